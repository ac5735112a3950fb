//! Reporting events, rooms and users to the server's operators.

use axum::Json;
use axum::extract::State;
use axum::routing::post;
use ruma::api::client::room::report_room;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Routes;
use crate::AppState;
use crate::error::ApiResult;
use crate::extract::{Auth, JsonBody, PathParams, parse_room, parse_user};
use crate::typed::{Ruma, RumaResponse};

pub fn routes() -> Routes {
    Routes::new()
        .route("/_matrix/client/v3/rooms/{room_id}/report/{event_id}", post(report_event))
        .route("/_matrix/client/v3/rooms/{room_id}/report", post(report_room))
        .route("/_matrix/client/v3/users/{user_id}/report", post(report_user))
}

#[derive(Deserialize)]
struct EventReportBody {
    reason: Option<String>,
    score: Option<i64>,
}

#[derive(Deserialize)]
struct ReportBody {
    reason: Option<String>,
}

async fn report_event(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams((room_id, event_id)): PathParams<(String, String)>,
    JsonBody(body): JsonBody<EventReportBody>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    state.service.report_event(&session.user_id, &room_id, &event_id, body.reason, body.score).await?;
    Ok(Json(json!({})))
}

async fn report_room(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<report_room::v3::Request>,
) -> ApiResult<RumaResponse<report_room::v3::Response>> {
    // ruma reads a missing reason as blank; a blank reason is kept as none, as before.
    let reason = Some(request.reason).filter(|reason| !reason.is_empty());
    state.service.report_room(&session.user_id, &request.room_id, reason).await?;
    Ok(RumaResponse(report_room::v3::Response::new()))
}

async fn report_user(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(user_id): PathParams<String>,
    JsonBody(body): JsonBody<ReportBody>,
) -> ApiResult<Json<Value>> {
    let user_id = parse_user(&user_id)?;
    state.service.report_user(&session.user_id, &user_id, body.reason).await?;
    Ok(Json(json!({})))
}
