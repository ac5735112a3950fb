//! What this server asks of others: joining a room that lives elsewhere (`make_join`, then
//! `send_join`), and filling a gap before a pushed event (`get_missing_events`, then the state
//! at the event from `/state`). Everything fetched is checked like a pushed PDU (format,
//! hashes, signatures of the servers the spec names) before it is stored.

use http::Method;
use lattice_core::event::Pdu;
use lattice_core::room_version::RoomVersion;
use lattice_core::state_resolution::StateMap;
use lattice_federation::FederationError;
use lattice_federation::client::Auth;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use ruma::events::StateEventType;
use ruma::room_version_rules::EventIdFormatVersion;
use ruma::state_res::Event;
use ruma::{CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedServerName, RoomId, ServerName, UserId};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::Federation;
use crate::ServiceError;
use crate::rooms::{Arrival, Ingested, Outcome};

/// Largest `send_join` or `/state` answer read: a big room's state and auth chain.
const MAX_STATE_RESPONSE_BYTES: usize = 256 * 1024 * 1024;
pub(super) const MAX_SMALL_RESPONSE_BYTES: usize = 4 * 1024 * 1024;
/// Events asked for per gap before falling back to the state at the event.
const MISSING_EVENTS_LIMIT: usize = 20;

pub(super) fn encode(part: &str) -> String {
    utf8_percent_encode(part, NON_ALPHANUMERIC).to_string()
}

/// The path of a `make_join` or `make_knock` request, offering every room version Lattice
/// supports.
pub(super) fn template_path(endpoint: &str, room_id: &RoomId, user_id: &UserId) -> String {
    let versions: Vec<String> =
        lattice_core::room_version::SUPPORTED_ROOM_VERSIONS.iter().map(|v| format!("ver={v}")).collect();
    format!(
        "/_matrix/federation/v1/{endpoint}/{}/{}?{}",
        encode(room_id.as_str()),
        encode(user_id.as_str()),
        versions.join("&")
    )
}

#[derive(Deserialize)]
struct MakeJoin {
    room_version: Option<String>,
    event: Value,
}

#[derive(Deserialize)]
struct SendJoin {
    #[serde(default)]
    state: Vec<Box<RawValue>>,
    #[serde(default)]
    auth_chain: Vec<Box<RawValue>>,
    event: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct StateAnswer {
    #[serde(default)]
    pdus: Vec<Box<RawValue>>,
    #[serde(default)]
    auth_chain: Vec<Box<RawValue>>,
}

#[derive(Deserialize)]
struct MissingEvents {
    #[serde(default)]
    events: Vec<Box<RawValue>>,
}

impl Federation {
    /// Joins a local user to a room this server is not in, through the first of `via` that
    /// helps. The join is stored with the state the resident server gave, after every state
    /// and auth-chain event passed the same checks as any PDU.
    pub async fn join_remote(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        via: &[OwnedServerName],
        reason: Option<String>,
    ) -> Result<OwnedEventId, ServiceError> {
        let client = self.remote()?.keys.client().clone();
        let path = template_path("make_join", room_id, user_id);
        let mut failures = Vec::new();
        // Another server may still let the user in (a restricted room's authoriser can be on
        // any server in it), so a refusal is kept while the rest are tried.
        let mut refusal = None;
        for server in via.iter().filter(|s| *s != self.server_name()) {
            let answer = client.request(server, Method::GET, &path, None, Auth::Signed, MAX_SMALL_RESPONSE_BYTES).await;
            let answer = answer.map_err(|error| room_refusal(server, "join", error));
            let attempt = match answer.and_then(|b| parse::<MakeJoin>(&b)) {
                Ok(template) => self.complete_join(server, user_id, room_id, template, reason.clone()).await,
                Err(error) => Err(error),
            };
            match attempt {
                Ok(event_id) => return Ok(event_id),
                Err(error @ ServiceError::IncompatibleRoomVersion(_)) => return Err(error),
                Err(error @ ServiceError::Forbidden(_)) => {
                    tracing::info!(%server, %room_id, %error, "the room refused the join through this server");
                    refusal.get_or_insert(error);
                }
                Err(error) => {
                    tracing::info!(%server, %room_id, %error, "joining through this server failed");
                    failures.push(format!("{server}: {error}"));
                }
            }
        }
        if let Some(refusal) = refusal {
            return Err(refusal);
        }
        if failures.is_empty() {
            return Err(ServiceError::NotFound(format!("no server to join {room_id} through: name one with `via`")));
        }
        Err(ServiceError::Remote(format!("could not join {room_id}: {}", failures.join("; "))))
    }

    async fn complete_join(
        &self,
        server: &ServerName,
        user_id: &UserId,
        room_id: &RoomId,
        template: MakeJoin,
        reason: Option<String>,
    ) -> Result<OwnedEventId, ServiceError> {
        let version = RoomVersion::parse(template.room_version.as_deref().unwrap_or("1"))?;
        let authoriser = template.event["content"]["join_authorised_via_users_server"].as_str().map(str::to_owned);
        let mut content = crate::accounts::profile_content(
            crate::rooms::member_content("join", reason),
            &self.accounts.member_profile(user_id).await?,
        );
        if let Some(authoriser) = authoriser {
            content["join_authorised_via_users_server"] = json!(authoriser);
        }
        let join = self.completed_template(&version, template.event, (user_id, room_id), content)?;
        let path =
            format!("/_matrix/federation/v2/send_join/{}/{}", encode(room_id.as_str()), encode(join.id().as_str()));
        let body = serde_json::to_value(join.object()).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let client = self.remote()?.keys.client().clone();
        let answer = client
            .request(server, Method::PUT, &path, Some(&body), Auth::Signed, MAX_STATE_RESPONSE_BYTES)
            .await
            .map_err(|error| room_refusal(server, "join", error))?;
        let answer: SendJoin = parse(&answer)?;
        // A restricted join comes back with the authorising server's signature added.
        let join = match &answer.event {
            Some(signed) => {
                let event = self.check_fetched(&version, signed.get().as_bytes()).await?;
                if event.id() != join.id() {
                    return Err(ServiceError::Remote("send_join answered with another event".into()));
                }
                event
            }
            None => join,
        };
        let state = self.store_fetched_state(&version, room_id, &answer.state, &answer.auth_chain).await?;
        if !state.contains_key(&(StateEventType::RoomCreate, String::new())) {
            return Err(ServiceError::Remote("the room's state has no valid create event".into()));
        }
        let event_id = join.id().to_owned();
        let ingested = self.rooms.ingest_placed(&version, join, Arrival::Live, Some(&state)).await?;
        match ingested.outcome {
            Outcome::Accepted => Ok(event_id),
            Outcome::SoftFailed(reason) | Outcome::Rejected(reason) => {
                Err(ServiceError::Forbidden(format!("the join did not pass the room's rules here: {reason}")))
            }
            Outcome::Outlier => Err(ServiceError::Internal("a live join became an outlier".into())),
        }
    }

    /// A membership event of this server's user completed from another server's template
    /// (`make_join`, `make_leave`): the template must be that user's membership in that room;
    /// this server sets the content, origin and time (and the event ID before v3) and signs.
    pub(super) fn completed_template(
        &self,
        version: &RoomVersion,
        template: Value,
        (user_id, room_id): (&UserId, &RoomId),
        content: Value,
    ) -> Result<Pdu, ServiceError> {
        let mut object = match CanonicalJsonValue::try_from(template) {
            Ok(CanonicalJsonValue::Object(object)) => object,
            _ => return Err(ServiceError::Remote("the membership template is not a JSON object".into())),
        };
        let field = |object: &CanonicalJsonObject, name: &str| match object.get(name) {
            Some(CanonicalJsonValue::String(value)) => Some(value.clone()),
            _ => None,
        };
        if field(&object, "sender").as_deref() != Some(user_id.as_str())
            || field(&object, "state_key").as_deref() != Some(user_id.as_str())
            || field(&object, "type").as_deref() != Some("m.room.member")
            || field(&object, "room_id").as_deref() != Some(room_id.as_str())
        {
            return Err(ServiceError::Remote("the template is not a membership of this user in this room".into()));
        }
        object.insert("content".into(), canonical(content)?);
        object.insert("origin".into(), CanonicalJsonValue::String(self.server_name().to_string()));
        let now = i64::try_from(self.now_ms()).unwrap_or(i64::MAX);
        object.insert("origin_server_ts".into(), CanonicalJsonValue::Integer(now.try_into().unwrap_or_default()));
        if version.rules().event_id_format == EventIdFormatVersion::V1 {
            let id = format!("${}:{}", crate::secrets::random_alphanumeric(18), self.server_name());
            object.insert("event_id".into(), CanonicalJsonValue::String(id));
        }
        self.rooms.sign_template(version, object)
    }

    /// Asks the alias's server which room it names (`/query/directory`).
    pub async fn query_remote_alias(
        &self,
        alias: &ruma::RoomAliasId,
    ) -> Result<(ruma::OwnedRoomId, Vec<OwnedServerName>), ServiceError> {
        #[derive(Deserialize)]
        struct Directory {
            room_id: ruma::OwnedRoomId,
            #[serde(default)]
            servers: Vec<String>,
        }
        let client = self.remote()?.keys.client().clone();
        let path = format!("/_matrix/federation/v1/query/directory?room_alias={}", encode(alias.as_str()));
        let bytes = match client
            .request(alias.server_name(), Method::GET, &path, None, Auth::Signed, MAX_SMALL_RESPONSE_BYTES)
            .await
        {
            Err(lattice_federation::FederationError::Status { status: 404, .. }) => {
                return Err(ServiceError::NotFound(format!("{alias} does not exist")));
            }
            other => other?,
        };
        let answer: Directory = parse(&bytes)?;
        let mut servers: Vec<OwnedServerName> =
            answer.servers.iter().filter_map(|s| OwnedServerName::try_from(s.as_str()).ok()).take(20).collect();
        if !servers.iter().any(|s| s == alias.server_name()) {
            servers.push(alias.server_name().to_owned());
        }
        Ok((answer.room_id, servers))
    }

    /// Checks fetched state and auth-chain PDUs, stores them as outliers, and returns the
    /// state map of those in `state` that were stored.
    async fn store_fetched_state(
        &self,
        version: &RoomVersion,
        room_id: &RoomId,
        state: &[Box<RawValue>],
        auth_chain: &[Box<RawValue>],
    ) -> Result<StateMap, ServiceError> {
        let mut events: Vec<Pdu> = Vec::with_capacity(state.len() + auth_chain.len());
        let mut state_ids: std::collections::HashSet<OwnedEventId> =
            std::collections::HashSet::with_capacity(state.len());
        for (raw, in_state) in state.iter().map(|r| (r, true)).chain(auth_chain.iter().map(|r| (r, false))) {
            match self.check_fetched(version, raw.get().as_bytes()).await {
                Ok(event) => {
                    if in_state {
                        state_ids.insert(event.id().to_owned());
                    }
                    events.push(event);
                }
                Err(error) => tracing::info!(%room_id, %error, "a fetched state event failed its checks; left out"),
            }
        }
        let mut slots = Vec::with_capacity(state_ids.len());
        for event in &events {
            if let Some(key) = event.state_key()
                && state_ids.contains(event.id())
            {
                slots.push(((StateEventType::from(event.kind().to_string()), key.to_owned()), event.id().to_owned()));
            }
        }
        let left_out = self.rooms.store_outliers(version, room_id, events).await?;
        Ok(slots.into_iter().filter(|(_, id)| !left_out.contains(id)).collect())
    }

    /// A PDU fetched from any server: parsed for the room version and checked against the
    /// keys of the servers that must have signed it.
    pub(super) async fn check_fetched(&self, version: &RoomVersion, bytes: &[u8]) -> Result<Pdu, ServiceError> {
        let object = lattice_core::pdu::parse(bytes, version)?;
        let keys = self.keys_for(&object, version).await?;
        self.rooms.check_fetched_pdu(version, object, &keys)
    }

    /// A pushed event whose prev (or auth) events are not stored: asks `origin` for the
    /// missing events between the room's front and it, stores those that now fit, and when a
    /// gap remains takes the state before the event from `origin`'s `/state` and places the
    /// event on it (the gap is recorded for backfill).
    pub(super) async fn fill_gap_and_ingest(
        &self,
        origin: &ServerName,
        version: &RoomVersion,
        event: Pdu,
    ) -> Result<Ingested, ServiceError> {
        let room_id = crate::rooms::room_id_of_pdu(&event)?;
        let client = self.remote()?.keys.client().clone();
        let earliest = self.rooms.forward_extremities(&room_id).await?;
        let body = json!({
            "earliest_events": earliest,
            "latest_events": [event.id()],
            "limit": MISSING_EVENTS_LIMIT,
            "min_depth": 0,
        });
        let path = format!("/_matrix/federation/v1/get_missing_events/{}", encode(room_id.as_str()));
        match client.request(origin, Method::POST, &path, Some(&body), Auth::Signed, MAX_SMALL_RESPONSE_BYTES).await {
            Ok(bytes) => {
                let missing: MissingEvents = parse(&bytes)?;
                let mut fetched = Vec::new();
                for raw in missing.events.iter().take(MISSING_EVENTS_LIMIT) {
                    match self.check_fetched(version, raw.get().as_bytes()).await {
                        Ok(pdu) if crate::rooms::room_id_of_pdu(&pdu)? == room_id => fetched.push(pdu),
                        Ok(_) => tracing::info!(%origin, "get_missing_events answered an event of another room"),
                        Err(error) => tracing::info!(%origin, %error, "a missing event failed its checks"),
                    }
                }
                fetched.sort_by_key(|pdu| pdu.depth());
                for pdu in fetched {
                    match self.rooms.ingest(version, pdu.clone()).await {
                        Err(ServiceError::MissingEvents(_)) => {
                            self.place_on_fetched_state(origin, version, &room_id, pdu).await?;
                        }
                        Err(error) => tracing::info!(%origin, %error, "a missing event was not stored"),
                        Ok(_) => {}
                    }
                }
            }
            Err(error) => tracing::info!(%origin, %error, "get_missing_events failed"),
        }
        match self.rooms.ingest(version, event.clone()).await {
            Err(ServiceError::MissingEvents(_)) => self.place_on_fetched_state(origin, version, &room_id, event).await,
            other => other,
        }
    }

    /// Fills a gap in a room's history from another server in the room (`/backfill`): at most
    /// `limit` events back from `missing` (the prev events the stored history lacks), placed in
    /// history order, never in `/sync`. Returns how many were stored.
    pub async fn backfill_gap(
        &self,
        room_id: &RoomId,
        missing: &[String],
        limit: usize,
    ) -> Result<usize, ServiceError> {
        let version = self.rooms.room_version(room_id).await?;
        let client = self.remote()?.keys.client().clone();
        let mut query: Vec<String> = missing.iter().take(20).map(|id| format!("v={}", encode(id))).collect();
        query.push(format!("limit={}", limit.min(100)));
        let path = format!("/_matrix/federation/v1/backfill/{}?{}", encode(room_id.as_str()), query.join("&"));
        let servers = self.rooms.joined_servers(room_id).await?;
        for server in servers.iter().filter(|s| *s != self.server_name()) {
            let bytes =
                match client.request(server, Method::GET, &path, None, Auth::Signed, MAX_STATE_RESPONSE_BYTES).await {
                    Ok(bytes) => bytes,
                    Err(error) => {
                        tracing::info!(%server, %room_id, %error, "backfill failed; trying another server");
                        continue;
                    }
                };
            #[derive(Deserialize)]
            struct Backfill {
                #[serde(default)]
                pdus: Vec<Box<RawValue>>,
            }
            let answer: Backfill = parse(&bytes)?;
            let mut events = Vec::with_capacity(answer.pdus.len());
            for raw in answer.pdus.iter().take(limit.min(100)) {
                match self.check_fetched(&version, raw.get().as_bytes()).await {
                    Ok(pdu) if crate::rooms::room_id_of_pdu(&pdu)? == room_id => events.push(pdu),
                    Ok(_) => tracing::info!(%server, "backfill answered an event of another room"),
                    Err(error) => tracing::info!(%server, %error, "a backfilled event failed its checks"),
                }
            }
            // Oldest first, so each event's prev events are stored before it where the batch has them.
            events.sort_by_key(|pdu| pdu.depth());
            // Written without a sync each, then made durable together before the page is answered.
            let stored =
                crate::rooms::with_deferred_durability(self.place_backfilled(server, &version, room_id, events)).await;
            if stored > 0 {
                self.kv.flush().await?;
            }
            tracing::debug!(%server, %room_id, asked = missing.len(), answered = answer.pdus.len(), stored, "backfilled");
            return Ok(stored);
        }
        Ok(0)
    }

    /// Stores backfilled `events` (oldest first) as history; returns how many were stored.
    async fn place_backfilled(
        &self,
        server: &ServerName,
        version: &RoomVersion,
        room_id: &RoomId,
        events: Vec<Pdu>,
    ) -> usize {
        let mut stored = 0;
        for event in events {
            let outcome = match self.rooms.ingest_placed(version, event.clone(), Arrival::Backfill, None).await {
                Err(ServiceError::MissingEvents(_)) => {
                    self.place_on_state_from(server, version, room_id, event, Arrival::Backfill).await
                }
                other => other,
            };
            match outcome {
                Ok(ingested) => {
                    if let crate::rooms::Outcome::Rejected(reason) = &ingested.outcome {
                        tracing::info!(%server, event_id = %ingested.event_id, %reason, "a backfilled event was rejected");
                    }
                    stored += 1;
                }
                Err(error) => tracing::info!(%server, %error, "a backfilled event was not stored"),
            }
        }
        stored
    }

    /// Places `event` live on the state `origin` says was before it.
    async fn place_on_fetched_state(
        &self,
        origin: &ServerName,
        version: &RoomVersion,
        room_id: &RoomId,
        event: Pdu,
    ) -> Result<Ingested, ServiceError> {
        self.place_on_state_from(origin, version, room_id, event, Arrival::Live).await
    }

    /// Places `event` (live or as history) on the state `origin` says was before it.
    async fn place_on_state_from(
        &self,
        origin: &ServerName,
        version: &RoomVersion,
        room_id: &RoomId,
        event: Pdu,
        arrival: Arrival,
    ) -> Result<Ingested, ServiceError> {
        let client = self.remote()?.keys.client().clone();
        let path = format!(
            "/_matrix/federation/v1/state/{}?event_id={}",
            encode(room_id.as_str()),
            encode(event.id().as_str())
        );
        let bytes = client.request(origin, Method::GET, &path, None, Auth::Signed, MAX_STATE_RESPONSE_BYTES).await?;
        let answer: StateAnswer = parse(&bytes)?;
        let mut auth_chain = answer.auth_chain;
        // The event's own auth events may be outside the state's chain.
        let own_auth =
            format!("/_matrix/federation/v1/event_auth/{}/{}", encode(room_id.as_str()), encode(event.id().as_str()));
        if let Ok(bytes) =
            client.request(origin, Method::GET, &own_auth, None, Auth::Signed, MAX_STATE_RESPONSE_BYTES).await
            && let Ok(extra) = parse::<Value>(&bytes)
            && let Some(chain) =
                extra.get("auth_chain").and_then(|c| serde_json::from_value::<Vec<Box<RawValue>>>(c.clone()).ok())
        {
            auth_chain.extend(chain);
        }
        let state = self.store_fetched_state(version, room_id, &answer.pdus, &auth_chain).await?;
        self.rooms.ingest_placed(version, event, arrival, Some(&state)).await
    }
}

pub(super) fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ServiceError> {
    serde_json::from_slice(bytes).map_err(|e| ServiceError::Remote(format!("the other server's answer: {e}")))
}

fn canonical(value: Value) -> Result<CanonicalJsonValue, ServiceError> {
    CanonicalJsonValue::try_from(value).map_err(|e| ServiceError::BadJson(e.to_string()))
}

/// The room's answer to a membership this server asked for on a user's behalf (a join, a
/// knock), passed on to the client as the spec asks: a refusal (403), or a room version this
/// server does not support (400). Anything else (a server that does not know the room, or does
/// not answer) lets the next server be tried.
pub(super) fn room_refusal(server: &ServerName, what: &str, error: FederationError) -> ServiceError {
    if let FederationError::Status { status: 400 | 403, body, .. } = &error
        && let Ok(answer) = serde_json::from_str::<Value>(body)
    {
        let reason = answer["error"].as_str().unwrap_or_default();
        match answer["errcode"].as_str() {
            Some("M_FORBIDDEN") => return ServiceError::Forbidden(format!("{server} refused the {what}: {reason}")),
            Some("M_INCOMPATIBLE_ROOM_VERSION") => {
                let version = answer["room_version"].as_str().unwrap_or_default();
                return ServiceError::IncompatibleRoomVersion(version.to_owned());
            }
            _ => {}
        }
    }
    ServiceError::from(error)
}
