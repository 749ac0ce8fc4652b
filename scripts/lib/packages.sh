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

# ensure_s3s_fs: puts target/tools/bin on PATH and installs s3s-fs there when it is missing:
# the S3-compatible server of the storage.s3 tests and bench, from crates.io. 0.14.1 is the
# newest that builds on rustc 1.92+ (0.17 needs 1.96); under target/ a clean clone builds it
# once.
ensure_s3s_fs() {
  export PATH="$PWD/target/tools/bin:$PATH"
  command -v s3s-fs >/dev/null 2>&1 && return 0
  echo "installing s3s-fs 0.14.1 into target/tools (cargo install, about 2 minutes)" >&2
  cargo install --quiet --locked --root target/tools s3s-fs@0.14.1 --features binary
}

# ensure_moto: installs moto's S3 server (PyPI, pinned) into a venv under target/tools when
# moto_server is missing: the S3 tests need one server with ListMultipartUploads, which s3s-fs
# lacks. Call after ensure_s3s_fs (which puts target/tools/bin on PATH).
ensure_moto() {
  command -v moto_server >/dev/null 2>&1 && return 0
  echo "installing moto[server] 5.2.1 into target/tools/moto (pip, about a minute)" >&2
  python3 -m venv target/tools/moto
  target/tools/moto/bin/pip install --quiet --disable-pip-version-check 'moto[server]==5.2.1'
  mkdir -p target/tools/bin
  ln -sf "$PWD/target/tools/moto/bin/moto_server" target/tools/bin/moto_server
}
