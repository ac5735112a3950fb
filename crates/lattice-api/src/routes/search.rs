//! `POST /search`: message search over the rooms the user is joined to (see
//! `lattice_service::rooms::search` for the index, the query syntax and the ranking).

use axum::Json;
use axum::extract::State;
use axum::routing::post;
use lattice_service::rooms::SearchCriteria;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Routes;
use crate::AppState;
use crate::error::ApiResult;
use crate::extract::{Auth, JsonBody, QueryParams};

pub fn routes() -> Routes {
    Routes::new().route("/_matrix/client/v3/search", post(search))
}

#[derive(Deserialize)]
struct SearchQuery {
    next_batch: Option<String>,
}

#[derive(Deserialize)]
struct SearchBody {
    search_categories: Categories,
}

/// The one category the spec defines; others are ignored, as the spec's object allows.
#[derive(Deserialize)]
struct Categories {
    room_events: Option<SearchCriteria>,
}

async fn search(
    State(state): State<AppState>,
    Auth(session): Auth,
    QueryParams(query): QueryParams<SearchQuery>,
    JsonBody(body): JsonBody<SearchBody>,
) -> ApiResult<Json<Value>> {
    let Some(criteria) = body.search_categories.room_events else {
        return Ok(Json(json!({ "search_categories": {} })));
    };
    let rooms = state.service.rooms();
    let found = rooms.search_room_events(&session.user_id, criteria, query.next_batch.as_deref()).await?;
    Ok(Json(json!({ "search_categories": { "room_events": found } })))
}
