//! Delayed events (MSC4140, unstable prefix `org.matrix.msc4140`): scheduling through the
//! dedicated endpoint (scheduling through `/send` and `/state` with the `delay` query parameter
//! is in `rooms.rs`), listing and reading the user's scheduled events, and the management
//! actions: with the action in the body (authenticated; the form older matrix-js-sdk releases
//! use) and one endpoint per action (unauthenticated: the `delay_id` is the capability, so an
//! SFU can hold it).

use axum::Json;
use axum::extract::State;
use axum::routing::{get, post, put};
use lattice_service::delayed_events::{DelayedAction, DelayedEventView, ListFilter, ScheduleRequest};
use lattice_service::rooms::Txn;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Routes;
use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, JsonBody, PathParams, QueryParams, parse_room};

pub fn routes() -> Routes {
    Routes::new()
        .route(
            "/_matrix/client/unstable/org.matrix.msc4140/rooms/{room_id}/delayed_event/{event_type}/{txn_id}",
            put(schedule),
        )
        .route("/_matrix/client/unstable/org.matrix.msc4140/delayed_events", get(list))
        .route("/_matrix/client/unstable/org.matrix.msc4140/delayed_events/{delay_id}", get(get_one).post(update))
        .route("/_matrix/client/unstable/org.matrix.msc4140/delayed_events/{delay_id}/{action}", post(update_action))
}

/// The `org.matrix.msc4140.delay` query parameter of `/send` and `/state`, in milliseconds.
#[derive(Deserialize)]
pub(super) struct DelayQuery {
    #[serde(rename = "org.matrix.msc4140.delay")]
    delay: Option<String>,
}

impl DelayQuery {
    /// The delay asked for, if any; anything but a non-negative integer is `M_INVALID_PARAM`
    /// (zero is refused by the service with the other limits).
    pub(super) fn delay_ms(&self) -> ApiResult<Option<u64>> {
        self.delay
            .as_deref()
            .map(|text| {
                text.parse::<u64>().map_err(|_| {
                    ApiError::InvalidParam(format!(
                        "org.matrix.msc4140.delay must be a number of milliseconds, not {text:?}"
                    ))
                })
            })
            .transpose()
    }
}

/// Schedules a delayed event for `/send`, `/state` and the dedicated endpoint alike.
pub(super) async fn schedule_event(
    state: &AppState,
    session: &lattice_service::Session,
    request: ScheduleRequest<'_>,
) -> ApiResult<Json<Value>> {
    state.limits.message_per_user.check(session.user_id.as_str())?;
    let delay_id = state.service.delayed_events().schedule(&session.user_id, request).await?;
    Ok(Json(json!({ "delay_id": delay_id })))
}

#[derive(Deserialize)]
struct SchedulePath {
    room_id: String,
    event_type: String,
    txn_id: String,
}

#[derive(Deserialize)]
struct ScheduleBody {
    delay: Value,
    #[serde(default)]
    state_key: Option<String>,
    content: Value,
}

/// `PUT /rooms/{roomId}/delayed_event/{eventType}/{txnId}`: `delay` (ms), `state_key` for a
/// state event, and the `content`.
async fn schedule(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(path): PathParams<SchedulePath>,
    JsonBody(body): JsonBody<ScheduleBody>,
) -> ApiResult<Json<Value>> {
    require_enabled(&state)?;
    let room_id = parse_room(&path.room_id)?;
    let delay_ms = body
        .delay
        .as_u64()
        .ok_or_else(|| ApiError::InvalidParam("delay must be a positive integer number of milliseconds".into()))?;
    let request = ScheduleRequest {
        room_id: &room_id,
        event_type: &path.event_type,
        state_key: body.state_key.as_deref(),
        content: body.content,
        delay_ms,
        txn: Some(Txn { device_id: session.device_id.as_str(), txn_id: &path.txn_id }),
    };
    schedule_event(&state, &session, request).await
}

#[derive(Deserialize)]
struct ListQuery {
    status: Option<String>,
    room_id: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    order_by: Option<String>,
    dir: Option<String>,
    outcome: Option<String>,
    reason: Option<String>,
    from: Option<String>,
    since_ts: Option<String>,
}

/// `GET /delayed_events`: the user's scheduled events, or with `status=finalised` the sent and
/// cancelled ones still kept. All of them fit one page (at most 1000 of each per user), so no
/// pagination token is handed out, and none is accepted.
async fn list(
    State(state): State<AppState>,
    Auth(session): Auth,
    QueryParams(query): QueryParams<ListQuery>,
) -> ApiResult<Json<Value>> {
    require_enabled(&state)?;
    state.limits.delayed_events_per_key.check(session.user_id.as_str())?;
    let invalid = |name: &str, value: &str| ApiError::InvalidParam(format!("unsupported {name}: {value:?}"));
    let finalised_only = match query.status.as_deref() {
        None | Some("scheduled") => false,
        Some("finalised") => true,
        Some(other) => return Err(invalid("status", other)),
    };
    if let Some(outcome) = query.outcome.as_deref().filter(|o| !matches!(*o, "send" | "cancel" | "error")) {
        return Err(invalid("outcome", outcome));
    }
    if let Some(reason) = query.reason.as_deref().filter(|r| !matches!(*r, "action" | "delay")) {
        return Err(invalid("reason", reason));
    }
    if let Some(from) = query.from.as_deref() {
        return Err(invalid("from token", from));
    }
    if let Some(since) = query.since_ts.as_deref() {
        return Err(invalid("since_ts", since));
    }
    let order: fn(&DelayedEventView) -> u64 = match query.order_by.as_deref() {
        // A scheduled event will be finalised when it falls due: at its send time.
        None | Some("send_ts") | Some("origin_server_ts") => |view| match view {
            DelayedEventView::Scheduled(record) => record.due_ms(),
            DelayedEventView::Finalised(done) => done.finalised_ms,
        },
        Some("running_since") => |view| match view {
            DelayedEventView::Scheduled(record) => record.running_since_ms,
            DelayedEventView::Finalised(done) => done.event.running_since_ms,
        },
        Some(other) => return Err(invalid("order_by", other)),
    };
    let backward = match query.dir.as_deref() {
        None | Some("f") => false,
        Some("b") => true,
        Some(other) => return Err(invalid("dir", other)),
    };
    // Only finalised events have an outcome or a reason.
    let finalised_only = finalised_only || query.outcome.is_some() || query.reason.is_some();
    let filter = ListFilter {
        finalised_only,
        room_id: query.room_id,
        event_type: query.event_type,
        outcome: query.outcome,
        reason: query.reason,
    };
    let mut records = state.service.delayed_events().list(&session.user_id, &filter).await?;
    records.sort_by_key(|view| (order(view), delay_id_of(view).to_owned()));
    if backward {
        records.reverse();
    }
    let events: Vec<Value> = records.iter().map(describe).collect();
    Ok(Json(json!({ "delayed_events": events })))
}

fn delay_id_of(view: &DelayedEventView) -> &str {
    match view {
        DelayedEventView::Scheduled(record) => &record.delay_id,
        DelayedEventView::Finalised(done) => &done.event.delay_id,
    }
}

/// A scheduled or finalised event as the MSC describes it: a finalised one adds its `outcome`,
/// `reason`, the sent event's `event_id` or the `error` that kept it from being sent (a standard
/// error response), and when it was finalised (`origin_server_ts`).
fn describe(view: &DelayedEventView) -> Value {
    let (record, done) = match view {
        DelayedEventView::Scheduled(record) => (record, None),
        DelayedEventView::Finalised(done) => (&done.event, Some(done)),
    };
    let mut value = json!({
        "delay_id": record.delay_id,
        "room_id": record.room_id,
        "type": record.event_type,
        "delay": record.delay_ms,
        "running_since": record.running_since_ms,
        "content": record.content,
    });
    if let Some(key) = &record.state_key {
        value["state_key"] = json!(key);
    }
    if let Some(done) = done {
        value["outcome"] = json!(done.outcome);
        value["reason"] = json!(done.reason);
        value["origin_server_ts"] = json!(done.finalised_ms);
        if let Some(event_id) = &done.event_id {
            value["event_id"] = json!(event_id);
        }
        if let Some(error) = &done.error {
            value["error"] = crate::error::error_body(lattice_service::delayed_events::error_of(error));
        }
    }
    value
}

#[derive(Deserialize)]
struct DelayIdPath {
    delay_id: String,
}

/// `GET /delayed_events/{delay_id}`: one of the user's scheduled or finalised events (another
/// user's is unknown).
async fn get_one(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(path): PathParams<DelayIdPath>,
) -> ApiResult<Json<Value>> {
    require_enabled(&state)?;
    state.limits.delayed_events_per_key.check(session.user_id.as_str())?;
    let record = state.service.delayed_events().get(&session.user_id, &path.delay_id).await?;
    Ok(Json(describe(&record)))
}

#[derive(Deserialize)]
struct UpdateBody {
    action: String,
}

/// `POST /delayed_events/{delay_id}` with `{"action": …}`: the owner's own events only.
async fn update(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(path): PathParams<DelayIdPath>,
    JsonBody(body): JsonBody<UpdateBody>,
) -> ApiResult<Json<Value>> {
    let action = parse_action(&body.action)?;
    apply(&state, &path.delay_id, action, Some(&session.user_id)).await
}

#[derive(Deserialize)]
struct ActionPath {
    delay_id: String,
    action: String,
}

/// `POST /delayed_events/{delay_id}/{action}`: whoever holds the `delay_id`.
async fn update_action(
    State(state): State<AppState>,
    PathParams(path): PathParams<ActionPath>,
) -> ApiResult<Json<Value>> {
    let Some(action) = DelayedAction::parse(&path.action) else { return Err(ApiError::UnknownEndpoint) };
    apply(&state, &path.delay_id, action, None).await
}

fn parse_action(action: &str) -> ApiResult<DelayedAction> {
    DelayedAction::parse(action)
        .ok_or_else(|| ApiError::InvalidParam(format!("action must be cancel, restart or send, not {action:?}")))
}

async fn apply(
    state: &AppState,
    delay_id: &str,
    action: DelayedAction,
    owner: Option<&ruma::UserId>,
) -> ApiResult<Json<Value>> {
    require_enabled(state)?;
    state.limits.delayed_events_per_key.check(delay_id)?;
    state.service.delayed_events().update(delay_id, action, owner).await?;
    Ok(Json(json!({})))
}

/// With delayed events off, their endpoints do not exist.
fn require_enabled(state: &AppState) -> ApiResult<()> {
    if state.service.delayed_events().config().enabled { Ok(()) } else { Err(ApiError::UnknownEndpoint) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_parameters_parse_as_milliseconds_or_are_refused() {
        let query = |delay: Option<&str>| DelayQuery { delay: delay.map(str::to_owned) };
        assert_eq!(query(None).delay_ms().unwrap(), None);
        assert_eq!(query(Some("1500")).delay_ms().unwrap(), Some(1500));
        for bad in ["-1", "1.5", "abc", "", "99999999999999999999999"] {
            assert!(matches!(query(Some(bad)).delay_ms(), Err(ApiError::InvalidParam(_))), "{bad:?}");
        }
    }
}
