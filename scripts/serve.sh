#!/usr/bin/env bash
# Serves the page for development at http://127.0.0.1:8080/ with `trunk serve`, which rebuilds
# on every change. Generates the embedded default model first if public/models/default is missing.
#
# Needs trunk, wasm-bindgen-cli at the version Cargo.lock gives wasm-bindgen, wasm-opt, and the
# wasm32-unknown-unknown target (see README).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL_DIR=public/models/default
if [[ ! -f "$MODEL_DIR/config.json" ]]; then
  echo "Generating the default model in $MODEL_DIR (random weights, preset small, seed 0)" >&2
  cargo run --release -p cli --bin clip-lens -- random-model --preset small --seed 0 --out "$MODEL_DIR"
fi

exec trunk serve "$@"
