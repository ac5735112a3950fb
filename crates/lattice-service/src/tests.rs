//! Service behaviour that needs a controlled clock, on the in-memory store.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use lattice_storage::MemoryStore;
use ruma::api::client::uiaa::{AuthData, RegistrationToken};

use crate::{Clock, LoginRequest, PasswordHasher, RegisterRequest, Service, ServiceError};

struct ManualClock(AtomicU64);

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl ManualClock {
    fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

fn service() -> (Service, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock(AtomicU64::new(1_000_000)));
    let config = crate::test_config("hs.test");
    let hasher = PasswordHasher::new(64, 1).unwrap();
    (Service::new(config, Arc::new(MemoryStore::new()), clock.clone(), hasher, crate::test_signing_key()), clock)
}

fn login(user: &str, refresh_token: bool) -> LoginRequest {
    LoginRequest {
        user: user.into(),
        password: "pw".into(),
        device_id: None,
        initial_device_display_name: None,
        refresh_token,
        ip: None,
    }
}

async fn register_with_token(service: &Service, name: &str, token: &str) -> Result<(), ServiceError> {
    let mut stage = RegistrationToken::new(token.to_owned());
    stage.session = None;
    let request = RegisterRequest {
        username: Some(name.into()),
        password: Some("pw".into()),
        auth: Some(AuthData::RegistrationToken(stage)),
        ..Default::default()
    };
    service.accounts().register(request).await.map(|_| ())
}

#[tokio::test]
async fn refreshable_access_tokens_expire_into_soft_logout() {
    let (service, clock) = service();
    let token = service.accounts().create_registration_token(None, None).await.unwrap().token;
    register_with_token(&service, "alice", &token).await.unwrap();
    let session = service.accounts().login(login("alice", true)).await.unwrap();
    let access = session.tokens.access_token;
    assert!(service.accounts().authenticate(&access).await.is_ok());
    clock.advance(60_001);
    assert!(matches!(
        service.accounts().authenticate(&access).await,
        Err(ServiceError::UnknownToken { soft_logout: true })
    ));
    let refreshed = service.accounts().refresh(session.tokens.refresh_token.as_deref().unwrap()).await.unwrap();
    assert!(service.accounts().authenticate(&refreshed.access_token).await.is_ok());
}

#[tokio::test]
async fn registration_tokens_run_out_and_expire() {
    let (service, clock) = service();
    let once = service.accounts().create_registration_token(Some(1), None).await.unwrap().token;
    register_with_token(&service, "first", &once).await.unwrap();
    assert!(!service.accounts().registration_token_usable(&once).await.unwrap());
    assert!(matches!(register_with_token(&service, "second", &once).await, Err(ServiceError::AuthRequired(_))));

    let brief = service.accounts().create_registration_token(None, Some(clock.now_ms() + 1_000)).await.unwrap().token;
    assert!(service.accounts().registration_token_usable(&brief).await.unwrap());
    clock.advance(1_000);
    assert!(!service.accounts().registration_token_usable(&brief).await.unwrap());
    let tokens = service.accounts().registration_tokens().await.unwrap();
    assert_eq!(tokens.iter().find(|t| t.token == once).unwrap().completed, 1);
}

#[tokio::test]
async fn abandoned_uia_sessions_expire_and_are_swept() {
    let (service, clock) = service();
    let request =
        || RegisterRequest { username: Some("bob".into()), password: Some("pw".into()), ..Default::default() };
    let Err(ServiceError::AuthRequired(challenge)) = service.accounts().register(request()).await else {
        panic!("expected UIA")
    };
    assert_eq!(service.accounts().sweep_expired_uia_sessions().await.unwrap(), 0);
    clock.advance(lattice_core::limits::UIA_SESSION_LIFETIME_MS + 1);

    // The expired session is refused (a fresh one is offered instead)...
    let token = service.accounts().create_registration_token(None, None).await.unwrap().token;
    let mut stage = RegistrationToken::new(token);
    stage.session = Some(challenge.session.clone());
    let stale = RegisterRequest { auth: Some(AuthData::RegistrationToken(stage)), ..request() };
    let Err(ServiceError::AuthRequired(fresh)) = service.accounts().register(stale).await else {
        panic!("expected a new challenge")
    };
    assert_ne!(fresh.session, challenge.session);
    // ...and the sweep deletes it, leaving the fresh one.
    assert_eq!(service.accounts().sweep_expired_uia_sessions().await.unwrap(), 1);
}

#[tokio::test]
async fn concurrent_registrations_of_one_name_create_one_account() {
    let (service, _) = service();
    let service = Arc::new(service);
    let token = service.accounts().create_registration_token(None, None).await.unwrap().token;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (service, token) = (service.clone(), token.clone());
        tasks.push(tokio::spawn(async move { register_with_token(&service, "carol", &token).await }));
    }
    let mut created = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(()) => created += 1,
            Err(ServiceError::UserInUse) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(created, 1);
    assert_eq!(service.accounts().registration_tokens().await.unwrap()[0].completed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_registrations_share_an_unlimited_token() {
    let (service, _) = service();
    let service = Arc::new(service);
    let token = service.accounts().create_registration_token(None, None).await.unwrap().token;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let (service, token) = (service.clone(), token.clone());
        tasks.push(tokio::spawn(async move { register_with_token(&service, &format!("user{i}"), &token).await }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(service.accounts().registration_tokens().await.unwrap()[0].completed, 32);
}

/// The original of a redacted event is readable by a server admin for the retention, then the
/// purge deletes it and the admin sees the redacted event like everyone.
#[tokio::test]
async fn redacted_originals_are_kept_for_the_retention_then_purged() {
    let (service, clock) = service();
    let account = |name: &str, admin| crate::NewAccount { username: name.into(), password: "pw".into(), admin };
    let admin = service.accounts().create_user(account("admin", true)).await.unwrap();
    let room = service.rooms().create_room(&admin, crate::rooms::CreateRoom::default()).await.unwrap();
    let content = serde_json::json!({ "msgtype": "m.text", "body": "evidence" });
    let message = service.rooms().send_event(&admin, &room, "m.room.message", None, content, None).await.unwrap();
    let redaction = serde_json::json!({ "redacts": message });
    service.rooms().send_event(&admin, &room, "m.room.redaction", None, redaction, None).await.unwrap();

    let original = service.rooms().room_event_unredacted(&admin, &room, message.as_str()).await.unwrap();
    assert_eq!(original["content"]["body"], "evidence");
    clock.advance(crate::DEFAULT_REDACTION_RETENTION_MS - 1);
    assert_eq!(service.rooms().purge_expired_redacted_originals().await.unwrap(), 0, "not yet past the retention");
    clock.advance(1);
    assert_eq!(service.rooms().purge_expired_redacted_originals().await.unwrap(), 1);
    let redacted = service.rooms().room_event_unredacted(&admin, &room, message.as_str()).await.unwrap();
    assert_eq!(redacted["content"], serde_json::json!({}));
    assert_eq!(service.rooms().purge_expired_redacted_originals().await.unwrap(), 0);
}

/// Every table has exactly one owning service (the shared `counters` aside, whose rows are
/// named per owner), except `meta`, which the storage layer's schema code keeps.
#[test]
fn every_table_but_meta_has_one_owner() {
    use lattice_storage::Table;
    let scopes = [
        crate::rooms::TABLES,
        crate::accounts::TABLES,
        crate::account_data::TABLES,
        crate::to_device::TABLES,
        crate::e2ee::TABLES,
        crate::reports::TABLES,
        crate::push::TABLES,
        lattice_federation::key_cache::TABLES,
        lattice_federation::sender::TABLES,
        crate::federation::TABLES,
        crate::media::TABLES,
        crate::presence::TABLES,
        crate::delayed_events::TABLES,
    ];
    for table in Table::ALL {
        let owners: Vec<&str> =
            scopes.iter().filter(|scope| scope.tables.contains(table)).map(|scope| scope.owner).collect();
        match table {
            Table::Meta | Table::AuthChains => assert!(owners.is_empty(), "{table:?} is the schema's: {owners:?}"),
            Table::Counters => assert!(!owners.is_empty()),
            _ => assert_eq!(owners.len(), 1, "{table:?} is owned by {owners:?}"),
        }
    }
}

/// Time moves presence, through the one sweep the presence task runs: a syncing user goes idle
/// after the idle timeout (and never offline while a sync runs); once their syncs stop, offline
/// after the offline timeout; each move is a change on the presence stream. A sync brings
/// them back.
#[tokio::test]
async fn presence_goes_idle_then_offline_as_time_passes() {
    use crate::presence::PresenceState;
    let (service, clock) = service();
    let account = crate::NewAccount { username: "alice".into(), password: "pw".into(), admin: false };
    let alice = service.accounts().create_user(account).await.unwrap();
    let presence = service.presence.clone();
    let timeouts = presence.config().timeouts;
    let state = || async { presence.current(&alice).await.unwrap() };

    let syncing = presence.sync_started(&alice, PresenceState::Online).await;
    assert_eq!(state().await.state, PresenceState::Online);
    assert!(state().await.currently_active());
    let online_at = presence.position().await.unwrap();
    clock.advance(timeouts.idle_ms - 1);
    assert_eq!(presence.apply_timeouts().await.unwrap(), 0);
    clock.advance(1);
    assert_eq!(presence.apply_timeouts().await.unwrap(), 1);
    assert_eq!(state().await.state, PresenceState::Unavailable);
    assert!(!state().await.currently_active());
    let idle_at = presence.position().await.unwrap();
    assert!(idle_at > online_at, "going idle is a change syncs see");
    clock.advance(timeouts.offline_ms * 100);
    assert_eq!(presence.apply_timeouts().await.unwrap(), 0, "a running sync keeps the user from going offline");

    drop(syncing);
    clock.advance(timeouts.offline_ms - 1);
    assert_eq!(presence.apply_timeouts().await.unwrap(), 0);
    clock.advance(1);
    assert_eq!(presence.apply_timeouts().await.unwrap(), 1);
    assert_eq!(state().await.state, PresenceState::Offline);
    assert!(presence.position().await.unwrap() > idle_at);
    assert_eq!(presence.apply_timeouts().await.unwrap(), 0, "offline stays offline");

    let _back = presence.sync_started(&alice, PresenceState::Online).await;
    assert_eq!(state().await.state, PresenceState::Online);
    // A sync with set_presence=offline neither counts as activity nor keeps the user online.
    let quiet = presence.sync_started(&alice, PresenceState::Offline).await;
    drop(quiet);
    assert_eq!(state().await.state, PresenceState::Online);
}

/// A long-poll spends most of its life parked: its future is what each idle `/sync` holds, so
/// it stays small (each look at the streams is allocated only while it runs). 10,000 waiting
/// clients cost 10,000 of these.
#[test]
fn a_parked_sync_future_is_small() {
    let (service, _) = service();
    let user = ruma::user_id!("@alice:hs.test");
    let request = crate::sync::SyncRequest {
        since: None,
        timeout: std::time::Duration::from_secs(30),
        device_id: None,
        filter: crate::rooms::SyncFilter::default(),
        full_state: false,
        set_presence: crate::presence::PresenceState::Online,
    };
    let future = service.sync().sync(user, request);
    let size = std::mem::size_of_val(&future);
    assert!(size <= 8 * 1024, "a /sync future takes {size} bytes");
}
