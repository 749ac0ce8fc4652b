//! The blob coalescer: one upstream GET for many readers, failures, failover and limits.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_readers_of_a_cold_blob_share_one_upstream_get() {
    within(async {
        let mut h = Harness::start().await;
        let (blob, digest) = h.cold_blob((3 << 20) + 12_345, false);

        let bodies = futures_util::future::join_all((0..16).map(|_| h.get_blob(&digest))).await;
        // Every reader is in before a byte moves: each fetch would have sent its GET by now.
        let gets = h.upstream.take_requests();
        assert_eq!(gets, vec![(Method::GET, format!("/v2/library/app/blobs/{digest}"))]);
        assert_eq!((h.blob_requests("miss"), h.blob_requests("coalesced")), (1, 15));

        let readers = spawn_readers(bodies);
        feed(&h.upstream.next_feed().await, blob.clone());
        assert_got(readers, &blob).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_leaves_mid_way_does_not_cancel_the_fetch_for_the_others() {
    within(async {
        let mut h = Harness::start().await;
        let (blob, digest) = h.cold_blob(2 << 20, false);

        // The first reader started the fetch; it reads a little and goes.
        let mut first = h.get_blob(&digest).await;
        let second = h.get_blob(&digest).await;
        let (progress, tx) = h.in_flight(&digest).await;
        feed(&tx, blob.slice(..blob.len() / 2));
        let chunk = first.next().await.unwrap().unwrap();
        assert!(!chunk.is_empty() && chunk == blob.slice(..chunk.len()));
        drop(first);

        feed(&tx, blob.slice(blob.len() / 2..));
        drop(tx);
        assert_got(spawn_readers(vec![second]), &blob).await;
        ended(progress).await;
        assert_eq!(h.storage.blob_size(&digest).await.unwrap(), Some(blob.len() as u64), "the blob was cached");
        assert_eq!(h.upstream.take_requests().len(), 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_fetch_fails_every_reader_and_commits_nothing() {
    within(async {
        let mut h = Harness::start().await;
        // Chunked: the fetch cannot reach its verdict before the test ends the body.
        let (blob, digest) = h.cold_blob(1 << 20, true);
        let len = blob.len();
        let mut corrupt = blob.to_vec();
        corrupt[700_000] ^= 0xff;

        let mut watched = h.get_blob(&digest).await;
        let others = spawn_readers(futures_util::future::join_all((0..3).map(|_| h.get_blob(&digest))).await);
        let (mut progress, tx) = h.in_flight(&digest).await;
        feed_until_written(&tx, &mut progress, corrupt.into(), len).await;

        // Every byte is on disk and the verdict is not in: a reader gets all but the last, so
        // no response can complete with a corrupt blob. (Reads go up to what they may send,
        // so one that crossed the held-back byte would have it.)
        let mut got = 0;
        while got < len - 1 {
            got += watched.next().await.unwrap().unwrap().len();
        }
        assert_eq!(got, len - 1, "a reader got the last byte before the verdict");
        drop(tx);
        assert!(watched.next().await.unwrap().is_err(), "the watched reader's stream did not fail");
        for r in others {
            let (got, err) = r.await.unwrap();
            assert!(err.is_some(), "a reader's stream ended cleanly");
            assert!(got.len() < len, "a reader got the whole corrupt blob");
        }
        ended(progress).await;
        assert_eq!(h.storage.blob_size(&digest).await.unwrap(), None, "the corrupt blob was committed");
        assert_eq!(h.staging_files(), 0, "the staging file was left behind");
        assert_eq!(h.metrics.digest_mismatches.get(), 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_joins_at_ninety_percent_still_gets_every_byte() {
    within(async {
        let mut h = Harness::start().await;
        let (blob, digest) = h.cold_blob(4 << 20, false);

        let first = spawn_readers(vec![h.get_blob(&digest).await]);
        let (mut progress, tx) = h.in_flight(&digest).await;
        let ninety = blob.len() * 9 / 10;
        feed_until_written(&tx, &mut progress, blob.slice(..ninety), ninety).await;

        let late = h.get_blob(&digest).await;
        assert_eq!(h.blob_requests("coalesced"), 1, "the late reader started a fetch of its own");
        assert_eq!(h.upstream.take_requests().len(), 1);
        let late = spawn_readers(vec![late]);
        feed(&tx, blob.slice(ninety..));
        drop(tx);
        assert_got(first.into_iter().chain(late).collect(), &blob).await;
    })
    .await
}

#[tokio::test]
async fn failovers_count_failed_requests_but_not_rejected_answers() {
    within(async {
        let h = Harness::start().await;
        let failovers = |reason: &str| {
            let labels = ["docker.io", h.upstream.name.as_str(), reason];
            h.metrics.upstream_failovers.with_label_values(&labels).get()
        };
        // A request that fails (503) is a failover.
        h.upstream.set_down(true);
        assert_eq!(h.tag("v1").await, Err(ErrorCode::Unavailable));
        assert_eq!(failovers("5xx"), 1);

        // An answer whose bytes do not match the digest asked for is rejected: the upstream's
        // health hears of it (its circuit opens at once), the failover count does not.
        h.upstream.set_down(false);
        let digest = Digest::of(b"what was asked for");
        h.upstream.put_manifest(&digest.to_string(), MANIFEST);
        let reference = Reference::Digest(digest);
        let err = h.cache.manifest(&h.route, &reference, &[]).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Unavailable);
        assert!(err.message.contains("circuit open"), "{}", err.message);
        assert_eq!((failovers("digest_mismatch"), h.metrics.digest_mismatches.get()), (0, 1));
        assert_eq!(h.upstream.take_requests().len(), 2, "the open circuit was dialled");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_longer_than_it_may_be_is_cut_off_and_never_cached() {
    within(async {
        const LIMIT: u64 = 256 * 1024;
        let mut h = Harness::start_with(LIMIT).await;
        // Announced too long: refused before a byte is read.
        let (_, announced) = h.cold_blob(1 << 20, false);
        let refused = h.cache.blob(&h.route, &announced, None, false).await.err().expect("a refusal");
        assert!(refused.message.contains("may have"), "{}", refused.message);

        // An endless chunked body: cut off at the limit, however much the upstream sends.
        let (_, endless) = h.cold_blob(1 << 20, true);
        let reader = spawn_readers(vec![h.get_blob(&endless).await]);
        let (mut progress, tx) = h.in_flight(&endless).await;
        let endless_body = blob_bytes(2 << 20);
        for chunk in endless_body.chunks(64 * 1024) {
            // The fetch hangs up on it at the limit.
            if tx.send(endless_body.slice_ref(chunk)).is_err() {
                break;
            }
        }
        // Later attempts (resumes) end at once: the upstream closes them empty.
        let mut feeds = std::mem::replace(&mut h.upstream.feeds, mpsc::unbounded_channel().1);
        let drain = tokio::spawn(async move {
            while let Some(f) = feeds.recv().await {
                drop(f)
            }
        });
        let mut most = 0;
        while progress.changed().await.is_ok() {
            most = most.max(progress.borrow().received);
        }
        assert!(most <= LIMIT, "{most} bytes kept of a blob that may have {LIMIT}");
        let (got, err) = reader.into_iter().next().unwrap().await.unwrap();
        assert!(err.is_some() && got.len() as u64 <= LIMIT, "the reader got {} bytes and no error", got.len());
        assert_eq!(h.storage.blob_size(&endless).await.unwrap(), None, "the cut-off blob was committed");
        assert_eq!(h.staging_files(), 0, "the staging file was left behind");
        drop(tx);
        drain.abort();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_missed_the_store_just_before_a_commit_is_served_the_committed_blob() {
    within(async {
        let mut h = Harness::start().await;
        let (blob, digest) = h.cold_blob(100_000, false);
        let first = spawn_readers(vec![h.get_blob(&digest).await]);
        let (progress, tx) = h.in_flight(&digest).await;
        feed(&tx, blob.clone());
        drop(tx);
        assert_got(first, &blob).await;
        ended(progress).await;
        h.upstream.take_requests();

        // A request whose look at the store came before the commit reaches the fetch map after
        // the fetch left it: it must find the blob, not fetch it again.
        let again = h.cache.join_or_start(&h.route, &digest).await.unwrap();
        assert!(again.is_none(), "a second fetch was started for a committed blob");
        assert!(h.upstream.take_requests().is_empty());
    })
    .await
}
