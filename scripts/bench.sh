#!/usr/bin/env bash
# Runs Ferry's benchmarks (issue 7).
#
#   scripts/bench.sh          end-to-end comparison with Distribution's proxy and nginx (benches/e2e.rs):
#                             prints one Markdown table on stdout, progress on stderr (~10 min on 2 cores)
#   scripts/bench.sh micro    criterion micro benches (benches/micro.rs)
#   scripts/bench.sh all      both
#
# Installs the Debian packages the e2e bench drives when they are missing (as root, or through
# sudo), builds Ferry in release and runs the bench against that binary. Environment passed
# through: FERRY_BENCH_ONLY=1a,1b,2,3a,3b,4,5,6,7,8 (subset; 8 is the 3-replica cluster on
# s3s-fs and redis-server), FERRY_BENCH_QUICK=1 (smoke test), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

what="${1:-e2e}"
case "$what" in
  e2e | micro | all) ;;
  *)
    echo "usage: $0 [e2e|micro|all]" >&2
    exit 2
    ;;
esac

if [[ $what != micro ]]; then
  # The shaped link is a relay inside the bench (no netem here), so no tc/iproute2 is needed.
  # shellcheck source=scripts/lib/packages.sh
  source scripts/lib/packages.sh
  ensure_packages bench.sh docker-registry=docker-registry nginx=nginx wrk=wrk curl=curl getconf=libc-bin \
    redis-server=redis-server
  ensure_s3s_fs
  # Debian installs nginx with its service enabled; the bench starts its own nginx on a free
  # loopback port and never touches a system one.
fi

target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --locked --bin ferry
export FERRY_BIN="$target_dir/release/ferry"

if [[ $what != micro ]]; then
  start=$(date +%s)
  cargo bench --locked --bench e2e
  echo "bench.sh: e2e took $(($(date +%s) - start)) s (including the bench's own build)" >&2
fi
if [[ $what != e2e ]]; then
  cargo bench --locked --bench micro
fi
