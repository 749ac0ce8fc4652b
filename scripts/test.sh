#!/usr/bin/env bash
# Runs Ferry's whole test suite: unit tests and the end-to-end tests against a real
# Distribution registry (Debian's docker-registry) with real clients (skopeo).
# Installs the Debian packages the tests need when they are missing (as root), or stops
# with the command to run. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/lib/packages.sh
source scripts/lib/packages.sh
ensure_packages test.sh docker-registry=docker-registry skopeo=skopeo htpasswd=apache2-utils \
  openssl=openssl curl=curl containerd=containerd ctr=containerd

exec cargo test --locked "$@"
