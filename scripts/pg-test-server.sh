#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests: its own cluster (initdb) in a private temporary
# directory, listening on loopback only, run as the `postgres` system user (PostgreSQL refuses
# to run as root). `./x test` starts one before the tests and stops it after, on every path.
#
#   scripts/pg-test-server.sh start DIR PORT   create the cluster in DIR, start it, print its URL
#   scripts/pg-test-server.sh stop DIR         stop it (fast shutdown) and remove DIR
#
# The URL printed is what the controller's store tests read from TERN_TEST_PG_URL.
set -euo pipefail

bindir() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
  if [ -z "$d" ] || [ ! -x "$d/initdb" ]; then
    echo "pg-test-server: PostgreSQL is not installed (scripts/install-prereqs.sh installs Debian's postgresql)" >&2
    exit 3
  fi
  echo "$d"
}

cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { sed -n '6,7p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

case "$cmd" in
  start)
    port=${3:-}
    [[ "$port" =~ ^[0-9]+$ ]] || { echo "pg-test-server: PORT must be a number, got '${port}'" >&2; exit 2; }
    bin=$(bindir)
    install -d -m 0700 -o postgres -g postgres "$dir"
    runuser -u postgres -- "$bin/initdb" -D "$dir/data" -U tern --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; exit 1; }
    # Loopback only; the socket in DIR too, so nothing else on the machine is touched.
    runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c max_connections=200" start >/dev/null \
      || { cat "$dir/server.log" >&2; exit 1; }
    runuser -u postgres -- "$bin/createdb" -h 127.0.0.1 -p "$port" -U tern tern_test
    echo "postgres://tern@127.0.0.1:$port/tern_test"
    ;;
  stop)
    bin=$(bindir)
    if [ -f "$dir/data/postmaster.pid" ]; then
      runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop >/dev/null 2>&1 || {
        pid=$(head -n1 "$dir/data/postmaster.pid" 2>/dev/null || true)
        [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
      }
    fi
    rm -rf "$dir"
    ;;
  *)
    echo "pg-test-server: unknown command '$cmd' (valid: start, stop)" >&2
    exit 2
    ;;
esac
