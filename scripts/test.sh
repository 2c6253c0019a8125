#!/usr/bin/env bash
# Runs every test: the engine and command line on burn's CPU backend, the same numerical checks
# on burn's wgpu backend over Vulkan (Mesa's lavapipe when there is no GPU), and the browser
# end-to-end test in headless Chromium with WebGPU. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

# The engine builds with its wgpu feature by default, so the CPU tests and the wgpu tests
# (engine/tests/wgpu_backend.rs) compile once and run together.
echo "== engine and command line: CPU backend, and wgpu over Vulkan"
cargo test --release --workspace --exclude app

echo "== page in Chromium with WebGPU"
scripts/e2e.sh
