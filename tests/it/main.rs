//! Integration tests: real Lattice servers on loopback, driven over HTTP, by the `matrix-sdk`
//! client, and as a child process.

mod accounts;
mod bad_input;
mod history;
mod process;
mod rooms;
mod sdk_client;
mod support;
mod sync;
