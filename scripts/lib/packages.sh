# shellcheck shell=bash
# Sourced by scripts/test.sh and scripts/bench.sh.
# ensure_packages NAME CMD=PACKAGE...: installs the Debian packages of the commands that are
# missing (as root, or through sudo), or stops with the command to run.
ensure_packages() {
  local who=$1 pair cmd
  shift
  local -a missing=()
  for pair in "$@"; do
    cmd=${pair%%=*}
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${pair#*=}")
  done
  ((${#missing[@]})) || return 0
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "$who: installing missing packages: ${missing[*]}" >&2
  if [[ $(id -u) -eq 0 ]]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  elif command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "$who: MISSING TOOLS. Run as root: apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
}
