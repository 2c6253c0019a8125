#!/usr/bin/env bash
# Runs every test: the engine and command line on burn's CPU backend, the same numerical checks
# on burn's wgpu backend over Vulkan (Mesa's lavapipe when there is no GPU), and the browser
# end-to-end test in headless Chromium with WebGPU. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh --system-only

# trunk and wasm-bindgen-cli compile in the background while the native tests build: long
# single-crate steps of the native build leave a core idle.
mkdir -p target
tools_log=target/install-tools.log
scripts/install-deps.sh --tools-only >"$tools_log" 2>&1 &
tools_pid=$!

# The engine builds with its wgpu feature by default, so the CPU tests and the wgpu tests
# (engine/tests/wgpu_backend.rs) compile once and run together.
echo "== engine and command line: CPU backend, and wgpu over Vulkan"
if ! cargo test --release --workspace --exclude app; then
  kill "$tools_pid" 2>/dev/null || true
  exit 1
fi

echo "== waiting for trunk and wasm-bindgen-cli (log: $tools_log)"
if ! wait "$tools_pid"; then
  cat "$tools_log" >&2
  echo "installing trunk or wasm-bindgen-cli failed; the log is above" >&2
  exit 1
fi

echo "== page in Chromium with WebGPU"
scripts/e2e.sh
