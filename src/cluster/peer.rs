//! Replica-to-replica requests: a replica whose client asks for a blob another replica is
//! fetching streams it from that owner, as the owner receives it
//! (`GET /_ferry/peer/blobs/<digest>`, answered from the owner's fetch in progress with the
//! same rule as every client: the last byte only after the digest verdict).
//!
//! Each request carries `X-Ferry-Peer: <expiry>.<hex HMAC-SHA256>` over the digest and the
//! expiry, keyed by a key derived from the cluster secret: the endpoint is no way around
//! the access rules for anyone without the secret, and a captured header opens one blob for a
//! minute.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{KeyInit, Mac};

use super::Cluster;
use crate::distribution::Digest;

/// Where a replica serves the fetches it owns to the other replicas.
pub const PATH: &str = "/_ferry/peer/blobs/";

/// The header that proves a request comes from a replica.
pub const HEADER: &str = "x-ferry-peer";

/// How long a signed request stays valid (clocks of replicas may differ this much, too).
const VALIDITY: Duration = Duration::from_secs(60);

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The client replicas ask each other with: no proxy (replicas reach each other directly),
/// short connects, and reads that may idle while the owner's upstream is slow.
pub(super) fn client(lease_ttl: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(2))
        .read_timeout(Duration::from_secs(30).max(lease_ttl * 3))
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

impl Cluster {
    fn mac(&self, digest: &Digest, expiry: u64) -> Option<HmacSha256> {
        let mut mac = HmacSha256::new_from_slice(&self.peer_key).ok()?;
        mac.update(format!("blob {digest} {expiry}").as_bytes());
        Some(mac)
    }

    /// The `X-Ferry-Peer` value for a request of `digest`.
    pub fn sign(&self, digest: &Digest) -> String {
        let expiry = now_secs() + VALIDITY.as_secs();
        let sig = self.mac(digest, expiry).map(|m| hex::encode(m.finalize().into_bytes())).unwrap_or_default();
        format!("{expiry}.{sig}")
    }

    /// Whether `header` is a valid, unexpired signature for `digest` by a replica.
    pub fn verify(&self, header: &str, digest: &Digest) -> bool {
        let Some((expiry, sig)) = header.split_once('.') else { return false };
        let (Ok(expiry), Ok(sig)) = (expiry.parse::<u64>(), hex::decode(sig)) else { return false };
        let now = now_secs();
        if expiry < now || expiry > now + 2 * VALIDITY.as_secs() {
            return false;
        }
        self.mac(digest, expiry).is_some_and(|m| m.verify_slice(&sig).is_ok())
    }

    /// Asks the replica at `owner` for `digest` from byte `from` on. An answer that is not
    /// 200 or 206 is an error (the owner has no such fetch any more, or is someone else).
    pub async fn from_peer(&self, owner: &str, digest: &Digest, from: u64) -> Result<reqwest::Response, String> {
        let mut req = self.peers.get(format!("{owner}{PATH}{digest}")).header(HEADER, self.sign(digest));
        if from > 0 {
            req = req.header(http::header::RANGE, format!("bytes={from}-"));
        }
        let resp = req.send().await.map_err(|e| crate::upstream::error_chain(&e))?;
        match resp.status().as_u16() {
            200 | 206 => Ok(resp),
            s => Err(format!("the owner answered {s}")),
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClusterConfig;

    fn cluster(secret: &str) -> std::sync::Arc<Cluster> {
        let dir = std::env::temp_dir().join(format!("ferry-peer-{}", uuid::Uuid::new_v4().simple()));
        std::fs::write(&dir, secret).unwrap();
        let config = ClusterConfig {
            redis: "redis://127.0.0.1:1/0".into(),
            advertise: "http://127.0.0.1:1".into(),
            secret_file: dir.clone(),
            lease_ttl: Duration::from_secs(10),
            redis_timeout: Duration::from_secs(1),
        };
        let c = Cluster::new(&config, std::sync::Arc::new(crate::metrics::Metrics::new().unwrap())).unwrap();
        std::fs::remove_file(dir).unwrap();
        c
    }

    #[tokio::test]
    async fn only_a_replica_with_the_secret_can_sign_for_a_blob() {
        let d = Digest::of(b"layer");
        let other = Digest::of(b"another layer");
        let (a, b) = (cluster("the same secret, 32 bytes long.."), cluster("the same secret, 32 bytes long.."));
        let stranger = cluster("a different secret of some length");
        let header = a.sign(&d);
        assert!(b.verify(&header, &d), "replicas share the secret");
        assert!(!b.verify(&header, &other), "a signature opens one blob");
        assert!(!stranger.verify(&header, &d), "another cluster's signature");
        let (expiry, sig) = header.split_once('.').unwrap();
        let later = format!("{}.{sig}", expiry.parse::<u64>().unwrap() + 30);
        assert!(!b.verify(&later, &d), "the expiry is signed");
        assert!(!b.verify(&format!("{}.{sig}", now_secs() - 1), &d), "expired");
        assert!(!b.verify("garbage", &d) && !b.verify("1.zz", &d));
    }
}
