//! Invalidations that reach every replica at once (`ferry cache forget`): one Redis pub/sub
//! channel. The replica that forgets publishes; every replica (itself included) subscribes and
//! drops the tags from its memory tier. The stored tag records are in the shared bucket and
//! are removed by the replica that forgets, so a replica that missed a message (it was
//! reconnecting, or not yet subscribed) only has to empty its memory tier of tags to be right
//! again, and it does so on every subscription, the first included.

use std::sync::Arc;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{Cluster, PROBE_INTERVAL};

/// The channel every replica listens on.
const CHANNEL: &str = "ferry:invalidate";

/// What the receivers of [`Cluster::invalidations`] must drop from memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Invalidation {
    /// The tags of one repository of one registry: one tag, or every tag (`tag: None`).
    Tags {
        /// Canonical registry name.
        registry: String,
        /// Repository as the upstream knows it.
        repo: String,
        /// One tag, or all.
        tag: Option<String>,
    },
    /// Messages may have been missed (the subscription was re-established): every tag.
    Everything,
}

/// Invalidations queued for the cache before the subscriber waits for it (they are tiny, and
/// a slow cache only delays the subscriber: Redis buffers the channel meanwhile).
const QUEUE: usize = 256;

impl Cluster {
    /// Tells every replica (this one included) to drop `inv`; `false` if Redis did not take it
    /// (the other replicas then keep their memory tier's entry for at most its TTL).
    pub async fn publish(&self, inv: &Invalidation) -> bool {
        let Ok(payload) = serde_json::to_string(inv) else { return false };
        self.command(move |mut c| async move {
            redis::cmd("PUBLISH").arg(CHANNEL).arg(payload).query_async::<i64>(&mut c).await
        })
        .await
        .is_some()
    }

    /// The invalidations published by any replica, as they arrive, with
    /// [`Invalidation::Everything`] after every subscription (messages may have been missed). The subscription ends when the
    /// receiver is dropped.
    pub fn invalidations(self: &Arc<Self>) -> mpsc::Receiver<Invalidation> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (client, timeout) = (self.client.clone(), self.timeout);
        tokio::spawn(async move {
            while !tx.is_closed() {
                match tokio::time::timeout(timeout, subscribe(&client)).await {
                    Ok(Ok(pubsub)) => {
                        // Whatever was published while this replica was not subscribed (before
                        // the first subscription too: the memory tier may already hold tags).
                        if tx.send(Invalidation::Everything).await.is_err() {
                            return;
                        }
                        if !relay(pubsub, &tx).await {
                            return;
                        }
                        tracing::info!("the invalidation channel closed; subscribing again");
                    }
                    Ok(Err(e)) => tracing::debug!(error = ?e.kind(), "cannot subscribe to invalidations"),
                    Err(_) => {
                        tracing::debug!("cannot subscribe to invalidations: no answer within cluster.redis_timeout")
                    }
                }
                tokio::time::sleep(PROBE_INTERVAL).await;
            }
        });
        rx
    }
}

async fn subscribe(client: &redis::Client) -> redis::RedisResult<redis::aio::PubSub> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(CHANNEL).await?;
    Ok(pubsub)
}

/// Forwards messages until the connection ends (`true`) or the receiver is gone (`false`).
async fn relay(pubsub: redis::aio::PubSub, tx: &mpsc::Sender<Invalidation>) -> bool {
    let mut messages = pubsub.into_on_message();
    while let Some(msg) = messages.next().await {
        let Ok(inv) = serde_json::from_slice::<Invalidation>(msg.get_payload_bytes()) else {
            tracing::warn!("ignoring a malformed message on {CHANNEL}");
            continue;
        };
        if tx.send(inv).await.is_err() {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_form_is_stable_json() {
        let inv = Invalidation::Tags { registry: "docker.io".into(), repo: "library/nginx".into(), tag: None };
        let text = serde_json::to_string(&inv).unwrap();
        assert_eq!(text, r#"{"Tags":{"registry":"docker.io","repo":"library/nginx","tag":null}}"#);
        assert_eq!(serde_json::from_str::<Invalidation>(&text).unwrap(), inv);
    }
}
