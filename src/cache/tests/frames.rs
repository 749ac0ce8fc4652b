//! The frames of a fetch: shared with the readers that keep up, kept for those behind only
//! while the disk has no copy.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_keep_up_are_sent_the_frames_the_fetch_received() {
    within(async {
        let mut h = Harness::start().await;
        let (blob, digest) = h.cold_blob(4 << 20, false);
        let mut bodies = vec![h.get_blob(&digest).await, h.get_blob(&digest).await];
        let (mut progress, tx) = h.in_flight(&digest).await;
        feed_until_written(&tx, &mut progress, blob.slice(..128 * 1024), 128 * 1024).await;

        // Both readers' first chunk is the same memory: the frame the upstream filled, not a
        // copy of it and not a read of the staging file.
        let a = bodies[0].next().await.unwrap().unwrap();
        let b = bodies[1].next().await.unwrap().unwrap();
        assert!(!a.is_empty() && a == blob.slice(..a.len()));
        assert_eq!(a.as_ptr(), b.as_ptr(), "the readers were sent copies");
        assert!(h.ring_budget.held() > 0);

        feed(&tx, blob.slice(128 * 1024..));
        drop(tx);
        let rest = spawn_readers(bodies);
        for r in rest {
            let (got, err) = r.await.unwrap();
            assert!(err.is_none(), "{err:?}");
            assert!([&a[..], &got[..]].concat() == blob, "a reader did not get the blob");
        }
        ended(progress).await;
        assert_eq!(h.ring_budget.held(), 0, "an ended fetch still holds ring memory");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_does_not_read_holds_up_neither_the_fetch_nor_the_others() {
    within(async {
        let mut h = Harness::start().await;
        // Eight rings' worth: the ring cannot keep it all for the reader that does not read.
        let (blob, digest) = h.cold_blob(8 * RING as usize, false);
        let stalled = h.get_blob(&digest).await;
        let reading = spawn_readers(vec![h.get_blob(&digest).await]);
        let (progress, tx) = h.in_flight(&digest).await;
        feed(&tx, blob.clone());
        drop(tx);
        assert_got(reading, &blob).await;
        ended(progress).await;
        assert_eq!(h.storage.blob_size(&digest).await.unwrap(), Some(blob.len() as u64), "the blob was not cached");
        assert_eq!(h.ring_budget.held(), 0);

        // The stalled reader still gets every byte, from the file the fetch left behind.
        assert_got(spawn_readers(vec![stalled]), &blob).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_room_on_disk_the_fetch_waits_for_its_slowest_reader_and_both_get_every_byte() {
    within(async {
        let mut h = Harness::start().await;
        // The disk refuses the staging file: the ring is the only copy of the bytes.
        std::fs::remove_dir_all(h.dir.path().join(layout::STAGING_DIR)).unwrap();
        let (blob, digest) = h.cold_blob(8 * RING as usize, false);
        let slow = h.get_blob(&digest).await;
        let fast = spawn_readers(vec![h.get_blob(&digest).await]);
        let (mut progress, feed_tx) = h.in_flight(&digest).await;
        feed(&feed_tx, blob.clone());
        drop(feed_tx);
        // More than a ring's worth has arrived and the slow reader took none of it: its
        // frames must still be there (a ring that let them go fails this reader).
        progress.wait_for(|p| p.received > RING).await.unwrap();
        assert!(h.ring_budget.held() > RING, "frames the slow reader needs left the ring");
        assert_got(spawn_readers(vec![slow]), &blob).await;
        assert_got(fast, &blob).await;
        assert_eq!(h.storage.blob_size(&digest).await.unwrap(), None, "cached without a staging file");
        assert_eq!(h.ring_budget.held(), 0);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_breaks_mid_way_is_resumed_and_every_reader_sees_one_whole_blob() {
    within(async {
        let mut h = Harness::start().await;
        let (blob, digest) = h.cold_blob(4 * RING as usize, false);
        let keeping_up = spawn_readers(vec![h.get_blob(&digest).await]);
        let stalled = h.get_blob(&digest).await;
        let (mut progress, tx) = h.in_flight(&digest).await;
        // Half the blob, then the upstream's connection breaks (shorter than it announced).
        let half = blob.len() / 2;
        feed_until_written(&tx, &mut progress, blob.slice(..half), half).await;
        drop(tx);
        // The fake ignores Range and sends the whole blob again: the fetch drops what it has.
        let tx = h.upstream.next_feed().await;
        feed(&tx, blob.clone());
        drop(tx);
        assert_got(keeping_up, &blob).await;
        assert_got(spawn_readers(vec![stalled]), &blob).await;
        ended(progress).await;
        let gets = h.upstream.take_requests().into_iter().filter(|(m, _)| m == Method::GET).count();
        assert_eq!(gets, 2, "one GET, one resume");
        assert_eq!(h.storage.blob_size(&digest).await.unwrap(), Some(blob.len() as u64));
    })
    .await
}
