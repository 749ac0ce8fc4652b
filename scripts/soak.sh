#!/usr/bin/env bash
# The soak (not part of CI's run): 64 clients pulling and pushing through a fault proxy that
# injects resets, stalls and 5xx, beside an idle/slowloris crowd, for FERRY_SOAK_SECS seconds
# (default 600, at most 600). Prints requests, unrecovered errors (goal 0), p99, and Ferry's
# RSS and descriptors every 10 s (goal: flat), then the bytes verified.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/packages.sh
source scripts/lib/packages.sh
ensure_packages soak.sh docker-registry=docker-registry skopeo=skopeo htpasswd=apache2-utils
export FERRY_SOAK_SECS="${FERRY_SOAK_SECS:-600}"
exec cargo test --release --locked --test e2e soak -- --ignored --nocapture
