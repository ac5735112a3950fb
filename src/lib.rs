//! The `lattice` server: configuration, start-up, shutdown and operator commands, around the
//! HTTP edge (`lattice-api`) and the application (`lattice-service`).

pub mod admin;
pub mod config;
pub mod in_process;
pub mod logging;
mod signing_key;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::ConnectInfo;
use axum::serve::IncomingStream;
use lattice_api::{ApiConfig, AppState, RateLimit};
use lattice_federation::{
    ClientLimits, ClientSettings, FederationClient, HickoryResolver, KeyCache, NameResolver, NoDns, OwnKeys,
    TlsSettings,
};
use lattice_service::{PasswordHasher, RegistrationMode, Service, ServiceConfig, SystemClock};
use lattice_storage::{KvStore, RocksOptions, RocksStore, StoreClosed};
use ruma::signatures::Ed25519KeyPair;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::Config;

/// How often abandoned user-interactive-auth sessions are deleted.
const UIA_SWEEP_INTERVAL: Duration = Duration::from_secs(300);

/// How long shutdown waits for in-flight requests before it closes anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The opened database and the application on top of it.
pub struct Opened {
    pub service: Arc<Service>,
    /// The server's current signing key (the service signs events with it).
    pub signing_key: Arc<Ed25519KeyPair>,
    /// `true` when the data directory was created by this open.
    pub fresh: bool,
    /// Completes once the service and everything else holding the database are dropped and the
    /// database is closed, so the data directory can be opened again.
    pub closed: StoreClosed,
}

/// Opens (or creates) the data directory: RocksDB, schema check, signing key.
pub async fn open(config: &Config) -> anyhow::Result<Opened> {
    Ok(open_with_store(config).await?.0)
}

/// [`open`], also handing out the store for the parts composed beside the service
/// (federation's key cache). Drop it with the service: the database closes only once both
/// are gone.
async fn open_with_store(config: &Config) -> anyhow::Result<(Opened, Arc<dyn KvStore>)> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let options = RocksOptions {
        sync_writes: config.storage.sync_writes,
        block_cache_bytes: config.storage.block_cache_mib << 20,
        wal_in_process_memory: config.storage.testing_wal_in_process_memory,
    };
    let db_dir = config.database_dir();
    let store = RocksStore::open(&db_dir, &options).map_err(|e| {
        let hint = if e.to_string().contains("LOCK") {
            " (is another lattice process using this data directory?)"
        } else {
            ""
        };
        anyhow::anyhow!("opening database {}: {e}{hint}", db_dir.display())
    })?;
    let closed = store.closed();
    let kv: Arc<dyn KvStore> = Arc::new(store);
    let found = prepare_store(config, &kv).await?;
    let key = signing_key::load_or_create(&config.signing_key_path())?;
    tracing::info!(key_id = %key.key_id(), public_key = %key.public_key_base64(), "signing key loaded");
    let signing_key = Arc::new(key.key_pair);
    let service = build_service(config, kv.clone(), Arc::new(SystemClock), signing_key.clone()).await?;
    Ok((Opened { service, signing_key, fresh: found.is_none(), closed }, kv))
}

/// Checks (and migrates) the schema and moves counters past their reservations. Returns the
/// schema version found (`None`: a new store).
async fn prepare_store(config: &Config, kv: &Arc<dyn KvStore>) -> anyhow::Result<Option<u32>> {
    let migrations = lattice_service::rooms::schema_migrations();
    let found = lattice_storage::open_schema(kv.as_ref(), &migrations, config.storage.migration_chunk_rows)
        .await
        .context("checking (and migrating) the database schema")?;
    // Before anything takes a stream position: none may repeat one a client saw before a crash.
    lattice_storage::recover_counters(kv.as_ref()).await.context("moving counters past their reservations")?;
    Ok(found)
}

/// The application over a prepared store, with its media store opened.
async fn build_service(
    config: &Config,
    kv: Arc<dyn KvStore>,
    clock: Arc<dyn lattice_service::Clock>,
    signing_key: Arc<Ed25519KeyPair>,
) -> anyhow::Result<Arc<Service>> {
    let hasher = PasswordHasher::new(config.auth.password_hash_memory_kib, config.auth.password_hash_iterations)?;
    let service_config = ServiceConfig {
        server_name: config.server_name.clone(),
        default_room_version: config.rooms.default_room_version.clone(),
        public_rooms_cache_ms: config.rooms.public_rooms_cache_secs.saturating_mul(1000),
        registration: match config.registration.mode {
            config::RegistrationModeConfig::Token => RegistrationMode::Token,
            config::RegistrationModeConfig::Open => RegistrationMode::Open,
            config::RegistrationModeConfig::Disabled => RegistrationMode::Disabled,
        },
        refreshable_token_lifetime_ms: config.auth.refreshable_token_lifetime_secs.saturating_mul(1000),
        redaction_retention_ms: config.rooms.redaction_retention_ms()?,
        push_allow_insecure_gateways: config.push.allow_insecure_gateways,
        push_badge_counts_messages: config.push.badge_counts_messages,
        user_directory_search_all_users: config.user_directory.search_all_users,
        turn: config.calls.turn()?,
        media: config.media.service_config(&config.data_dir)?,
        presence: config.presence.service_config()?,
        delayed_events: config.delayed_events.service_config()?,
    };
    let service = Arc::new(Service::new(service_config, kv, clock, hasher, signing_key));
    service.media().open().await.context("opening the media store")?;
    Ok(service)
}

fn api_config(config: &Config) -> anyhow::Result<ApiConfig> {
    let limit = |rate: config::RateConfig| {
        config.rate_limits.enabled.then_some(RateLimit { per_second: rate.per_second, burst: rate.burst })
    };
    Ok(ApiConfig {
        max_request_bytes: config.limits.max_request_bytes,
        client_base_url: config.discovery.client_base_url.clone(),
        livekit_service_url: config.calls.livekit_service_url.clone(),
        well_known_server: config.discovery.server_delegation.clone(),
        trust_x_forwarded_for: config.listen.trust_x_forwarded_for,
        trusted_proxies: config.trusted_proxies()?,
        login_per_ip: limit(config.rate_limits.login_per_ip),
        login_per_user: limit(config.rate_limits.login_per_user),
        registration_per_ip: limit(config.rate_limits.registration_per_ip),
        uia_password_per_ip: limit(config.rate_limits.uia_password_per_ip),
        uia_password_per_user: limit(config.rate_limits.uia_password_per_user),
        public_rooms_per_ip: limit(config.rate_limits.public_rooms_per_ip),
        message_per_user: limit(config.rate_limits.message_per_user),
        room_creation_per_user: limit(config.rate_limits.room_creation_per_user),
        invite_per_user: limit(config.rate_limits.invite_per_user),
        join_per_user: limit(config.rate_limits.join_per_user),
        to_device_per_user: limit(config.rate_limits.to_device_per_user),
        federation_per_origin: limit(config.rate_limits.federation_per_origin),
        federation_failed_auth_per_ip: limit(config.rate_limits.federation_failed_auth_per_ip),
        key_query_per_ip: limit(config.rate_limits.key_query_per_ip),
        federation_concurrent_per_origin: config.federation.concurrent_requests_per_origin,
        federation_queued_per_origin: config.federation.queued_requests_per_origin,
        url_preview_per_user: limit(config.rate_limits.url_preview_per_user),
        delayed_events_per_key: limit(config.rate_limits.delayed_events_per_key),
    })
}

/// The federation router with the connection's peer address as `ConnectInfo`.
type PeerRouter = axum::middleware::AddExtension<axum::Router, ConnectInfo<SocketAddr>>;

/// The federation router, given each connection's peer address (failed authentications are
/// counted per address). axum's `into_make_service_with_connect_info` knows only its own TCP
/// listener.
fn with_peer_address(
    router: axum::Router,
) -> impl for<'a> tower::Service<
    IncomingStream<'a, tls::TlsListener>,
    Error = Infallible,
    Response = PeerRouter,
    Future = std::future::Ready<Result<PeerRouter, Infallible>>,
> + Send
+ 'static {
    tower::service_fn(move |incoming: IncomingStream<'_, tls::TlsListener>| {
        let peer = ConnectInfo(*incoming.remote_addr());
        std::future::ready(Ok(tower::Layer::layer(&axum::Extension(peer), router.clone())))
    })
}

/// A server that is accepting requests.
pub struct Running {
    pub address: SocketAddr,
    /// The federation (TLS) listener's address, when `[federation] listen` is set.
    pub federation_address: Option<SocketAddr>,
    /// The registration token created because this start made a new data directory.
    pub first_registration_token: Option<String>,
    /// How many `/sync` long-polls are asleep (tests wait for one before writing).
    pub sync_waiters: lattice_service::SyncWaiters,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish, flushes storage and closes the database:
    /// when this returns, the data directory can be opened again (unless requests were still
    /// running after the grace period; they hold the database until they end).
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(());
        self.task.await.context("server task")?
    }

    /// Runs until `signal` completes, then stops.
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> anyhow::Result<()> {
        signal.await;
        tracing::info!("shutting down: finishing in-flight requests");
        self.stop().await
    }
}

/// Opens the data directory, binds the listener and starts serving.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let started = Instant::now();
    for name in &config.ignored_environment {
        tracing::warn!(variable = %name, "ignoring an environment variable that names no configuration key");
    }
    let (opened, kv) = open_with_store(&config).await?;
    let first_registration_token =
        if opened.fresh && config.registration.mode != config::RegistrationModeConfig::Disabled {
            let valid_ms = u64::from(config.registration.first_token_valid_days) * 24 * 3600 * 1000;
            let expiry = lattice_service::Clock::now_ms(&SystemClock).saturating_add(valid_ms);
            Some(opened.service.accounts().create_registration_token(None, Some(expiry)).await?.token)
        } else {
            None
        };
    let listener = TcpListener::bind(config.listen.address)
        .await
        .with_context(|| format!("listening on {} (key `listen.address`)", config.listen.address))?;
    let address = listener.local_addr()?;
    let service = opened.service.clone();
    let sync_waiters = service.sync_waiters();
    let closed = opened.closed;
    let mut state = AppState::new(service.clone(), api_config(&config)?);
    let federation = match start_federation(&config, &kv, &opened.signing_key).await? {
        Some((keys, listener)) => {
            let catch_up_after = config.federation.catch_up_after()?;
            service
                .federation()
                .enable(keys.clone(), catch_up_after)
                .await
                .context("starting the federation queues")?;
            state = state.with_federation(keys);
            Some((lattice_api::federation_router(state.clone()), listener))
        }
        None => None,
    };
    drop(kv);
    let federation_address =
        federation.as_ref().map(|(_, listener)| axum::serve::Listener::local_addr(listener)).transpose()?;
    let (federation_stop, on_federation_stop) = oneshot::channel::<()>();
    let federation_task = federation.map(|(router, listener)| {
        tokio::spawn(async move {
            axum::serve(listener, with_peer_address(router))
                .with_graceful_shutdown(async move {
                    let _ = on_federation_stop.await;
                })
                .await
        })
    });
    let app = lattice_api::router(state).into_make_service_with_connect_info::<SocketAddr>();
    let sweeper = tokio::spawn(sweep_uia_sessions(service.clone()));
    let redaction_purger = tokio::spawn(purge_redacted_originals(service.clone()));
    let room_tasks = spawn_room_tasks(&service);
    let push_deliverer = tokio::spawn(deliver_pushes(service.clone()));
    let presence_task = {
        let service = service.clone();
        tokio::spawn(async move { service.run_presence().await })
    };
    let delayed_events_timer = tokio::spawn(service.delayed_events().clone().run());
    let (shutdown, on_shutdown) = oneshot::channel::<()>();
    let (draining_tx, draining_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = on_shutdown.await;
            let _ = federation_stop.send(());
            let _ = draining_tx.send(());
        });
        let serve = std::future::IntoFuture::into_future(serve);
        let grace = async {
            let _ = draining_rx.await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        let drained = tokio::select! {
            result = serve => {
                result.context("serving HTTP")?;
                true
            }
            () = grace => {
                tracing::warn!("in-flight requests did not finish within {SHUTDOWN_GRACE:?}; closing them");
                false
            }
        };
        let mut drained = drained;
        if let Some(mut federation_task) = federation_task {
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut federation_task).await {
                Ok(result) => result.context("federation server task")?.context("serving federation")?,
                Err(_) => {
                    tracing::warn!("in-flight federation requests did not finish within {SHUTDOWN_GRACE:?}");
                    federation_task.abort();
                    let _ = federation_task.await;
                    drained = false;
                }
            }
        }
        let others = [sweeper, redaction_purger, push_deliverer, presence_task, delayed_events_timer];
        for background in others.into_iter().chain(room_tasks) {
            background.abort();
            let _ = background.await;
        }
        service.federation().stop();
        service.flush().await.context("flushing storage")?;
        drop(service);
        if drained {
            // Every holder of the database has been dropped or is finishing its drop.
            tokio::time::timeout(SHUTDOWN_GRACE, closed.wait())
                .await
                .context("the database was still in use after shutdown")?;
        }
        tracing::info!("storage flushed; stopped");
        Ok(())
    });
    tracing::info!(address = %address, server_name = %config.server_name, elapsed_ms = started.elapsed().as_millis() as u64, "serving the client API");
    if let Some(address) = federation_address {
        tracing::info!(address = %address, "serving federation over TLS");
    }
    Ok(Running { address, federation_address, first_registration_token, sync_waiters, shutdown, task })
}

/// The key cache and the bound TLS listener, when `[federation] listen` is set.
async fn start_federation(
    config: &Config,
    kv: &Arc<dyn KvStore>,
    signing_key: &Arc<Ed25519KeyPair>,
) -> anyhow::Result<Option<(Arc<KeyCache>, tls::TlsListener)>> {
    let federation = &config.federation;
    let Some(listen) = federation.listen else { return Ok(None) };
    let (Some(cert), Some(key)) = (&federation.tls_cert, &federation.tls_key) else {
        anyhow::bail!("federation.listen is set without federation.tls_cert and federation.tls_key");
    };
    let tls_config = tls::server_config(cert, key)?;
    let trusted_ca_pem = match &federation.trusted_ca {
        Some(path) => {
            Some(std::fs::read(path).with_context(|| format!("reading federation.trusted_ca {}", path.display()))?)
        }
        None => None,
    };
    let old_keys = signing_key::load_old_keys(&config.old_signing_keys_path())?;
    let own = Arc::new(OwnKeys::new(
        config.server_name.clone(),
        signing_key.clone(),
        old_keys,
        federation.key_valid_for_ms()?,
    )?);
    let system_dns = if federation.dns {
        HickoryResolver::from_system()
            .inspect_err(|error| {
                tracing::warn!(%error, "no DNS: only IP literals and federation.resolve names can be reached");
            })
            .ok()
    } else {
        None
    };
    let dns = system_dns.is_some();
    let resolver: Arc<dyn NameResolver> = match system_dns {
        Some(resolver) => Arc::new(resolver),
        None => Arc::new(NoDns),
    };
    let settings = ClientSettings {
        tls: TlsSettings { verify_peer_tls: federation.verify_peer_tls, trusted_ca_pem },
        limits: ClientLimits::default(),
        resolve_overrides: federation.resolve.iter().map(|(name, addr)| (name.clone(), *addr)).collect(),
        dns,
        deny: lattice_federation::DenyList::new(federation.deny_servers.clone()),
        address_policy: Arc::new(federation.address_policy()?),
    };
    let client = FederationClient::new(own, settings, resolver, Arc::new(lattice_federation::SystemClock))
        .map_err(|e| anyhow::anyhow!("federation client (check federation.trusted_ca): {e}"))?;
    let keys = Arc::new(KeyCache::new(kv.clone(), Arc::new(client), federation.notaries()?));
    let tcp =
        TcpListener::bind(listen).await.with_context(|| format!("listening on {listen} (key `federation.listen`)"))?;
    let listener = tls::TlsListener::new(tcp, tls_config)?;
    Ok(Some((keys, listener)))
}

/// The tasks that move rooms along: typing expiry, merging wide fronts, the forwarder of local
/// events into the federation queues, and the retries of pushed PDUs refused for a failed fetch.
/// In-process servers run the same ones.
fn spawn_room_tasks(service: &Arc<Service>) -> Vec<JoinHandle<()>> {
    let forwarder = {
        let service = service.clone();
        tokio::spawn(async move { service.federation().forward_forever().await })
    };
    let refetcher = {
        let service = service.clone();
        tokio::spawn(async move { service.federation().refetch_forever().await })
    };
    vec![
        tokio::spawn(expire_typing(service.clone())),
        tokio::spawn(merge_wide_fronts(service.clone())),
        forwarder,
        refetcher,
    ]
}

async fn sweep_uia_sessions(service: Arc<Service>) {
    let mut interval = tokio::time::interval(UIA_SWEEP_INTERVAL);
    loop {
        interval.tick().await;
        match service.accounts().sweep_expired_uia_sessions().await {
            Ok(0) => {}
            Ok(swept) => tracing::debug!(swept, "deleted expired UIA sessions"),
            Err(error) => tracing::warn!(%error, "sweeping UIA sessions failed"),
        }
    }
}

/// How often expired typing notices are cleared (clients see them stop within this).
const TYPING_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

async fn expire_typing(service: Arc<Service>) {
    let mut interval = tokio::time::interval(TYPING_SWEEP_INTERVAL);
    loop {
        interval.tick().await;
        if let Err(error) = service.rooms().expire_typing().await {
            tracing::warn!(%error, "expiring typing notices failed");
        }
    }
}

/// How often kept originals of redacted events past their retention are deleted (the first
/// run is at start).
const REDACTION_PURGE_INTERVAL: Duration = Duration::from_secs(3600);

/// Sends merge events into rooms whose forward extremities grew past the threshold.
async fn merge_wide_fronts(service: Arc<Service>) {
    loop {
        let sent = service.rooms().merge_wide_fronts().await;
        if sent > 0 {
            tracing::info!(events = sent, "merged wide room fronts");
        }
    }
}

/// Delivers queued pushes to push gateways: when one is queued, and every second for the ones
/// backing off. Queued pushes are stored, so a restart loses none.
async fn deliver_pushes(service: Arc<Service>) {
    loop {
        if let Err(error) = service.deliver_due_pushes().await {
            tracing::warn!(%error, "push delivery failed");
        }
        service.push().wait_for_queued(lattice_service::push::DELIVERY_INTERVAL).await;
    }
}

async fn purge_redacted_originals(service: Arc<Service>) {
    let mut interval = tokio::time::interval(REDACTION_PURGE_INTERVAL);
    loop {
        interval.tick().await;
        match service.rooms().purge_expired_redacted_originals().await {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "deleted originals of redacted events past their retention"),
            Err(error) => tracing::warn!(%error, "purging originals of redacted events failed"),
        }
        purge_expired_previews(&service).await;
        purge_expired_preview_images(&service).await;
    }
}

/// Deletes cached URL previews past `media.url_preview.cache_ttl` (they would be fetched
/// again anyway), so the cache does not grow with every URL ever previewed.
async fn purge_expired_previews(service: &Service) {
    let Some(ttl_ms) = service.media().preview_cache_ttl_ms() else { return };
    let before = lattice_service::Clock::now_ms(&SystemClock).saturating_sub(ttl_ms);
    match service.media().purge_previews(before).await {
        Ok(0) => {}
        Ok(purged) => tracing::info!(purged, "deleted expired URL previews"),
        Err(error) => tracing::warn!(%error, "purging expired URL previews failed"),
    }
}

/// Deletes the images URL previews stored, past `media.url_preview.image_retention` (also when
/// previews have since been turned off).
async fn purge_expired_preview_images(service: &Service) {
    let retention_ms = service.media().preview_image_retention_ms();
    let before = lattice_service::Clock::now_ms(&SystemClock).saturating_sub(retention_ms);
    match service.media().purge_preview_images(before).await {
        Ok(0) => {}
        Ok(purged) => tracing::info!(purged, "deleted URL preview images past their retention"),
        Err(error) => tracing::warn!(%error, "purging URL preview images failed"),
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        () = terminate => {}
    }
}
