#!/usr/bin/env bash
# A throwaway PostgreSQL server on loopback, for the tests' PostgreSQL half.
#
#   scripts/postgres.sh start DIR   initialises DIR, starts a server on a free port, prints its URL
#   scripts/postgres.sh stop DIR    stops it (DIR can then be deleted)
#
# Then: SYNESIS_TEST_POSTGRES=<the URL> cargo test --workspace. Each test makes a database of
# its own on that server. Debian's `postgresql` is installed when no server is found (as root).
# The server runs as the `postgres` user when this runs as root (PostgreSQL refuses root).
set -euo pipefail
cmd=${1:?start or stop}
dir=${2:?a directory for the server}

server_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
as_server() {
  if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$1"; else sh -c "$1"; fi
}

bin=$(server_bin)
case $cmd in
start)
  if [ -z "$bin" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends postgresql >&2
    bin=$(server_bin)
  fi
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  [ "$(id -u)" = 0 ] && chown postgres "$dir"
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  as_server "'$bin/initdb' -D '$dir/data' -A trust -U postgres -E UTF8 --no-locale" >/dev/null
  as_server "'$bin/pg_ctl' -D '$dir/data' -l '$dir/log' -w -o \"-p $port -k '$dir' -c listen_addresses=127.0.0.1 -c max_connections=200\" start" >/dev/null
  echo "postgres://postgres@127.0.0.1:$port/postgres"
  ;;
stop)
  dir=$(cd "$dir" && pwd)
  as_server "'$bin/pg_ctl' -D '$dir/data' -m fast -w stop" >/dev/null
  ;;
*)
  echo "usage: $0 start|stop DIR" >&2
  exit 2
  ;;
esac
