#!/usr/bin/env bash
# Builds the site with `trunk build --release`, serves dist/ on 127.0.0.1, and runs the browser
# end-to-end test (tests/e2e) in Debian's Chromium with WebGPU against it.
#
# Environment: E2E_PORT (default 8099) sets the static server's port. CHROMIUM (default
# /usr/bin/chromium) names the browser. E2E_SKIP_BUILD=1 reuses an existing dist/.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${E2E_PORT:-8099}"

scripts/default-model.sh

if [[ "${E2E_SKIP_BUILD:-0}" != 1 ]]; then
  trunk build --release
fi

(cd tests/e2e && npm ci --no-audit --no-fund)

SERVER_LOG="$(mktemp)"
node tests/e2e/static-server.mjs dist "$PORT" /fixtures/models/=fixtures/models 2>"$SERVER_LOG" &
SERVER_PID=$!
stop_server() {
  kill "$SERVER_PID" 2>/dev/null || true
  rm -f "$SERVER_LOG"
}
trap stop_server EXIT

for _ in $(seq 50); do
  if curl --silent --fail --output /dev/null "http://127.0.0.1:$PORT/"; then
    break
  fi
  sleep 0.1
done

BASE_URL="http://127.0.0.1:$PORT/" node --test tests/e2e/page.test.mjs
