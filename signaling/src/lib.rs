//! The adi signaling hub.
//!
//! Cocoons hold one WebSocket each to the hub (`/ws/cocoon`); people reach their devices
//! through the REST API (`/api/...`) and the web UI (`/`). The hub keeps two kinds of
//! state apart: the durable [`catalog`] (users, devices, owners, token hashes), written
//! on configuration changes only, and the RAM [`registry`] of live connections, written
//! on every heartbeat. Routing and presence read RAM only.
//!
//! [`spawn`] starts a hub and hands back a [`HubHandle`], so tests and `adi dev` can run
//! hubs in-process.
//!
//! Layout, one job each, in the order they depend on each other: each uses only the
//! ones above it (no module imports one below it, so there is no cycle).
//! - `config`: hub configuration, validated before any port is bound.
//! - `catalog`: what the hub remembers across restarts, on SQLite or PostgreSQL.
//! - `credential`: the format of every bearer secret the hub hands out.
//! - `auth`: API keys exchanged for JWTs, and the JWT every call presents.
//! - `tokens`: one-time setup and share tokens: minting, checking, redeeming.
//! - `identity`: device ids derived from device secrets under a hub key.
//! - `keys`: where the hub's keys live (the catalog or a key file).
//! - `readiness`: whether the catalog can write right now.
//! - `link`: the hub's end of one device connection and what it carries.
//! - `registry`: which devices are connected now (RAM only, never the catalog).
//! - `throttle`: limits on sign-in, claim and enrolment attempts.
//! - `access`: who may see and use which device, decided in one place.
//! - `audit`: the security events the catalog keeps, and who may read them.
//! - `changes`: the catalog's access-change feed, applied to RAM every second.
//! - `cluster`: the other hubs sharing the catalog, their devices, and the way to them.
//! - `rpc`: asking a device something and waiting for its one answer.
//! - `routing`: picking the device that serves a capability.
//! - `aggregate`: fanning a query out to a user's devices and merging the parts.
//! - `close`: the close frame a served WebSocket ends with, by the error's type.
//! - `rest`: the REST routes, the one error shape, the caller.
//! - `client_ws`: a signed-in person's live WebSocket.
//! - `tls`: the certificate served for HTTPS and WSS, reloaded when its files change.
//! - `server`: the accept loop; admission, caps and deadlines of every TCP connection.
//! - `connection`: one actor per cocoon WebSocket, from registration to close.
//! - `proxy`: `/proxy/...`, a device's loopback service reached through the hub.
//! - `openai`: `/v1/...`, one OpenAI-compatible endpoint for every device's models.
//! - `metrics`: `/metrics` in Prometheus' text format.
//! - `sockets`: the cocoon and client WebSocket upgrades.
//! - `router`: the route table joining all of the above.
//! - `owner_only`: owner-only files (the shared `adi_storage` module, for the CLI).

mod access;
pub mod aggregate;
pub mod audit;
pub mod auth;
pub mod catalog;
mod changes;
mod client_ws;
mod close;
pub mod cluster;
pub mod config;
mod connection;
mod credential;
pub mod history;
mod identity;
mod keys;
mod link;
mod metrics;
mod openai;
mod proxy;
mod readiness;
mod registry;
pub mod rest;
mod router;
mod routing;
mod rpc;
mod server;
mod sockets;
mod throttle;
pub mod tls;
pub mod tokens;

/// Owner-only files and directories, re-exported for the CLI, which keeps its session
/// beside the hub's files and follows the same rule.
pub use adi_storage::owner_only;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{ConfigError, HubConfig};

use crate::auth::Auth;
use crate::catalog::{Catalog, CatalogError};
use crate::identity::DeviceIdKey;
use crate::keys::KeyError;
use crate::registry::Registry;

/// Why a hub could not start.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The catalog could not be opened.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The hub's keys could not be loaded.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// The TLS certificate or key could not be used.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The cluster could not be joined.
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    /// The metrics could not be set up.
    #[error("setting up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The listen address could not be bound. The OS's words are the error's source,
    /// not part of this message, so a printed chain says them once.
    #[error("cannot listen on {addr}")]
    Bind {
        /// Address asked for.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Shared state of one hub, reachable from every handler.
pub struct HubState {
    /// Validated configuration.
    pub config: HubConfig,
    /// Durable store.
    pub catalog: Arc<dyn Catalog>,
    /// Live connections.
    pub registry: Registry,
    /// JWT issuer and checker.
    pub auth: Auth,
    /// Device id derivation key.
    pub device_ids: DeviceIdKey,
    /// What the hub counts for `/metrics`.
    pub metrics: Arc<metrics::Metrics>,
    /// Whether the catalog writes, probed at most once a second for `/readyz`.
    pub readiness: readiness::Readiness,
    /// Cancelled when the hub begins to shut down: it stops accepting and lets the
    /// requests in flight finish (see [`HubConfig::shutdown_grace`]); only then does the
    /// registry's sweeper stop every cocoon connection.
    pub shutdown: CancellationToken,
    /// The connections held, under the hub's caps.
    pub(crate) admission: Arc<server::Admission>,
    /// Limits on sign-in, claim and enrolment attempts.
    pub(crate) throttle: throttle::Throttle,
    /// Whose turn it is among devices tied for best in capability routing.
    pub(crate) routing_turn: std::sync::atomic::AtomicUsize,
    /// The executable `/download/adi` serves.
    pub(crate) download: rest::install::Download,
    /// The other hubs sharing the catalog, when the hub runs as one of several.
    pub cluster: Option<Arc<cluster::Cluster>>,
    /// API keys the OpenAI-compatible endpoint has checked lately.
    pub(crate) openai_keys: openai::Keys,
}

impl HubState {
    /// The device's presence, wherever in the cluster it is connected.
    pub fn presence(&self, id: &adi_protocol::DeviceId) -> registry::Presence {
        let local = self.registry.presence(id);
        if local.last_heartbeat_age.is_some() {
            return local;
        }
        self.cluster
            .as_ref()
            .and_then(|c| c.presence(id))
            .unwrap_or(local)
    }

    /// The device's load as last reported, wherever in the cluster it is connected.
    pub fn load(&self, id: &adi_protocol::DeviceId) -> Option<adi_protocol::LoadReport> {
        if self.registry.connected_at(id).is_some() {
            return self.registry.load(id);
        }
        self.cluster.as_ref()?.load(id)
    }

    /// The device's service health as last reported, wherever it is connected.
    pub fn service_health(&self, id: &adi_protocol::DeviceId) -> Vec<adi_protocol::ServiceHealth> {
        if self.registry.connected_at(id).is_some() {
            return self.registry.service_health(id);
        }
        self.cluster
            .as_ref()
            .map(|c| c.health(id))
            .unwrap_or_default()
    }

    /// The URL of the hub the device is connected to, as `GET /api/hubs` names it;
    /// `None` while it is connected to none.
    pub fn hub_of(&self, id: &adi_protocol::DeviceId) -> Option<String> {
        if self.registry.connected_at(id).is_some() {
            return Some(self.listed_url());
        }
        let cluster = self.cluster.as_ref()?;
        let (_, hub) = cluster.access(id)?;
        cluster.peer_url(hub).map(|u| u.to_string())
    }

    /// This hub's URL, as `GET /api/hubs` names it (empty for a hub that runs alone and
    /// was told none).
    pub fn listed_url(&self) -> String {
        match &self.cluster {
            Some(c) => c.url.clone(),
            None => self
                .config
                .hub_url
                .clone()
                .or_else(|| self.config.public_url.clone())
                .unwrap_or_default(),
        }
    }

    /// Capability requests this hub has in flight to the device.
    pub fn in_flight(&self, id: &adi_protocol::DeviceId) -> u32 {
        self.registry.in_flight(id).unwrap_or_else(|| {
            self.cluster
                .as_ref()
                .and_then(|c| c.in_flight_to(id))
                .unwrap_or(0)
        })
    }

    /// `https` when the hub serves TLS itself, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.config.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// A running hub.
pub struct HubHandle {
    addr: SocketAddr,
    state: Arc<HubState>,
    task: JoinHandle<std::io::Result<()>>,
}

impl HubHandle {
    /// The address the hub listens on (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` (`https://` when it serves TLS), the base URL clients and cocoons
    /// use.
    pub fn url(&self) -> String {
        format!("{}://{}", self.state.scheme(), self.addr)
    }

    /// The hub's catalog, for administrative commands run in the same process.
    pub fn catalog(&self) -> Arc<dyn Catalog> {
        self.state.catalog.clone()
    }

    /// The hub's shared state.
    pub fn state(&self) -> &Arc<HubState> {
        &self.state
    }

    /// Stops accepting, lets the requests in flight finish (at most for the grace
    /// period), then closes every cocoon connection with "hub restarting".
    pub async fn shutdown(self) {
        self.state.shutdown.cancel();
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("hub server ended with an error: {e:#}"),
            Err(e) => tracing::error!("hub server task failed: {e:#}"),
        }
    }

    /// Waits until the hub stops (it runs until `shutdown` or a fatal error, and once
    /// the shutdown token is cancelled, until the requests in flight have finished).
    pub async fn wait(self) -> std::io::Result<()> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }

    /// A token that stops the hub when cancelled (for signal handlers).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.state.shutdown.clone()
    }
}

/// Opens the catalog, loads or creates the hub keys, binds and starts serving.
pub async fn spawn(config: HubConfig) -> Result<HubHandle, HubError> {
    config.validate()?;
    let catalog = catalog::open(config.database_url.as_deref(), &config.data_dir).await?;
    // Merged views ask for the caller's devices on every request: from RAM.
    let catalog: Arc<dyn Catalog> = Arc::new(catalog::MemberView::new(catalog));
    let keys = keys::load(catalog.as_ref(), config.key_file.as_deref()).await?;
    let auth = Auth::new(&keys.jwt, config.jwt_ttl);
    for (sid, expires_at) in catalog.revoked_sessions(auth::unix_now_i64()).await? {
        auth.revoke(&sid, u64::try_from(expires_at).unwrap_or(0));
    }
    changes::load(catalog.as_ref(), &auth).await?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| HubError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| HubError::Bind {
        addr: config.listen,
        source,
    })?;
    let certificates = config
        .tls
        .clone()
        .map(tls::Certificates::open)
        .transpose()?;
    let acceptor = certificates
        .as_ref()
        .map(tls::Certificates::acceptor)
        .transpose()?;
    let cluster = match &config.nats_url {
        Some(nats) => {
            let url = config
                .hub_url
                .clone()
                .or_else(|| config.public_url.clone())
                .unwrap_or_else(|| {
                    let scheme = if config.tls.is_some() {
                        "https"
                    } else {
                        "http"
                    };
                    format!("{scheme}://{addr}")
                });
            let url = url.trim_end_matches('/').to_owned();
            Some(cluster::Cluster::join(nats, url, &keys.jwt, config.hub_ca_cert.as_deref()).await?)
        }
        None => None,
    };
    let metrics = Arc::new(metrics::Metrics::new()?);
    let admission = server::Admission::new(&config, metrics.connections_refused());
    let state = Arc::new(HubState {
        registry: Registry::new(config.heartbeat_interval),
        auth,
        device_ids: DeviceIdKey::new(keys.device_id),
        metrics,
        readiness: readiness::Readiness::default(),
        shutdown: CancellationToken::new(),
        admission: admission.clone(),
        routing_turn: std::sync::atomic::AtomicUsize::new(0),
        throttle: throttle::Throttle::default(),
        download: rest::install::Download::new(&config.data_dir),
        cluster,
        openai_keys: openai::Keys::default(),
        catalog,
        config,
    });
    // Cancelled once the requests in flight have drained: devices stay connected until
    // then, so a download through the proxy or a capability call in progress finishes.
    let drained = CancellationToken::new();
    tokio::spawn({
        let state = state.clone();
        let drained = drained.clone();
        async move { state.registry.run_sweeper(&drained).await }
    });
    tokio::spawn({
        let state = state.clone();
        let drained = drained.clone();
        async move {
            let poll = if state.cluster.is_some() {
                changes::CLUSTER_POLL
            } else {
                changes::POLL
            };
            changes::follow(
                state.catalog.clone(),
                &state.auth,
                &state.registry,
                poll,
                drained,
            )
            .await
        }
    });
    if let Some(certificates) = certificates {
        tokio::spawn(certificates.watch(drained.clone()));
    }
    if let Some(cluster) = &state.cluster {
        cluster.start(Arc::downgrade(&state), drained.clone())?;
        tracing::info!(hub = %cluster.id, url = cluster.url, "joined the cluster");
    }
    rest::install::warn_without_public_url(&state);
    let app = router::app(state.clone());
    let shutdown = state.shutdown.clone();
    let grace = state.config.shutdown_grace;
    let task = tokio::spawn({
        let state = state.clone();
        async move {
            let serve = server::serve(
                listener,
                app,
                &state.config,
                acceptor,
                admission,
                state.cluster.clone(),
                shutdown.clone(),
            );
            tokio::select! {
                () = serve => {}
                () = async {
                    shutdown.cancelled().await;
                    if let Some(cluster) = &state.cluster {
                        cluster.drain();
                    }
                    tracing::info!(?grace, "shutting down: no new connections; waiting for the requests in flight");
                    tokio::time::sleep(grace).await;
                } => {
                    tracing::warn!(?grace, "requests still in flight after the grace period; closing them");
                }
            }
            drained.cancel();
            Ok(())
        }
    });
    tracing::info!(%addr, "hub listening");
    Ok(HubHandle { addr, state, task })
}
