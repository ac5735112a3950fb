#!/usr/bin/env bash
# Installs the release binary for operators, lean: the DWARF debug info (most of the file's
# size) is split off into a separate file that gdb and other debuggers find through a
# .gnu_debuglink section, while the symbol table stays, so backtraces still name functions.
#
#   scripts/install.sh [BINARY]         → /usr/local/bin/lattice (+ /usr/local/bin/.debug/lattice.debug)
#   PREFIX=$HOME/.local scripts/install.sh
#   DESTDIR=/tmp/pkg scripts/install.sh  (staging, e.g. for a package)
#   sudo scripts/install.sh ~/.cache/lattice-target/release/lattice   (build as yourself, install as root)
#
# Build first (`make install` does). BINARY defaults to $CARGO_TARGET_DIR/release/lattice
# (CARGO_TARGET_DIR defaults to ~/.cache/lattice-target, as in the Makefile).
set -euo pipefail

target_dir="${CARGO_TARGET_DIR:-$HOME/.cache/lattice-target}"
source_binary="${1:-$target_dir/release/lattice}"
prefix="${PREFIX:-/usr/local}"
bin_dir="${DESTDIR:-}$prefix/bin"
debug_dir="$bin_dir/.debug"

if [[ ! -x "$source_binary" ]]; then
    echo "no binary at $source_binary: build it first (make install, or cargo build --release)" >&2
    exit 1
fi
for tool in objcopy strip; do
    command -v "$tool" >/dev/null || { echo "$tool is missing: install binutils" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp "$source_binary" "$work/lattice"
objcopy --only-keep-debug "$work/lattice" "$work/lattice.debug"
strip --strip-debug "$work/lattice"
# The link records the debug file's name and checksum; debuggers look for it next to the
# binary and in its .debug directory.
objcopy --add-gnu-debuglink="$work/lattice.debug" "$work/lattice"

install -d "$bin_dir" "$debug_dir"
install -m 0755 "$work/lattice" "$bin_dir/lattice"
install -m 0644 "$work/lattice.debug" "$debug_dir/lattice.debug"

size() { du -h "$1" | cut -f1; }
echo "installed $bin_dir/lattice ($(size "$bin_dir/lattice"); built: $(size "$source_binary"))"
echo "debug info in $debug_dir/lattice.debug ($(size "$debug_dir/lattice.debug"))"
