//! The signature and content-hash checks of a transaction's PDUs, off the async workers and
//! alongside the rest of the transaction's work: they need no storage and are most of a PDU's
//! cost before ingest. PDUs are handed over in chunks as they are prepared, the chunks spread
//! over one blocking thread per core (each thread taking its chunks in order), and answered
//! chunk by chunk in the transaction's order: the checks run while the rest of the transaction
//! is prepared, and ingest (which keeps that order) starts on the first chunk while later ones
//! are still being checked.

use std::sync::mpsc;

use lattice_core::event::Pdu;
use lattice_core::room_version::RoomVersion;
use ruma::{CanonicalJsonObject, OwnedServerName, ServerName};
use tokio::sync::oneshot;

use crate::ServiceError;

/// PDUs checked together: small enough that ingest starts soon, large enough that handing a
/// chunk over costs little beside its checks.
const CHUNK: usize = 5;

/// A pushed PDU ready for its signature checks: parsed, of a room this server is in, with the
/// keys of the servers that must have signed it.
pub(super) struct Prepared {
    pub event_id: String,
    pub version: RoomVersion,
    pub object: CanonicalJsonObject,
    pub keys: ruma::signatures::PublicKeyMap,
}

/// A pushed PDU after its signature checks: its event ID, room version and the checked event,
/// or why it is refused.
pub(super) type Checked = (String, RoomVersion, Result<Pdu, String>);

type Work = (Vec<Prepared>, oneshot::Sender<Vec<Checked>>);

/// One transaction's checks: PDUs go in with [`SignatureChecks::push`], chunks of checked PDUs
/// come out of [`SignatureChecks::finish`] in the order they went in. Dropping it (the request
/// went away) lets the threads finish the chunks they have and stop.
pub(super) struct SignatureChecks {
    origin: OwnedServerName,
    threads: usize,
    workers: Vec<mpsc::Sender<Work>>,
    filling: Vec<Prepared>,
    answers: Vec<oneshot::Receiver<Vec<Checked>>>,
}

impl SignatureChecks {
    pub(super) fn new(origin: &ServerName) -> Self {
        Self {
            origin: origin.to_owned(),
            threads: std::thread::available_parallelism().map_or(1, usize::from),
            workers: Vec::new(),
            filling: Vec::with_capacity(CHUNK),
            answers: Vec::new(),
        }
    }

    /// Queues one PDU; a full chunk goes to its thread at once.
    pub(super) fn push(&mut self, pdu: Prepared) {
        self.filling.push(pdu);
        if self.filling.len() == CHUNK {
            self.hand_over();
        }
    }

    /// The answers, one per chunk, in order.
    pub(super) fn finish(mut self) -> Vec<oneshot::Receiver<Vec<Checked>>> {
        if !self.filling.is_empty() {
            self.hand_over();
        }
        std::mem::take(&mut self.answers)
    }

    /// Sends the filling chunk to the next thread in turn, starting that thread on first use
    /// (a transaction of a few PDUs starts one).
    fn hand_over(&mut self) {
        let chunk = std::mem::replace(&mut self.filling, Vec::with_capacity(CHUNK));
        let (answer, answered) = oneshot::channel();
        let turn = self.answers.len() % self.threads;
        if turn == self.workers.len() {
            let (work, incoming) = mpsc::channel::<Work>();
            let origin = self.origin.clone();
            tokio::task::spawn_blocking(move || {
                for (chunk, answer) in incoming {
                    // Nobody to tell when the transaction's request went away.
                    let _ = answer.send(chunk.into_iter().map(|pdu| check_one(&origin, pdu)).collect());
                }
            });
            self.workers.push(work);
        }
        // A thread that stopped (its check panicked) drops the answer, which `answered` reports.
        let _ = self.workers[turn].send((chunk, answer));
        self.answers.push(answered);
    }
}

/// A chunk's answer; a check that panicked is a bug, and fails the transaction as a whole, so
/// that nothing is recorded for it and the sending server sends it again (the PDUs ingested
/// before are then answered as already stored).
pub(super) async fn checked(answer: oneshot::Receiver<Vec<Checked>>) -> Result<Vec<Checked>, ServiceError> {
    answer.await.map_err(|_| ServiceError::Internal("a PDU's signature check failed".into()))
}

fn check_one(origin: &ServerName, pdu: Prepared) -> Checked {
    let checked = crate::rooms::check_remote_object(origin, &pdu.version, pdu.object, &pdu.keys);
    (pdu.event_id, pdu.version, checked.map_err(|e| e.to_string()))
}
