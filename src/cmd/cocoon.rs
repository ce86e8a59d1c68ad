//! `adi cocoon ...`: run this device's agent, and manage devices through the hub.

use std::collections::BTreeSet;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde::Deserialize;

use adi_cocoon::{CocoonConfig, CocoonError, ConnState};
use adi_protocol::views::CocoonView;
use adi_protocol::ServiceInfo;

use crate::client::{normalize_hub, HubArgs, HubClient};
use crate::paths;

#[derive(Subcommand)]
pub enum CocoonCmd {
    /// Run this device's agent: connect to the hub and stay connected.
    Run(Box<RunArgs>),
    /// Print a one-time token: a setup token enrols a new device, a share token
    /// (--share DEVICE) makes whoever claims it a co-owner.
    GenerateToken(TokenArgs),
    /// Become a co-owner of a device with a share token someone gave you.
    Claim(ClaimArgs),
    /// List your devices.
    List(ListArgs),
    /// List a device's services.
    Services(ServicesArgs),
    /// List what this device would offer (built-ins and plugin manifests), and where
    /// each capability comes from. Exits 1 if a manifest is invalid.
    Capabilities(CapabilitiesArgs),
    /// Ask, as this device, for a capability served by the best device its owners may
    /// use; prints the answer (and, on stderr, the device that served it).
    Request(RequestArgs),
    /// Keep this device's agent running under systemd.
    #[command(subcommand)]
    Service(crate::cmd::service::ServiceCmd),
}

/// Where a cocoon's data dir and plugin settings are, for commands run beside it.
#[derive(Args)]
pub struct PluginArgs {
    /// Directory of plugin manifests (default: plugins/ in the data dir).
    #[arg(long, env = "ADI_COCOON_PLUGINS_DIR")]
    plugins_dir: Option<PathBuf>,
    /// Do not offer this capability (protocol name, e.g. llm.chat); repeatable.
    #[arg(
        long = "disable-capability",
        env = "ADI_COCOON_DISABLE_CAPABILITIES",
        value_delimiter = ','
    )]
    disable_capabilities: Vec<String>,
}

#[derive(Args)]
pub struct CapabilitiesArgs {
    /// The cocoon's data dir (default: XDG data dir).
    #[arg(long, env = "ADI_COCOON_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// TOML config file (default: cocoon.toml in the data dir, if present).
    #[arg(long, env = "ADI_COCOON_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    plugins: PluginArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct RequestArgs {
    /// PROTOCOL, PROTOCOL@VERSION or PROTOCOL:VERSION (least compatible version).
    capability: String,
    /// The request, as JSON; `-` reads it from stdin, `@FILE` from a file.
    #[arg(long, default_value = "null")]
    payload: String,
    /// Try this device first (a device id).
    #[arg(long, value_name = "DEVICE")]
    prefer: Option<String>,
    /// How long to wait for the answer.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// The asking cocoon's data dir (default: XDG data dir).
    #[arg(long, env = "ADI_COCOON_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Print `{from_device, payload}` instead of the payload alone.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct RunArgs {
    /// Threads for the agent's own networking. One keeps the device's other cores for
    /// its workloads and costs the least CPU per proxied request (no hand-offs between
    /// threads); one thread carries about a gigabyte a second of proxied bodies.
    #[arg(long, env = "ADI_COCOON_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: u16,
    /// Hub URL (or `hub` in the config file).
    #[arg(long, env = "ADI_HUB")]
    hub: Option<String>,
    /// TOML config file (default: cocoon.toml in the data dir, if present); flags and
    /// environment variables override it.
    #[arg(long, env = "ADI_COCOON_CONFIG")]
    config: Option<PathBuf>,
    /// One-time setup token; needed only the first time this data dir is used.
    #[arg(long, env = "ADI_COCOON_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Device name (default: host name).
    #[arg(long, env = "ADI_COCOON_NAME")]
    name: Option<String>,
    /// Where the device secret lives (default: XDG data dir).
    #[arg(long, env = "ADI_COCOON_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// A service on this device's loopback, NAME:PORT[/HEALTH_PATH]; repeatable.
    #[arg(long = "service", env = "COCOON_SERVICES", value_delimiter = ',', value_parser = parse_service)]
    services: Vec<ServiceInfo>,
    /// Longest delay between reconnect attempts.
    #[arg(long, env = "ADI_COCOON_BACKOFF_MAX", default_value = "10s", value_parser = humantime::parse_duration)]
    backoff_max: Duration,
    /// Task store: sqlite:PATH or postgres://... (default: tasks.db in the data dir).
    #[arg(long, env = "COCOON_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Refuse tasks that run a command on this device.
    #[arg(long, env = "ADI_COCOON_NO_EXEC")]
    no_exec: bool,
    /// Task commands running at once; more wait as pending (default 4).
    #[arg(long, env = "ADI_COCOON_MAX_CONCURRENT_TASKS")]
    max_concurrent_tasks: Option<usize>,
    /// How often services are probed for health.
    #[arg(long, env = "ADI_COCOON_HEALTH_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    health_interval: Duration,
    /// On SIGTERM or Ctrl-C, how long the cocoon keeps serving the proxied and
    /// capability requests in flight (the hub sends it nothing new meanwhile) before it
    /// disconnects; 0 disconnects at once. Running tasks are stopped either way.
    #[arg(long, env = "ADI_COCOON_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    #[command(flatten)]
    plugins: PluginArgs,
    /// Loopback address of the local API for programs on this device, or `off`
    /// (default 127.0.0.1:0, a free port; address and token go to local-api.json in the
    /// data dir).
    #[arg(long, env = "ADI_COCOON_LOCAL_API")]
    local_api: Option<String>,
    /// Where this device is, in your words (shown to its owners).
    #[arg(long, env = "ADI_COCOON_LOCATION")]
    location: Option<String>,
}

impl RunArgs {
    /// The data dir given, if any.
    pub(crate) fn data_dir(&self) -> Option<&std::path::Path> {
        self.data_dir.as_deref()
    }

    /// The config file given, if any.
    pub(crate) fn config_path(&self) -> Option<&std::path::Path> {
        self.config.as_deref()
    }

    /// The hub given, if any (the config file may name one too).
    pub(crate) fn hub(&self) -> Option<&str> {
        self.hub.as_deref()
    }

    /// The setup token given, if any.
    pub(crate) fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// How long a stopping agent finishes its requests in flight.
    pub(crate) fn shutdown_grace(&self) -> Duration {
        self.shutdown_grace
    }
}

#[derive(Args)]
pub struct TokenArgs {
    /// Make a share token for this device (id or name) instead of a setup token.
    #[arg(long, value_name = "DEVICE")]
    share: Option<String>,
    /// How long the token stays valid (e.g. 10m, 1h, 7d).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    expires: Duration,
    /// Print the hub's full answer as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    hub: HubArgs,
}

#[derive(Args)]
pub struct ClaimArgs {
    /// The share token.
    token: String,
    #[command(flatten)]
    hub: HubArgs,
}

#[derive(Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    hub: HubArgs,
}

#[derive(Args)]
pub struct ServicesArgs {
    /// Device id or name.
    device: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    hub: HubArgs,
}

pub async fn run(cmd: CocoonCmd) -> Result<()> {
    match cmd {
        CocoonCmd::Run(a) => run_agent(*a).await,
        CocoonCmd::GenerateToken(a) => generate_token(a).await,
        CocoonCmd::Claim(a) => claim(a).await,
        CocoonCmd::List(a) => list(a).await,
        CocoonCmd::Services(a) => services(a).await,
        CocoonCmd::Capabilities(a) => capabilities(a),
        CocoonCmd::Request(a) => request(a).await,
        CocoonCmd::Service(c) => crate::cmd::service::run(c),
    }
}

/// Parses `--local-api`: a loopback `IP:PORT`, or `off`.
fn parse_local_api(s: &str) -> Result<Option<SocketAddr>> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let addr: SocketAddr = s
        .parse()
        .with_context(|| format!("--local-api {s:?} is not IP:PORT or off"))?;
    if !addr.ip().is_loopback() {
        bail!("--local-api {addr} is not a loopback address; use 127.0.0.1:PORT or [::1]:PORT");
    }
    Ok(Some(addr))
}

/// Checks protocol names given to --disable-capability.
fn disabled_set(names: &[String]) -> Result<BTreeSet<String>> {
    names
        .iter()
        .map(|n| n.trim())
        .filter(|n| !n.is_empty())
        .map(|n| {
            adi_protocol::capability::validate_protocol(n)
                .map(str::to_owned)
                .map_err(|e| anyhow::anyhow!("--disable-capability: {e}"))
        })
        .collect()
}

/// Parses `NAME:PORT[/HEALTH_PATH]`.
pub fn parse_service(s: &str) -> Result<ServiceInfo, String> {
    let (name, rest) = s
        .trim()
        .split_once(':')
        .ok_or_else(|| format!("service {s:?} is not NAME:PORT"))?;
    let (port, health) = match rest.split_once('/') {
        Some((p, h)) => (p, Some(format!("/{h}"))),
        None => (rest, None),
    };
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(format!(
            "service name {name:?} must be 1-64 of [A-Za-z0-9._-]"
        ));
    }
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("service port {port:?} is not 1-65535"))?;
    Ok(ServiceInfo {
        name: name.to_owned(),
        port,
        health_path: health,
    })
}

/// The cocoon's data dir (given or the XDG default) and its config file: the one given,
/// else `cocoon.toml` in the data dir if there is one.
pub(crate) fn data_dir_and_file(
    data_dir: Option<PathBuf>,
    config: Option<&std::path::Path>,
) -> Result<(PathBuf, adi_cocoon::config_file::CocoonFile)> {
    let data_dir = data_dir.unwrap_or_else(|| paths::data_dir("cocoon"));
    let file = match config {
        Some(path) => adi_cocoon::config_file::load(path, true)?,
        None => adi_cocoon::config_file::load(
            &data_dir.join(adi_cocoon::config_file::DEFAULT_FILE),
            false,
        )?,
    }
    .unwrap_or_default();
    Ok((data_dir, file))
}

async fn run_agent(mut args: RunArgs) -> Result<()> {
    let (data_dir, file) = data_dir_and_file(args.data_dir.clone(), args.config.as_deref())?;
    let hub = args.hub.clone().or(file.hub).ok_or_else(|| {
        anyhow::anyhow!(
            "no hub given: pass --hub, set ADI_HUB, or put hub = \"...\" in the config file"
        )
    })?;
    let hub = normalize_hub(&hub)?;
    args.services
        .extend(file.services.into_iter().map(ServiceInfo::from));
    let mut names: Vec<&str> = args.services.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        bail!("service {:?} is given twice", w[0]);
    }
    let mut config = CocoonConfig::new(
        hub.clone(),
        data_dir,
        args.name.or(file.name).unwrap_or_else(paths::hostname),
    );
    config.setup_token = args.token;
    config.services = args.services;
    config.backoff_max = args.backoff_max;
    config.task_database_url = args.database_url.or(file.database_url);
    config.exec_allowed = !(args.no_exec || file.no_exec);
    config.max_concurrent_tasks = args
        .max_concurrent_tasks
        .or(file.max_concurrent_tasks)
        .unwrap_or(4);
    config.health_interval = args.health_interval;
    config.shutdown_grace = args.shutdown_grace;
    config.plugins_dir = args.plugins.plugins_dir.or(file.plugins_dir);
    let mut disabled = args.plugins.disable_capabilities;
    disabled.extend(file.disable_capabilities);
    config.disabled_capabilities = disabled_set(&disabled)?;
    if let Some(api) = args.local_api.or(file.local_api) {
        config.local_api = parse_local_api(&api)?;
    }
    config.location = args.location.or(file.location);
    let handle = adi_cocoon::start(config)
        .await
        .context("starting the cocoon")?;
    let mut state = handle.state();
    let watcher = tokio::spawn(async move {
        while state.changed().await.is_ok() {
            let now = state.borrow_and_update().clone();
            if let ConnState::Online { device_id } = now {
                eprintln!("cocoon online as device {device_id} at {hub}");
            }
        }
    });
    let stopper = {
        let signal = crate::cmd::signaling::shutdown_signal();
        tokio::spawn(signal)
    };
    let result = tokio::select! {
        _ = stopper => {
            eprintln!(
                "cocoon stopping: finishing the requests in flight (at most {}); signal again to stop now",
                humantime::format_duration(args.shutdown_grace)
            );
            handle.stop();
            tokio::select! {
                r = handle.join() => r,
                () = crate::cmd::signaling::shutdown_signal() => {
                    tracing::warn!("stopping now: requests in flight are cut off; tasks left running are cleaned up at the next start");
                    Ok(())
                }
            }
        }
        r = wait_end(&handle) => {
            r?;
            handle.join().await
        }
    };
    watcher.abort();
    match result {
        Ok(()) => Ok(()),
        Err(CocoonError::Refused { code, message }) => {
            Err(FinalRefusal(format!("the hub refused this device ({code}): {message}")).into())
        }
        Err(e @ CocoonError::NotAHub { .. }) => Err(FinalRefusal(e.to_string()).into()),
        Err(e) => Err(e.into()),
    }
}

/// The hub refused this device for good (a bad token, a second agent with its secret):
/// starting it again as it is cannot help, so `adi` exits with
/// [`FinalRefusal::EXIT_STATUS`], which the systemd unit does not restart.
#[derive(Debug)]
pub struct FinalRefusal(String);

impl FinalRefusal {
    /// `EX_CONFIG` from sysexits.h: the configuration must change first.
    pub const EXIT_STATUS: u8 = 78;
}

impl std::fmt::Display for FinalRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FinalRefusal {}

/// Resolves when the cocoon ends by itself (a final refusal).
async fn wait_end(handle: &adi_cocoon::CocoonHandle) -> Result<()> {
    let mut state = handle.state();
    loop {
        if matches!(
            *state.borrow_and_update(),
            ConnState::Failed { .. } | ConnState::NotAHub { .. } | ConnState::Stopped
        ) {
            return Ok(());
        }
        if state.changed().await.is_err() {
            return Ok(());
        }
    }
}

#[derive(Deserialize, serde::Serialize)]
struct TokenAnswer {
    token: String,
    kind: String,
    expires_at: i64,
    #[serde(default)]
    device_id: Option<String>,
}

async fn generate_token(args: TokenArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let body = match &args.share {
        Some(device) => serde_json::json!({
            "kind": "share",
            "device_id": crate::cmd::tasks::resolve_device(&client, device).await?,
            "expires_in_secs": args.expires.as_secs()
        }),
        None => serde_json::json!({ "kind": "setup", "expires_in_secs": args.expires.as_secs() }),
    };
    let answer: TokenAnswer = client.post("/api/tokens", &body).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    println!("{}", answer.token);
    let expires = humantime::format_duration(args.expires);
    if args.share.is_some() {
        eprintln!(
            "one-time share token, valid {expires}; the recipient runs: adi cocoon claim TOKEN"
        );
    } else {
        eprintln!(
            "one-time setup token, valid {expires}; on the new device run:\n  curl -fsSL {hub}/install.sh | sh -s -- TOKEN\nor: adi cocoon run --hub {hub} --token TOKEN --name NAME",
            hub = client.base
        );
    }
    Ok(())
}

async fn claim(args: ClaimArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let device: CocoonView = client
        .post(
            "/api/tokens/claim",
            &serde_json::json!({ "token": args.token.trim() }),
        )
        .await?;
    println!("you now co-own {} ({})", device.name, device.id);
    Ok(())
}

#[derive(Deserialize)]
struct CocoonList {
    cocoons: Vec<CocoonView>,
}

async fn list(args: ListArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let list: CocoonList = client.get("/api/cocoons").await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list.cocoons)?);
        return Ok(());
    }
    if list.cocoons.is_empty() {
        println!("no devices yet: `adi cocoon generate-token` makes a setup token for one");
        return Ok(());
    }
    let rows: Vec<[String; 8]> = list
        .cocoons
        .iter()
        .map(|c| {
            [
                c.id.to_string(),
                c.name.clone(),
                c.status.clone(),
                c.last_heartbeat_age_secs
                    .map(|a| format!("{a:.1}s ago"))
                    .unwrap_or_else(|| "-".into()),
                c.load
                    .as_ref()
                    .map(|l| {
                        format!(
                            "{}cpu {:.0}% {}/{}GiB",
                            l.cpu_count,
                            l.cpu_percent,
                            gib(l.ram_used_bytes),
                            gib(l.ram_total_bytes)
                        )
                    })
                    .unwrap_or_else(|| "-".into()),
                c.load
                    .as_ref()
                    .map(|l| {
                        if l.gpus.is_empty() {
                            "none".to_owned()
                        } else {
                            l.gpus
                                .iter()
                                .map(|g| {
                                    format!(
                                        "{} {}/{}GiB {}%",
                                        g.name,
                                        gib(g.memory_used_bytes),
                                        gib(g.memory_total_bytes),
                                        g.utilization_percent
                                    )
                                })
                                .collect::<Vec<_>>()
                                .join("; ")
                        }
                    })
                    .unwrap_or_else(|| "-".into()),
                join_or_dash(c.services.iter().map(|s| format!("{}:{}", s.name, s.port))),
                join_or_dash(c.capabilities.iter().map(ToString::to_string)),
            ]
        })
        .collect();
    print_table(
        [
            "ID",
            "NAME",
            "STATUS",
            "HEARTBEAT",
            "CPU/RAM",
            "GPUS",
            "SERVICES",
            "CAPABILITIES",
        ],
        &rows,
    );
    for c in list.cocoons.iter() {
        if let Some(conflict) = &c.conflict {
            println!(
                "warning: {} ({}) was connected from two places at once: the agent from {} \
                 was stopped when one from {} connected with the same device secret",
                c.name,
                c.id,
                conflict
                    .displaced_from
                    .as_deref()
                    .unwrap_or("an unknown address"),
                conflict
                    .connected_from
                    .as_deref()
                    .unwrap_or("an unknown address"),
            );
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct ServiceList {
    services: Vec<adi_protocol::views::ServiceView>,
}

async fn services(args: ServicesArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let device = crate::cmd::tasks::resolve_device(&client, &args.device).await?;
    let list: ServiceList = client
        .get(&format!("/api/cocoons/{device}/services"))
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list.services)?);
        return Ok(());
    }
    let rows: Vec<[String; 4]> = list
        .services
        .iter()
        .map(|s| {
            let health = serde_json::to_value(s.health)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            [
                s.name.clone(),
                s.port.to_string(),
                match &s.health_detail {
                    Some(d) => format!("{health} ({d})"),
                    None => health,
                },
                s.health_path.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print_table(["NAME", "PORT", "HEALTH", "HEALTH PATH"], &rows);
    Ok(())
}

fn capabilities(args: CapabilitiesArgs) -> Result<()> {
    let (data_dir, file) = data_dir_and_file(args.data_dir.clone(), args.config.as_deref())?;
    let mut disabled = args.plugins.disable_capabilities;
    disabled.extend(file.disable_capabilities);
    let mut config = CocoonConfig::new("http://unused", data_dir, "unused");
    config.plugins_dir = args.plugins.plugins_dir.or(file.plugins_dir);
    config.disabled_capabilities = disabled_set(&disabled)?;
    let set = adi_cocoon::plugins::load(&config.plugin_config());
    for e in &set.errors {
        eprintln!("skipped: {e}");
    }
    if args.json {
        let rows: Vec<serde_json::Value> = set
            .served
            .iter()
            .map(|s| {
                serde_json::json!({
                    "protocol": s.offer.protocol,
                    "version": s.offer.version.to_string(),
                    "idempotent": s.offer.idempotent,
                    "source": s.source,
                    "plugin": s.plugin,
                    "serves": serves_text(&s.serve),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"capabilities": rows, "errors": set.errors})
            )?
        );
    } else {
        let rows: Vec<[String; 5]> = set
            .served
            .iter()
            .map(|s| {
                [
                    s.offer.protocol.clone(),
                    s.offer.version.to_string(),
                    if s.offer.idempotent { "yes" } else { "no" }.into(),
                    match &s.plugin {
                        Some(name) => format!("{} ({name})", s.source),
                        None => s.source.clone(),
                    },
                    serves_text(&s.serve),
                ]
            })
            .collect();
        print_table(
            ["PROTOCOL", "VERSION", "IDEMPOTENT", "SOURCE", "SERVES"],
            &rows,
        );
    }
    if !set.errors.is_empty() {
        bail!(
            "{} manifest problem(s); the cocoon skips those and offers the rest",
            set.errors.len()
        );
    }
    Ok(())
}

fn serves_text(serve: &adi_cocoon::plugins::Serve) -> String {
    match serve {
        adi_cocoon::plugins::Serve::Builtin => "the cocoon itself".into(),
        adi_cocoon::plugins::Serve::Http(url) => format!("POST {url}"),
        adi_cocoon::plugins::Serve::Command { argv, .. } => argv.join(" "),
    }
}

#[derive(Deserialize)]
struct LocalError {
    error: LocalErrorDetail,
}

#[derive(Deserialize)]
struct LocalErrorDetail {
    code: String,
    message: String,
}

async fn request(args: RequestArgs) -> Result<()> {
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| paths::data_dir("cocoon"));
    let info = adi_cocoon::local_api::read_info(&data_dir).with_context(|| {
        format!(
            "no running cocoon's local API found in {} (is `adi cocoon run` running with this data dir, and its local API on?)",
            data_dir.display()
        )
    })?;
    let (protocol, version) = match args.capability.split_once(['@', ':']) {
        Some((p, v)) => (p.trim().to_owned(), Some(v.trim().to_owned())),
        None => (args.capability.trim().to_owned(), None),
    };
    adi_protocol::CapabilityQuery::new(&protocol, version.as_deref())?;
    let raw = if args.payload == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the payload from stdin")?;
        s
    } else if let Some(path) = args.payload.strip_prefix('@') {
        std::fs::read_to_string(path).with_context(|| format!("reading the payload from {path}"))?
    } else {
        args.payload.clone()
    };
    let payload = adi_protocol::Payload::from_json(raw).context("--payload is not valid JSON")?;
    let body = adi_protocol::capability::RequestBody {
        version,
        payload,
        prefer_device: args.prefer,
        timeout_ms: u64::try_from(args.timeout.as_millis()).ok(),
    };
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()?
        .post(format!("{}/v1/capabilities/{protocol}/request", info.url))
        .bearer_auth(&info.token)
        .json(&body)
        .timeout(args.timeout + Duration::from_secs(5))
        .send()
        .await
        .with_context(|| format!("cannot reach the cocoon's local API at {}", info.url))?;
    let status = resp.status();
    let bytes = resp.bytes().await?;
    if !status.is_success() {
        match serde_json::from_slice::<LocalError>(&bytes) {
            Ok(e) => bail!("{} ({})", e.error.message, e.error.code),
            Err(_) => bail!("the local API answered HTTP {status}"),
        }
    }
    let answer: adi_protocol::CapabilityAnswer = serde_json::from_slice(&bytes)
        .context("the local API's answer is not what this adi expects")?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::to_value(&answer)?)?
        );
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(&answer.payload.to_value())?
        );
        eprintln!("served by device {}", answer.from_device);
    }
    Ok(())
}

fn gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 30) as f64)
}

fn join_or_dash(items: impl Iterator<Item = String>) -> String {
    let joined: Vec<String> = items.collect();
    if joined.is_empty() {
        "-".into()
    } else {
        joined.join(",")
    }
}

/// Prints rows under a header, each column as wide as its widest cell.
pub(crate) fn print_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_parse_with_and_without_health() {
        let s = parse_service("grafana:3000").expect("ok");
        assert_eq!(
            (s.name.as_str(), s.port, s.health_path),
            ("grafana", 3000, None)
        );
        let s = parse_service("api:8092/healthz").expect("ok");
        assert_eq!(s.health_path.as_deref(), Some("/healthz"));
        assert!(parse_service("nope").is_err());
        assert!(parse_service("x:0").is_err());
        assert!(parse_service("x:70000").is_err());
        assert!(parse_service("../etc:80").is_err());
    }
}
