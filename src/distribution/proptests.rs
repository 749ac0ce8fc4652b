//! Property tests for every parser here that takes outside input: no input panics, valid input
//! round-trips, and what a parser accepts is what the spec's grammar allows.

use proptest::prelude::*;

use super::*;

const COMPONENT: &str = "[a-z0-9]{1,8}((\\.|_|__|-{1,3})[a-z0-9]{1,8}){0,2}";

proptest! {
    #[test]
    fn any_name_parses_or_is_refused_without_panic(s in "\\PC{0,300}") {
        if let Ok(n) = RepoName::parse(&s) {
            prop_assert_eq!(n.as_str(), s.as_str());
            prop_assert!(!s.contains("..") && !s.starts_with('/') && !s.ends_with('/') && !s.contains("//"));
            prop_assert!(s.len() <= MAX_NAME_LEN);
        }
    }

    #[test]
    fn grammar_names_round_trip(parts in proptest::collection::vec(COMPONENT, 1..5)) {
        let s = parts.join("/");
        let n = RepoName::parse(&s).unwrap();
        prop_assert_eq!(n.to_string(), s);
        prop_assert_eq!(n.components(), parts.len());
    }

    #[test]
    fn any_reference_parses_or_is_refused_without_panic(s in "\\PC{0,200}") {
        match Reference::parse(&s) {
            Ok(r) => prop_assert_eq!(r.to_string(), s),
            Err(e) => prop_assert!(matches!(e.code, ErrorCode::ManifestInvalid | ErrorCode::DigestInvalid)),
        }
    }

    #[test]
    fn tags_and_digests_round_trip(tag in "[A-Za-z0-9_][A-Za-z0-9._-]{0,127}", hex in "[0-9a-f]{64}") {
        prop_assert_eq!(Reference::parse(&tag).unwrap(), Reference::Tag(tag.clone()));
        let d = format!("sha256:{hex}");
        let parsed = Digest::parse(&d).unwrap();
        prop_assert_eq!(parsed.to_string(), d.clone());
        prop_assert_eq!(Reference::parse(&d).unwrap(), Reference::Digest(parsed));
    }

    #[test]
    fn ranges_never_panic_and_resolve_inside_the_blob(h in "\\PC{0,40}", size in 0u64..u64::MAX) {
        if let Some(r) = ByteRange::parse(&h) {
            if let Some((start, end)) = r.resolve(size) {
                prop_assert!(start <= end && end < size);
            }
        }
    }

    #[test]
    fn well_formed_ranges_round_trip(a in 0u64..1 << 40, len in 0u64..1 << 40, size in 1u64..1 << 41) {
        let r = ByteRange::parse(&format!("bytes={a}-{}", a + len)).unwrap();
        prop_assert_eq!(r, ByteRange::From(a, Some(a + len)));
        match r.span(size) {
            Ok((s, e)) => prop_assert!(s == a && e == (a + len).min(size - 1)),
            Err(err) => prop_assert!(a >= size && err.code == ErrorCode::RangeInvalid),
        }
    }

    #[test]
    fn accept_lists_never_panic(values in proptest::collection::vec("[ -~]{0,80}", 0..4)) {
        let mut headers = http::HeaderMap::new();
        for v in &values {
            if let Ok(v) = http::HeaderValue::from_str(v) {
                headers.append(http::header::ACCEPT, v);
            }
        }
        let list = accept_list(&headers);
        prop_assert!(list.iter().all(|t| !t.is_empty() && !t.contains(',')));
        let _ = accepts(&list, OCI_INDEX);
    }

    #[test]
    fn api_paths_never_panic(path in "[a-z0-9/._-]{0,40}(/manifests/|/blobs/|/blobs/uploads/|/tags/list|/referrers/)?[a-zA-Z0-9:._-]{0,20}") {
        if let Some(api) = split_api(&path) {
            prop_assert!(path.starts_with(api.name));
        }
    }
}
