//! The cocoon: the agent every device runs. It keeps one outbound WebSocket to the hub,
//! proves its identity with its device secret, heartbeats, and reconnects forever with
//! capped exponential backoff and jitter. Only a refusal that retrying cannot fix (a bad
//! setup token, an unenrolled secret) stops it.
//!
//! [`start`] runs a cocoon as a task and hands back a [`CocoonHandle`] whose state is a
//! `watch` channel, so tests and `adi dev` can run cocoons in-process.
//!
//! Layout, one job each:
//! - [`lock`]: one live agent per data dir.
//! - `hubs`: the hubs it may connect to, and which one it tries next.
//! - [`identity`]: the device secret, owner-only in the data dir.
//! - `session`: the connection loop, and a session actor per connection.
//! - [`proxy`] and `pool`: the hub's proxied requests, served against the device's own
//!   loopback services, with connections driven by the requests that hold them.
//! - `requests`: the hub's questions about this device's tasks.
//! - [`runner`]: running tasks' commands, whole, and their logs.
//! - [`plugins`] and `capabilities`: what the device offers, and serving it.
//! - [`local_api`]: the loopback API programs on this device use.
//! - [`services`]: what a service declaration must be, however it is given.
//! - [`models`]: the models of its OpenAI-compatible servers, and with them the live
//!   service list the hub is told; [`model_offers`]: those models offered as the
//!   `llm.chat` and `embeddings` capabilities.
//! - `health` and [`probe`]: service health, and CPU, RAM and GPU figures.
//! - [`config_file`]: the agent's `cocoon.toml`.

mod capabilities;
pub mod config_file;
mod health;
mod hubs;
pub mod identity;
pub mod local_api;
pub mod lock;
pub mod model_offers;
pub mod models;
pub mod plugins;
mod pool;
mod probe;
mod proxy;
mod requests;
pub mod runner;
pub mod services;
mod session;
pub mod trust;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use adi_protocol::{
    CapabilityAnswer, CapabilityOutcome, CapabilityQuery, DeviceId, ErrorCode, RemoteError,
    ServiceInfo, DEFAULT_MAX_FRAME_BYTES,
};
use rand::Rng;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use identity::IdentityError;

use crate::runner::{Runner, RunnerConfig};

/// Directory, under the data dir, read for plugin manifests unless another is given.
pub const DEFAULT_PLUGINS_DIR: &str = "plugins";
/// Capability requests from local programs waiting to go to the hub; more are refused.
const CALL_QUEUE: usize = 256;

/// Everything a cocoon needs to run.
#[derive(Debug, Clone)]
pub struct CocoonConfig {
    /// Base URL of the hub, `http(s)://host:port`: the primary, tried first.
    pub hub_url: String,
    /// More hubs of the same cluster, tried in turn when the one the device is on is
    /// lost or cannot be reached. The hubs a hub names as its cluster join them while
    /// the agent runs.
    pub fallback_hubs: Vec<String>,
    /// Where the device secret (and later the task store) lives.
    pub data_dir: PathBuf,
    /// Human name of the device.
    pub name: String,
    /// One-time setup token; needed only until the device is enrolled.
    pub setup_token: Option<String>,
    /// Services on this device's loopback to offer through the hub, OpenAI-compatible
    /// servers (kind [`adi_protocol::ServiceKind::OpenAi`]) among them; plugin
    /// manifests may declare more servers.
    pub services: Vec<ServiceInfo>,
    /// How often OpenAI-compatible servers are asked for their models (sooner while
    /// one cannot be asked).
    pub openai_refresh: Duration,
    /// First reconnect delay.
    pub backoff_initial: Duration,
    /// Reconnect delays never exceed this.
    pub backoff_max: Duration,
    /// Largest frame accepted from the hub.
    pub max_frame_bytes: usize,
    /// Task store: `sqlite:PATH` or `postgres://...`; default `tasks.db` in the data dir.
    pub task_database_url: Option<String>,
    /// Whether tasks with a command may run here.
    pub exec_allowed: bool,
    /// Commands running at once; further tasks wait as pending.
    pub max_concurrent_tasks: usize,
    /// How often services are probed for health and load is sampled.
    pub health_interval: Duration,
    /// Plugin manifests; `None` for `plugins/` in the data dir.
    pub plugins_dir: Option<PathBuf>,
    /// How often the plugins directory is looked at for changes.
    pub plugins_poll: Duration,
    /// Protocol names not to offer, built-ins included.
    pub disabled_capabilities: BTreeSet<String>,
    /// Loopback address of the local API for programs on this device; `None` turns it
    /// off. Port 0 picks a free port; the address and the access token are written to
    /// [`local_api::INFO_FILE`] in the data dir.
    pub local_api: Option<SocketAddr>,
    /// Where the device is, in its owner's words.
    pub location: Option<String>,
    /// How long a cocoon asked to stop keeps serving the proxied and capability
    /// requests it has in flight (the hub sends it nothing new meanwhile) before it
    /// closes its connection; zero closes at once.
    pub shutdown_grace: Duration,
    /// A private CA to trust, besides the public roots, for a hub served over TLS.
    pub ca_cert: Option<PathBuf>,
}

impl CocoonConfig {
    /// A configuration with default timings.
    pub fn new(
        hub_url: impl Into<String>,
        data_dir: impl Into<PathBuf>,
        name: impl Into<String>,
    ) -> Self {
        CocoonConfig {
            hub_url: hub_url.into(),
            fallback_hubs: Vec::new(),
            data_dir: data_dir.into(),
            name: name.into(),
            setup_token: None,
            services: Vec::new(),
            openai_refresh: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            task_database_url: None,
            exec_allowed: true,
            max_concurrent_tasks: 4,
            health_interval: Duration::from_secs(5),
            plugins_dir: None,
            plugins_poll: Duration::from_secs(2),
            disabled_capabilities: BTreeSet::new(),
            local_api: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            location: None,
            shutdown_grace: Duration::from_secs(30),
            ca_cert: None,
        }
    }

    /// The plugin directory and switches this configuration names.
    pub fn plugin_config(&self) -> plugins::PluginConfig {
        plugins::PluginConfig {
            dir: Some(
                self.plugins_dir
                    .clone()
                    .unwrap_or_else(|| self.data_dir.join(DEFAULT_PLUGINS_DIR)),
            ),
            disabled: self.disabled_capabilities.clone(),
            services: self.services.iter().map(|s| s.name.clone()).collect(),
        }
    }

    /// The delay at step `attempt` (0-based) of the backoff: doubling from
    /// `backoff_initial`, capped at `backoff_max`, then jittered to 50–100 % so a fleet
    /// that lost its hub at once does not come back at once. With several hubs a step
    /// is a whole round of them.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let base = self
            .backoff_initial
            .saturating_mul(2u32.saturating_pow(attempt.min(20)))
            .min(self.backoff_max);
        base.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
    }
}

/// Where a cocoon's connection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnState {
    /// Dialling a hub.
    Connecting {
        /// The hub dialled.
        hub: String,
    },
    /// Registered and heartbeating.
    Online {
        /// The id the hub knows this device by.
        device_id: DeviceId,
        /// The hub it is on, which with several hubs need not be the primary.
        hub: String,
    },
    /// Waiting before the next attempt.
    Reconnecting {
        /// Consecutive failed attempts.
        attempt: u32,
        /// Why the last attempt or connection ended.
        reason: String,
        /// The hub the next attempt goes to.
        hub: String,
    },
    /// Refused for good; the cocoon stopped.
    Failed {
        /// The hub's reason.
        code: ErrorCode,
        /// The hub's words.
        message: String,
    },
    /// What answered at the hub's address is not an adi hub; the cocoon stopped.
    NotAHub {
        /// The hub URL that answered.
        hub: String,
        /// What it answered.
        answered: String,
    },
    /// Stopped on request.
    Stopped,
}

/// Why a cocoon stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum CocoonError {
    /// The device secret could not be loaded or created.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A configured hub URL cannot be dialled.
    #[error("hub URL {url:?} {why}")]
    HubUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// The task store could not be opened.
    #[error("task store: {0}")]
    TaskStore(#[from] adi_task_store::StoreError),
    /// The CA file given with `--ca-cert` cannot be used.
    #[error(transparent)]
    Trust(#[from] trust::TrustError),
    /// The local API could not start.
    #[error("local API: {0}")]
    LocalApi(String),
    /// The data dir is another agent's, or cannot be locked.
    #[error(transparent)]
    DataDir(#[from] lock::LockError),
    /// What answered at the hub's address is not an adi hub, so retrying cannot help
    /// until the address changes.
    #[error("{hub} is not an adi hub ({answered}); check the hub URL")]
    NotAHub {
        /// The hub URL as configured.
        hub: String,
        /// What it answered.
        answered: String,
    },
    /// The hub refused this device and retrying cannot help.
    #[error("the hub refused this device ({code}): {message}")]
    Refused {
        /// The hub's reason.
        code: ErrorCode,
        /// The hub's words.
        message: String,
    },
}

/// A capability request from a program on this device, on its way to the hub.
#[derive(Debug)]
pub(crate) struct CapabilityCall {
    pub(crate) query: CapabilityQuery,
    pub(crate) payload: adi_protocol::Payload,
    pub(crate) prefer: Option<DeviceId>,
    pub(crate) deadline: Duration,
    pub(crate) reply: oneshot::Sender<CapabilityOutcome>,
}

/// Asks the hub, as this device, to have a capability served by the best device this
/// device's owners may use. Cheap to clone; used by the local API and in-process callers.
#[derive(Clone, Debug)]
pub struct CapabilityClient {
    calls: mpsc::Sender<CapabilityCall>,
    state: watch::Receiver<ConnState>,
}

impl CapabilityClient {
    /// Sends one request and waits, at most `deadline`, for its one answer.
    pub async fn request(
        &self,
        query: CapabilityQuery,
        payload: adi_protocol::Payload,
        prefer: Option<DeviceId>,
        deadline: Duration,
    ) -> Result<CapabilityAnswer, RemoteError> {
        if !matches!(*self.state.borrow(), ConnState::Online { .. }) {
            return Err(RemoteError::new(
                ErrorCode::DeviceOffline,
                "this device is not connected to its hub right now",
            ));
        }
        let (tx, rx) = oneshot::channel();
        let call = CapabilityCall {
            query,
            payload,
            prefer,
            deadline,
            reply: tx,
        };
        self.calls.try_send(call).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => RemoteError::new(
                ErrorCode::UpstreamError,
                format!("more than {CALL_QUEUE} requests are waiting to go to the hub"),
            ),
            mpsc::error::TrySendError::Closed(_) => {
                RemoteError::new(ErrorCode::DeviceOffline, "the cocoon has stopped")
            }
        })?;
        // The hub answers by the deadline; the margin covers the trip back.
        match tokio::time::timeout(deadline + Duration::from_secs(2), rx).await {
            Err(_) => Err(RemoteError::new(
                ErrorCode::Timeout,
                format!("no answer within {deadline:?}"),
            )),
            Ok(Err(_)) => Err(RemoteError::new(
                ErrorCode::DeviceOffline,
                "the connection to the hub was lost before the answer came",
            )),
            Ok(Ok(CapabilityOutcome::Ok(answer))) => Ok(answer),
            Ok(Ok(CapabilityOutcome::Error(e))) => Err(e),
        }
    }

    /// The device id, once the cocoon is online.
    pub fn device_id(&self) -> Option<DeviceId> {
        match &*self.state.borrow() {
            ConnState::Online { device_id, .. } => Some(device_id.clone()),
            _ => None,
        }
    }

    /// The connection state, live.
    pub fn state(&self) -> watch::Receiver<ConnState> {
        self.state.clone()
    }
}

/// A running cocoon.
pub struct CocoonHandle {
    /// Held for the agent's life: no other agent may use its data dir meanwhile.
    _lock: lock::DataDirLock,
    state: watch::Receiver<ConnState>,
    runner: Arc<Runner>,
    cancel: CancellationToken,
    task: JoinHandle<Result<(), CocoonError>>,
    client: CapabilityClient,
    capabilities: watch::Receiver<Arc<plugins::CapabilitySet>>,
    local_api: Option<local_api::LocalApi>,
}

impl CocoonHandle {
    /// Asks for capabilities as this device.
    pub fn capability_client(&self) -> CapabilityClient {
        self.client.clone()
    }

    /// What this device offers now, live.
    pub fn capabilities(&self) -> watch::Receiver<Arc<plugins::CapabilitySet>> {
        self.capabilities.clone()
    }

    /// The local API's address, when it runs.
    pub fn local_api_addr(&self) -> Option<SocketAddr> {
        self.local_api.as_ref().map(local_api::LocalApi::local_addr)
    }

    /// The connection state, live.
    pub fn state(&self) -> watch::Receiver<ConnState> {
        self.state.clone()
    }

    /// Waits until the cocoon is online and returns its device id, or the refusal.
    pub async fn online(&self) -> Result<DeviceId, CocoonError> {
        let mut rx = self.state.clone();
        loop {
            match &*rx.borrow_and_update() {
                ConnState::Online { device_id, .. } => return Ok(device_id.clone()),
                ConnState::Failed { code, message } => {
                    return Err(CocoonError::Refused {
                        code: *code,
                        message: message.clone(),
                    })
                }
                ConnState::NotAHub { hub, answered } => {
                    return Err(CocoonError::NotAHub {
                        hub: hub.clone(),
                        answered: answered.clone(),
                    })
                }
                _ => {}
            }
            if rx.changed().await.is_err() {
                return Err(CocoonError::Refused {
                    code: ErrorCode::Internal,
                    message: "cocoon stopped".into(),
                });
            }
        }
    }

    /// Asks the cocoon to close its connection and stop.
    pub fn stop(&self) {
        self.cancel.cancel();
    }

    /// This device's task runner (and through it, its task store).
    pub fn runner(&self) -> &Arc<Runner> {
        &self.runner
    }

    /// Waits for the cocoon to end, then stops its running tasks; `Err` if it was
    /// refused for good.
    pub async fn join(self) -> Result<(), CocoonError> {
        let ended = self.task.await;
        if let Some(api) = self.local_api {
            api.shutdown().await;
        }
        self.runner.shutdown().await;
        match ended {
            Ok(r) => r,
            Err(e) => Err(CocoonError::Refused {
                code: ErrorCode::Internal,
                message: format!("cocoon task failed: {e}"),
            }),
        }
    }
}

/// Loads (or creates) the device identity, opens the task store, starts the task
/// runner and the connection loop.
pub async fn start(config: CocoonConfig) -> Result<CocoonHandle, CocoonError> {
    let hubs = hubs::Hubs::new(&config.hub_url, &config.fallback_hubs)?;
    // Before anything in the data dir is read or written. The note names the primary:
    // the device's identity is the data dir's, whichever hub it is on.
    let lock = lock::acquire(&config.data_dir, &config.hub_url)?;
    let trust = trust::Trust::new(config.ca_cert.as_deref())?;
    let secret = identity::load_or_create(&config.data_dir)?;
    // Sampled while the task store opens: the registration carries it.
    let sampling = tokio::task::spawn_blocking(probe::open_sampled);
    let store = adi_task_store::open(config.task_database_url.as_deref(), &config.data_dir).await?;
    let sampled = sampling.await.ok();
    let runner = Runner::start(
        store,
        RunnerConfig {
            max_concurrent: config.max_concurrent_tasks.max(1),
            exec_allowed: config.exec_allowed,
            has_gpu: sampled
                .as_ref()
                .is_some_and(|(_, load)| probe::has_gpu(load)),
            ..RunnerConfig::default()
        },
    )
    .await?;
    let (tx, rx) = watch::channel(ConnState::Connecting {
        hub: hubs.current().url().to_owned(),
    });
    let cancel = CancellationToken::new();
    let http = proxy::client();
    let load = probe::spawn(sampled, config.health_interval, cancel.child_token());
    let capabilities = plugins::watch(
        config.plugin_config(),
        config.plugins_poll,
        cancel.child_token(),
    );
    // Registration carries the models the servers list now, asked briefly.
    let services = models::spawn(
        config.services.clone(),
        capabilities.clone(),
        http.clone(),
        config.openai_refresh,
        cancel.child_token(),
    )
    .await;
    let capabilities = model_offers::watch(
        capabilities,
        services.clone(),
        config.disabled_capabilities.clone(),
        cancel.child_token(),
    );
    let health = health::spawn(
        services.clone(),
        http.clone(),
        config.health_interval,
        cancel.child_token(),
    );
    let server = Arc::new(capabilities::CapabilityServer::new(
        capabilities.clone(),
        http.clone(),
        runner.clone(),
        config.max_frame_bytes.saturating_sub(1024),
    ));
    let (calls_tx, calls) = mpsc::channel(CALL_QUEUE);
    let client = CapabilityClient {
        calls: calls_tx,
        state: rx.clone(),
    };
    let local_api = match config.local_api {
        Some(addr) => Some(
            local_api::LocalApi::start(addr, &config.data_dir, client.clone())
                .await
                .map_err(|e| CocoonError::LocalApi(e.to_string()))?,
        ),
        None => {
            local_api::forget(&config.data_dir);
            None
        }
    };
    let shared = session::Shared {
        trust,
        instance: hex::encode(rand::random::<[u8; 16]>()),
        runner: runner.clone(),
        http: pool::Pool::default(),
        health,
        load,
        services,
        capabilities: capabilities.clone(),
        server,
    };
    let task = tokio::spawn(session::run(
        config,
        hubs,
        secret,
        shared,
        calls,
        tx,
        cancel.clone(),
    ));
    Ok(CocoonHandle {
        _lock: lock,
        state: rx,
        runner,
        cancel,
        task,
        client,
        capabilities,
        local_api,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        let c = CocoonConfig::new("http://x", "/tmp", "n");
        for attempt in 0..30 {
            let d = c.backoff(attempt);
            let base = c
                .backoff_initial
                .saturating_mul(2u32.saturating_pow(attempt.min(20)))
                .min(c.backoff_max);
            assert!(
                d >= base / 2 && d <= base,
                "attempt {attempt}: {d:?} vs {base:?}"
            );
        }
        assert!(c.backoff(50) <= c.backoff_max);
    }
}
