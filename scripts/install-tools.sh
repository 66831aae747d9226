#!/usr/bin/env bash
# Installs the system tools the test suite talks to, when they are missing:
# redis-server and redis-cli (Debian redis-server, redis-tools), Prometheus
# and promtool, Chromium (page tests), h2load (nghttp2-client, a C load generator
# for the benchmark tool), and the dashboard type-check's npm packages. Python packages
# come from pyproject's dev extras (make's venv). Idempotent and quiet when
# everything is present.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null 2>&1; then
    echo "install-tools: missing ${need[*]}; install them (apt-get install ${need[*]}) and re-run" >&2
    exit 1
  fi
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "install-tools: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # shellcheck disable=SC2068
  $SUDO apt-get install -y -qq --no-install-recommends ${need[@]} >/dev/null
fi

# The packaged redis-server and prometheus start system services on install;
# the tests start their own processes on free ports and need none of them.

if [ -f dashboards/package.json ] && [ ! -d dashboards/node_modules ]; then
  echo "install-tools: npm ci in dashboards/"
  (cd dashboards && npm ci --no-audit --no-fund --loglevel=error)
fi
