//! Tag freshness and stale-if-error, by the manual clock.

use super::*;

#[tokio::test]
async fn a_fresh_tag_asks_no_upstream_and_an_expired_one_costs_one_head() {
    within(async {
        let h = Harness::start().await;
        h.upstream.put_manifest("v1", MANIFEST);
        assert_eq!(h.tag("v1").await, Ok(Source::Upstream(h.upstream.name.clone())));
        assert_eq!(h.upstream.take_requests(), vec![(Method::GET, manifest_path("v1"))]);

        h.clock.advance(Duration::from_secs(TAG_TTL - 1));
        assert_eq!(h.tag("v1").await, Ok(Source::Cache));
        assert_eq!(h.upstream.take_requests(), vec![], "a fresh tag asked the upstream");

        h.clock.advance(Duration::from_secs(2));
        assert_eq!(h.tag("v1").await, Ok(Source::Revalidated));
        assert_eq!(h.upstream.take_requests(), vec![(Method::HEAD, manifest_path("v1"))]);

        // The revalidation starts a new TTL.
        h.clock.advance(Duration::from_secs(TAG_TTL - 1));
        assert_eq!(h.tag("v1").await, Ok(Source::Cache));
        assert_eq!(h.upstream.take_requests(), vec![]);
    })
    .await
}

#[tokio::test]
async fn with_the_upstream_down_a_tag_is_served_stale_until_serve_stale_has_passed() {
    within(async {
        let h = Harness::start().await;
        h.upstream.put_manifest("v1", MANIFEST);
        assert_eq!(h.tag("v1").await, Ok(Source::Upstream(h.upstream.name.clone())));
        h.upstream.set_down(true);

        h.clock.set(T0 + TAG_TTL + 1);
        assert_eq!(h.tag("v1").await, Ok(Source::Stale));
        h.clock.set(T0 + SERVE_STALE);
        assert_eq!(h.tag("v1").await, Ok(Source::Stale), "at serve_stale exactly it is still served");
        h.clock.set(T0 + SERVE_STALE + 1);
        assert_eq!(h.tag("v1").await, Err(ErrorCode::Unavailable));
        assert_eq!(h.metrics.cache_requests.with_label_values(&["manifest", "stale"]).get(), 2);
    })
    .await
}

#[tokio::test]
async fn a_request_that_read_the_store_before_a_tag_flight_ended_is_served_its_answer() {
    within(async {
        let h = Harness::start().await;
        h.upstream.put_manifest("v1", MANIFEST);
        assert_eq!(h.tag("v1").await, Ok(Source::Upstream(h.upstream.name.clone())));
        h.upstream.take_requests();
        // What a request holds whose store read came before that flight wrote the tag: nothing.
        let again = h.cache.tag_flight(&h.route, "v1", None, &[]).await.map(|(_, s)| s).map_err(|e| e.code);
        assert_eq!(again, Ok(Source::Cache));
        assert_eq!(h.upstream.take_requests(), vec![], "a second upstream fetch of the tag");
    })
    .await
}
