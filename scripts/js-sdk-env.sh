# Sourced by scripts/setup.sh and tests/interop/js_sdk.sh: makes sure a Node.js that
# matrix-js-sdk supports is at hand and tests/js has its packages, and puts that Node first on PATH.
#   - Node: the system's `node` when it is new enough (JS_SDK_NODE_MAJOR), otherwise Node.js from
#     the npm registry's node-linux-<arch> package, installed once under $JS_SDK_NODE_DIR (Debian 12
#     ships Node 18; matrix-js-sdk 39 and later need 22).
#   - Packages: `npm ci` from tests/js/package-lock.json, with its cache under ~/.cache, run again
#     only when the lock file changes.
# Needs `npm` (Debian: apt-get install npm, which brings nodejs).
JS_SDK_NODE_MAJOR=22
JS_SDK_NODE_VERSION="${JS_SDK_NODE_VERSION:-22.23.5}"
JS_SDK_NODE_DIR="${JS_SDK_NODE_DIR:-$HOME/.cache/lattice-node}"
JS_SDK_NPM_CACHE="${JS_SDK_NPM_CACHE:-$HOME/.cache/lattice-npm}"

node_major() {
  "$1" -e 'process.stdout.write(process.versions.node.split(".")[0])' 2>/dev/null || echo 0
}

js_sdk_node() {
  if command -v node >/dev/null 2>&1 && [ "$(node_major node)" -ge "$JS_SDK_NODE_MAJOR" ]; then
    return 0
  fi
  local arch
  case "$(uname -m)" in
    x86_64) arch=x64 ;;
    aarch64 | arm64) arch=arm64 ;;
    *) echo "no Node.js >= $JS_SDK_NODE_MAJOR for $(uname -m); put one on PATH" >&2; return 1 ;;
  esac
  local bin="$JS_SDK_NODE_DIR/node_modules/node-linux-$arch/bin"
  if [ "$(node_major "$bin/node")" != "${JS_SDK_NODE_VERSION%%.*}" ]; then
    echo "installing Node.js $JS_SDK_NODE_VERSION (npm package node-linux-$arch) into $JS_SDK_NODE_DIR" >&2
    mkdir -p "$JS_SDK_NODE_DIR"
    npm install --prefix "$JS_SDK_NODE_DIR" --cache "$JS_SDK_NPM_CACHE" --no-audit --no-fund --silent \
      "node-linux-$arch@$JS_SDK_NODE_VERSION"
  fi
  export PATH="$bin:$PATH"
}

# `npm ci` in tests/js unless node_modules already matches the lock file.
js_sdk_packages() {
  local project
  project="$(cd "$(dirname "${BASH_SOURCE[0]}")/../tests/js" && pwd)"
  if cmp -s "$project/package-lock.json" "$project/node_modules/.lattice-installed-lock"; then
    return 0
  fi
  echo "installing tests/js packages (npm ci)" >&2
  (cd "$project" && npm ci --cache "$JS_SDK_NPM_CACHE" --no-audit --no-fund --silent)
  cp "$project/package-lock.json" "$project/node_modules/.lattice-installed-lock"
}
