//! The forwarder: reads this server's users' live events from the event stream, in order,
//! and queues each for every other server joined to its room. The mark of how far it has read
//! is written in the same batch as the queued rows, so after a crash it resumes exactly where
//! the last committed batch ended: no event is skipped, and a repeat is at most a repeat of a
//! transaction the destination already drops as a duplicate. That batch is written without a
//! sync of its own ([`Sender::commit_forwarded`]): it is derived from events already stored, so
//! a power cut that takes it only moves the mark back.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use lattice_federation::Sender;
use lattice_storage::WriteBatch;
use ruma::{OwnedRoomId, OwnedServerName};

use super::{Federation, server_of};
use crate::ServiceError;

/// Events read from the stream per pass.
const EVENTS_PER_PASS: usize = 200;
/// A pass runs at least this often even if no wake-up came.
const IDLE_RECHECK: Duration = Duration::from_secs(5);

impl Federation {
    /// Forwards new events until the process ends. Does nothing until federation is enabled.
    pub async fn forward_forever(&self) {
        let written = self.rooms.events_written();
        loop {
            let more = match self.forward_once().await {
                Ok(more) => more,
                Err(error) => {
                    tracing::warn!(%error, "forwarding events to other servers failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    false
                }
            };
            if !more {
                let _ = tokio::time::timeout(IDLE_RECHECK, written.notified()).await;
            }
        }
    }

    /// One pass: queues the events after the mark; returns whether more may be waiting.
    pub async fn forward_once(&self) -> Result<bool, ServiceError> {
        let Ok(remote) = self.remote() else { return Ok(false) };
        let sender = &remote.sender;
        let Some(mark) = sender.forwarded_up_to().await? else {
            // Federation was just turned on: what happened before is not owed to anyone.
            let now = self.rooms.events_completed().await?;
            let mut batch = WriteBatch::new();
            Sender::set_forwarded_up_to(&mut batch, now);
            sender.commit_forwarded(batch).await?;
            return Ok(true);
        };
        let (owed, reached) = self.rooms.owed_events_after(mark, EVENTS_PER_PASS).await?;
        if reached == mark {
            return Ok(false);
        }
        let mut batch = WriteBatch::new();
        let mut servers_of: HashMap<OwnedRoomId, BTreeSet<OwnedServerName>> = HashMap::new();
        let mut woken: BTreeSet<OwnedServerName> = BTreeSet::new();
        for event in &owed {
            if !servers_of.contains_key(&event.room_id) {
                let joined = self.rooms.joined_servers(&event.room_id).await?;
                servers_of.insert(event.room_id.clone(), joined);
            }
            let mut destinations = servers_of.get(&event.room_id).cloned().unwrap_or_default();
            // A member's own server hears of their kick, ban or leave even once out of the room.
            if let Some(server) = event.member.as_deref().and_then(server_of) {
                destinations.insert(server);
            }
            destinations.remove(self.server_name());
            let destinations: Vec<OwnedServerName> = destinations.into_iter().collect();
            sender.queue_pdu(&mut batch, &destinations, &event.pdu_json).await?;
            woken.extend(destinations);
        }
        Sender::set_forwarded_up_to(&mut batch, reached);
        sender.commit_forwarded(batch).await?;
        sender.wake(&woken.into_iter().collect::<Vec<_>>());
        Ok(true)
    }

    /// Sends an EDU about a room (typing, a receipt) to the room's other servers. Best effort:
    /// with federation off, or no other server in the room, it does nothing.
    pub async fn send_room_edu(&self, room_id: &ruma::RoomId, edu: &serde_json::Value) -> Result<(), ServiceError> {
        let Ok(remote) = self.remote() else { return Ok(()) };
        let mut destinations = self.rooms.joined_servers(room_id).await?;
        destinations.remove(self.server_name());
        if destinations.is_empty() {
            return Ok(());
        }
        let destinations: Vec<OwnedServerName> = destinations.into_iter().collect();
        let mut batch = WriteBatch::new();
        remote.sender.queue_edu(&mut batch, &destinations, &edu.to_string()).await?;
        remote.sender.commit(batch).await?;
        remote.sender.wake(&destinations);
        Ok(())
    }

    /// Queues one event for `destinations` now (the join another server sent through
    /// `send_join`, which the other servers of the room learn from this one).
    pub(super) async fn queue_now(&self, destinations: &[OwnedServerName], pdu_json: &str) -> Result<(), ServiceError> {
        if destinations.is_empty() {
            return Ok(());
        }
        let sender = &self.remote()?.sender;
        let mut batch = WriteBatch::new();
        sender.queue_pdu(&mut batch, destinations, pdu_json).await?;
        sender.commit(batch).await?;
        sender.wake(destinations);
        Ok(())
    }
}
