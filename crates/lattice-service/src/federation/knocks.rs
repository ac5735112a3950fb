//! Knocking across servers (server-server "Knocking upon a room"). Inbound, another server's
//! user knocks on a room here: `make_knock` hands out a template only when the knock would pass
//! this server's auth rules, and `send_knock` takes the signed knock through the one ingest
//! path and describes the room in return. Outbound, this server's user knocks on a room this
//! server is not in: the same two steps through a server of the room, and the knock is kept as
//! the user's out-of-band membership with the state that server described, until an invite
//! (the knock accepted), a kick (refused) or the user's own leave (withdrawn) replaces it.

use http::Method;
use lattice_core::event::Pdu;
use lattice_core::room_version::RoomVersion;
use lattice_federation::client::Auth;
use ruma::state_res::Event;
use ruma::{EventId, OwnedEventId, OwnedServerName, RoomId, ServerName, UserId};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::Federation;
use super::join::{MAX_SMALL_RESPONSE_BYTES, encode, parse};
use crate::ServiceError;

/// Most `knock_room_state` entries read from a knock's answer.
const MAX_KNOCK_STATE: usize = 50;

#[derive(Deserialize)]
struct MakeKnock {
    room_version: String,
    event: Value,
}

#[derive(Deserialize)]
struct SendKnockAnswer {
    /// `knock_state_events` is the name the proposal used before knocking was specified.
    #[serde(default, alias = "knock_state_events")]
    knock_room_state: Vec<Box<RawValue>>,
}

impl Federation {
    /// `PUT /send_knock/{roomId}/{eventId}`: the knocking server's signed knock, through the
    /// ingest path (the auth rules decide whether the room takes knocks from this user), then
    /// passed on to the room's other servers. Answers the room's description for the knocker's
    /// clients: create event, join rules, name, avatar, topic, alias, encryption, and the knock.
    pub async fn send_knock(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
        bytes: &[u8],
    ) -> Result<Value, ServiceError> {
        let (version, object, fields) = self.own_membership(origin, room_id, event_id, bytes, "knock").await?;
        if !version.rules().authorization.knocking {
            return Err(ServiceError::Forbidden(format!("room {room_id} is version {}: no knocking", version.id())));
        }
        self.ingest_membership(origin, room_id, &version, &object).await?;
        let knocker = UserId::parse(fields.sender()).map_err(|e| ServiceError::BadJson(e.to_string()))?;
        Ok(json!({ "knock_room_state": self.rooms.invite_room_state(room_id, &knocker).await? }))
    }

    /// Knocks for a local user on a room this server is not in, through the first of `via`
    /// that takes the knock. Returns the knock's event ID.
    pub async fn knock_remote(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        via: &[OwnedServerName],
        reason: Option<String>,
    ) -> Result<OwnedEventId, ServiceError> {
        let client = self.remote()?.keys.client().clone();
        let path = super::join::template_path("make_knock", room_id, user_id);
        let mut failures = Vec::new();
        for server in via.iter().filter(|s| *s != self.server_name()) {
            let answer = client.request(server, Method::GET, &path, None, Auth::Signed, MAX_SMALL_RESPONSE_BYTES).await;
            let answer = answer.map_err(|error| super::join::room_refusal(server, "knock", error));
            let attempt = match answer.and_then(|b| parse::<MakeKnock>(&b)) {
                Ok(template) => self.complete_knock(server, user_id, room_id, template, reason.clone()).await,
                Err(error) => Err(error),
            };
            match attempt {
                Ok(event_id) => return Ok(event_id),
                // The room's own refusal (its join rule, a ban) is the answer; no other
                // server of the room would say otherwise.
                Err(error @ (ServiceError::Forbidden(_) | ServiceError::IncompatibleRoomVersion(_))) => {
                    return Err(error);
                }
                Err(error) => {
                    tracing::info!(%server, %room_id, %error, "knocking through this server failed");
                    failures.push(format!("{server}: {error}"));
                }
            }
        }
        if failures.is_empty() {
            return Err(ServiceError::NotFound(format!(
                "no server to knock on {room_id} through: name one with `via`"
            )));
        }
        Err(ServiceError::Remote(format!("could not knock on {room_id}: {}", failures.join("; "))))
    }

    /// Completes, signs and sends the knock (`send_knock`), then records it for the user with
    /// the room's description from the answer.
    async fn complete_knock(
        &self,
        server: &ServerName,
        user_id: &UserId,
        room_id: &RoomId,
        template: MakeKnock,
        reason: Option<String>,
    ) -> Result<OwnedEventId, ServiceError> {
        let version = RoomVersion::parse(&template.room_version)?;
        if !version.rules().authorization.knocking {
            return Err(ServiceError::Remote(format!("{server} offered a knock in room version {}", version.id())));
        }
        let content = crate::accounts::profile_content(
            crate::rooms::member_content("knock", reason),
            &self.accounts.member_profile(user_id).await?,
        );
        let knock = self.completed_template(&version, template.event, (user_id, room_id), content)?;
        let path =
            format!("/_matrix/federation/v1/send_knock/{}/{}", encode(room_id.as_str()), encode(knock.id().as_str()));
        let body = serde_json::to_value(knock.object()).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let client = self.remote()?.keys.client().clone();
        let answer = client
            .request(server, Method::PUT, &path, Some(&body), Auth::Signed, MAX_SMALL_RESPONSE_BYTES)
            .await
            .map_err(|error| super::join::room_refusal(server, "knock", error))?;
        let answer: SendKnockAnswer = parse(&answer)?;
        let stripped = self.knock_room_state(&version, room_id, &answer.knock_room_state).await;
        self.rooms.record_out_of_band(&version, &knock, stripped).await?;
        Ok(knock.id().to_owned())
    }

    /// The room's description from a knock's answer. The knock is in the room by now, so an
    /// entry that fails its checks is left out (as the spec asks) rather than failing the knock.
    async fn knock_room_state(&self, version: &RoomVersion, room_id: &RoomId, entries: &[Box<RawValue>]) -> Vec<Value> {
        let mut stripped = Vec::new();
        for raw in entries.iter().take(MAX_KNOCK_STATE) {
            match self.stripped_entry(version, room_id, raw).await {
                Ok(entry) => stripped.push(entry),
                Err(error) => tracing::info!(%room_id, %error, "a knock_room_state entry was left out"),
            }
        }
        stripped
    }

    /// Servers to reach a room this server is not in through, for a user's out-of-band
    /// membership (`membership`, the stored event): whoever invited them, then the servers of
    /// the users who set the state the room was described with, then the server the room ID
    /// names (before v12).
    pub(super) fn servers_of_described_room(
        &self,
        membership: &Pdu,
        stripped_state: &[Value],
        room_id: &RoomId,
    ) -> Vec<OwnedServerName> {
        let mut servers: Vec<OwnedServerName> = Vec::new();
        let mut add = |server: &ServerName| {
            if server != self.server_name() && !servers.iter().any(|s| s == server) {
                servers.push(server.to_owned());
            }
        };
        add(membership.sender().server_name());
        for entry in stripped_state {
            if let Some(sender) = entry["sender"].as_str().and_then(|s| UserId::parse(s).ok()) {
                add(sender.server_name());
            }
        }
        if let Some(server) = room_id.server_name() {
            add(server);
        }
        servers
    }
}
