//! `adi proxy DEVICE SERVICE --listen ADDR`: a local port that forwards to a device's
//! service through the hub (like `kubectl port-forward`), for clients that cannot add a
//! bearer header. The port listens on loopback by default; whoever can reach it acts
//! with your session, so keep it there.
//!
//! A forward outlives any one JWT: a [`Session`] task renews the session before it
//! expires (and when the hub refuses it) by exchanging the API key again, or, without
//! one, by re-reading the session `adi login` stores, so a fresh `adi login` in another
//! terminal is picked up without a restart. When no valid session is left, requests
//! are answered 401 with what to do. HTTP upgrades (WebSocket) are carried through:
//! both upgraded connections are spliced together, as the hub does for `/proxy`.
//!
//! For a raw TCP service (kind `tcp`: SSH, a database) the port forwards bytes, not
//! HTTP: each accepted connection gets a stream of its own (an `adi-tcp` upgrade, see
//! [`crate::cmd::connect`]), half-closes passed on both ways.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use clap::Args;
use futures_util::{StreamExt, TryStreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use adi_protocol::http::{is_hop_by_hop, requested_upgrade};
use adi_signaling::auth::unix_now;

use crate::client::{exchange_key, load_session_at, session_path, HubArgs, HubClient};

#[derive(Args)]
pub struct ProxyArgs {
    /// Device id or name.
    device: String,
    /// Service name, as the device registered it.
    service: String,
    /// Local address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    #[command(flatten)]
    hub: HubArgs,
}

#[derive(Clone)]
struct Forward {
    target: String,
    session: Session,
    http: reqwest::Client,
}

/// What the check before forwarding reads of `GET /api/cocoons/{id}/services`.
#[derive(serde::Deserialize)]
struct Services {
    services: Vec<Named>,
}

#[derive(serde::Deserialize)]
struct Named {
    name: String,
    /// A hub that predates kinds offers HTTP services only.
    #[serde(default)]
    kind: adi_protocol::ServiceKind,
}

pub async fn run(args: ProxyArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let device = crate::client::resolve_device(&client, &args.device).await?;
    // A forward to a service the device does not have would answer 404 to every
    // request: say so now, with the services it has.
    let offered: Services = client
        .get(&format!("/api/cocoons/{device}/services"))
        .await?;
    let Some(kind) = offered
        .services
        .iter()
        .find(|s| s.name == args.service)
        .map(|s| s.kind)
    else {
        let names: Vec<&str> = offered.services.iter().map(|s| s.name.as_str()).collect();
        anyhow::bail!(
            "{} has no service {:?}; {}",
            args.device,
            args.service,
            if names.is_empty() {
                "it offers none (adi cocoon run --service NAME:PORT adds one)".to_owned()
            } else {
                format!("its services: {}", names.join(", "))
            }
        );
    };
    let renewal = match &args.hub.api_key {
        Some(key) => Renewal::ApiKey(key.clone()),
        None => Renewal::Stored(session_path()),
    };
    let forward = Forward {
        target: format!("{}/proxy/{device}/{}", client.base, args.service),
        session: Session::spawn(
            client.base.clone(),
            renewal,
            Credential::valid(client.token.clone(), client.expires_at),
        ),
        http: forward_client()?,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr()?;
    if kind.is_tcp() {
        eprintln!(
            "forwarding tcp://{local} -> {} on {} (Ctrl-C stops)",
            args.service, args.device
        );
        return forward_tcp(listener, forward).await;
    }
    eprintln!(
        "forwarding http://{local} -> {} on {} (Ctrl-C stops)",
        args.service, args.device
    );
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app(forward))
        .with_graceful_shutdown(crate::signals::shutdown())
        .await?;
    Ok(())
}

fn app(forward: Forward) -> axum::Router {
    axum::Router::new()
        .fallback(forward_request)
        .with_state(forward)
}

fn forward_client() -> Result<reqwest::Client> {
    Ok(crate::client::trusting_builder()?
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

// ---------------------------------------------------------------------------------
// The session, kept fresh by one task.

/// How a session is renewed.
#[derive(Debug, Clone)]
enum Renewal {
    /// Exchange this API key again.
    ApiKey(String),
    /// Re-read the session `adi login` stored at this path.
    Stored(PathBuf),
}

/// The credential requests present now.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Credential {
    Valid {
        token: String,
        /// Unix seconds.
        expires_at: u64,
        /// When to renew it unasked.
        renew_at: Instant,
    },
    /// No usable session; what to tell the user.
    Expired(String),
}

impl Credential {
    fn valid(token: String, expires_at: u64) -> Self {
        Credential::Valid {
            token,
            expires_at,
            renew_at: renew_at(Instant::now(), unix_now(), expires_at),
        }
    }

    fn usable_token(&self) -> Option<&str> {
        match self {
            Credential::Valid {
                token, expires_at, ..
            } if *expires_at > unix_now() => Some(token),
            _ => None,
        }
    }
}

/// When to renew a session expiring at `expires_at` (unix seconds), seen at `now`
/// (`now_unix` in unix seconds): after three quarters of what is left, so a request
/// never carries a token about to lapse, and at once if it has lapsed already.
fn renew_at(now: Instant, now_unix: u64, expires_at: u64) -> Instant {
    let left = expires_at.saturating_sub(now_unix);
    now + Duration::from_secs(left - left / 4)
}

/// A request to renew; `refused` is the token the hub turned down, if that is why.
struct Renew {
    refused: Option<String>,
    reply: oneshot::Sender<Credential>,
}

/// Handle to the session task: cheap to clone, one per forwarded request.
#[derive(Clone)]
struct Session {
    current: watch::Receiver<Credential>,
    renew: mpsc::Sender<Renew>,
}

/// Longest a renewal may take before it counts as failed.
const RENEW_TIMEOUT: Duration = Duration::from_secs(30);
/// How soon a renewal that failed is tried again while the old token still works.
const RETRY_AFTER: Duration = Duration::from_secs(10);
/// Renewal requests waiting for the session task; more wait for room.
const RENEW_QUEUE: usize = 64;

impl Session {
    fn spawn(hub: String, renewal: Renewal, initial: Credential) -> Self {
        let (current_tx, current) = watch::channel(initial);
        let (renew, renew_rx) = mpsc::channel(RENEW_QUEUE);
        tokio::spawn(keep_session(hub, renewal, current_tx, renew_rx));
        Session { current, renew }
    }

    /// A token to present now, renewed first if it lapsed; or why there is none.
    async fn token(&self) -> Result<String, String> {
        if let Some(token) = self.current.borrow().usable_token() {
            return Ok(token.to_owned());
        }
        self.renewed(None).await
    }

    /// A renewed token (unless another request renewed it already); or why not.
    async fn renewed(&self, refused: Option<String>) -> Result<String, String> {
        let (reply, answer) = oneshot::channel();
        self.renew
            .send(Renew { refused, reply })
            .await
            .map_err(|_| "the session task ended".to_owned())?;
        match answer.await {
            Ok(Credential::Valid { token, .. }) => Ok(token),
            Ok(Credential::Expired(why)) => Err(why),
            Err(_) => Err("the session task ended".to_owned()),
        }
    }
}

/// The session task: renews on its timer and when asked, one renewal at a time, so a
/// burst of refused requests costs one token exchange.
async fn keep_session(
    hub: String,
    renewal: Renewal,
    current: watch::Sender<Credential>,
    mut requests: mpsc::Receiver<Renew>,
) {
    loop {
        let wake = match &*current.borrow() {
            Credential::Valid { renew_at, .. } => Some(*renew_at),
            Credential::Expired(_) => None,
        };
        tokio::select! {
            () = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                renew(&hub, &renewal, &current, None).await;
            }
            request = requests.recv() => {
                let Some(Renew { refused, reply }) = request else { return };
                let usable = current.borrow().usable_token().map(str::to_owned);
                match (usable, refused) {
                    // Lapsed, or no session at all: try again.
                    (None, _) => renew(&hub, &renewal, &current, None).await,
                    // The hub refused the very token we hold.
                    (Some(token), Some(refused)) if token == refused => {
                        renew(&hub, &renewal, &current, Some(&refused)).await;
                    }
                    // Someone renewed it meanwhile.
                    (Some(_), _) => {}
                }
                let _ = reply.send(current.borrow().clone());
            }
        }
    }
}

/// Renews the session; `refused` is the token the hub turned down, when that is why.
async fn renew(
    hub: &str,
    renewal: &Renewal,
    current: &watch::Sender<Credential>,
    refused: Option<&str>,
) {
    let before = current.borrow().clone();
    // The token we hold, while it lasts and the hub has not refused it.
    let keep = before
        .usable_token()
        .filter(|t| refused != Some(*t))
        .map(str::to_owned);
    let next = match renewal {
        Renewal::ApiKey(key) => {
            match tokio::time::timeout(RENEW_TIMEOUT, exchange_key(hub, key)).await {
                Ok(Ok(answer)) => Credential::valid(answer.token, answer.expires_at),
                failed => {
                    let why = match failed {
                        Ok(Err(e)) => format!("{e:#}"),
                        _ => format!("the hub did not answer within {RENEW_TIMEOUT:?}"),
                    };
                    match (keep, &before) {
                        (Some(token), Credential::Valid { expires_at, .. }) => {
                            tracing::warn!("cannot renew the session yet: {why}");
                            Credential::Valid {
                                token,
                                expires_at: *expires_at,
                                renew_at: Instant::now() + RETRY_AFTER,
                            }
                        }
                        _ => Credential::Expired(format!(
                            "the session could not be renewed with the API key: {why}"
                        )),
                    }
                }
            }
        }
        Renewal::Stored(path) => stored(hub, path, &before, keep.is_some(), refused),
    };
    if let Credential::Expired(why) = &next {
        if !matches!(&before, Credential::Expired(old) if old == why) {
            eprintln!("adi proxy: {why}");
        }
    }
    current.send_replace(next);
}

/// The session `adi login` stored, when it holds a token the hub has not refused;
/// else the one we hold while it lasts (`keep`); else why there is none.
fn stored(
    hub: &str,
    path: &std::path::Path,
    before: &Credential,
    keep: bool,
    refused: Option<&str>,
) -> Credential {
    let login = format!("run `adi login --hub {hub}` again (or start adi proxy with ADI_API_KEY)");
    let now = unix_now();
    let file = match load_session_at(path) {
        Ok(file) => file.filter(|s| s.hub == hub),
        Err(e) => {
            return Credential::Expired(format!("cannot read the stored session ({e:#}): {login}"))
        }
    };
    match file {
        Some(s) if s.expires_at > now && refused != Some(s.token.as_str()) => {
            Credential::valid(s.token, s.expires_at)
        }
        _ if keep => match before {
            // Nothing newer yet: look again when it lapses.
            Credential::Valid {
                token, expires_at, ..
            } => Credential::Valid {
                token: token.clone(),
                expires_at: *expires_at,
                renew_at: Instant::now() + Duration::from_secs(expires_at.saturating_sub(now)),
            },
            Credential::Expired(why) => Credential::Expired(why.clone()),
        },
        Some(s) if s.expires_at > now => {
            Credential::Expired(format!("the hub refused the stored session: {login}"))
        }
        Some(s) => Credential::Expired(format!(
            "your session expired {} ago: {login}",
            humantime::format_duration(Duration::from_secs(now.saturating_sub(s.expires_at)))
        )),
        None => Credential::Expired(format!("no stored session for {hub}: {login}")),
    }
}

// ---------------------------------------------------------------------------------
// Forwarding.

async fn forward_request(State(f): State<Forward>, req: Request) -> Response {
    match forward_inner(f, req).await {
        Ok(r) => r,
        Err(e) => (StatusCode::BAD_GATEWAY, format!("adi proxy: {e:#}")).into_response(),
    }
}

async fn forward_inner(f: Forward, mut req: Request) -> Result<Response> {
    let upgrade = {
        let get = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
        requested_upgrade(get(header::CONNECTION), get(header::UPGRADE))
    };
    let on_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    // Only a request without a body can be sent again after the hub refused a token.
    let has_body = parts.headers.contains_key(header::TRANSFER_ENCODING)
        || parts
            .headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    let body = has_body.then_some(body);
    let token = match f.session.token().await {
        Ok(t) => t,
        Err(why) => return Ok(no_session(&why)),
    };
    let send = |token: &str, body: Option<Body>| {
        hub_request(&f, &parts, upgrade.as_deref(), token, body).send()
    };
    let mut resp = send(&token, body).await.context("the hub did not answer")?;
    if resp.status() == StatusCode::UNAUTHORIZED && is_bearer_challenge(resp.headers()) {
        let (head, peeked) = peek_body(resp).await;
        if !peeked.is_hub_unauthorized() {
            return Ok(plain_response(head, peeked.into_body()));
        }
        match f.session.renewed(Some(token)).await {
            Err(why) => return Ok(no_session(&why)),
            // The hub refused before reading the body, but it is gone: let the client
            // send it again; the next request carries the new token.
            Ok(_) if has_body => return Ok(plain_response(head, peeked.into_body())),
            Ok(token) => {
                resp = send(&token, None).await.context("the hub did not answer")?;
            }
        }
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(on_upgrade) = on_upgrade {
            return Ok(splice_upgrade(resp, on_upgrade));
        }
    }
    let head = Head::of(&resp);
    Ok(plain_response(
        head,
        Body::from_stream(resp.bytes_stream().map_err(std::io::Error::other)),
    ))
}

fn hub_request(
    f: &Forward,
    parts: &axum::http::request::Parts,
    upgrade: Option<&str>,
    token: &str,
    body: Option<Body>,
) -> reqwest::RequestBuilder {
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let connection = parts
        .headers
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok());
    let mut builder = f
        .http
        .request(parts.method.clone(), format!("{}{target}", f.target))
        .bearer_auth(token);
    for (name, value) in &parts.headers {
        if !is_hop_by_hop(name.as_str(), connection) && name != "host" && name != "authorization" {
            builder = builder.header(name, value);
        }
    }
    if let Some(protocol) = upgrade {
        builder = builder
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, protocol);
    }
    if let Some(body) = body {
        builder = builder.body(reqwest::Body::wrap_stream(body.into_data_stream()));
    }
    builder
}

/// Status and end-to-end headers of the hub's answer.
struct Head {
    status: StatusCode,
    headers: HeaderMap,
}

impl Head {
    fn of(resp: &reqwest::Response) -> Self {
        let connection = resp
            .headers()
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok());
        let mut headers = HeaderMap::new();
        for (name, value) in resp.headers() {
            if !is_hop_by_hop(name.as_str(), connection) {
                if let (Ok(n), Ok(v)) = (
                    HeaderName::try_from(name.as_str()),
                    HeaderValue::from_bytes(value.as_bytes()),
                ) {
                    headers.append(n, v);
                }
            }
        }
        Head {
            status: resp.status(),
            headers,
        }
    }
}

fn plain_response(head: Head, body: Body) -> Response {
    let mut out = Response::new(body);
    *out.status_mut() = head.status;
    *out.headers_mut() = head.headers;
    out
}

/// Answers `101` to the local client and joins its upgraded connection to the hub's.
fn splice_upgrade(resp: reqwest::Response, on_upgrade: hyper::upgrade::OnUpgrade) -> Response {
    let protocol = resp.headers().get(header::UPGRADE).cloned();
    let mut out = plain_response(Head::of(&resp), Body::empty());
    out.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(p) = protocol {
        out.headers_mut().insert(header::UPGRADE, p);
    }
    tokio::spawn(async move {
        let (hub, local) = tokio::join!(resp.upgrade(), on_upgrade);
        match (hub, local) {
            (Ok(mut hub), Ok(local)) => {
                let mut local = hyper_util::rt::TokioIo::new(local);
                if let Err(e) = tokio::io::copy_bidirectional(&mut local, &mut hub).await {
                    tracing::debug!("upgraded connection ended: {e}");
                }
            }
            (Err(e), _) => tracing::warn!("the hub's side of the upgrade failed: {e}"),
            (_, Err(e)) => tracing::warn!("the local side of the upgrade failed: {e}"),
        }
    });
    out
}

// ---------------------------------------------------------------------------------
// Raw TCP.

/// Local connections forwarded at once; past it, new ones wait to be accepted.
const MAX_TCP_CONNECTIONS: usize = 1024;

/// Forwards each accepted connection to the tcp service through a stream of its own,
/// until a stop signal. The hub's refusals are said on stderr and close the local
/// connection, which has no other way to hear them.
async fn forward_tcp(listener: tokio::net::TcpListener, forward: Forward) -> Result<()> {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_TCP_CONNECTIONS));
    let stop = crate::signals::shutdown();
    tokio::pin!(stop);
    loop {
        let slot = tokio::select! {
            () = &mut stop => return Ok(()),
            slot = slots.clone().acquire_owned() => slot?,
        };
        let (socket, peer) = tokio::select! {
            () = &mut stop => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    eprintln!("adi proxy: accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = socket.set_nodelay(true);
        let forward = forward.clone();
        tokio::spawn(async move {
            if let Err(e) = forward_connection(&forward, socket).await {
                eprintln!("adi proxy: connection from {peer}: {e:#}");
            }
            drop(slot);
        });
    }
}

/// Opens a stream for one local connection (with a renewed session if the hub refused
/// the one held) and passes bytes both ways, half-closes included, until both ends
/// have closed.
async fn forward_connection(f: &Forward, mut socket: tokio::net::TcpStream) -> Result<()> {
    use crate::cmd::connect::{open, Opened};
    let token = f.session.token().await.map_err(anyhow::Error::msg)?;
    let mut opened = open(&f.http, &f.target, &token).await?;
    if matches!(&opened, Opened::Refused(r) if r.unauthorized) {
        let token = f
            .session
            .renewed(Some(token))
            .await
            .map_err(anyhow::Error::msg)?;
        opened = open(&f.http, &f.target, &token).await?;
    }
    let mut stream = match opened {
        Opened::Stream(stream) => stream,
        Opened::Refused(refusal) => anyhow::bail!("{refusal}"),
    };
    tokio::io::copy_bidirectional(&mut socket, &mut stream).await?;
    Ok(())
}

/// Answer to the local client when no valid session is left.
fn no_session(why: &str) -> Response {
    (StatusCode::UNAUTHORIZED, format!("adi proxy: {why}\n")).into_response()
}

fn is_bearer_challenge(headers: &reqwest::header::HeaderMap) -> bool {
    headers
        .get(header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("bearer"))
}

/// A 401 body the hub writes is small JSON; a service's may be anything.
const PEEK_LIMIT: usize = 16 * 1024;

/// The start of a 401's body, read to tell the hub's refusal from a service's.
struct Peeked {
    start: Vec<u8>,
    rest: Option<futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>>,
}

async fn peek_body(resp: reqwest::Response) -> (Head, Peeked) {
    let head = Head::of(&resp);
    let mut stream = resp.bytes_stream().boxed();
    let mut start = Vec::new();
    while start.len() <= PEEK_LIMIT {
        match stream.next().await {
            Some(Ok(chunk)) => start.extend_from_slice(&chunk),
            // A broken body is no refusal of ours; pass on what came.
            Some(Err(_)) | None => return (head, Peeked { start, rest: None }),
        }
    }
    (
        head,
        Peeked {
            start,
            rest: Some(stream),
        },
    )
}

impl Peeked {
    /// Whether this is the hub's own `unauthorized` error (not the service's 401).
    fn is_hub_unauthorized(&self) -> bool {
        self.rest.is_none()
            && serde_json::from_slice::<serde_json::Value>(&self.start)
                .is_ok_and(|v| v["error"]["code"] == "unauthorized")
    }

    fn into_body(self) -> Body {
        let start = futures_util::stream::once(async move {
            Ok::<_, std::io::Error>(bytes::Bytes::from(self.start))
        });
        match self.rest {
            None => Body::from_stream(start),
            Some(rest) => Body::from_stream(start.chain(rest.map_err(std::io::Error::other))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TestHub {
        hub: adi_signaling::HubHandle,
        key: String,
        /// A correctly signed token of the same user that expired an hour ago.
        expired: String,
        _dir: tempfile::TempDir,
    }

    async fn hub() -> anyhow::Result<TestHub> {
        let dir = tempfile::tempdir()?;
        let hub = adi_signaling::spawn(adi_signaling::HubConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: dir.path().join("hub"),
            ..Default::default()
        })
        .await?;
        let catalog = hub.catalog();
        let (user, key) = adi_signaling::auth::add_user(catalog.as_ref(), "alice").await?;
        // The hub's signing key, as the hub itself loads it.
        let jwt_key = catalog.hub_secret_or_insert("jwt_key", b"unused").await?;
        let claims = adi_signaling::auth::Claims {
            sub: user.id,
            name: user.name,
            iat: unix_now() - 7200,
            exp: unix_now() - 3600,
            iss: "adi-hub".into(),
            sid: None,
            kid: None,
            scp: None,
            dev: None,
        };
        let expired = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(&jwt_key),
        )?;
        Ok(TestHub {
            hub,
            key,
            expired,
            _dir: dir,
        })
    }

    fn forward(t: &TestHub, renewal: Renewal, initial: Credential) -> Forward {
        Forward {
            // No such device: an authenticated request is answered 404, a refused one 401.
            target: format!("{}/proxy/{}/web", t.hub.url(), "0".repeat(32)),
            session: Session::spawn(t.hub.url(), renewal, initial),
            http: forward_client().expect("client"),
        }
    }

    async fn status_of(f: &Forward) -> anyhow::Result<(StatusCode, String)> {
        let req = Request::builder().uri("/x").body(Body::empty())?;
        send(f, req).await
    }

    /// A POST with a body: one that cannot be sent twice.
    async fn post_status_of(f: &Forward) -> anyhow::Result<(StatusCode, String)> {
        let req = Request::builder()
            .method("POST")
            .uri("/x")
            .header("content-length", "3")
            .body(Body::from("abc"))?;
        send(f, req).await
    }

    async fn send(f: &Forward, req: Request) -> anyhow::Result<(StatusCode, String)> {
        let resp = forward_inner(f.clone(), req).await?;
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    #[tokio::test]
    async fn the_expired_token_itself_is_refused_by_the_hub() -> anyhow::Result<()> {
        let t = hub().await?;
        let resp = reqwest::Client::new()
            .get(format!("{}/api/cocoons", t.hub.url()))
            .bearer_auth(&t.expired)
            .send()
            .await?;
        assert_eq!(resp.status(), 401);
        Ok(())
    }

    #[tokio::test]
    async fn a_lapsed_token_is_renewed_with_the_api_key_before_it_is_sent() -> anyhow::Result<()> {
        let t = hub().await?;
        let lapsed = Credential::valid(t.expired.clone(), unix_now() - 3600);
        let f = forward(&t, Renewal::ApiKey(t.key.clone()), lapsed);
        // A body cannot be sent twice: only renewing first gets this one through.
        let (status, body) = post_status_of(&f).await?;
        assert_eq!(status, StatusCode::NOT_FOUND, "authenticated: {body}");
        let now = f.session.current.borrow().clone();
        assert!(
            now.usable_token().is_some_and(|tok| tok != t.expired),
            "{now:?}"
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_token_the_hub_refuses_is_renewed_and_the_request_sent_again() -> anyhow::Result<()> {
        let t = hub().await?;
        // The local clock thinks it is good for an hour; the hub knows better.
        let skewed = Credential::valid(t.expired.clone(), unix_now() + 3600);
        let f = forward(&t, Renewal::ApiKey(t.key.clone()), skewed);
        let (status, body) = status_of(&f).await?;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "retried and authenticated: {body}"
        );
        // Later requests use the renewed token straight away.
        let (status, _) = status_of(&f).await?;
        assert_eq!(status, StatusCode::NOT_FOUND);
        Ok(())
    }

    #[tokio::test]
    async fn an_expired_stored_session_is_reported_and_a_new_login_picked_up() -> anyhow::Result<()>
    {
        let t = hub().await?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("session.json");
        let write = |token: &str, expires_at: u64| {
            std::fs::write(
                &path,
                serde_json::to_vec(&crate::client::Session {
                    ca_cert: None,
                    hub: t.hub.url(),
                    token: token.to_owned(),
                    expires_at,
                    user: "alice".into(),
                })?,
            )
        };
        write(&t.expired, unix_now() - 3600)?;
        let lapsed = Credential::valid(t.expired.clone(), unix_now() - 3600);
        let f = forward(&t, Renewal::Stored(path.clone()), lapsed);
        let (status, body) = status_of(&f).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(
            body.contains("session expired") && body.contains("adi login"),
            "{body}"
        );
        // `adi login` in another terminal: the forward carries on without a restart.
        let fresh = exchange_key(&t.hub.url(), &t.key).await?;
        write(&fresh.token, fresh.expires_at)?;
        let (status, body) = status_of(&f).await?;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        Ok(())
    }

    #[tokio::test]
    async fn a_stored_session_the_hub_refuses_says_so() -> anyhow::Result<()> {
        let t = hub().await?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("session.json");
        std::fs::write(
            &path,
            serde_json::to_vec(&crate::client::Session {
                ca_cert: None,
                hub: t.hub.url(),
                token: t.expired.clone(),
                expires_at: unix_now() + 3600,
                user: "alice".into(),
            })?,
        )?;
        let skewed = Credential::valid(t.expired.clone(), unix_now() + 3600);
        let f = forward(&t, Renewal::Stored(path), skewed);
        let (status, body) = status_of(&f).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(
            body.contains("refused the stored session") && body.contains("adi login"),
            "{body}"
        );
        Ok(())
    }

    #[test]
    fn renewal_comes_after_three_quarters_of_the_lifetime() {
        let now = Instant::now();
        assert_eq!(
            renew_at(now, 1_000, 1_000 + 3600),
            now + Duration::from_secs(2700)
        );
        assert_eq!(renew_at(now, 1_000, 1_060), now + Duration::from_secs(45));
        assert_eq!(renew_at(now, 1_000, 900), now, "lapsed: at once");
    }
}
