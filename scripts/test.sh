#!/usr/bin/env bash
# Runs Ferry's whole test suite: unit tests and the end-to-end tests against a real
# Distribution registry (Debian's docker-registry) with real clients (skopeo, containerd) and
# a real S3-compatible server (s3s-fs).
# Installs the Debian packages the tests need when they are missing (as root), or stops
# with the command to run. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/lib/packages.sh
source scripts/lib/packages.sh
ensure_packages test.sh docker-registry=docker-registry skopeo=skopeo htpasswd=apache2-utils \
  openssl=openssl curl=curl containerd=containerd ctr=containerd

# The S3-compatible server of the storage.s3 tests, from crates.io: 0.14.1 is the newest that
# builds on rustc 1.92+ (0.17 needs 1.96). Kept under target/ so a clean clone builds it once.
export PATH="$PWD/target/tools/bin:$PATH"
if ! command -v s3s-fs >/dev/null 2>&1; then
  echo "test.sh: installing s3s-fs 0.14.1 into target/tools (cargo install, about 2 minutes)" >&2
  cargo install --quiet --locked --root target/tools s3s-fs@0.14.1 --features binary
fi

cargo test --locked "$@"
# The pull-through, cache, durability and hosted suites once more with every Ferry on a bucket
# (one shared s3s-fs; see tests/e2e/harness/s3.rs). Only for the whole suite, not a selection.
if (($# == 0)); then
  echo "test.sh: the e2e suites again, on S3 (FERRY_E2E_STORAGE=s3)" >&2
  FERRY_E2E_STORAGE=s3 cargo test --locked --test e2e -- pull_through:: cache:: durability:: hosted::
fi
