#!/usr/bin/env bash
# The queue tests start a throwaway PostgreSQL server on loopback (tests/pg_server.py). Install Debian's package
# when no server binaries are here, unless RANA_TEST_POSTGRES_URL names a server of your own.
set -euo pipefail
if [ -n "${RANA_TEST_POSTGRES_URL:-}" ] || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null \
    || command -v initdb >/dev/null; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "PostgreSQL is needed by the tests: run 'sudo apt-get install postgresql' or set RANA_TEST_POSTGRES_URL" >&2
  exit 1
fi
echo "installing PostgreSQL (Debian package) for the queue tests" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends postgresql >/dev/null
