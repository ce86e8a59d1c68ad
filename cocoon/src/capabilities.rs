//! Answers the hub's capability requests on this device: finds the offer that serves
//! the query in the current [`CapabilitySet`] and asks the plugin behind it — a POST to
//! its loopback URL, or its command with the payload on stdin — within the deadline.
//!
//! A plugin's failure is the caller's `upstream_error`, with the plugin's words; it never
//! takes the cocoon down. Answers larger than one frame are refused here, so they cannot
//! break the link to the hub.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use adi_protocol::capability::best_offer;
use adi_protocol::tasks::NewTask;
use adi_protocol::{CapabilityQuery, DeviceId, ErrorCode, Payload, RemoteError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Semaphore};
use tracing::debug;

use crate::model_offers;
use crate::plugins::{CapabilitySet, Serve, Served};
use crate::runner::Runner;

/// Plugin commands running at once; further requests wait (within their deadline).
const MAX_COMMANDS: usize = 16;
/// Bytes of a command's stderr kept for the error message.
const STDERR_TAIL: usize = 2048;

/// Serves this device's capabilities.
pub(crate) struct CapabilityServer {
    set: watch::Receiver<Arc<CapabilitySet>>,
    http: reqwest::Client,
    runner: Arc<Runner>,
    commands: Semaphore,
    max_answer: usize,
}

impl CapabilityServer {
    pub(crate) fn new(
        set: watch::Receiver<Arc<CapabilitySet>>,
        http: reqwest::Client,
        runner: Arc<Runner>,
        max_answer: usize,
    ) -> Self {
        CapabilityServer {
            set,
            http,
            runner,
            commands: Semaphore::new(MAX_COMMANDS),
            max_answer,
        }
    }

    /// The newest offer that serves `query`, if this device has one now.
    fn find(&self, query: &CapabilityQuery) -> Option<Served> {
        let set = self.set.borrow();
        let best = best_offer(set.served.iter().map(|s| &s.offer), query)?;
        set.served.iter().find(|s| &s.offer == best).cloned()
    }

    /// Serves one request; the answer is the plugin's JSON as it gave it.
    pub(crate) async fn serve(
        &self,
        device: &DeviceId,
        query: &CapabilityQuery,
        payload: Payload,
        deadline: Duration,
    ) -> Result<Payload, RemoteError> {
        let served = self.find(query).ok_or_else(|| {
            RemoteError::new(
                ErrorCode::NoCapableDevice,
                format!("this device does not offer {query}"),
            )
        })?;
        debug!(capability = %served.offer, source = %served.source, "serving capability");
        let answer = tokio::time::timeout(deadline, async {
            match &served.serve {
                Serve::Builtin => self.builtin(device, &served, payload).await,
                Serve::Http(url) => self.http(url, &payload).await,
                Serve::Command { argv, cwd } => self.command(argv, cwd, &payload).await,
                Serve::Models { path, servers } => {
                    let (url, body) = model_offers::prepare(path, servers, query, payload)?;
                    self.http(&url, &body).await
                }
            }
        })
        .await
        .map_err(|_| {
            RemoteError::new(
                ErrorCode::Timeout,
                format!("{} did not answer within {deadline:?}", served.offer),
            )
        })??;
        Ok(answer)
    }

    async fn builtin(
        &self,
        device: &DeviceId,
        served: &Served,
        payload: Payload,
    ) -> Result<Payload, RemoteError> {
        match served.offer.protocol.as_str() {
            // A task sent to "whichever device serves tasks": created and run here.
            "tasks" => {
                let task: NewTask = serde_json::from_str(payload.get()).map_err(|e| {
                    RemoteError::new(
                        ErrorCode::BadRequest,
                        format!("a tasks request is a new task ({{\"title\", \"command\"?, ...}}): {e}"),
                    )
                })?;
                let mut created = self.runner.submit(task).await.map_err(|e| {
                    RemoteError::new(ErrorCode::BadRequest, format!("the task was refused: {e}"))
                })?;
                created.device_id = Some(device.clone());
                serde_json::to_string(&created)
                    .and_then(Payload::from_json)
                    .map_err(|e| RemoteError::new(ErrorCode::Internal, format!("encoding the task: {e}")))
            }
            other => Err(RemoteError::new(
                ErrorCode::BadRequest,
                format!("{other} is served through its own routes (/proxy/DEVICE/SERVICE/...), not as a request"),
            )),
        }
    }

    async fn http(&self, url: &str, payload: &Payload) -> Result<Payload, RemoteError> {
        // The payload is JSON already: it goes as it came, without being printed again.
        let resp = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(payload.get().to_owned())
            .send()
            .await
            .map_err(|e| {
                RemoteError::new(
                    ErrorCode::UpstreamError,
                    format!("the plugin at {url} is not answering: {}", reason(&e)),
                )
            })?;
        let status = resp.status();
        let body = read_limited(resp, self.max_answer).await?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body);
            let text: String = text.chars().take(300).collect();
            return Err(RemoteError::new(
                ErrorCode::UpstreamError,
                format!(
                    "the plugin at {url} answered HTTP {}: {}",
                    status.as_u16(),
                    text.trim()
                ),
            ));
        }
        json_answer(body).map_err(|e| {
            RemoteError::new(
                ErrorCode::UpstreamError,
                format!("the plugin at {url} answered with something that is not JSON: {e}"),
            )
        })
    }

    async fn command(
        &self,
        argv: &[String],
        cwd: &std::path::Path,
        payload: &Payload,
    ) -> Result<Payload, RemoteError> {
        let _slot = self
            .commands
            .acquire()
            .await
            .map_err(|_| RemoteError::new(ErrorCode::Internal, "the cocoon is stopping"))?;
        let program = &argv[0];
        let mut child = tokio::process::Command::new(program)
            .args(&argv[1..])
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                RemoteError::new(
                    ErrorCode::UpstreamError,
                    format!("the plugin command {program:?} could not start: {e}"),
                )
            })?;
        let input = payload.get().as_bytes();
        let mut stdin = child.stdin.take();
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let max = self.max_answer;
        let write = async {
            if let Some(mut s) = stdin.take() {
                // A plugin that ignores its input closes the pipe early; that is fine.
                let _ = s.write_all(input).await;
                let _ = s.shutdown().await;
            }
        };
        let read_out = async {
            let mut buf = Vec::new();
            if let Some(s) = stdout.as_mut() {
                let _ = s.take(max as u64 + 1).read_to_end(&mut buf).await;
            }
            buf
        };
        let read_err = async {
            let mut buf = Vec::new();
            if let Some(s) = stderr.as_mut() {
                let _ = s.take(64 * 1024).read_to_end(&mut buf).await;
            }
            buf
        };
        let ((), out, errs) = tokio::join!(write, read_out, read_err);
        if out.len() > max {
            return Err(RemoteError::new(
                ErrorCode::PayloadTooLarge,
                format!("the plugin command {program:?} answered more than {max} bytes"),
            ));
        }
        let status = child.wait().await.map_err(|e| {
            RemoteError::new(
                ErrorCode::UpstreamError,
                format!("waiting for the plugin command {program:?}: {e}"),
            )
        })?;
        if !status.success() {
            let text = String::from_utf8_lossy(&errs);
            let tail: String = text
                .chars()
                .rev()
                .take(STDERR_TAIL)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            return Err(RemoteError::new(
                ErrorCode::UpstreamError,
                format!(
                    "the plugin command {program:?} failed ({status}): {}",
                    tail.trim()
                ),
            ));
        }
        json_answer(out).map_err(|e| {
            RemoteError::new(
                ErrorCode::UpstreamError,
                format!("the plugin command {program:?} printed something that is not JSON: {e}"),
            )
        })
    }
}

/// A plugin's answer, checked to be JSON and kept as it was written.
fn json_answer(bytes: Vec<u8>) -> Result<Payload, String> {
    let text = String::from_utf8(bytes).map_err(|e| e.to_string())?;
    Payload::from_json(text).map_err(|e| e.to_string())
}

/// The body, refusing one over `max` bytes without holding more than that.
async fn read_limited(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, RemoteError> {
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > max {
                    return Err(RemoteError::new(
                        ErrorCode::PayloadTooLarge,
                        format!("the plugin answered more than {max} bytes"),
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                return Err(RemoteError::new(
                    ErrorCode::UpstreamError,
                    format!("reading the plugin's answer: {}", reason(&e)),
                ))
            }
        }
    }
}

/// The innermost cause, which is where reqwest keeps "connection refused".
fn reason(e: &reqwest::Error) -> String {
    let mut source: &dyn std::error::Error = e;
    while let Some(next) = source.source() {
        source = next;
    }
    source.to_string()
}
