//! Push rules under `/pushrules` (spec v1.16, "Push notifications"): the caller's own rules
//! only, chosen by the access token, never by the path.

use axum::extract::State;
use axum::routing::{get, post};
use ruma::api::client::push::PushRule;
use ruma::api::client::push::set_pusher::v3::PusherAction;
use ruma::api::client::push::{
    delete_pushrule, get_notifications, get_pushers, get_pushrule, get_pushrule_actions, get_pushrule_enabled,
    get_pushrules_all, get_pushrules_global_scope, set_pusher, set_pushrule, set_pushrule_actions,
    set_pushrule_enabled,
};
use ruma::{MilliSecondsSinceUnixEpoch, UInt};

use super::Routes;
use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::Auth;
use crate::typed::{Ruma, RumaResponse};

pub fn routes() -> Routes {
    Routes::new()
        .route("/_matrix/client/v3/pushrules/", get(all_rules))
        .route("/_matrix/client/v3/pushrules/global/", get(global_rules))
        .route("/_matrix/client/v3/pushrules/global/{kind}/{rule_id}", get(rule).put(set_rule).delete(delete_rule))
        .route("/_matrix/client/v3/pushrules/global/{kind}/{rule_id}/enabled", get(enabled).put(set_enabled))
        .route("/_matrix/client/v3/pushrules/global/{kind}/{rule_id}/actions", get(actions).put(set_actions))
        .route("/_matrix/client/v3/notifications", get(notifications))
        .route("/_matrix/client/v3/pushers", get(pushers))
        .route("/_matrix/client/v3/pushers/set", post(set_pusher))
}

async fn all_rules(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(_): Ruma<get_pushrules_all::v3::Request>,
) -> ApiResult<RumaResponse<get_pushrules_all::v3::Response>> {
    let rules = state.service.push().rules(&session.user_id).await?;
    Ok(RumaResponse(get_pushrules_all::v3::Response::new(rules)))
}

async fn global_rules(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(_): Ruma<get_pushrules_global_scope::v3::Request>,
) -> ApiResult<RumaResponse<get_pushrules_global_scope::v3::Response>> {
    let rules = state.service.push().rules(&session.user_id).await?;
    Ok(RumaResponse(get_pushrules_global_scope::v3::Response::new(rules)))
}

async fn rule(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<get_pushrule::v3::Request>,
) -> ApiResult<RumaResponse<get_pushrule::v3::Response>> {
    let rule = state.service.push().rule(&session.user_id, &request.kind, &request.rule_id).await?;
    Ok(RumaResponse(get_pushrule::v3::Response::new(PushRule::from(rule))))
}

async fn set_rule(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<set_pushrule::v3::Request>,
) -> ApiResult<RumaResponse<set_pushrule::v3::Response>> {
    let (before, after) = (request.before.as_deref(), request.after.as_deref());
    state.service.push().set_rule(&session.user_id, request.rule, before, after).await?;
    Ok(RumaResponse(set_pushrule::v3::Response::new()))
}

async fn delete_rule(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<delete_pushrule::v3::Request>,
) -> ApiResult<RumaResponse<delete_pushrule::v3::Response>> {
    state.service.push().delete_rule(&session.user_id, &request.kind, &request.rule_id).await?;
    Ok(RumaResponse(delete_pushrule::v3::Response::new()))
}

async fn enabled(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<get_pushrule_enabled::v3::Request>,
) -> ApiResult<RumaResponse<get_pushrule_enabled::v3::Response>> {
    let rule = state.service.push().rule(&session.user_id, &request.kind, &request.rule_id).await?;
    Ok(RumaResponse(get_pushrule_enabled::v3::Response::new(rule.enabled())))
}

async fn set_enabled(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<set_pushrule_enabled::v3::Request>,
) -> ApiResult<RumaResponse<set_pushrule_enabled::v3::Response>> {
    let push = state.service.push();
    push.set_enabled(&session.user_id, &request.kind, &request.rule_id, request.enabled).await?;
    Ok(RumaResponse(set_pushrule_enabled::v3::Response::new()))
}

async fn actions(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<get_pushrule_actions::v3::Request>,
) -> ApiResult<RumaResponse<get_pushrule_actions::v3::Response>> {
    let rule = state.service.push().rule(&session.user_id, &request.kind, &request.rule_id).await?;
    Ok(RumaResponse(get_pushrule_actions::v3::Response::new(rule.actions().to_vec())))
}

async fn set_actions(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<set_pushrule_actions::v3::Request>,
) -> ApiResult<RumaResponse<set_pushrule_actions::v3::Response>> {
    let push = state.service.push();
    push.set_actions(&session.user_id, &request.kind, &request.rule_id, request.actions).await?;
    Ok(RumaResponse(set_pushrule_actions::v3::Response::new()))
}

async fn notifications(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<get_notifications::v3::Request>,
) -> ApiResult<RumaResponse<get_notifications::v3::Response>> {
    let limit = request.limit.map(|limit| usize::try_from(u64::from(limit)).unwrap_or(usize::MAX));
    let only_highlights = request.only.as_deref() == Some("highlight");
    let (listed, next_token) =
        state.service.notifications(&session.user_id, request.from.as_deref(), limit, only_highlights).await?;
    let mut notifications = Vec::with_capacity(listed.len());
    for (notification, event) in listed {
        let ts = MilliSecondsSinceUnixEpoch(UInt::new_saturating(notification.ts));
        notifications.push(get_notifications::v3::Notification::new(
            notification.actions,
            crate::typed::raw(&event)?,
            notification.read,
            notification.room_id,
            ts,
        ));
    }
    let mut response = get_notifications::v3::Response::new(notifications);
    response.next_token = next_token;
    Ok(RumaResponse(response))
}

async fn pushers(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(_): Ruma<get_pushers::v3::Request>,
) -> ApiResult<RumaResponse<get_pushers::v3::Response>> {
    let pushers = state.service.push().pushers(&session.user_id).await?;
    Ok(RumaResponse(get_pushers::v3::Response::new(pushers)))
}

async fn set_pusher(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<set_pusher::v3::Request>,
) -> ApiResult<RumaResponse<set_pusher::v3::Response>> {
    let push = state.service.push();
    match request.action {
        PusherAction::Post(post) => push.set_pusher(&session.user_id, post.pusher, post.append).await?,
        PusherAction::Delete(ids) => push.delete_pusher(&session.user_id, &ids).await?,
        _ => return Err(ApiError::InvalidParam("unknown pusher action".into())),
    }
    Ok(RumaResponse(set_pusher::v3::Response::new()))
}
