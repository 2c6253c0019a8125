#!/usr/bin/env bash
# Serves the page for development at http://127.0.0.1:8080/ with `trunk serve`, which rebuilds
# on every change. Generates the embedded default model first if public/models/default is missing.
#
# Installs what it needs first (scripts/install-deps.sh without the browser): the wasm32 target,
# trunk, and wasm-bindgen-cli at the version Cargo.lock gives wasm-bindgen.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh --no-browser

MODEL_DIR=public/models/default
if [[ ! -f "$MODEL_DIR/config.json" ]]; then
  echo "Generating the default model in $MODEL_DIR (random weights, preset small, seed 0)" >&2
  cargo run --release -p cli --bin clip-lens -- random-model --preset small --seed 0 --out "$MODEL_DIR"
fi

# The default model's neuron atlas over the fixture images (about 30 s on two cores). k = 8 because
# the fixtures have 32 readable images; 4 of the 80 templates per class keep the class embeddings
# quick on the CPU.
ATLAS_DIR="$MODEL_DIR/atlas"
if [[ ! -f "$ATLAS_DIR/manifest.json" ]]; then
  echo "Building the default atlas in $ATLAS_DIR (fixtures/images, k = 8)" >&2
  cargo run --release -p cli --bin clip-lens -- atlas --model "$MODEL_DIR" --images fixtures/images \
    --out "$ATLAS_DIR" --k 8 --templates 4
fi

exec trunk serve "$@"
