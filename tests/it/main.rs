//! Integration tests: real Lattice servers on loopback, driven over HTTP, by the `matrix-sdk`
//! client, and as a child process.

mod abuse;
mod accounts;
mod authorisation;
mod bad_input;
mod calls;
mod directory;
mod e2ee;
mod federation_invites;
mod federation_keys;
mod federation_rooms;
mod history;
mod history_order;
mod legacy_paths;
mod media;
mod membership;
mod migration;
mod no_panic;
mod operations;
mod power_loss;
mod process;
mod push;
mod relations;
mod restart;
mod rooms;
mod sdk_client;
mod sdk_e2ee;
mod sdk_join_by_alias;
mod support;
mod sync;
mod sync_correctness;
mod to_device;
mod user_directory;
mod visibility;
