#!/usr/bin/env bash
# Installs the system packages Lattice's build needs, if they are missing:
#   - libclang (Debian libclang-dev): librocksdb-sys runs bindgen.
#   - a C++ compiler: RocksDB itself is built from source by the rocksdb crate.
#   - curl and Python 3 with venv: the Synapse interop test (tests/interop/) drives a real
#     Synapse from PyPI with them.
#   - npm (Debian's, with nodejs): the matrix-js-sdk start-up test (tests/interop/js_sdk.sh);
#     then Node.js >= 22 (from the npm registry when the system's is older) and tests/js's
#     packages (`npm ci`), see scripts/js-sdk-env.sh.
# Safe to run repeatedly; does nothing when everything is present.
set -euo pipefail

need=()
have_libclang() {
  ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1 || [ -n "${LIBCLANG_PATH:-}" ]
}
have_libclang || need+=(libclang-dev)
command -v c++ >/dev/null 2>&1 || need+=(g++)
# jemalloc (the server's allocator) is built from source with make.
command -v make >/dev/null 2>&1 || need+=(make)
command -v curl >/dev/null 2>&1 || need+=(curl)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo is missing; install Rust from https://rustup.rs" >&2; exit 1; }

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if command -v apt-get >/dev/null 2>&1; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
  else
    echo "setup: please install ${need[*]} with your system's package manager" >&2
    exit 1
  fi
fi

source "$(dirname "$0")/js-sdk-env.sh"
js_sdk_node
js_sdk_packages
