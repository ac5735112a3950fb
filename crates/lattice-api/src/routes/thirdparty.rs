//! `/thirdparty/*`: the networks bridged into Matrix. The protocols come from application
//! services, and this server has no application-service support, so it bridges no network: the
//! list of protocols is empty and every lookup in one finds nothing. Clients ask for the list at
//! start-up (Element Web's room directory and dial pad read it) and treat an error as a failure to
//! retry, so the empty list is the answer that says "no bridges".

use axum::routing::get;
use ruma::api::client::thirdparty::{
    get_location_for_protocol, get_location_for_room_alias, get_protocol, get_protocols, get_user_for_protocol,
    get_user_for_user_id,
};

use super::Routes;
use crate::error::{ApiError, ApiResult};
use crate::extract::Auth;
use crate::typed::{Ruma, RumaResponse};

pub fn routes() -> Routes {
    Routes::new()
        .route("/_matrix/client/v3/thirdparty/protocols", get(protocols))
        .route("/_matrix/client/v3/thirdparty/protocol/{protocol}", get(protocol))
        .route("/_matrix/client/v3/thirdparty/location/{protocol}", get(locations_in_protocol))
        .route("/_matrix/client/v3/thirdparty/user/{protocol}", get(users_in_protocol))
        .route("/_matrix/client/v3/thirdparty/location", get(locations_of_alias))
        .route("/_matrix/client/v3/thirdparty/user", get(users_of_user_id))
}

async fn protocols(
    _auth: Auth,
    Ruma(_): Ruma<get_protocols::v3::Request>,
) -> ApiResult<RumaResponse<get_protocols::v3::Response>> {
    Ok(RumaResponse(get_protocols::v3::Response::new(Default::default())))
}

async fn protocol(_auth: Auth, Ruma(request): Ruma<get_protocol::v3::Request>) -> ApiError {
    unknown_protocol(&request.protocol)
}

async fn locations_in_protocol(_auth: Auth, Ruma(request): Ruma<get_location_for_protocol::v3::Request>) -> ApiError {
    unknown_protocol(&request.protocol)
}

async fn users_in_protocol(_auth: Auth, Ruma(request): Ruma<get_user_for_protocol::v3::Request>) -> ApiError {
    unknown_protocol(&request.protocol)
}

async fn locations_of_alias(_auth: Auth, Ruma(request): Ruma<get_location_for_room_alias::v3::Request>) -> ApiError {
    not_found(format!("no bridged location for {}", request.alias))
}

async fn users_of_user_id(_auth: Auth, Ruma(request): Ruma<get_user_for_user_id::v3::Request>) -> ApiError {
    not_found(format!("no bridged user for {}", request.userid))
}

fn unknown_protocol(protocol: &str) -> ApiError {
    not_found(format!("unknown third-party protocol {protocol:?}: this server bridges none"))
}

fn not_found(message: String) -> ApiError {
    ApiError::Service(lattice_service::ServiceError::NotFound(message))
}
