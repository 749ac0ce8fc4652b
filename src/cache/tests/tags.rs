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

fn policy(pattern: &str, secs: u64) -> crate::config::TagPolicy {
    crate::config::TagPolicy { r#match: pattern.to_owned(), ttl: Duration::from_secs(secs) }
}

#[tokio::test]
async fn the_first_matching_tag_policy_sets_the_ttl() {
    within(async {
        let h = Harness::start_tuned(u64::MAX, |c| {
            c.tag_policies = vec![policy("*:latest", 60), policy("docker.io/library/*:[0-9]*", 86_400)];
        })
        .await;
        for tag in ["latest", "1.27", "edge"] {
            h.upstream.put_manifest(tag, MANIFEST);
            assert_eq!(h.tag(tag).await, Ok(Source::Upstream(h.upstream.name.clone())));
        }
        h.upstream.take_requests();
        h.clock.advance(Duration::from_secs(61));
        assert_eq!(h.tag("latest").await, Ok(Source::Revalidated), "latest lives 1m");
        assert_eq!(h.tag("edge").await, Ok(Source::Cache), "no policy: tag_ttl");
        h.clock.advance(Duration::from_secs(TAG_TTL));
        assert_eq!(h.tag("1.27").await, Ok(Source::Cache), "a release tag lives 24h");
        assert_eq!(h.tag("edge").await, Ok(Source::Revalidated));
        assert_eq!(
            h.upstream.take_requests(),
            vec![(Method::HEAD, manifest_path("latest")), (Method::HEAD, manifest_path("edge"))]
        );
    })
    .await
}

#[tokio::test]
async fn a_tag_deleted_upstream_is_passed_on_or_kept_as_configured() {
    within(async {
        for keep in [false, true] {
            let h = Harness::start_tuned(u64::MAX, |c| c.keep_deleted_tags = keep).await;
            h.upstream.put_manifest("v1", MANIFEST);
            assert_eq!(h.tag("v1").await, Ok(Source::Upstream(h.upstream.name.clone())));
            h.upstream.delete_manifest("v1");
            h.clock.advance(Duration::from_secs(TAG_TTL + 1));
            let kept = h.metrics.cache_requests.with_label_values(&["manifest", "kept_deleted"]);
            if keep {
                assert_eq!(h.tag("v1").await, Ok(Source::Stale));
                assert_eq!(kept.get(), 1);
                h.upstream.take_requests();
                assert_eq!(h.tag("v1").await, Ok(Source::Cache), "kept for another TTL");
                assert_eq!(h.upstream.take_requests(), vec![]);
            } else {
                assert_eq!(h.tag("v1").await, Err(ErrorCode::ManifestUnknown));
                assert_eq!(kept.get(), 0);
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_forgotten_tag_is_asked_again_and_others_stay() {
    within(async {
        let h = Harness::start().await;
        for tag in ["v1", "v2"] {
            h.upstream.put_manifest(tag, MANIFEST);
            assert_eq!(h.tag(tag).await, Ok(Source::Upstream(h.upstream.name.clone())));
        }
        h.upstream.take_requests();
        let forgotten = h.cache.forget(&h.route, Some("v1")).await.unwrap();
        assert_eq!(forgotten, super::super::Forgotten { records: 1, every_replica: true });
        assert_eq!(h.tag("v1").await, Ok(Source::Upstream(h.upstream.name.clone())), "v1 was asked again");
        assert_eq!(h.tag("v2").await, Ok(Source::Cache));
        assert_eq!(h.upstream.take_requests(), vec![(Method::GET, manifest_path("v1"))]);

        // Every tag of the repository.
        assert_eq!(h.cache.forget(&h.route, None).await.unwrap().records, 2);
        assert_eq!(h.tag("v2").await, Ok(Source::Upstream(h.upstream.name.clone())));
        assert_eq!(h.upstream.take_requests(), vec![(Method::GET, manifest_path("v2"))]);
    })
    .await
}
