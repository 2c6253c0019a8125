#!/usr/bin/env bash
# Serves the page for development at http://127.0.0.1:8080/ with `trunk serve`, which rebuilds
# on every change. Generates the embedded default model and its atlas first when they are missing.
#
# Installs what it needs first (scripts/install-deps.sh without the browser): the wasm32 target,
# trunk, and wasm-bindgen-cli at the version Cargo.lock gives wasm-bindgen.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh --no-browser

scripts/default-model.sh

exec trunk serve "$@"
