# The two commands a fresh machine needs (see README.md):
#   make run    — build and run the server on its embedded default (./lattice-data, 127.0.0.1:8008)
#   make test   — build and run the whole test suite
# Both install missing system packages first. One cargo profile (release) serves running,
# testing and benchmarking, so RocksDB's C++ is compiled once per target directory.

export CARGO_TARGET_DIR ?= $(HOME)/.cache/lattice-target

.PHONY: setup run test lint bench interop js-sdk s3

setup:
	@scripts/setup.sh

# `make run` builds every target, tests included, before starting the server: a build of the
# binary alone resolves host-crate features without the dev-dependencies, which changes the
# features of bindgen's dependencies and would compile RocksDB's C++ a second time.
run: setup
	cargo build --release --workspace --all-targets
	$(CARGO_TARGET_DIR)/release/lattice serve

test: setup
	cargo test --release --workspace
	tests/interop/js_sdk.sh
	tests/interop/synapse_keys.sh
	tests/interop/s3_media.sh

# Element Web's SDK (matrix-js-sdk from npm, tests/js) starting up against Lattice on loopback.
js-sdk: setup
	cargo build --release --workspace --all-targets
	tests/interop/js_sdk.sh

# Federation interop with a real Synapse (PyPI, in a virtualenv under ~/.cache), on loopback.
interop: setup
	cargo build --release --workspace --all-targets
	tests/interop/synapse_keys.sh

# Media in an S3-compatible bucket (moto's S3 server from PyPI, in a virtualenv under ~/.cache).
s3: setup
	cargo build --release --workspace --all-targets
	tests/interop/s3_media.sh

lint: setup
	cargo fmt --all -- --check
	cargo clippy --release --workspace --all-targets -- -D warnings

bench: setup
	scripts/bench.sh
	cargo run --release --example room_bench
	cargo run --release --example room_bench -- --sync-only --sync-rooms 1000 --idle 10000
	cargo run --release --workspace --example room_model_bench
	cargo run --release -p lattice-core --example pdu_check_rate
	cargo run --release -p lattice-core --example state_resolution_time

# `make install` (PREFIX=/usr/local, DESTDIR for staging): the release binary with its debug
# info split into bin/.debug/lattice.debug, see scripts/install.sh. Builds like `make run`.
.PHONY: install
install: setup
	cargo build --release --workspace --all-targets
	scripts/install.sh
