//! HTTPS for the listener: rustls with ALPN (`h2`, `http/1.1`), and a certificate that can be
//! replaced at run time (SIGHUP) without dropping connections: new handshakes get the new
//! certificate, established connections keep theirs.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// A certificate that can be swapped under running handshakes.
#[derive(Debug)]
struct Reloadable {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Reloadable {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|k| k.clone())
    }
}

/// The listener's TLS state.
pub struct Tls {
    acceptor: TlsAcceptor,
    resolver: Arc<Reloadable>,
    provider: Arc<CryptoProvider>,
    cert: PathBuf,
    key: PathBuf,
}

fn load(provider: &CryptoProvider, cert: &PathBuf, key: &PathBuf) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("tls.cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("tls.cert {}: no certificate in the file", cert.display()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("tls.key {}: {e}", key.display()))?;
    let signing =
        provider.key_provider.load_private_key(key_der).map_err(|e| format!("tls.key {}: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| format!("tls.cert and tls.key do not belong together: {e}"))?;
    Ok(certified)
}

impl Tls {
    /// Loads the certificate and key and builds the acceptor.
    pub fn new(config: &TlsConfig) -> Result<Arc<Tls>, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let key = load(&provider, &config.cert, &config.key)?;
        let resolver = Arc::new(Reloadable { current: RwLock::new(Arc::new(key)) });
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(Tls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            resolver,
            provider,
            cert: config.cert.clone(),
            key: config.key.clone(),
        }))
    }

    /// The acceptor for new connections.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// Re-reads the certificate and key files; on any error the current pair stays in use.
    pub fn reload(&self) -> Result<(), String> {
        let key = load(&self.provider, &self.cert, &self.key)?;
        let mut current = self.current_lock()?;
        *current = Arc::new(key);
        Ok(())
    }

    fn current_lock(&self) -> Result<std::sync::RwLockWriteGuard<'_, Arc<CertifiedKey>>, String> {
        self.resolver.current.write().map_err(|_| "certificate lock poisoned".to_owned())
    }
}
