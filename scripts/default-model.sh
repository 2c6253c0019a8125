#!/usr/bin/env bash
# Generates the page's embedded default model in public/models/default/ (random weights, preset
# small, seed 0) and its neuron atlas over the fixture photographs, each only when missing.
# scripts/serve.sh and scripts/e2e.sh call it.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL_DIR=public/models/default
if [[ ! -f "$MODEL_DIR/config.json" ]]; then
  echo "Generating the default model in $MODEL_DIR (random weights, preset small, seed 0)" >&2
  cargo run --release -p cli --bin clip-lens -- random-model --preset small --seed 0 --out "$MODEL_DIR"
fi

# About 30 s on two cores. k = 8 because the fixtures have 32 readable images, and 4 of the 80
# templates per class keep the class embeddings quick on the CPU.
ATLAS_DIR="$MODEL_DIR/atlas"
if [[ ! -f "$ATLAS_DIR/manifest.json" ]]; then
  echo "Building the default atlas in $ATLAS_DIR (fixtures/images, k = 8)" >&2
  cargo run --release -p cli --bin clip-lens -- atlas --model "$MODEL_DIR" --images fixtures/images \
    --out "$ATLAS_DIR" --k 8 --templates 4
fi
