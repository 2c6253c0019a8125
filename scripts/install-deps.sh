#!/usr/bin/env bash
# Installs what building, serving and testing need on a fresh Debian machine, skipping what is
# already there: Debian's Chromium (browser tests), Mesa's lavapipe Vulkan driver (native GPU
# tests without a GPU), the wasm32 Rust target, trunk, and the wasm-bindgen CLI at the version
# Cargo.lock pins.
#
# Options: --no-browser skips Chromium. --system-only installs the Debian packages and the
# wasm32 target only; --tools-only compiles trunk and wasm-bindgen-cli only, so that the test
# script can compile them while it builds the native tests.
set -euo pipefail
cd "$(dirname "$0")/.."

browser=1
system=1
tools=1
for option in "$@"; do
  case "$option" in
    --no-browser) browser=0 ;;
    --system-only) tools=0 ;;
    --tools-only) system=0 ;;
    *)
      echo "install-deps.sh: unknown option $option (expected --no-browser, --system-only or --tools-only)" >&2
      exit 2
      ;;
  esac
done

if ((system)); then
  packages=(mesa-vulkan-drivers libvulkan1)
  if ((browser)); then
    packages+=(chromium chromium-driver)
  fi
  missing=()
  for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  if ((${#missing[@]})); then
    echo "installing Debian packages: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi

  rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
fi

if ((tools)); then
  # trunk 0.22 needs a newer rustc than 1.95; 0.21.14 builds with it.
  if ! command -v trunk >/dev/null; then
    cargo install --locked trunk@0.21.14
  fi

  # The CLI must match the wasm-bindgen crate in Cargo.lock exactly. It installs without
  # --locked because one of its locked dependencies is not served by the registry.
  bindgen_version=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
  if [[ -n "$bindgen_version" ]] && ! wasm-bindgen --version 2>/dev/null | grep -q " $bindgen_version\$"; then
    cargo install wasm-bindgen-cli --version "$bindgen_version"
  fi
fi
