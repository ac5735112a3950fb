//! Integration tests: real Lattice servers on loopback, driven over HTTP, by the `matrix-sdk`
//! client, and as a child process.

mod accounts;
mod bad_input;
mod directory;
mod history;
mod membership;
mod no_panic;
mod process;
mod relations;
mod restart;
mod rooms;
mod sdk_client;
mod support;
mod sync;
mod to_device;
