//! The pure protocol core of Lattice: Matrix rules with no I/O and no async.
//!
//! `limits` bounds every input; `user_id` holds the rules for new accounts; `room_version` and
//! `pdu` check and sign events. Auth rules and state resolution join them next.

pub mod limits;
pub mod pdu;
pub mod room_version;
pub mod user_id;
