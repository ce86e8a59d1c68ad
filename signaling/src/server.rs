//! The hub's accept loop. It owns admission and the life of every TCP connection:
//! each one is counted against a total cap and a cap per source address before any
//! HTTP is read, gets a deadline for each request head (which also closes a keep-alive
//! connection left idle that long), and ends when the hub stops. The last slots under
//! the total cap are kept for what must always get through — health checks, sign-ins
//! and devices reconnecting — so idle or half-open sockets can never lock those out.
//! A WebSocket keeps its connection's slot for as long as it lives. Another hub of the
//! cluster opens a connection per request it forwards, so an address from which a
//! request proved it came from a hub (the cluster's hub key) is not held to the cap per
//! source for a while after: only to the total cap, whose reserve stays.
//!
//! It must never decide anything about what a request may do: routing and access are
//! the router's. Refusals are written without reading the request, so a refused
//! connection costs one accept and one small write.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use adi_protocol::ErrorCode;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::rest::error::ApiError;
use crate::HubConfig;

/// Largest request head the hub reads. Heads that could be carried to a device are far
/// smaller (see `adi_protocol::limits`); this bounds what one slow client can make the
/// hub hold while its head arrives.
const MAX_HEAD_BUFFER: usize = 128 * 1024;

/// Paths served on a connection that took a reserved slot.
const PRIORITY_PATHS: &[&str] = &[
    "/healthz",
    "/readyz",
    "/api/auth/token",
    "/api/auth/session",
    "/ws/cocoon",
];

/// Connection counts, total and by source address.
pub(crate) struct Admission {
    max_total: usize,
    max_per_source: usize,
    reserved: usize,
    counts: Mutex<Counts>,
    refused: Refused,
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
    /// Addresses another hub of the cluster proved itself from, and when it last did.
    hubs: HashMap<IpAddr, Instant>,
}

/// How long an address a hub proved itself from stays exempt from the cap per source
/// after its last such request (a cluster's hubs talk every few seconds while in use).
const HUB_SOURCE_TRUST: Duration = Duration::from_secs(600);
/// At most this many such addresses are remembered: a cluster has a handful of hubs,
/// and only holders of the hub key add one.
const MAX_HUB_SOURCES: usize = 256;

/// Counters of refused connections, by reason, for `/metrics`.
#[derive(Clone)]
pub(crate) struct Refused {
    pub(crate) per_source: prometheus::IntCounter,
    pub(crate) total: prometheus::IntCounter,
}

/// How a new connection is admitted.
enum Admit {
    /// Every route.
    Open(ConnSlot),
    /// A reserved slot: health checks, sign-ins and device reconnects only.
    Priority(ConnSlot),
    /// Not at all: this answer, written before the connection closes.
    Refused(&'static [u8]),
}

/// One admitted connection's place under the caps; given back when the last clone is
/// dropped. Requests carry a clone (as an extension), so a WebSocket that outlives its
/// HTTP connection keeps the slot.
#[derive(Clone)]
pub struct ConnSlot {
    held: Arc<Held>,
}

impl ConnSlot {
    /// This connection's address sent a request that proved it came from another hub.
    fn vouch_for_hub(&self) {
        self.held.admission.vouch_for_hub(self.held.source);
    }
}

struct Held {
    admission: Arc<Admission>,
    source: IpAddr,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut counts = self.admission.lock();
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                counts.by_source.remove(&self.source);
            }
        }
    }
}

impl Admission {
    pub(crate) fn new(config: &HubConfig, refused: Refused) -> Arc<Self> {
        Arc::new(Admission {
            max_total: config.max_connections,
            max_per_source: config.max_connections_per_source,
            reserved: config.reserved_connections().min(config.max_connections),
            counts: Mutex::new(Counts::default()),
            refused,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        // The counts stay consistent across a panic elsewhere: keep using them.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connections held now.
    pub(crate) fn open(&self) -> usize {
        self.lock().total
    }

    /// Records that a request from `source` proved it came from another hub.
    fn vouch_for_hub(&self, source: IpAddr) {
        let mut counts = self.lock();
        let now = Instant::now();
        if !counts.hubs.contains_key(&source) && counts.hubs.len() >= MAX_HUB_SOURCES {
            counts
                .hubs
                .retain(|_, seen| now.duration_since(*seen) < HUB_SOURCE_TRUST);
            if counts.hubs.len() >= MAX_HUB_SOURCES {
                return;
            }
        }
        counts.hubs.insert(source, now);
    }

    fn admit(self: &Arc<Self>, source: IpAddr) -> Admit {
        let mut counts = self.lock();
        let from_source = counts.by_source.get(&source).copied().unwrap_or(0);
        let hub = counts
            .hubs
            .get(&source)
            .is_some_and(|seen| seen.elapsed() < HUB_SOURCE_TRUST);
        if self.max_per_source > 0 && from_source >= self.max_per_source && !hub {
            self.refused.per_source.inc();
            return Admit::Refused(TOO_MANY_FROM_SOURCE);
        }
        if counts.total >= self.max_total {
            self.refused.total.inc();
            return Admit::Refused(AT_CAPACITY);
        }
        let priority = counts.total >= self.max_total - self.reserved;
        counts.total += 1;
        *counts.by_source.entry(source).or_insert(0) += 1;
        drop(counts);
        let slot = ConnSlot {
            held: Arc::new(Held {
                admission: self.clone(),
                source,
            }),
        };
        if priority {
            Admit::Priority(slot)
        } else {
            Admit::Open(slot)
        }
    }
}

const TOO_MANY_FROM_SOURCE: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nconnection: close\r\nretry-after: 1\r\ncontent-length: 111\r\n\r\n{\"error\":{\"code\":\"too_many_requests\",\"message\":\"too many connections from your address; close some and retry\"}}";

const AT_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\nretry-after: 1\r\ncontent-length: 94\r\n\r\n{\"error\":{\"code\":\"unavailable\",\"message\":\"the hub is at its connection limit; retry shortly\"}}";

/// Serves `app` on `listener` until `shutdown` is cancelled, then lets every connection
/// finish the request it is serving and returns once none is left. Upgraded
/// connections (WebSockets) are their handlers' to end.
pub(crate) async fn serve<S>(
    listener: TcpListener,
    app: S,
    config: &HubConfig,
    tls: Option<tokio_rustls::TlsAcceptor>,
    admission: Arc<Admission>,
    cluster: Option<Arc<crate::cluster::Cluster>>,
    shutdown: CancellationToken,
) where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let connections = TaskTracker::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        .max_buf_size(MAX_HEAD_BUFFER);
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, most likely: wait for some to close
                    // rather than spin.
                    warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (slot, priority) = match admission.admit(peer.ip()) {
            Admit::Open(slot) => (slot, false),
            Admit::Priority(slot) => (slot, true),
            Admit::Refused(answer) => {
                debug!(%peer, "connection refused at its cap");
                refuse(&tcp, answer);
                continue;
            }
        };
        if let Err(e) = tcp.set_nodelay(true) {
            // Small frames would wait for the peer's delayed ACK, up to 40 ms each.
            debug!("cannot set TCP_NODELAY: {e}");
        }
        let service = hyper_util::service::TowerToHyperService::new(ConnService {
            app: app.clone(),
            peer,
            slot,
            priority,
            cluster: cluster.clone(),
        });
        let stop = shutdown.clone();
        match &tls {
            None => {
                let conn = http.serve_connection(TokioIo::new(tcp), service);
                connections.spawn(run(conn.with_upgrades(), stop, peer));
            }
            Some(acceptor) => {
                // The handshake is part of the head's deadline, so a client that
                // stalls in it holds its slot no longer than one that stalls in HTTP.
                let handshake = tokio::time::timeout(config.header_timeout, acceptor.accept(tcp));
                let http = http.clone();
                connections.spawn(async move {
                    let tls = match handshake.await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => return debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => return debug!(%peer, "TLS handshake timed out"),
                    };
                    let conn = http.serve_connection(TokioIo::new(tls), service);
                    run(conn.with_upgrades(), stop, peer).await;
                });
            }
        }
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Serves one connection until it ends, or until `stop`, when it finishes the request
/// in flight and takes no other.
async fn run<C, E>(conn: C, stop: CancellationToken, peer: SocketAddr)
where
    C: std::future::Future<Output = Result<(), E>> + GracefulConnection,
    E: std::fmt::Display,
{
    let mut conn = std::pin::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        debug!(%peer, "connection ended: {e}");
    }
}

/// A hyper connection that can be told to finish its request in flight and stop.
trait GracefulConnection {
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>);
}

impl<I, S> GracefulConnection for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

/// Writes a refusal to a connection that was not admitted, without waiting: a fresh
/// socket's send buffer takes it whole, and the connection is closed right after.
fn refuse(tcp: &TcpStream, answer: &[u8]) {
    let _ = tcp.try_write(answer);
}

/// The router as one connection sees it: each request gets the peer's address and the
/// connection's slot, a reserved slot serves only the priority paths, and a request
/// whose head is ambiguous is refused before any route sees it.
#[derive(Clone)]
struct ConnService<S> {
    app: S,
    peer: SocketAddr,
    slot: ConnSlot,
    priority: bool,
    /// Whose hub key proves a request came from another of its hubs.
    cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl<S> tower::Service<hyper::Request<Incoming>> for ConnService<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future =
        futures_util::future::Either<std::future::Ready<Result<Response, Infallible>>, S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        self.app.poll_ready(cx)
    }

    fn call(&mut self, req: hyper::Request<Incoming>) -> Self::Future {
        use futures_util::future::Either;
        let mut req = req.map(Body::new);
        if let Some(refusal) = self.refusal(&req) {
            return Either::Left(std::future::ready(Ok(refusal)));
        }
        if crate::cluster::sent_by_hub(self.cluster.as_deref(), req.headers()) {
            self.slot.vouch_for_hub();
        }
        req.extensions_mut().insert(ConnectInfo(self.peer));
        req.extensions_mut().insert(self.slot.clone());
        Either::Right(self.app.call(req))
    }
}

impl<S> ConnService<S> {
    fn refusal(&self, req: &Request) -> Option<Response> {
        // Two Host headers: the hub and a service behind it could each believe another
        // one, so neither is trusted.
        if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
            return Some(
                ApiError::new(
                    ErrorCode::BadRequest,
                    "the request has more than one Host header",
                )
                .into_response(),
            );
        }
        if self.priority && !PRIORITY_PATHS.contains(&req.uri().path()) {
            let mut refused = ApiError::new(
                ErrorCode::Unavailable,
                "the hub is at its connection limit and serves only health checks, sign-ins \
                 and device reconnects; retry shortly",
            )
            .into_response();
            refused
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Some(refused);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> Refused {
        Refused {
            per_source: prometheus::IntCounter::new("a", "a").expect("counter"),
            total: prometheus::IntCounter::new("b", "b").expect("counter"),
        }
    }

    #[test]
    fn the_canned_refusals_say_their_own_length() {
        for answer in [TOO_MANY_FROM_SOURCE, AT_CAPACITY] {
            let text = std::str::from_utf8(answer).expect("ascii");
            let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
            let declared: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|n| n.parse().ok())
                .expect("a length");
            assert_eq!(declared, body.len(), "{head}");
            let _: serde_json::Value = serde_json::from_str(body).expect("json");
        }
    }

    #[test]
    fn caps_hold_per_source_and_in_total_with_the_reserve_last() {
        let config = HubConfig {
            max_connections: 64,
            max_connections_per_source: 40,
            ..HubConfig::default()
        };
        let admission = Admission::new(&config, refused());
        let a: IpAddr = [127, 0, 0, 2].into();
        let b: IpAddr = [127, 0, 0, 3].into();
        let mut held = Vec::new();
        for _ in 0..40 {
            match admission.admit(a) {
                Admit::Open(slot) => held.push(slot),
                _ => panic!("refused under both caps"),
            }
        }
        assert!(matches!(
            admission.admit(a),
            Admit::Refused(TOO_MANY_FROM_SOURCE)
        ));
        // 64 in all, of which the last 4 are kept: 20 more open ones, then priority.
        for _ in 0..20 {
            match admission.admit(b) {
                Admit::Open(slot) => held.push(slot),
                _ => panic!("refused before the reserve"),
            }
        }
        for _ in 0..4 {
            match admission.admit(b) {
                Admit::Priority(slot) => held.push(slot),
                _ => panic!("the reserve was not offered"),
            }
        }
        assert!(matches!(admission.admit(b), Admit::Refused(AT_CAPACITY)));
        assert_eq!(admission.open(), 64);
        held.truncate(10);
        assert_eq!(admission.open(), 10);
        assert!(matches!(admission.admit(a), Admit::Open(_)));
        drop(held);
        assert_eq!(admission.open(), 0);
        assert!(
            admission.lock().by_source.is_empty(),
            "no source left behind"
        );
    }

    #[test]
    fn an_address_a_hub_proved_itself_from_passes_the_cap_per_source_but_not_the_total() {
        let config = HubConfig {
            max_connections: 64,
            max_connections_per_source: 8,
            ..HubConfig::default()
        };
        let admission = Admission::new(&config, refused());
        let hub: IpAddr = [127, 0, 0, 2].into();
        let other: IpAddr = [127, 0, 0, 3].into();
        let mut held = Vec::new();
        for ip in [hub, other] {
            for _ in 0..8 {
                match admission.admit(ip) {
                    Admit::Open(slot) => held.push(slot),
                    _ => panic!("refused under both caps"),
                }
            }
            assert!(matches!(
                admission.admit(ip),
                Admit::Refused(TOO_MANY_FROM_SOURCE)
            ));
        }
        // One request from the hub's address carried the hub key.
        held[0].vouch_for_hub();
        for _ in 0..44 {
            match admission.admit(hub) {
                Admit::Open(slot) => held.push(slot),
                _ => panic!("a hub's address was held to the cap per source"),
            }
        }
        assert!(
            matches!(admission.admit(other), Admit::Refused(TOO_MANY_FROM_SOURCE)),
            "other addresses keep their cap"
        );
        // The total cap and its reserve hold for the hub too.
        let kept: Vec<ConnSlot> = (0..4)
            .filter_map(|_| match admission.admit(hub) {
                Admit::Priority(slot) => Some(slot),
                _ => None,
            })
            .collect();
        assert_eq!(kept.len(), 4);
        assert!(matches!(admission.admit(hub), Admit::Refused(AT_CAPACITY)));
        drop((held, kept));
        assert_eq!(admission.open(), 0);
    }

    #[test]
    fn addresses_vouched_for_are_bounded() {
        let admission = Admission::new(&HubConfig::default(), refused());
        for i in 0..(MAX_HUB_SOURCES as u32 + 10) {
            admission.vouch_for_hub(IpAddr::from(i.to_be_bytes()));
        }
        assert_eq!(admission.lock().hubs.len(), MAX_HUB_SOURCES);
    }
}
