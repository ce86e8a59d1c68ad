//! The cocoon: the agent every device runs. It keeps one outbound WebSocket to the hub,
//! proves its identity with its device secret, heartbeats, and reconnects forever with
//! capped exponential backoff and jitter. Only a refusal that retrying cannot fix (a bad
//! setup token, an unenrolled secret) stops it.
//!
//! [`spawn`] runs a cocoon as a task and hands back a [`CocoonHandle`] whose state is a
//! `watch` channel, so tests and `adi dev` can run cocoons in-process.

pub mod config_file;
mod health;
pub mod identity;
pub mod probe;
pub mod proxy;
mod requests;
pub mod runner;
mod session;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use adi_protocol::{DeviceId, ErrorCode, ServiceInfo, DEFAULT_MAX_FRAME_BYTES};
use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use identity::IdentityError;

use crate::runner::{Runner, RunnerConfig};

/// Capabilities every cocoon serves itself, as `protocol:version`.
pub const BUILTIN_CAPABILITIES: &[&str] = &["tasks:1.0.0", "proxy.http:1.0.0"];

/// Everything a cocoon needs to run.
#[derive(Debug, Clone)]
pub struct CocoonConfig {
    /// Base URL of the hub, `http(s)://host:port`.
    pub hub_url: String,
    /// Where the device secret (and later the task store) lives.
    pub data_dir: PathBuf,
    /// Human name of the device.
    pub name: String,
    /// One-time setup token; needed only until the device is enrolled.
    pub setup_token: Option<String>,
    /// Services on this device's loopback to offer through the hub.
    pub services: Vec<ServiceInfo>,
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
            data_dir: data_dir.into(),
            name: name.into(),
            setup_token: None,
            services: Vec::new(),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            task_database_url: None,
            exec_allowed: true,
            max_concurrent_tasks: 4,
            health_interval: Duration::from_secs(5),
        }
    }

    /// The hub's WebSocket endpoint for cocoons.
    fn ws_url(&self) -> Result<String, CocoonError> {
        let base = self.hub_url.trim_end_matches('/');
        let rest = if let Some(r) = base.strip_prefix("http://") {
            format!("ws://{r}")
        } else if let Some(r) = base.strip_prefix("https://") {
            format!("wss://{r}")
        } else if base.starts_with("ws://") || base.starts_with("wss://") {
            base.to_owned()
        } else {
            return Err(CocoonError::HubUrl(self.hub_url.clone()));
        };
        Ok(format!("{rest}/ws/cocoon"))
    }

    /// The delay before reconnect attempt `attempt` (0-based): doubling from
    /// `backoff_initial`, capped at `backoff_max`, then jittered to 50–100 % so a fleet
    /// that lost its hub at once does not come back at once.
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
    /// Dialling the hub.
    Connecting,
    /// Registered and heartbeating.
    Online {
        /// The id the hub knows this device by.
        device_id: DeviceId,
    },
    /// Waiting before the next attempt.
    Reconnecting {
        /// Consecutive failed attempts.
        attempt: u32,
        /// Why the last attempt or connection ended.
        reason: String,
    },
    /// Refused for good; the cocoon stopped.
    Failed {
        /// The hub's reason.
        code: ErrorCode,
        /// The hub's words.
        message: String,
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
    /// The hub URL is not http(s):// or ws(s)://.
    #[error("hub URL must start with http:// or https://: {0}")]
    HubUrl(String),
    /// The task store could not be opened.
    #[error("task store: {0}")]
    TaskStore(#[from] adi_task_store::StoreError),
    /// The hub refused this device and retrying cannot help.
    #[error("the hub refused this device ({code}): {message}")]
    Refused {
        /// The hub's reason.
        code: ErrorCode,
        /// The hub's words.
        message: String,
    },
}

/// A running cocoon.
pub struct CocoonHandle {
    state: watch::Receiver<ConnState>,
    runner: Arc<Runner>,
    cancel: CancellationToken,
    task: JoinHandle<Result<(), CocoonError>>,
}

impl CocoonHandle {
    /// The connection state, live.
    pub fn state(&self) -> watch::Receiver<ConnState> {
        self.state.clone()
    }

    /// Waits until the cocoon is online and returns its device id, or the refusal.
    pub async fn online(&self) -> Result<DeviceId, CocoonError> {
        let mut rx = self.state.clone();
        loop {
            match &*rx.borrow_and_update() {
                ConnState::Online { device_id } => return Ok(device_id.clone()),
                ConnState::Failed { code, message } => {
                    return Err(CocoonError::Refused {
                        code: *code,
                        message: message.clone(),
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
    let ws_url = config.ws_url()?;
    let secret = identity::load_or_create(&config.data_dir)?;
    let store = adi_task_store::open(config.task_database_url.as_deref(), &config.data_dir).await?;
    let runner = Runner::start(
        store,
        RunnerConfig {
            max_concurrent: config.max_concurrent_tasks.max(1),
            exec_allowed: config.exec_allowed,
            has_gpu: tokio::task::spawn_blocking(probe::detect_gpu)
                .await
                .unwrap_or(false),
        },
    )
    .await?;
    let (tx, rx) = watch::channel(ConnState::Connecting);
    let cancel = CancellationToken::new();
    let http = proxy::client();
    let health = health::spawn(
        config.services.clone(),
        http.clone(),
        config.health_interval,
        cancel.child_token(),
    );
    let load = probe::spawn(config.health_interval, cancel.child_token());
    let shared = session::Shared {
        runner: runner.clone(),
        http,
        health,
        load,
    };
    let task = tokio::spawn(session::run(
        config,
        ws_url,
        secret,
        shared,
        tx,
        cancel.clone(),
    ));
    Ok(CocoonHandle {
        state: rx,
        runner,
        cancel,
        task,
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

    #[test]
    fn hub_urls_map_to_the_cocoon_endpoint() {
        let mut c = CocoonConfig::new("http://127.0.0.1:8080/", "/tmp", "n");
        assert_eq!(c.ws_url().expect("ok"), "ws://127.0.0.1:8080/ws/cocoon");
        c.hub_url = "https://hub.example".into();
        assert_eq!(c.ws_url().expect("ok"), "wss://hub.example/ws/cocoon");
        c.hub_url = "ftp://nope".into();
        assert!(c.ws_url().is_err());
    }
}
