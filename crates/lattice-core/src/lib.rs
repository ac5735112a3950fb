//! The pure protocol core of Lattice: Matrix rules with no I/O and no async.
//!
//! `limits` bounds every input; `user_id` holds the rules for new accounts; `room_version`,
//! `pdu`, `event`, `auth` and `state_resolution` check, sign, authorise and resolve events;
//! `power` reads power levels the way the auth rules do; `presence` moves users between online,
//! idle and offline; `visibility` decides who may see which
//! event of a room's history.

pub mod auth;
pub mod event;
pub mod limits;
pub mod pdu;
pub mod power;
pub mod presence;
pub mod room_builder;
pub mod room_version;
pub mod state_resolution;
pub mod user_id;
pub mod visibility;
