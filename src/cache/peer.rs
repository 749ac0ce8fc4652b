//! The cache's side of a cluster's blob fetches: a fetch whose lease another replica holds
//! streams the owner's fetch in progress (and takes over from the upstreams when the owner
//! goes away), and the owner answers such requests from its fetch (`Cache::for_peer`).

use std::sync::Arc;
use std::time::Instant;

use super::fetch::{Ended, Received};
use super::Cache;
use crate::cluster::lease::fetch_key;
use crate::cluster::{Claim, Cluster, Lease};
use crate::distribution::{BlobAnswer, ByteRange, Digest, ErrorCode, ProtocolError};
use crate::storage::Storage;

/// What `Progress::upstream` and the access log say for bytes another replica sent.
pub(super) const PEER: &str = "peer";

/// Where a fetch gets its bytes.
pub(super) enum Origin {
    /// The upstreams, holding the cluster's lease for the digest when there is a cluster.
    Upstreams(Option<Lease>),
    /// The replica at this URL holds the lease: stream its fetch in progress (`None`: the
    /// holder cannot be asked yet; wait until the lease names one or lapses).
    Peer(Option<String>),
}

/// How streaming from the owner ended.
pub(super) enum PeerEnd {
    /// Every byte arrived (from the owner, or from the store once it was committed).
    Whole,
    /// The owner went away: go on from the upstreams, holding the lease (or alone, without
    /// Redis or after waiting too long for a lease that never lapses).
    Upstreams(Option<Lease>),
}

impl Received<'_> {
    /// Streams the blob from the replica that holds its lease, resuming from the bytes kept
    /// whenever that stream breaks: from the same owner, a new one, the store, or, once
    /// this replica takes the lease, the upstreams. Gives up waiting (and fetches alone)
    /// after three lease TTLs without a byte.
    pub(super) async fn through_peers(
        &mut self,
        cluster: &Arc<Cluster>,
        storage: &dyn Storage,
        mut owner: Option<String>,
        digest: &Digest,
    ) -> Result<PeerEnd, ProtocolError> {
        let patience = cluster.lease_ttl() * 3;
        let mut progress = (Instant::now(), self.kept);
        loop {
            if let Some(url) = &owner {
                if self.stream_owner(cluster, url, digest).await? {
                    return Ok(PeerEnd::Whole);
                }
            }
            if self.kept > progress.1 {
                progress = (Instant::now(), self.kept);
            }
            match cluster.claim(fetch_key(digest)).await {
                Claim::Owner(lease) => {
                    // The owner may have stored it before it went: the rest comes from there.
                    if self.rest_from_store(storage, digest).await? {
                        return Ok(PeerEnd::Whole);
                    }
                    self.metrics.cluster_fetches.with_label_values(&["takeover"]).inc();
                    tracing::info!(%digest, kept = self.kept, "the replica fetching this blob went away; taking over");
                    return Ok(PeerEnd::Upstreams(Some(lease)));
                }
                Claim::Alone => return Ok(PeerEnd::Upstreams(None)),
                Claim::Held(next) => {
                    if progress.0.elapsed() > patience {
                        tracing::warn!(%digest, "the replica holding this blob's lease sends nothing; fetching alone");
                        return Ok(PeerEnd::Upstreams(None));
                    }
                    if next.is_none() || next == owner {
                        tokio::time::sleep(cluster.poll_interval()).await;
                    }
                    owner = next;
                }
            }
        }
    }

    /// One request to the owner for the bytes not kept yet; `true` once the body ended whole.
    async fn stream_owner(&mut self, cluster: &Cluster, url: &str, digest: &Digest) -> Result<bool, ProtocolError> {
        let resp = match cluster.from_peer(url, digest, self.kept).await {
            Ok(resp) => resp,
            Err(why) => {
                tracing::debug!(%digest, %why, "the blob's owner cannot stream it");
                return Ok(false);
            }
        };
        let discard = match self.place(&resp, PEER) {
            Ok(discard) => discard,
            Err(reason) => {
                tracing::warn!(%digest, %reason, "the blob's owner answered with the wrong bytes");
                return Ok(false);
            }
        };
        self.from_peer = true;
        let copied = self.copy(resp.bytes_stream(), discard, PEER).await;
        self.from_peer = false;
        match copied? {
            Ok(()) => Ok(true),
            Err(reason) => {
                tracing::info!(%digest, %reason, kept = self.kept, "stream from the blob's owner broke; resuming");
                Ok(false)
            }
        }
    }

    /// The rest of the blob from the store, if it is there by now; `true` once it ended whole.
    async fn rest_from_store(&mut self, storage: &dyn Storage, digest: &Digest) -> Result<bool, ProtocolError> {
        let Ok(Some(size)) = storage.blob_size(digest).await else { return Ok(false) };
        let Ok(Some(body)) = storage.read_blob(digest, self.kept, size).await else { return Ok(false) };
        if self.place_span((self.kept, Some(size)), PEER).is_err() {
            return Ok(false);
        }
        self.from_peer = true;
        let copied = self.copy(body, 0, PEER).await;
        self.from_peer = false;
        Ok(copied?.is_ok())
    }
}

impl Cache {
    /// Who fetches `digest`: with a cluster, the replica that holds its lease; this one from
    /// the upstreams otherwise, with the role it is counted under once it starts (`None`: no
    /// cluster). `None`: the replica that held the lease stored the blob since.
    pub(super) async fn origin(&self, digest: &Digest) -> Option<(Origin, Option<&'static str>)> {
        let Some(cluster) = &self.cluster else { return Some((Origin::Upstreams(None), None)) };
        let (origin, role) = match cluster.claim(fetch_key(digest)).await {
            Claim::Owner(lease) => {
                // The last owner may have stored it and let go between our look and the claim.
                if let Ok(Some(_)) = self.storage.blob_size(digest).await {
                    return None;
                }
                (Origin::Upstreams(Some(lease)), "owner")
            }
            Claim::Held(owner) => (Origin::Peer(owner), "peer"),
            Claim::Alone => (Origin::Upstreams(None), "alone"),
        };
        Some((origin, Some(role)))
    }

    /// For a fetch whose lease another replica holds, streams the owner's bytes; `Ok(lease)`
    /// when the rest must come from the upstreams (holding the lease if this replica took it
    /// over), `Err` with how the fetch ended otherwise (whole from the owner, or failed).
    pub(super) async fn after_peers<'a>(
        &self,
        mut received: Received<'a>,
        origin: Origin,
        digest: &Digest,
    ) -> Result<(Received<'a>, Option<Lease>), Ended> {
        let (owner, cluster) = match (origin, &self.cluster) {
            (Origin::Upstreams(lease), _) => return Ok((received, lease)),
            (Origin::Peer(_), None) => return Ok((received, None)),
            (Origin::Peer(owner), Some(cluster)) => (owner, cluster),
        };
        let ended = |result, staged_bytes| Ended { result, staged_bytes, publish: false, lease: None };
        match received.through_peers(cluster, &*self.storage, owner, digest).await {
            Ok(PeerEnd::Whole) => {
                let result = match received.finish().await {
                    Ok(()) => received.verify(digest, None),
                    Err(e) => Err(e),
                };
                Err(ended(result, 0))
            }
            Ok(PeerEnd::Upstreams(lease)) => Ok((received, lease)),
            Err(e) => Err(ended(Err(e), received.staged_bytes)),
        }
    }

    /// What the owner of a fetch answers another replica: the fetch in progress, the same
    /// frames as its own clients get (the last byte after the verdict), or the blob once it
    /// is stored. Never starts a fetch: a replica asks the owner only while it holds the lease.
    pub async fn for_peer(
        self: &Arc<Self>,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<BlobAnswer, ProtocolError> {
        if let Some((reader, _)) = self.try_join(digest)? {
            return self.answer_from(reader, digest, range).await;
        }
        match self.storage.blob_size(digest).await {
            Ok(Some(size)) => {
                let span = match range {
                    Some(r) => Some(r.resolve(size).ok_or_else(|| crate::distribution::unsatisfiable(size))?),
                    None => None,
                };
                let (start, end) = span.map(|(s, e)| (s, e + 1)).unwrap_or((0, size));
                if let Ok(Some(body)) = self.storage.read_blob(digest, start, end).await {
                    let source = crate::distribution::Source::Cache;
                    return Ok(BlobAnswer { size: Some(size), range: span, body: Some(body), source, redirect: None });
                }
                Err(ProtocolError::new(ErrorCode::BlobUnknown, format!("no fetch of {digest} here")))
            }
            _ => Err(ProtocolError::new(ErrorCode::BlobUnknown, format!("no fetch of {digest} here"))),
        }
    }
}
