//! Keep-alive HTTP/1 connections to this device's loopback services, each one driven by
//! the request that holds it.
//!
//! A pooled client that runs every connection on a task of its own makes each proxied
//! request hand its head to that task and take the response head and every body chunk
//! back from it: wake-ups across tasks on every exchange. Here a request takes an idle
//! connection out of the pool (or opens one), drives it itself while it writes the
//! request and reads the answer, and puts it back once the exchange is over, so the
//! bytes move in the request's own task. An idle connection is polled by nobody: one
//! the service closed is found closed when next taken, and a request that it could not
//! carry goes out once more on a new connection.
//!
//! Connections only ever go to `127.0.0.1` at a registered port; nothing a request
//! carries picks the address.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A request body for a service: empty, or streamed from the hub.
pub(crate) type ProxyBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;
type Io = TokioIo<TcpStream>;

/// How long a connection may wait unused before it is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per service: as many as a hub has requests in flight to one
/// device at most, so a burst's connections all stay for the next, but no more.
const MAX_IDLE_PER_PORT: usize = 1024;
/// How long opening a connection to a loopback service may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an exchange with a service failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExchangeError {
    /// Nothing accepted the connection (the service is not listening, or too slow to).
    #[error("{0}")]
    Connect(String),
    /// The connection opened but the exchange broke: a malformed answer, a close.
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

/// The HTTP client for loopback services: idle keep-alive connections by service port,
/// shared by every request of a cocoon, and nothing more: no proxy from the
/// environment, no redirects (they are the client's business), no decompression (bytes
/// pass as sent).
#[derive(Clone)]
pub(crate) struct Pool {
    shared: Arc<Shared>,
}

impl Default for Pool {
    fn default() -> Self {
        Pool::with_idle_timeout(IDLE_TIMEOUT)
    }
}

struct Shared {
    idle: Mutex<HashMap<u16, Vec<Idle>>>,
    idle_timeout: Duration,
    /// Whether the task that closes connections idle too long runs.
    reaping: AtomicBool,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// One HTTP/1 connection to a service, owned by the request using it.
pub(crate) struct Conn {
    port: u16,
    sender: SendRequest<ProxyBody>,
    /// `None` once the connection has ended (closed or failed). Boxed, as its state
    /// is large: a request's future holds the connection, and moves it.
    io: Option<Box<Connection<Io, ProxyBody>>>,
    /// Whether it came from the pool: only then may a failed send be tried again.
    reused: bool,
}

impl Pool {
    /// A pool that closes connections unused for `idle_timeout`.
    pub(crate) fn with_idle_timeout(idle_timeout: Duration) -> Self {
        Pool {
            shared: Arc::new(Shared {
                idle: Mutex::default(),
                idle_timeout,
                reaping: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `request` to the service on `port` and waits for the response head. A
    /// reused connection that turns out closed before it took the request is replaced
    /// by a new one, once.
    pub(crate) async fn send(
        &self,
        port: u16,
        request: http::Request<ProxyBody>,
    ) -> Result<(Conn, http::Response<Incoming>), ExchangeError> {
        let mut conn = self.checkout(port).await?;
        let sent = conn.sender.try_send_request(request);
        let mut failed = match conn.drive(sent).await {
            Ok(response) => return Ok((conn, response)),
            Err(failed) => failed,
        };
        match failed.take_message() {
            Some(request) if conn.reused => {
                let mut conn = open(port).await?;
                let sent = conn.sender.send_request(request);
                let response = conn.drive(sent).await?;
                Ok((conn, response))
            }
            _ => Err(failed.into_error().into()),
        }
    }

    /// A connection for a request that switches protocols: not pooled, and run on a
    /// task of its own, which hands the raw connection to the upgrade when it happens.
    pub(crate) async fn upgradable(
        &self,
        port: u16,
    ) -> Result<SendRequest<ProxyBody>, ExchangeError> {
        let (sender, conn) = handshake(port).await?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    /// Puts a connection whose exchange is over back for the next request, or closes
    /// it when it cannot take another (the service asked to close, the body was not
    /// read to its end, the exchange failed).
    pub(crate) fn checkin(&self, mut conn: Conn) {
        // One poll lets the connection see its exchange through and ask for the next.
        let mut cx = Context::from_waker(Waker::noop());
        if !poll_io(&mut conn.io, &mut cx) || !conn.sender.is_ready() {
            return;
        }
        conn.reused = true;
        let port = conn.port;
        let now = Instant::now();
        {
            let Ok(mut idle) = self.shared.idle.lock() else {
                return;
            };
            let list = idle.entry(port).or_default();
            if list.len() >= MAX_IDLE_PER_PORT {
                return;
            }
            list.push(Idle { conn, since: now });
        }
        if !self.shared.reaping.swap(true, Ordering::AcqRel) {
            tokio::spawn(reap(Arc::downgrade(&self.shared)));
        }
    }

    async fn checkout(&self, port: u16) -> Result<Conn, ExchangeError> {
        while let Some(mut conn) = self.take_idle(port) {
            // Driving it once shows whether the service closed it while it waited.
            if conn.ready().await {
                return Ok(conn);
            }
        }
        open(port).await
    }

    fn take_idle(&self, port: u16) -> Option<Conn> {
        let mut idle = self.shared.idle.lock().ok()?;
        let list = idle.get_mut(&port)?;
        let now = Instant::now();
        while let Some(idle) = list.pop() {
            if idle.fresh(now, self.shared.idle_timeout) {
                return Some(idle.conn);
            }
        }
        None
    }
}

impl Conn {
    /// Runs `work` to its end while driving this connection, so the request's bytes
    /// move and its answer arrives in the caller's task.
    pub(crate) async fn drive<F: Future>(&mut self, work: F) -> F::Output {
        let mut work = pin!(work);
        let io = &mut self.io;
        poll_fn(|cx| {
            poll_io(io, cx);
            work.as_mut().poll(cx)
        })
        .await
    }

    /// Whether the connection can take a request: it has not ended while idle.
    async fn ready(&mut self) -> bool {
        let Conn { sender, io, .. } = self;
        poll_fn(|cx| {
            if !poll_io(io, cx) {
                return Poll::Ready(false);
            }
            sender.poll_ready(cx).map(|r| r.is_ok())
        })
        .await
    }
}

/// Lets a connection do what it can now (write, read, hand an answer over); forgets it
/// once it has ended. Whether it still runs.
fn poll_io(io: &mut Option<Box<Connection<Io, ProxyBody>>>, cx: &mut Context<'_>) -> bool {
    if let Some(conn) = io.as_mut() {
        if Pin::new(conn).poll(cx).is_ready() {
            *io = None;
        }
    }
    io.is_some()
}

impl Idle {
    /// Whether it has waited less than `timeout` by `now`.
    fn fresh(&self, now: Instant, timeout: Duration) -> bool {
        now.duration_since(self.since) < timeout
    }
}

async fn open(port: u16) -> Result<Conn, ExchangeError> {
    let (sender, conn) = handshake(port).await?;
    Ok(Conn {
        port,
        sender,
        io: Some(Box::new(conn)),
        reused: false,
    })
}

async fn handshake(
    port: u16,
) -> Result<(SendRequest<ProxyBody>, Connection<Io, ProxyBody>), ExchangeError> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Err(_) => {
            return Err(ExchangeError::Connect(format!(
                "no connection within {CONNECT_TIMEOUT:?}"
            )))
        }
        Ok(Err(e)) => return Err(ExchangeError::Connect(e.to_string())),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    Ok(http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await?)
}

/// Closes connections left idle past the pool's idle timeout, until the pool is gone.
async fn reap(shared: Weak<Shared>) {
    loop {
        let Some(every) = shared.upgrade().map(|s| s.idle_timeout / 2) else {
            return;
        };
        tokio::time::sleep(every).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let timeout = shared.idle_timeout;
        let Ok(mut idle) = shared.idle.lock() else {
            return;
        };
        let now = Instant::now();
        idle.retain(|_, list| {
            list.retain(|i| i.fresh(now, timeout));
            !list.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A service on a real loopback port that answers every request with `hello` and
    /// counts the connections it accepted; with `close_after_each` it closes each one
    /// after its answer, without saying so in the answer.
    async fn service(close_after_each: bool) -> (u16, Arc<AtomicUsize>) {
        let (port, accepted, _) = counted_service(close_after_each).await;
        (port, accepted)
    }

    /// [`service`], also counting the connections the client side closed.
    async fn counted_service(close_after_each: bool) -> (u16, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let gone = closed.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let gone = gone.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        let Ok(n) = socket.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            gone.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
                            if socket.write_all(answer).await.is_err() {
                                return;
                            }
                            if close_after_each {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (port, accepted, closed)
    }

    fn get(port: u16) -> http::Request<ProxyBody> {
        http::Request::get("/x")
            .header("host", format!("127.0.0.1:{port}"))
            .body(BodyExt::boxed(Empty::new().map_err(|never| match never {})))
            .expect("request")
    }

    async fn exchange(pool: &Pool, port: u16) -> Bytes {
        let (mut conn, response) = pool.send(port, get(port)).await.expect("answered");
        assert_eq!(response.status(), 200);
        let body = conn
            .drive(response.into_body().collect())
            .await
            .expect("body")
            .to_bytes();
        pool.checkin(conn);
        body
    }

    #[tokio::test]
    async fn one_connection_carries_request_after_request() {
        let (port, accepted) = service(false).await;
        let pool = Pool::default();
        for _ in 0..20 {
            assert_eq!(exchange(&pool, port).await, "hello");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_service_closed_is_replaced_without_an_error() {
        let (port, accepted) = service(true).await;
        let pool = Pool::default();
        for _ in 0..10 {
            assert_eq!(exchange(&pool, port).await, "hello");
            // Let the close reach this side before the next request takes the connection.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 10);
    }

    #[tokio::test]
    async fn a_response_dropped_unread_does_not_spoil_the_next_exchange() {
        let (port, _) = service(false).await;
        let pool = Pool::default();
        let (conn, response) = pool.send(port, get(port)).await.expect("answered");
        drop(response);
        pool.checkin(conn);
        assert_eq!(exchange(&pool, port).await, "hello");
    }

    #[tokio::test]
    async fn connections_idle_too_long_are_closed_not_reused() {
        let (port, accepted, closed) = counted_service(false).await;
        let pool = Pool::with_idle_timeout(Duration::from_millis(200));
        assert_eq!(exchange(&pool, port).await, "hello");
        assert_eq!(closed.load(Ordering::SeqCst), 0);
        // The reaper looks every half timeout: by then the service has seen the close.
        let deadline = Instant::now() + Duration::from_secs(10);
        while closed.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(closed.load(Ordering::SeqCst), 1);
        assert_eq!(exchange(&pool, port).await, "hello");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let err = Pool::default().send(port, get(port)).await.err();
        assert!(matches!(err, Some(ExchangeError::Connect(_))), "{err:?}");
    }
}
