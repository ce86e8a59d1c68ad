//! Self-distribution: the hub serves an install script and its own executable, so a new
//! device needs nothing but `curl -fsSL HUB/install.sh | sh -s -- TOKEN`. Also serves
//! the web UI's page.
//!
//! The executable is served without its debug info: a build with it is several times
//! larger, and a device has no use for it. On the first download the hub writes a copy
//! without it (`objcopy --strip-debug`, from binutils) into its data dir, owner-only,
//! and serves that from then on. Where that cannot be done (no `objcopy` on the hub's
//! host, no room) it serves the running executable as it is, and says why once.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::OnceCell;
use tokio_util::io::ReaderStream;

use crate::HubState;

/// Says once, at start, where install.sh sends devices when no public URL is set: to
/// whatever host each request names, which only fits a hub reached at one address.
pub(crate) fn warn_without_public_url(state: &HubState) {
    if state.config.public_url.is_none() {
        tracing::warn!(
            "no --public-url: install.sh tells each device to use the host its own request \
             named; set --public-url to the URL devices reach this hub at"
        );
    }
}

pub(crate) fn routes() -> Router<Arc<HubState>> {
    Router::new()
        .route("/", get(|| async { Html(adi_web::INDEX_HTML) }))
        .route("/install.sh", get(install_script))
        .route("/download/adi", get(download))
}

/// The URL a device should use to reach this hub: the configured public URL, else what
/// the request itself was addressed to.
fn hub_url(state: &HubState, headers: &HeaderMap) -> String {
    if let Some(url) = &state.config.public_url {
        return url.trim_end_matches('/').to_owned();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".:-[]".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| state_addr(state));
    let scheme = match headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
    {
        Some("https") => "https",
        _ => state.scheme(),
    };
    format!("{scheme}://{host}")
}

fn state_addr(state: &HubState) -> String {
    state.config.listen.to_string()
}

async fn install_script(State(state): State<Arc<HubState>>, headers: HeaderMap) -> Response {
    let origin = if state.config.public_url.is_some() {
        "the hub's --public-url"
    } else {
        "the address this script was fetched from; the hub has no --public-url"
    };
    let script = INSTALL_SH
        .replace("@HUB@", &hub_url(&state, &headers))
        .replace("@ORIGIN@", origin)
        .replace("@OS@", std::env::consts::OS)
        .replace("@ARCH@", std::env::consts::ARCH);
    (
        [(header::CONTENT_TYPE, "text/x-shellscript; charset=utf-8")],
        script,
    )
        .into_response()
}

/// The copy of the running executable that `/download/adi` serves, made once.
pub(crate) struct Download {
    /// Where the copy without debug info goes.
    copy: PathBuf,
    /// The file served: the copy once made, or the running executable.
    served: OnceCell<PathBuf>,
}

/// File name of the served copy in the hub's data dir.
const COPY_FILE: &str = "adi-download";

/// How long making the copy may take before the original is served instead.
const STRIP_TIMEOUT: Duration = Duration::from_secs(120);

/// Why no smaller copy is served.
#[derive(Debug, thiserror::Error)]
enum StripError {
    #[error("objcopy (binutils) could not run: {0}")]
    Spawn(std::io::Error),
    #[error("objcopy failed: {0}")]
    Failed(String),
    #[error("objcopy took longer than {STRIP_TIMEOUT:?}")]
    Timeout,
    #[error("{}: {error}", path.display())]
    File {
        path: PathBuf,
        error: std::io::Error,
    },
}

impl Download {
    pub(crate) fn new(data_dir: &Path) -> Self {
        Download {
            copy: data_dir.join(COPY_FILE),
            served: OnceCell::new(),
        }
    }

    /// The file to serve; made on the first call, which the others wait for.
    async fn file(&self) -> Result<PathBuf, std::io::Error> {
        let running = running_executable()?;
        let served = self
            .served
            .get_or_init(|| async {
                match strip(&running, &self.copy).await {
                    Ok(Some(copy)) => copy,
                    Ok(None) => running.clone(),
                    Err(e) => {
                        tracing::warn!(
                            "serving /download/adi with its debug info, as it runs: {e}"
                        );
                        running.clone()
                    }
                }
            })
            .await;
        Ok(served.clone())
    }
}

/// The executable of this process. On Linux, `/proc/PID/exe` still reads when the
/// file on disk was replaced by an upgrade; by pid, because a tool opening
/// `/proc/self/exe` would read its own.
fn running_executable() -> Result<PathBuf, std::io::Error> {
    if cfg!(target_os = "linux") {
        Ok(PathBuf::from(format!("/proc/{}/exe", std::process::id())))
    } else {
        std::env::current_exe()
    }
}

/// Writes `running` without its debug info to `copy` (0600); `None` when that would
/// not be smaller (a build without debug info).
async fn strip(running: &Path, copy: &Path) -> Result<Option<PathBuf>, StripError> {
    let file_error = |path: &Path| {
        let path = path.to_owned();
        move |error| StripError::File { path, error }
    };
    if let Some(dir) = copy.parent() {
        crate::owner_only::dir(dir).map_err(file_error(dir))?;
    }
    let scratch = copy.with_extension(format!("tmp{}", std::process::id()));
    let _ = tokio::fs::remove_file(&scratch).await;
    let run = tokio::process::Command::new("objcopy")
        .arg("--strip-debug")
        .arg(running)
        .arg(&scratch)
        .kill_on_drop(true)
        .output();
    let made = match tokio::time::timeout(STRIP_TIMEOUT, run).await {
        Err(_) => Err(StripError::Timeout),
        Ok(Err(e)) => Err(StripError::Spawn(e)),
        Ok(Ok(out)) if !out.status.success() => Err(StripError::Failed(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        )),
        Ok(Ok(_)) => Ok(()),
    };
    let kept = async {
        made?;
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::Permissions::from_mode(crate::owner_only::FILE_MODE);
        tokio::fs::set_permissions(&scratch, mode)
            .await
            .map_err(file_error(&scratch))?;
        let size = |p: PathBuf| async move {
            tokio::fs::metadata(&p)
                .await
                .map(|m| m.len())
                .map_err(file_error(&p))
        };
        if size(scratch.clone()).await? >= size(running.to_owned()).await? {
            return Ok(None);
        }
        tokio::fs::rename(&scratch, copy)
            .await
            .map_err(file_error(copy))?;
        Ok(Some(copy.to_owned()))
    }
    .await;
    if !matches!(kept, Ok(Some(_))) {
        let _ = tokio::fs::remove_file(&scratch).await;
    }
    kept
}

async fn download(State(state): State<Arc<HubState>>) -> Response {
    let path = match state.download.file().await {
        Ok(p) => p,
        Err(e) => return unavailable(&e),
    };
    let opened = match tokio::fs::File::open(&path).await {
        Ok(f) => Ok(f),
        // The copy was removed under the hub: the original is still there.
        Err(_) => match running_executable() {
            Ok(p) => tokio::fs::File::open(p).await,
            Err(e) => Err(e),
        },
    };
    let file = match opened {
        Ok(f) => f,
        Err(e) => return unavailable(&e),
    };
    let len = file.metadata().await.map(|m| m.len()).ok();
    let mut resp = Response::new(Body::from_stream(ReaderStream::with_capacity(
        file,
        64 * 1024,
    )));
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(
        header::CONTENT_DISPOSITION,
        header::HeaderValue::from_static("attachment; filename=\"adi\""),
    );
    if let Some(len) = len {
        headers.insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
    }
    resp
}

fn unavailable(e: &std::io::Error) -> Response {
    tracing::warn!("cannot serve own executable: {e:#}");
    (StatusCode::SERVICE_UNAVAILABLE, "executable unavailable").into_response()
}

/// Installs `adi` from the hub into `$ADI_PREFIX/bin` (default `~/.local`), then starts
/// the cocoon with the token given as the first argument, or says how to.
const INSTALL_SH: &str = r#"#!/bin/sh
# Installs adi from @HUB@ and enrols this device with a setup token.
# Usage: curl -fsSL @HUB@/install.sh | sh -s -- SETUP_TOKEN
# Environment: ADI_PREFIX (default $HOME/.local), ADI_NO_START=1 to only install,
#              ADI_COCOON_NAME (default: hostname), ADI_COCOON_DATA_DIR,
#              ADI_CA_CERT: a private CA (PEM) that issued the hub's certificate, used
#              for the download and by the cocoon after it.
set -eu
HUB="@HUB@"
TOKEN="${1:-}"
echo "adi install: using hub $HUB (@ORIGIN@)"
PREFIX="${ADI_PREFIX:-$HOME/.local}"
BIN="$PREFIX/bin"

os="$(uname -s | tr '[:upper:]' '[:lower:]')"
arch="$(uname -m)"
if [ "$os" != "@OS@" ] || [ "$arch" != "@ARCH@" ]; then
  echo "adi install: this hub serves a @OS@/@ARCH@ build, but this machine is $os/$arch" >&2
  exit 1
fi

mkdir -p "$BIN"
tmp="$(mktemp "$BIN/.adi.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
if command -v curl >/dev/null 2>&1; then
  if [ -n "${ADI_CA_CERT:-}" ]; then
    curl -fsSL --cacert "$ADI_CA_CERT" "$HUB/download/adi" -o "$tmp"
  else
    curl -fsSL "$HUB/download/adi" -o "$tmp"
  fi
elif command -v wget >/dev/null 2>&1; then
  if [ -n "${ADI_CA_CERT:-}" ]; then
    wget -qO "$tmp" --ca-certificate="$ADI_CA_CERT" "$HUB/download/adi"
  else
    wget -qO "$tmp" "$HUB/download/adi"
  fi
else
  echo "adi install: need curl or wget" >&2
  exit 1
fi
chmod 0755 "$tmp"
mv -f "$tmp" "$BIN/adi"
trap - EXIT
echo "adi installed to $BIN/adi"

name="${ADI_COCOON_NAME:-$(hostname 2>/dev/null || echo device)}"
if [ -z "$TOKEN" ]; then
  echo "enrol this device with: $BIN/adi cocoon run --hub $HUB --token SETUP_TOKEN --name $name"
  exit 0
fi
if [ "${ADI_NO_START:-}" = "1" ]; then
  echo "start the cocoon with: $BIN/adi cocoon run --hub $HUB --token <your token> --name $name"
  exit 0
fi
echo "starting the cocoon; it keeps running (Ctrl-C stops it)"
echo "to keep it running across reboots instead: $BIN/adi cocoon service install -- --hub $HUB --token <your token> --name $name"
exec "$BIN/adi" cocoon run --hub "$HUB" --token "$TOKEN" --name "$name"
"#;
