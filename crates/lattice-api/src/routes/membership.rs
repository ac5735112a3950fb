//! Membership beyond join and leave: knocking, forgetting rooms, and room upgrades.

use axum::extract::State;
use axum::routing::post;
use lattice_service::rooms::UpgradeRoom;
use ruma::OwnedRoomId;
use ruma::api::client::knock::knock_room;
use ruma::api::client::membership::forget_room;
use ruma::api::client::room::upgrade_room;

use super::Routes;
use crate::AppState;
use crate::error::ApiResult;
use crate::extract::Auth;
use crate::typed::{Ruma, RumaResponse};

pub fn routes() -> Routes {
    Routes::new()
        .route("/_matrix/client/v3/knock/{room_id_or_alias}", post(knock))
        .route("/_matrix/client/v3/rooms/{room_id}/forget", post(forget))
        .route("/_matrix/client/v3/rooms/{room_id}/upgrade", post(upgrade))
}

/// `POST /knock/{roomIdOrAlias}`: an alias resolves here (another server's through that
/// server); `via` (and the older `server_name`) name servers to knock through when this server
/// is not in the room.
async fn knock(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<knock_room::v3::Request>,
) -> ApiResult<RumaResponse<knock_room::v3::Response>> {
    state.limits.join_per_user.check(session.user_id.as_str())?;
    let mut via = request.via;
    let room_id = match OwnedRoomId::try_from(request.room_id_or_alias) {
        Ok(room_id) => room_id,
        Err(alias) => {
            let (room_id, servers) = state.service.resolve_alias(&alias).await?;
            via.extend(servers);
            room_id
        }
    };
    state.service.knock(&session.user_id, &room_id, &via, request.reason).await?;
    Ok(RumaResponse(knock_room::v3::Response::new(room_id)))
}

async fn forget(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<forget_room::v3::Request>,
) -> ApiResult<RumaResponse<forget_room::v3::Response>> {
    state.service.rooms().forget_room(&session.user_id, &request.room_id).await?;
    Ok(RumaResponse(forget_room::v3::Response::new()))
}

async fn upgrade(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<upgrade_room::v3::Request>,
) -> ApiResult<RumaResponse<upgrade_room::v3::Response>> {
    state.limits.room_creation_per_user.check(session.user_id.as_str())?;
    let upgrade =
        UpgradeRoom { new_version: request.new_version.to_string(), additional_creators: request.additional_creators };
    let replacement = state.service.rooms().upgrade_room(&session.user_id, &request.room_id, upgrade).await?;
    Ok(RumaResponse(upgrade_room::v3::Response::new(replacement)))
}
