#!/usr/bin/env bash
# The whole test suite, on a fresh machine or CI: cargo fmt --check, clippy -D warnings, and
# every test on SQLite and on a throwaway PostgreSQL server that this script finds or installs,
# starts on a free loopback port as an unprivileged user, and always stops by its pid.
#
# TEST_DATABASE_URL=postgres://... uses an existing server instead of starting one. Chromium and
# chromium-driver (for the browser test) are installed with apt-get when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "[test.sh] $*" >&2; }
fail() { say "FAILED: $*"; exit 1; }

PG_PID=""
PG_TMP=""
cleanup() {
  if [ -n "$PG_PID" ] && kill -0 "$PG_PID" 2>/dev/null; then
    kill -INT "$PG_PID" 2>/dev/null || true          # fast shutdown
    for _ in $(seq 1 100); do kill -0 "$PG_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$PG_PID" 2>/dev/null || true
    say "stopped PostgreSQL (pid $PG_PID)"
  fi
  [ -n "$PG_TMP" ] && rm -rf "$PG_TMP"
  return 0
}
trap cleanup EXIT INT TERM

find_pg_bindir() {
  local d
  for d in /usr/lib/postgresql/*/bin "$(pg_config --bindir 2>/dev/null || true)" /usr/local/pgsql/bin; do
    if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then
      echo "$d"
    fi
  done | sort -V | tail -n 1
}

# Below the kernel's ephemeral range (32768-60999 here): a port there can be taken by any
# outgoing connection (pip, apt) between the probe and the server's bind.
free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$(( 20000 + RANDOM % 12000 ))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return 0; fi
  done
  return 1
}

start_postgres() {
  local bindir port runas=()
  bindir=$(find_pg_bindir)
  if [ -z "$bindir" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      say "PostgreSQL not found: installing it with apt-get"
      apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2 \
        || fail "could not install PostgreSQL"
      bindir=$(find_pg_bindir)
    fi
    [ -n "$bindir" ] || fail "PostgreSQL server binaries (initdb, pg_ctl) not found; install postgresql or set TEST_DATABASE_URL"
  fi
  PG_TMP=$(mktemp -d -t llmt-pg.XXXXXX)
  if [ "$(id -u)" = 0 ]; then
    # initdb refuses to run as root: the server runs as the unprivileged 'postgres' user.
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
    chown postgres "$PG_TMP"
    runas=(runuser -u postgres --)
  fi
  "${runas[@]}" "$bindir/initdb" -D "$PG_TMP/data" -U postgres -A trust -E UTF8 --locale=C --no-sync >"$PG_TMP/initdb.log" 2>&1 \
    || { cat "$PG_TMP/initdb.log" >&2; fail "initdb"; }
  # A port found free can still be taken before the server binds it: try a few.
  local attempt started=
  for attempt in 1 2 3 4 5; do
    port=$(free_port) || fail "no free loopback port"
    if "${runas[@]}" "$bindir/pg_ctl" -D "$PG_TMP/data" -l "$PG_TMP/server.log" -w -t 60 \
      -o "-p $port -k $PG_TMP -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
      start >/dev/null; then
      started=yes
      break
    fi
    grep -q "could not create any TCP/IP sockets" "$PG_TMP/server.log" || break
    say "port $port was taken (attempt $attempt): trying another"
  done
  [ -n "$started" ] || { cat "$PG_TMP/server.log" >&2; fail "PostgreSQL did not start"; }
  PG_PID=$(head -n 1 "$PG_TMP/data/postmaster.pid")
  export TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  export PG_BINDIR="$bindir"   # tests that crash and restart a server of their own
  say "PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (pid $PG_PID)"
}

# The browser test drives headless Chromium through its WebDriver (Debian: chromium,
# chromium-driver). Installed when missing and we can; otherwise that test fails and says why.
ensure_chromium() {
  if command -v chromedriver >/dev/null && { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then
    return 0
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "Chromium not found: installing chromium and chromium-driver with apt-get"
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >&2 \
      || fail "could not install Chromium"
  else
    say "Chromium or chromedriver missing and cannot be installed here: the browser test will fail"
  fi
}
ensure_chromium

# The gateway test drives the official `openai` Python package (issue 19): a throwaway venv
# under target/, made once and reused (pip from PyPI). Without it that test fails and says why.
ensure_openai_sdk() {
  local venv="$PWD/target/openai-sdk-venv"
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import openai' 2>/dev/null; then
    say "installing the openai Python package into $venv"
    if ! { python3 -m venv "$venv" >&2 && "$venv/bin/pip" install -q 'openai>=1.40' >&2; }; then
      # No venv module (Debian without python3-venv): the package into a folder of its own,
      # run by a wrapper that puts it on the path.
      say "python3 -m venv failed: installing with pip --target instead"
      rm -rf "$venv" && mkdir -p "$venv/bin" \
        && python3 -m pip install -q --target "$venv/lib" 'openai>=1.40' >&2 \
        && printf '#!/bin/sh\nPYTHONPATH="%s/lib${PYTHONPATH:+:$PYTHONPATH}" exec python3 "$@"\n' "$venv" > "$venv/bin/python" \
        && chmod +x "$venv/bin/python" \
        || { say "could not install the openai package: the gateway SDK test will fail"; return 0; }
    fi
  fi
  export OPENAI_SDK_PYTHON="$venv/bin/python"
  say "openai $("$OPENAI_SDK_PYTHON" -c 'import openai; print(openai.__version__)') for the gateway SDK test"
}
ensure_openai_sdk

if [ -z "${TEST_DATABASE_URL:-}" ]; then
  start_postgres
else
  say "using TEST_DATABASE_URL from the environment"
fi

say "cargo fmt --check"
cargo fmt --all -- --check || fail "cargo fmt: run 'cargo fmt --all'"
say "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings || fail "clippy"

say "cargo test (SQLite and PostgreSQL)"
LOG=$(mktemp -t llmt-test.XXXXXX)
status=0
cargo test --workspace 2>&1 | tee "$LOG" || status=$?
sqlite=$(grep -cE '::sqlite \.\.\. ok$' "$LOG" || true)
postgres=$(grep -cE '::postgres \.\.\. ok$' "$LOG" || true)
rm -f "$LOG"
say "database tests passed: $sqlite on SQLite, $postgres on PostgreSQL"
[ "$status" = 0 ] || fail "cargo test exited $status"
[ "$postgres" -gt 0 ] || fail "no PostgreSQL test ran"
say "all checks passed"
