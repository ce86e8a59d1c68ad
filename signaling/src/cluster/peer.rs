//! Requests from this hub to another of its cluster, over HTTP (HTTPS for a hub that
//! serves TLS), on pooled connections. Each carries the cluster's hub key, which the
//! other hub checks before it trusts anything the request says about its caller.
//!
//! The other hub holds this hub's address to its cap on connections per source until a
//! request with the key has been read from it. So before this hub forwards anything to a
//! hub it has not spoken to lately, it greets it with one small request and holds back
//! the rest until that is answered: a burst of forwards from a hub that has just started
//! then opens its connections once the address is trusted, instead of racing the first
//! request's head and being refused with `429`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use adi_protocol::{DeviceId, DeviceReply, DeviceRequest};
use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::{CLIENT_ADDR_HEADER, HUB_KEY_HEADER};
use crate::link::command::RpcError;
use adi_protocol::cluster::{Rpc, RpcAnswer};

/// Where another hub answers device requests for this one.
pub const RPC_PATH: &str = "/internal/hub/rpc";
/// Largest answer to a device request accepted from another hub.
const MAX_ANSWER_BYTES: usize = 256 * 1024 * 1024;
/// How long connecting to another hub may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Beyond the request's own deadline, how long the other hub has to send its answer.
const ANSWER_SLACK: Duration = Duration::from_secs(2);
/// How long a greeting is trusted to keep this hub's address exempt at the other hub,
/// which forgets it 10 minutes after the last request with the key.
const GREETING_LASTS: Duration = Duration::from_secs(300);
/// After a greeting went unanswered, how long requests go on without waiting for
/// another: a hub that is down must not make every forward wait twice.
const GREETING_RETRY: Duration = Duration::from_secs(1);
/// Longest a greeting may take, connection included.
const GREETING_TIMEOUT: Duration = Duration::from_secs(3);
/// Where a greeting goes: it is answered by every hub, and the hub key it carries is
/// what counts.
const GREETING_PATH: &str = "/healthz";

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// Pooled connections to the other hubs.
#[derive(Clone)]
pub struct Client {
    http: hyper_util::client::legacy::Client<Https, Body>,
    /// By hub URL: until when that hub need not be greeted again.
    greetings: Arc<DashMap<String, Arc<Greeting>>>,
    /// What the greetings' deadlines count from.
    epoch: Instant,
}

/// One hub's greeting: until when it holds (ms since the client's epoch, 0 before the
/// first), and the lock that lets only one request send it.
#[derive(Default)]
struct Greeting {
    until_ms: AtomicU64,
    sending: tokio::sync::Mutex<()>,
}

impl Client {
    /// A client trusting the public roots and, if given, the CA in the PEM file `ca`.
    pub fn new(ca: Option<&Path>) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = ca {
            let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.set_nodelay(true);
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(https);
        Ok(Client {
            http,
            greetings: Arc::default(),
            epoch: Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Makes sure hub `url` has read a request with the key from this hub lately: the
    /// first request to it in a while sends a greeting, and any sent meanwhile wait for
    /// it. A greeting that fails holds nothing back for long; the request that follows
    /// reports what is wrong.
    async fn greet(&self, url: &str, key: &str) {
        let greeting = match self.greetings.get(url) {
            Some(g) => g.clone(),
            None => self.greetings.entry(url.to_owned()).or_default().clone(),
        };
        if self.now_ms() < greeting.until_ms.load(Ordering::Acquire) {
            return;
        }
        let _sending = greeting.sending.lock().await;
        if self.now_ms() < greeting.until_ms.load(Ordering::Acquire) {
            return;
        }
        let answered = tokio::time::timeout(GREETING_TIMEOUT, self.send_greeting(url, key))
            .await
            .unwrap_or_else(|_| Err("no answer in time".into()));
        let lasts = match answered {
            Ok(()) => GREETING_LASTS,
            Err(why) => {
                tracing::debug!(hub = url, "greeting another hub failed: {why}");
                GREETING_RETRY
            }
        };
        let until = self
            .now_ms()
            .saturating_add(u64::try_from(lasts.as_millis()).unwrap_or(u64::MAX));
        greeting.until_ms.store(until, Ordering::Release);
    }

    async fn send_greeting(&self, url: &str, key: &str) -> Result<(), String> {
        let uri: Uri = format!("{}{GREETING_PATH}", url.trim_end_matches('/'))
            .parse()
            .map_err(|e: axum::http::uri::InvalidUri| e.to_string())?;
        let req = Request::get(uri)
            .header(HUB_KEY_HEADER, key)
            .body(Body::empty())
            .map_err(|e| e.to_string())?;
        let response = self.http.request(req).await.map_err(|e| e.to_string())?;
        let status = response.status();
        // Read to the end, so the connection goes back to the pool for what follows.
        axum::body::to_bytes(Body::new(response.into_body()), 4096)
            .await
            .map_err(|e| e.to_string())?;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("answered {status}"))
        }
    }

    /// Asks hub `url` to carry `request` to `device`, connected there; waits up to
    /// `deadline` (and a little more for the answer to arrive).
    pub async fn rpc(
        &self,
        url: &str,
        key: &str,
        device: &DeviceId,
        request: DeviceRequest,
        deadline: Duration,
    ) -> Result<DeviceReply, RpcError> {
        let body = Rpc {
            device: device.clone(),
            deadline_ms: u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX),
            request,
        };
        let lost = |why: String| {
            tracing::debug!(device_id = %device, hub = url, "request through another hub failed: {why}");
            RpcError::Disconnected
        };
        let body = serde_json::to_vec(&body).map_err(|e| lost(e.to_string()))?;
        let uri: Uri = format!("{}{RPC_PATH}", url.trim_end_matches('/'))
            .parse()
            .map_err(|e: axum::http::uri::InvalidUri| lost(e.to_string()))?;
        let req = Request::post(uri)
            .header(HUB_KEY_HEADER, key)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .map_err(|e| lost(e.to_string()))?;
        let exchange = async {
            self.greet(url, key).await;
            let response = self
                .http
                .request(req)
                .await
                .map_err(|e| lost(e.to_string()))?;
            let status = response.status();
            let bytes = axum::body::to_bytes(Body::new(response.into_body()), MAX_ANSWER_BYTES)
                .await
                .map_err(|e| lost(e.to_string()))?;
            if !status.is_success() {
                return Err(lost(format!("answered {status}")));
            }
            serde_json::from_slice::<RpcAnswer>(&bytes).map_err(|e| lost(e.to_string()))
        };
        match tokio::time::timeout(deadline + ANSWER_SLACK, exchange).await {
            Err(_) => Err(RpcError::Timeout(deadline)),
            Ok(Err(e)) => Err(e),
            Ok(Ok(answer)) => match answer {
                RpcAnswer::Ok(reply) => Ok(reply),
                RpcAnswer::Offline => Err(RpcError::Offline),
                RpcAnswer::Busy => Err(RpcError::Busy),
                RpcAnswer::Timeout(ms) => Err(RpcError::Timeout(Duration::from_millis(ms))),
                RpcAnswer::Disconnected => Err(RpcError::Disconnected),
                RpcAnswer::Remote(e) => Err(RpcError::Remote(e)),
            },
        }
    }

    /// Sends `req` on to hub `url` as it is (its path, headers and streamed body), with
    /// the hub key and the address it came from; answers with that hub's response,
    /// whose body streams as it arrives.
    pub async fn forward(
        &self,
        url: &str,
        key: &str,
        mut req: Request<Body>,
        from: SocketAddr,
    ) -> Result<Response<Incoming>, String> {
        self.greet(url, key).await;
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        *req.uri_mut() = format!("{}{path}", url.trim_end_matches('/'))
            .parse()
            .map_err(|e: axum::http::uri::InvalidUri| e.to_string())?;
        // The Host header stays as the client sent it: the service builds its links on it.
        let headers = req.headers_mut();
        headers.insert(
            HUB_KEY_HEADER,
            HeaderValue::from_str(key).map_err(|e| e.to_string())?,
        );
        headers.insert(
            CLIENT_ADDR_HEADER,
            HeaderValue::from_str(&from.to_string()).map_err(|e| e.to_string())?,
        );
        self.http.request(req).await.map_err(|e| {
            use std::error::Error as _;
            match e.source() {
                Some(s) => format!("{e}: {s}"),
                None => e.to_string(),
            }
        })
    }
}
