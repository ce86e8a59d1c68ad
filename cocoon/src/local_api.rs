//! The local API: how programs on this device ask for a capability through their own
//! cocoon, so the request leaves as this device (never as a user) and any device the
//! owners share may serve it.
//!
//! It listens on loopback only and wants `Authorization: Bearer TOKEN`, where the
//! token is made fresh at every start and written, with the address, to
//! [`INFO_FILE`] in the data dir (mode 0600): only programs of the user the cocoon runs
//! as can read it. `adi cocoon request` finds the API there.
//!
//! - `POST /v1/capabilities/{protocol}/request` with `{version?, payload, prefer_device?,
//!   timeout_ms?}` answers `{from_device, payload}`;
//! - `GET /v1/status` answers `{state, device_id?}`.
//!
//! Errors are `{"error": {"code", "message"}}` with the hub's status for each code.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use adi_protocol::capability::RequestBody;
use adi_protocol::{DeviceId, ErrorCode, RemoteError};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{CapabilityClient, ConnState};

/// File in the data dir that tells local programs where the API is and its token.
pub const INFO_FILE: &str = "local-api.json";
/// Deadline of a request that names none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest deadline a local request may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(600);

/// What [`INFO_FILE`] holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LocalApiInfo {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Bearer token for this run of the cocoon.
    pub token: String,
}

/// Why the local API could not start.
#[derive(Debug, thiserror::Error)]
pub enum LocalApiError {
    /// Asked to listen beyond loopback.
    #[error("{0} is not a loopback address; the local API listens on 127.0.0.1 or [::1] only")]
    NotLoopback(SocketAddr),
    /// The port is taken or the address unusable.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The info file could not be written.
    #[error("cannot write {path}: {source}")]
    Info {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// The running local API.
pub struct LocalApi {
    addr: SocketAddr,
    info_path: PathBuf,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

#[derive(Clone)]
struct Shared {
    token: String,
    client: CapabilityClient,
}

impl LocalApi {
    /// Binds `addr` (loopback only), writes the info file and serves.
    pub async fn start(
        addr: SocketAddr,
        data_dir: &Path,
        client: CapabilityClient,
    ) -> Result<Self, LocalApiError> {
        if !addr.ip().is_loopback() {
            return Err(LocalApiError::NotLoopback(addr));
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| LocalApiError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| LocalApiError::Bind { addr, source })?;
        let mut raw = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut raw);
        let token = hex::encode(raw);
        let info = LocalApiInfo {
            url: format!("http://{local}"),
            token: token.clone(),
        };
        let info_path = data_dir.join(INFO_FILE);
        write_private(&info_path, &info).map_err(|source| LocalApiError::Info {
            path: info_path.clone(),
            source,
        })?;
        let app = Router::new()
            .route(
                "/v1/capabilities/{protocol}/request",
                post(request).layer(DefaultBodyLimit::max(
                    adi_protocol::DEFAULT_MAX_FRAME_BYTES * 16,
                )),
            )
            .route("/v1/status", get(status))
            .with_state(Shared { token, client });
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::warn!("local API ended: {e:#}");
            }
        });
        tracing::info!(addr = %local, "local API listening");
        Ok(LocalApi {
            addr: local,
            info_path,
            stop,
            task,
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and removes the info file, so nobody tries a dead address.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
        let _ = std::fs::remove_file(&self.info_path);
    }
}

/// Removes a stale info file (the API is off for this run).
pub fn forget(data_dir: &Path) {
    let _ = std::fs::remove_file(data_dir.join(INFO_FILE));
}

/// Reads the info file of the cocoon whose data dir is `data_dir`.
pub fn read_info(data_dir: &Path) -> std::io::Result<LocalApiInfo> {
    let bytes = std::fs::read(data_dir.join(INFO_FILE))?;
    serde_json::from_slice(&bytes).map_err(std::io::Error::other)
}

/// Writes the info file owner-only, in one step: it holds the API's bearer token.
fn write_private(path: &Path, info: &LocalApiInfo) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        adi_storage::owner_only::create_missing_dirs(dir)?;
    }
    let bytes = serde_json::to_vec_pretty(info).map_err(std::io::Error::other)?;
    adi_storage::owner_only::write(path, &bytes)
}

struct ApiError(RemoteError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::json!({"error": {"code": self.0.code, "message": self.0.message}});
        (status, Json(body)).into_response()
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError(RemoteError::new(code, message))
}

fn authorize(shared: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or_default();
    if bool::from(presented.as_bytes().ct_eq(shared.token.as_bytes())) {
        Ok(())
    } else {
        Err(error(
            ErrorCode::Unauthorized,
            format!("missing or wrong bearer token; it is in {INFO_FILE} in the cocoon's data dir"),
        ))
    }
}

async fn request(
    State(shared): State<Shared>,
    UrlPath(protocol): UrlPath<String>,
    headers: HeaderMap,
    body: Result<Json<RequestBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<adi_protocol::CapabilityAnswer>, ApiError> {
    authorize(&shared, &headers)?;
    let Json(body) = body.map_err(|e| error(ErrorCode::BadRequest, e.body_text()))?;
    let query = body
        .query(&protocol)
        .map_err(|e| error(ErrorCode::BadRequest, e.to_string()))?;
    let prefer = body
        .prefer()
        .map_err(|e| error(ErrorCode::BadRequest, format!("prefer_device: {e}")))?;
    let deadline = body.deadline(DEFAULT_TIMEOUT, MAX_TIMEOUT);
    shared
        .client
        .request(query, body.payload, prefer, deadline)
        .await
        .map(Json)
        .map_err(ApiError)
}

#[derive(Serialize)]
struct Status {
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_id: Option<DeviceId>,
}

async fn status(
    State(shared): State<Shared>,
    headers: HeaderMap,
) -> Result<Json<Status>, ApiError> {
    authorize(&shared, &headers)?;
    let state = match &*shared.client.state.borrow() {
        ConnState::Connecting { .. } => "connecting",
        ConnState::Online { .. } => "online",
        ConnState::Reconnecting { .. } => "reconnecting",
        ConnState::Failed { .. } | ConnState::NotAHub { .. } => "failed",
        ConnState::Stopped => "stopped",
    };
    Ok(Json(Status {
        state,
        device_id: shared.client.device_id(),
    }))
}
