//! `adi signaling serve` and `adi signaling user ...`: run a hub, administer its users
//! (in `users`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use adi_signaling::HubConfig;

use crate::paths;

#[derive(Subcommand)]
pub enum SignalingCmd {
    /// Run the hub until Ctrl-C or SIGTERM.
    Serve(Box<ServeArgs>),
    /// The hubs serving now: one, or every hub of a cluster, with its devices and load.
    Hubs(crate::client::ListArgs),
    /// Manage users (run on the hub host, against its catalog; a running hub applies
    /// every change within a second).
    #[command(subcommand)]
    User(crate::cmd::users::UserCmd),
}

/// Where a hub's catalog is.
#[derive(Args, Clone)]
pub struct CatalogArgs {
    /// Directory of the embedded SQLite catalog.
    #[arg(long, env = "ADI_DATA_DIR", default_value_os_t = paths::data_dir("hub"))]
    pub data_dir: PathBuf,
    /// Use this PostgreSQL catalog instead (postgres://...).
    #[arg(long, env = "ADI_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

impl CatalogArgs {
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone()
    }
}

#[derive(Args)]
pub struct ServeArgs {
    /// Worker threads (default: one per core). Fewer leave cores to what shares the
    /// host, and on a host with two or so cores cost less CPU per proxied request.
    #[arg(long, env = "ADI_HUB_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
    /// Address to listen on.
    #[arg(long, env = "ADI_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    #[command(flatten)]
    catalog: CatalogArgs,
    /// File (owner-only) for the hub's signing and device-id keys, kept out of the
    /// catalog; created if missing, taking over the catalog's keys. Hubs sharing a
    /// catalog must share this file too.
    #[arg(long, env = "ADI_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// How often cocoons heartbeat (e.g. 5s, 500ms).
    #[arg(long, env = "ADI_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// Largest control frame accepted from a cocoon, in bytes.
    #[arg(long, env = "ADI_MAX_FRAME_BYTES", default_value_t = adi_protocol::DEFAULT_MAX_FRAME_BYTES)]
    max_frame_bytes: usize,
    /// Lifetime of sessions handed out for API keys.
    #[arg(long, env = "ADI_JWT_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    jwt_ttl: Duration,
    /// Serve HTTPS and WSS with this PEM certificate chain (with --tls-key); the files
    /// are re-read when they change, so a renewal needs no restart.
    #[arg(long, env = "ADI_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "ADI_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// How long the audit log keeps an event (e.g. 90d, 1y).
    #[arg(long, env = "ADI_AUDIT_RETENTION", default_value = "90d", value_parser = humantime::parse_duration)]
    audit_retention: Duration,
    /// URL users reach this hub at, for the install script (default: the request's Host).
    #[arg(long, env = "ADI_PUBLIC_URL")]
    public_url: Option<String>,
    /// How long a proxied request waits for the service's response head (a request
    /// may set its own with the x-adi-timeout-ms header).
    #[arg(long, env = "ADI_PROXY_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    proxy_timeout: Duration,
    /// Largest proxied request body in bytes (default: no limit; bodies stream).
    #[arg(long, env = "ADI_PROXY_MAX_BODY_BYTES")]
    proxy_max_body_bytes: Option<u64>,
    /// How long a capability request waits for the serving device (a request may set
    /// its own with timeout_ms).
    #[arg(long, env = "ADI_CAPABILITY_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    capability_timeout: Duration,
    /// On SIGTERM or Ctrl-C, how long the hub keeps serving the requests in flight
    /// (downloads, streams, capability calls) before it closes them; it accepts nothing
    /// new meanwhile and exits as soon as they are done. 0 stops at once.
    #[arg(long, env = "ADI_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// Bearer token (16 characters or more) that lets a scraper read /metrics from
    /// anywhere; without one, metrics are served on the hub's loopback only.
    #[arg(long, env = "ADI_METRICS_TOKEN", hide_env_values = true)]
    metrics_token: Option<String>,
    /// How long a client has to send a whole request head, from when it connects or
    /// its previous answer ends; a keep-alive connection idle this long is closed.
    #[arg(long, env = "ADI_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    header_timeout: Duration,
    /// How long a new WebSocket has to send its first frame (a device's registration,
    /// a client's sign-in).
    #[arg(long, env = "ADI_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,
    /// Connections held at once, device and client WebSockets included (at most the
    /// open-file limit allows). The last sixteenth take only health checks, sign-ins
    /// and device reconnects.
    #[arg(long, env = "ADI_MAX_CONNECTIONS", default_value_t = 16_384)]
    max_connections: usize,
    /// Connections one source address may hold at once; 0 for no cap (set it to 0 or
    /// high behind a reverse proxy, which every client's connection comes from).
    #[arg(long, env = "ADI_MAX_CONNECTIONS_PER_SOURCE", default_value_t = 512)]
    max_connections_per_source: usize,
    /// Join the other hubs that share this PostgreSQL catalog through this NATS server
    /// (nats://host:4222): devices and users may then use any of them.
    #[arg(long, env = "ADI_NATS")]
    nats: Option<String>,
    /// The URL other hubs and devices reach this hub at (default: --public-url, else
    /// http:// and the listen address).
    #[arg(long, env = "ADI_HUB_URL")]
    hub_url: Option<String>,
    /// A private CA (PEM) to trust, besides the public roots, for other hubs of the
    /// cluster served over TLS.
    #[arg(long, env = "ADI_HUB_CA_CERT")]
    hub_ca_cert: Option<PathBuf>,
}

async fn hubs(args: crate::client::ListArgs) -> Result<()> {
    let client = crate::client::HubClient::connect(&args.hub).await?;
    let list: adi_signaling::rest::hubs::HubList = client.get("/api/hubs").await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list.hubs)?);
        return Ok(());
    }
    let now = adi_signaling::auth::unix_now_i64();
    let rows: Vec<[String; 5]> = list
        .hubs
        .into_iter()
        .map(|h| {
            let state = match (h.this, h.draining) {
                (_, true) => "draining",
                (true, false) => "serving (this one)",
                (false, false) => "serving",
            };
            let up = h.started_at.map_or_else(
                || "-".into(),
                |t| {
                    humantime::format_duration(Duration::from_secs(
                        u64::try_from(now.saturating_sub(t)).unwrap_or(0),
                    ))
                    .to_string()
                },
            );
            [
                h.url,
                state.into(),
                h.devices.to_string(),
                h.in_flight.to_string(),
                up,
            ]
        })
        .collect();
    crate::table::print_table(["HUB", "STATE", "DEVICES", "IN FLIGHT", "UP"], &rows);
    Ok(())
}

pub async fn run(cmd: SignalingCmd) -> Result<()> {
    match cmd {
        SignalingCmd::Serve(args) => serve(*args).await,
        SignalingCmd::User(cmd) => crate::cmd::users::run(cmd).await,
        SignalingCmd::Hubs(args) => hubs(args).await,
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let max_connections = within_open_file_limit(args.max_connections);
    let config = HubConfig {
        listen: args.listen,
        data_dir: args.catalog.data_dir(),
        database_url: args.catalog.database_url.clone(),
        key_file: args.key_file,
        heartbeat_interval: args.heartbeat_interval,
        max_frame_bytes: args.max_frame_bytes,
        jwt_ttl: args.jwt_ttl,
        public_url: args.public_url,
        proxy_timeout: args.proxy_timeout,
        proxy_max_body_bytes: args.proxy_max_body_bytes,
        capability_timeout: args.capability_timeout,
        shutdown_grace: args.shutdown_grace,
        metrics_token: args.metrics_token,
        header_timeout: args.header_timeout,
        handshake_timeout: args.handshake_timeout,
        max_connections,
        max_connections_per_source: args.max_connections_per_source.min(max_connections),
        audit_retention: args.audit_retention,
        tls: match (args.tls_cert, args.tls_key) {
            (Some(cert), Some(key)) => Some(adi_signaling::config::TlsFiles { cert, key }),
            _ => None,
        },
        nats_url: args.nats,
        hub_url: args.hub_url,
        hub_ca_cert: args.hub_ca_cert,
        ..HubConfig::default()
    };
    let hub = adi_signaling::spawn(config)
        .await
        .context("starting the hub")?;
    eprintln!("adi hub listening on {}", hub.url());
    let stop = hub.shutdown_token();
    let mut running = std::pin::pin!(hub.wait());
    tokio::select! {
        r = &mut running => return r.context("hub server"),
        () = crate::signals::shutdown() => {}
    }
    eprintln!(
        "adi hub stopping: finishing the requests in flight (at most {}); \
         signal again to stop now",
        humantime::format_duration(args.shutdown_grace)
    );
    stop.cancel();
    tokio::select! {
        r = &mut running => r.context("hub server"),
        () = crate::signals::shutdown() => {
            tracing::warn!("stopping now: requests still in flight are cut off");
            Ok(())
        }
    }
}

/// Descriptors the hub needs besides its connections (catalog, logs, the runtime).
const SPARE_FILES: usize = 256;

/// The connection cap, lowered to what the open-file limit lets the hub hold: past it,
/// accepting fails anyway, and a cap the hub cannot reach would keep no reserve.
fn within_open_file_limit(wanted: usize) -> usize {
    let Ok((soft, _)) = rlimit::getrlimit(rlimit::Resource::NOFILE) else {
        return wanted;
    };
    let room = usize::try_from(soft)
        .unwrap_or(usize::MAX)
        .saturating_sub(SPARE_FILES);
    if wanted > room {
        tracing::warn!(
            wanted,
            open_file_limit = soft,
            "--max-connections lowered to {room} to fit the open-file limit; raise the \
             limit (ulimit -n, LimitNOFILE=) to hold more"
        );
        return room.max(64);
    }
    wanted
}
