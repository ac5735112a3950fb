//! The pure protocol core of Lattice: Matrix rules with no I/O and no async.
//!
//! Today it holds the limits every input is checked against and the user-ID rules for new
//! accounts; events, auth rules and state resolution join it with the event-core work.

pub mod limits;
pub mod user_id;
