#!/usr/bin/env bash
# Runs Ferry's whole test suite: unit tests and the end-to-end tests against a real
# Distribution registry (Debian's docker-registry) with real clients (skopeo).
# Installs the Debian packages the tests need when they are missing (as root), or stops
# with the command to run. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

# command -> Debian package
declare -A needs=(
  [docker-registry]=docker-registry
  [skopeo]=skopeo
  [htpasswd]=apache2-utils
  [openssl]=openssl
  [curl]=curl
  [containerd]=containerd
  [ctr]=containerd
)
missing=()
for cmd in "${!needs[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${needs[$cmd]}")
done
if ((${#missing[@]})); then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "test.sh: installing missing packages: ${missing[*]}" >&2
  if [[ $(id -u) -eq 0 ]]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  elif command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "test.sh: MISSING TOOLS. Run as root: apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

exec cargo test --locked "$@"
