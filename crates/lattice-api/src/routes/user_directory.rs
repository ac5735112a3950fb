//! `POST /user_directory/search`, on ruma's types.

use axum::extract::State;
use axum::routing::post;
use ruma::OwnedMxcUri;
use ruma::api::client::user_directory::search_users;

use super::Routes;
use crate::AppState;
use crate::error::ApiResult;
use crate::extract::Auth;
use crate::typed::{Ruma, RumaResponse};

pub fn routes() -> Routes {
    Routes::new().route("/_matrix/client/v3/user_directory/search", post(search))
}

async fn search(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<search_users::v3::Request>,
) -> ApiResult<RumaResponse<search_users::v3::Response>> {
    let limit = usize::try_from(u64::from(request.limit)).unwrap_or(usize::MAX);
    let page = state.service.search_user_directory(&session.user_id, &request.search_term, Some(limit)).await?;
    let results = page
        .results
        .into_iter()
        .map(|found| {
            let mut user = search_users::v3::User::new(found.user_id);
            user.display_name = found.display_name;
            // A stored avatar that is not an mxc:// URI is left out rather than passed on.
            user.avatar_url = found.avatar_url.filter(|url| url.starts_with("mxc://")).map(OwnedMxcUri::from);
            user
        })
        .collect();
    Ok(RumaResponse(search_users::v3::Response::new(results, page.limited)))
}
