//! `adi proxy DEVICE SERVICE --listen ADDR`: a local port that forwards to a device's
//! service through the hub (like `kubectl port-forward`), for clients that cannot add a
//! bearer header. The port listens on loopback by default; whoever can reach it acts
//! with your session, so keep it there.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use clap::Args;
use futures_util::TryStreamExt;

use adi_protocol::http::is_hop_by_hop;

use crate::client::{HubArgs, HubClient};

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
    token: String,
    http: reqwest::Client,
}

pub async fn run(args: ProxyArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let device = crate::cmd::tasks::resolve_device(&client, &args.device).await?;
    let forward = Forward {
        target: format!("{}/proxy/{device}/{}", client.base, args.service),
        token: client.token.clone(),
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr()?;
    eprintln!(
        "forwarding http://{local} -> {} on {} (Ctrl-C stops)",
        args.service, args.device
    );
    let app = axum::Router::new()
        .fallback(forward_request)
        .with_state(forward);
    axum::serve(listener, app)
        .with_graceful_shutdown(crate::cmd::signaling::shutdown_signal())
        .await?;
    Ok(())
}

async fn forward_request(State(f): State<Forward>, req: Request) -> Response {
    match forward_inner(f, req).await {
        Ok(r) => r,
        Err(e) => (StatusCode::BAD_GATEWAY, format!("adi proxy: {e:#}")).into_response(),
    }
}

async fn forward_inner(f: Forward, req: Request) -> Result<Response> {
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let connection = req
        .headers()
        .get("connection")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut builder = f
        .http
        .request(req.method().clone(), format!("{}{target}", f.target))
        .bearer_auth(&f.token);
    for (name, value) in req.headers() {
        if !is_hop_by_hop(name.as_str(), connection.as_deref())
            && name != "host"
            && name != "authorization"
        {
            builder = builder.header(name, value);
        }
    }
    let body = req.into_body().into_data_stream();
    let resp = builder
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .context("the hub did not answer")?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let mut out = Response::new(Body::from_stream(
        resp.bytes_stream().map_err(std::io::Error::other),
    ));
    *out.status_mut() = status;
    let connection = headers
        .get("connection")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    for (name, value) in &headers {
        if !is_hop_by_hop(name.as_str(), connection.as_deref()) {
            if let (Ok(n), Ok(v)) = (
                HeaderName::try_from(name.as_str()),
                HeaderValue::from_bytes(value.as_bytes()),
            ) {
                out.headers_mut().append(n, v);
            }
        }
    }
    Ok(out)
}
