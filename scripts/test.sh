#!/usr/bin/env bash
# Runs Ferry's whole test suite: unit tests and the end-to-end tests against a real
# Distribution registry (Debian's docker-registry) with real clients (skopeo, containerd) and
# real S3-compatible servers (s3s-fs from crates.io, moto from PyPI).
# Installs the Debian packages the tests need when they are missing (as root), or stops
# with the command to run. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/lib/packages.sh
source scripts/lib/packages.sh
ensure_packages test.sh docker-registry=docker-registry skopeo=skopeo htpasswd=apache2-utils \
  openssl=openssl curl=curl containerd=containerd ctr=containerd redis-server=redis-server

ensure_s3s_fs
ensure_moto

cargo test --locked "$@"
# The pull-through, cache, durability and hosted suites once more with every Ferry on a bucket
# (one shared s3s-fs; see tests/e2e/harness/s3.rs). Only for the whole suite, not a selection.
if (($# == 0)); then
  echo "test.sh: the e2e suites again, on S3 (FERRY_E2E_STORAGE=s3)" >&2
  FERRY_E2E_STORAGE=s3 cargo test --locked --test e2e -- pull_through:: cache:: durability:: hosted::
fi
