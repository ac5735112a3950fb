//! Invites across servers. Outbound, an invite of another server's user is built and checked
//! here, countersigned by the invitee's server (`/invite` v2), then stored and passed on like
//! any local event. Inbound, an invite of this server's user is checked, countersigned, and —
//! when this server is not in the room — kept as the user's out-of-band membership with the
//! state the inviting server described; refusing it goes back through a server of the room
//! (`make_leave`, `send_leave`).

use http::Method;
use lattice_core::event::Pdu;
use lattice_core::room_version::RoomVersion;
use lattice_federation::FederationError;
use lattice_federation::client::Auth;
use ruma::room_version_rules::RoomIdFormatVersion;
use ruma::state_res::Event;
use ruma::{CanonicalJsonValue, EventId, OwnedEventId, RoomId, ServerName, UserId};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::Federation;
use super::join::{MAX_SMALL_RESPONSE_BYTES, encode, parse};
use crate::ServiceError;
use crate::rooms::{LocalEvent, Outcome, room_id_of_pdu};

/// Most `invite_room_state` entries read from an invite.
const MAX_INVITE_STATE: usize = 50;

#[derive(Deserialize)]
struct InviteRequest {
    room_version: String,
    event: Box<RawValue>,
    #[serde(default)]
    invite_room_state: Vec<Box<RawValue>>,
}

#[derive(Deserialize)]
struct SignedEvent {
    event: Box<RawValue>,
}

#[derive(Deserialize)]
struct MakeLeave {
    room_version: Option<String>,
    event: Value,
}

impl Federation {
    /// `PUT /invite/v2/{roomId}/{eventId}`: `origin` invites a user of this server. Checked
    /// (an invite of an existing local user, by a user of `origin`, signed and intact, with a
    /// well-formed description of the room), countersigned, and recorded for the user when this
    /// server is not in the room. Answers the countersigned event.
    pub async fn receive_invite(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
        bytes: &[u8],
    ) -> Result<Value, ServiceError> {
        let request: InviteRequest =
            serde_json::from_slice(bytes).map_err(|e| ServiceError::BadJson(format!("not an invite request: {e}")))?;
        let version = RoomVersion::parse(&request.room_version)
            .map_err(|_| ServiceError::IncompatibleRoomVersion(request.room_version.clone()))?;
        let object = lattice_core::pdu::parse(request.event.get().as_bytes(), &version)?;
        let computed = lattice_core::pdu::event_id(&object, &version)?;
        if computed != event_id {
            return Err(ServiceError::BadJson(format!("the event's ID is {computed}, not {event_id}")));
        }
        let keys = self.keys_for(&object, &version).await?;
        let object = match lattice_core::pdu::check_signatures_and_hashes(object, &version, &keys)? {
            lattice_core::pdu::Checked::Intact(object) => object,
            lattice_core::pdu::Checked::Redacted(_) => {
                return Err(ServiceError::BadJson("the invite's content does not match its hash".into()));
            }
        };
        let invite = Pdu::new(object, &version)?;
        let invitee = self.check_invite_fields(origin, room_id, &invite)?;
        if self.rooms.room_version(room_id).await.is_ok() {
            self.require_acl(origin, room_id).await?;
        }
        self.accounts.existing_user(&invitee).await.map_err(|error| match error {
            ServiceError::NotFound(_) | ServiceError::UserDeactivated => {
                ServiceError::Forbidden(format!("{invitee} cannot be invited: {error}"))
            }
            other => other,
        })?;
        let stripped = self.checked_invite_state(&version, room_id, &request.invite_room_state).await?;
        let mut signed = invite.object().clone();
        self.rooms.countersign(&version, &mut signed)?;
        let countersigned = Pdu::new(signed.clone(), &version)?;
        if self.rooms.record_out_of_band(&version, &countersigned, stripped).await?.is_some() {
            tracing::info!(%origin, %room_id, %invitee, "invite from another server recorded");
        }
        Ok(json!({ "event": signed }))
    }

    /// An invite's own fields: of this room, an `m.room.member` invite, sent by a user of
    /// `origin`, of a user of this server. Returns the invitee.
    fn check_invite_fields(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        invite: &Pdu,
    ) -> Result<ruma::OwnedUserId, ServiceError> {
        if room_id_of_pdu(invite)? != room_id
            || invite.kind().to_string() != "m.room.member"
            || crate::rooms::membership_of_pdu(invite) != "invite"
        {
            return Err(ServiceError::BadJson("not an invite to this room".into()));
        }
        if invite.sender().server_name() != origin {
            return Err(ServiceError::Forbidden(format!("{origin} cannot invite as {}", invite.sender())));
        }
        let invitee = invite
            .state_key()
            .and_then(|key| UserId::parse(key).ok())
            .ok_or_else(|| ServiceError::BadJson("the invite's state key is not a user ID".into()))?;
        if invitee.server_name() != self.server_name() {
            return Err(ServiceError::BadJson(format!("{invitee} is not a user of this server")));
        }
        Ok(invitee)
    }

    /// The stripped state (`type`, `state_key`, `content`, `sender`) of an invite's
    /// `invite_room_state`. From v12, where the room ID is the create event's hash, every entry
    /// must be a PDU of the room whose signatures check, and the create event must be there
    /// (`400 M_MISSING_PARAM` otherwise), as the spec asks; earlier versions get the same
    /// shape checks only, as older servers send bare stripped events.
    async fn checked_invite_state(
        &self,
        version: &RoomVersion,
        room_id: &RoomId,
        entries: &[Box<RawValue>],
    ) -> Result<Vec<Value>, ServiceError> {
        if entries.len() > MAX_INVITE_STATE {
            return Err(ServiceError::BadJson(format!("more than {MAX_INVITE_STATE} invite_room_state entries")));
        }
        let mut stripped = Vec::with_capacity(entries.len());
        for raw in entries {
            stripped.push(self.stripped_entry(version, room_id, raw).await?);
        }
        if strict_room_state(version) && !stripped.iter().any(is_create_entry) {
            return Err(ServiceError::MissingParam("invite_room_state has no m.room.create event".into()));
        }
        Ok(stripped)
    }

    /// One entry of the state another server describes a room with (`invite_room_state`,
    /// `knock_room_state`), stripped to `type`, `state_key`, `content` and `sender` for
    /// clients: a state event of this room, and from v12 a PDU whose signatures check.
    pub(super) async fn stripped_entry(
        &self,
        version: &RoomVersion,
        room_id: &RoomId,
        raw: &RawValue,
    ) -> Result<Value, ServiceError> {
        let entry: Value = serde_json::from_str(raw.get()).map_err(|e| ServiceError::BadJson(e.to_string()))?;
        let (Some(kind), Some(state_key)) = (entry["type"].as_str(), entry["state_key"].as_str()) else {
            return Err(ServiceError::MissingParam("a room state entry is not a state event".into()));
        };
        if strict_room_state(version) {
            let event = self.check_fetched(version, raw.get().as_bytes()).await.map_err(|error| {
                ServiceError::MissingParam(format!("a room state entry failed its checks: {error}"))
            })?;
            if room_id_of_pdu(&event)? != room_id {
                return Err(ServiceError::MissingParam("a room state entry is of another room".into()));
            }
        } else if entry["room_id"].as_str().is_some_and(|id| id != room_id.as_str()) {
            return Err(ServiceError::MissingParam("a room state entry is of another room".into()));
        }
        Ok(json!({ "type": kind, "state_key": state_key, "content": entry["content"], "sender": entry["sender"] }))
    }

    /// Invites `invitee`, a user of another server: the invite is built on the room's current
    /// state and must pass this server's auth rules; the invitee's server countersigns it
    /// (refusing is its right: the user does not exist, or does not take invites); then it is
    /// stored and passed on to the room's servers like any local event.
    pub async fn invite_remote(
        &self,
        sender: &UserId,
        room_id: &RoomId,
        invitee: &UserId,
        content: Value,
    ) -> Result<OwnedEventId, ServiceError> {
        let client = self.remote()?.keys.client().clone();
        let version = self.rooms.room_version(room_id).await?;
        let event = LocalEvent {
            room_id: Some(room_id),
            sender,
            kind: "m.room.member",
            state_key: Some(invitee.as_str()),
            content,
        };
        let invite = self.rooms.checked_local_event(&version, event).await?;
        let body = json!({
            "room_version": version.id().as_str(),
            "event": invite.object(),
            "invite_room_state": self.rooms.invite_room_state(room_id, sender).await?,
        });
        let path =
            format!("/_matrix/federation/v2/invite/{}/{}", encode(room_id.as_str()), encode(invite.id().as_str()));
        let server = invitee.server_name();
        let answer = client
            .request(server, Method::PUT, &path, Some(&body), Auth::Signed, MAX_SMALL_RESPONSE_BYTES)
            .await
            .map_err(|error| refused_by(server, error))?;
        let answer: SignedEvent = parse(&answer)?;
        // Only the signatures are taken from the answer: the event stays the one built here.
        let answered: Value =
            serde_json::from_str(answer.event.get()).map_err(|e| ServiceError::Remote(e.to_string()))?;
        let signatures = CanonicalJsonValue::try_from(answered["signatures"].clone())
            .map_err(|e| ServiceError::Remote(format!("the countersigned invite's signatures: {e}")))?;
        if answered["signatures"].get(server.as_str()).is_none() {
            return Err(ServiceError::Remote(format!("{server} did not sign the invite")));
        }
        let mut object = invite.object().clone();
        object.insert("signatures".into(), signatures);
        let bytes = serde_json::to_vec(&object).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let countersigned = self.check_fetched(&version, &bytes).await?;
        if countersigned.id() != invite.id() || countersigned.content().get() != invite.content().get() {
            return Err(ServiceError::Remote(format!("{server} answered with another event")));
        }
        let event_id = countersigned.id().to_owned();
        match self.rooms.ingest(&version, countersigned).await?.outcome {
            Outcome::Accepted => Ok(event_id),
            Outcome::SoftFailed(reason) | Outcome::Rejected(reason) => Err(ServiceError::Forbidden(reason)),
            Outcome::Outlier => Err(ServiceError::Internal("a local invite became an outlier".into())),
        }
    }

    /// Ends a local user's out-of-band membership in a room this server is not in — refuses an
    /// invite, or withdraws a knock — with a `leave` made and sent through a server of the room
    /// (`make_leave`, `send_leave` v2); when none answers, the leave is kept here only, so the
    /// user is rid of the invite or knock either way.
    pub async fn leave_out_of_band(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        reason: Option<String>,
    ) -> Result<OwnedEventId, ServiceError> {
        let record = self
            .rooms
            .out_of_band(user_id, room_id)
            .await?
            .filter(|record| matches!(record.membership.as_str(), "invite" | "knock"))
            .ok_or_else(|| ServiceError::NotFound(format!("no invite to or knock on {room_id} to leave")))?;
        let version = RoomVersion::parse(&record.room_version)?;
        let membership = self.rooms.stored_pdu(&version, &record.event_id).await?;
        let servers = self.servers_of_described_room(&membership, &record.stripped_state, room_id);
        let mut leave = None;
        for server in &servers {
            match self.leave_through(server, user_id, room_id, reason.clone()).await {
                Ok(event) => {
                    leave = Some(event);
                    break;
                }
                Err(error) => {
                    tracing::info!(%server, %room_id, %error, "leaving through this server failed")
                }
            }
        }
        let leave = match leave {
            Some(leave) => leave,
            None => self.rooms.local_rejection(&version, &membership, reason)?,
        };
        let event_id = leave.id().to_owned();
        self.rooms.record_out_of_band(&version, &leave, Vec::new()).await?;
        Ok(event_id)
    }

    /// `make_leave` then `send_leave` v2 through `server`: the user's signed leave, accepted
    /// by that server.
    async fn leave_through(
        &self,
        server: &ServerName,
        user_id: &UserId,
        room_id: &RoomId,
        reason: Option<String>,
    ) -> Result<Pdu, ServiceError> {
        let client = self.remote()?.keys.client().clone();
        let path =
            format!("/_matrix/federation/v1/make_leave/{}/{}", encode(room_id.as_str()), encode(user_id.as_str()));
        let answer = client.request(server, Method::GET, &path, None, Auth::Signed, MAX_SMALL_RESPONSE_BYTES).await?;
        let template: MakeLeave = parse(&answer)?;
        let version = RoomVersion::parse(template.room_version.as_deref().unwrap_or("1"))?;
        let content = crate::rooms::member_content("leave", reason);
        let leave = self.completed_template(&version, template.event, (user_id, room_id), content)?;
        let path =
            format!("/_matrix/federation/v2/send_leave/{}/{}", encode(room_id.as_str()), encode(leave.id().as_str()));
        let body = serde_json::to_value(leave.object()).map_err(|e| ServiceError::Internal(e.to_string()))?;
        client.request(server, Method::PUT, &path, Some(&body), Auth::Signed, MAX_SMALL_RESPONSE_BYTES).await?;
        Ok(leave)
    }

    /// A pushed membership event for a room this server is not in: kept when it ends a local
    /// user's out-of-band invite (the inviter took it back, or a ban) or knock (refused), which
    /// it shows by citing that membership among its auth events. Anything else is not for this
    /// server.
    pub(super) async fn receive_out_of_band(&self, origin: &ServerName, bytes: &[u8]) -> Result<(), String> {
        #[derive(Deserialize)]
        struct Target {
            room_id: Option<String>,
            state_key: Option<String>,
        }
        let target: Target = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let room_id = target.room_id.and_then(|id| ruma::OwnedRoomId::try_from(id).ok()).ok_or("invalid room_id")?;
        let not_ours = || format!("this server is not in {room_id}");
        let user_id = target.state_key.and_then(|key| ruma::OwnedUserId::try_from(key).ok()).ok_or_else(not_ours)?;
        let Some(pending) = self.rooms.out_of_band(&user_id, &room_id).await.map_err(|e| e.to_string())? else {
            return Err(not_ours());
        };
        let version = RoomVersion::parse(&pending.room_version).map_err(|e| e.to_string())?;
        let object = lattice_core::pdu::parse(bytes, &version).map_err(|e| e.to_string())?;
        let keys = self.keys_for(&object, &version).await.map_err(|e| e.to_string())?;
        let event = self.rooms.check_remote_pdu(origin, &version, bytes, &keys).map_err(|e| e.to_string())?;
        let cites_pending = event.auth_event_ids().iter().any(|id| id.as_str() == pending.event_id);
        let membership = crate::rooms::membership_of_pdu(&event);
        let ends_pending = matches!(membership.as_str(), "leave" | "ban");
        if !matches!(pending.membership.as_str(), "invite" | "knock") || !cites_pending || !ends_pending {
            return Err(not_ours());
        }
        self.rooms.record_out_of_band(&version, &event, Vec::new()).await.map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// An invitee's server refusing an invite is the inviter's answer (403), not a fault here.
fn refused_by(server: &ServerName, error: FederationError) -> ServiceError {
    match error {
        FederationError::Status { status: 400..=499, body, .. } if status_is_refusal(&body) => {
            let reason = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_default();
            ServiceError::Forbidden(format!("{server} refused the invite: {reason}"))
        }
        other => ServiceError::from(other),
    }
}

/// From v12 the room ID is the create event's hash, so a room's description can be held to
/// signed PDUs of the room.
pub(super) fn strict_room_state(version: &RoomVersion) -> bool {
    version.rules().room_id_format == RoomIdFormatVersion::V2
}

pub(super) fn is_create_entry(entry: &Value) -> bool {
    entry["type"] == "m.room.create" && entry["state_key"] == ""
}

fn status_is_refusal(body: &str) -> bool {
    serde_json::from_str::<Value>(body).is_ok_and(|v| v["errcode"] == "M_FORBIDDEN" || v["errcode"] == "M_NOT_FOUND")
}
