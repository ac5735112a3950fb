//! A whole server without sockets, for seeded simulations of a federation
//! (`tests/it/simulation.rs`): the service, both routers and the background tasks that move
//! events between servers, assembled as [`crate::start`] assembles them, over a store, a clock
//! and a federation transport the caller gives. The simulation decides what the "network"
//! does to each request and moves the clock; everything above the transport is the code the
//! binary runs.

use std::sync::Arc;

use lattice_api::AppState;
use lattice_federation::{FederationClient, KeyCache, OwnKeys, Transport};
use lattice_service::Service;
use lattice_storage::KvStore;
use ruma::signatures::Ed25519KeyPair;
use tokio::task::JoinHandle;

use crate::Config;

/// Wall-clock time for both the service and the federation layer.
pub trait SimulationClock: lattice_service::Clock + lattice_federation::Clock + 'static {}

impl<T: lattice_service::Clock + lattice_federation::Clock + 'static> SimulationClock for T {}

/// One running server of a simulation.
pub struct InProcessServer {
    pub service: Arc<Service>,
    /// The client-server API, as served on `listen.address`.
    pub client: axum::Router,
    /// The server-server API, as served on `federation.listen`.
    pub federation: axum::Router,
    tasks: Vec<JoinHandle<()>>,
}

impl InProcessServer {
    /// Opens `kv` (a new store or one a previous start left), and starts the server named by
    /// `config` with federation on through `transport`.
    pub async fn start<C: SimulationClock>(
        config: &Config,
        kv: Arc<dyn KvStore>,
        clock: Arc<C>,
        signing_key: Arc<Ed25519KeyPair>,
        transport: Arc<dyn Transport>,
    ) -> anyhow::Result<Self> {
        crate::prepare_store(config, &kv).await?;
        let service = crate::build_service(config, kv.clone(), clock.clone(), signing_key.clone()).await?;
        let federation = &config.federation;
        let own = Arc::new(OwnKeys::new(
            config.server_name.clone(),
            signing_key,
            Vec::new(),
            federation.key_valid_for_ms()?,
        )?);
        let client = FederationClient::in_process(own, transport, clock)
            .map_err(|e| anyhow::anyhow!("federation client: {e}"))?;
        let keys = Arc::new(KeyCache::new(kv, Arc::new(client), federation.notaries()?));
        service.federation().enable(keys.clone(), federation.catch_up_after()?).await?;
        let state = AppState::new(service.clone(), crate::api_config(config)?).with_federation(keys);
        let tasks = crate::spawn_room_tasks(&service);
        Ok(Self {
            service,
            client: lattice_api::router(state.clone()),
            federation: lattice_api::federation_router(state),
            tasks,
        })
    }

    /// Stops the background tasks and the outbound queues: what a crash leaves, with the store
    /// kept by the caller.
    pub fn stop(self) {
        for task in &self.tasks {
            task.abort();
        }
        self.service.federation().stop();
    }
}
