//! Jumping to a date in a room whose history partly lives on other servers: asking them
//! `GET /timestamp_to_event` and pulling in the event they name.

use http::Method;
use lattice_federation::client::Auth;
use ruma::{OwnedEventId, RoomId};
use serde::Deserialize;

use super::Federation;
use super::join::{MAX_SMALL_RESPONSE_BYTES, encode, parse};
use crate::ServiceError;
use crate::rooms::EventAtTime;

/// Other servers asked, in turn, before giving up on a remote answer.
const MAX_SERVERS_ASKED: usize = 3;

#[derive(Deserialize)]
struct RemoteAnswer {
    event_id: OwnedEventId,
    origin_server_ts: u64,
}

impl Federation {
    /// The event nearest `ts` according to the first of the room's other servers that answers;
    /// `None` when none does (or the room has no other server). The answer is only a hint: the
    /// event is checked when it is fetched.
    pub async fn remote_timestamp_to_event(&self, room_id: &RoomId, ts: u64, forward: bool) -> Option<EventAtTime> {
        let client = self.remote().ok()?.keys.client().clone();
        let dir = if forward { "f" } else { "b" };
        let path = format!("/_matrix/federation/v1/timestamp_to_event/{}?ts={ts}&dir={dir}", encode(room_id.as_str()));
        let servers = self.rooms.joined_servers(room_id).await.ok()?;
        for server in servers.iter().filter(|s| *s != self.server_name()).take(MAX_SERVERS_ASKED) {
            let answer = client
                .request(server, Method::GET, &path, None, Auth::Signed, MAX_SMALL_RESPONSE_BYTES)
                .await
                .map_err(ServiceError::from)
                .and_then(|bytes| parse::<RemoteAnswer>(&bytes));
            match answer {
                Ok(answer) => {
                    return Some(EventAtTime {
                        event_id: answer.event_id.to_string(),
                        origin_server_ts: answer.origin_server_ts,
                    });
                }
                Err(error) => {
                    tracing::info!(%server, %room_id, %error, "timestamp_to_event failed; trying another server")
                }
            }
        }
        None
    }
}
