//! `adi cocoon run`: the device agent's flags, checked the same way wherever they come
//! from (flags, environment, `cocoon.toml`, a systemd unit's arguments), and running it
//! until it stops or is refused for good.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use adi_cocoon::{CocoonConfig, CocoonError, ConnState};
use adi_protocol::ServiceInfo;

use crate::client::normalize_hub;
use crate::paths;

#[derive(Args)]
pub struct PluginArgs {
    /// Directory of plugin manifests (default: plugins/ in the data dir).
    #[arg(long, env = "ADI_COCOON_PLUGINS_DIR")]
    pub(crate) plugins_dir: Option<PathBuf>,
    /// Do not offer this capability (protocol name, e.g. llm.chat); repeatable.
    #[arg(
        long = "disable-capability",
        env = "ADI_COCOON_DISABLE_CAPABILITIES",
        value_delimiter = ','
    )]
    pub(crate) disable_capabilities: Vec<String>,
}

#[derive(Args)]
pub struct RunArgs {
    /// Threads for the agent's own networking. One keeps the device's other cores for
    /// its workloads and costs the least CPU per proxied request (no hand-offs between
    /// threads); one thread carries about a gigabyte a second of proxied bodies.
    #[arg(long, env = "ADI_COCOON_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: u16,
    /// Hub URL (or `hub` in the config file). Repeat it, or separate URLs with commas,
    /// for several hubs of one cluster: the first is the primary, the others are tried
    /// in turn when the device's hub is lost or cannot be reached.
    #[arg(long, env = "ADI_HUB", value_delimiter = ',')]
    hub: Vec<String>,
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
    /// An OpenAI-compatible server (llama.cpp, vLLM, Ollama, ...) on this device's
    /// loopback, NAME:PORT; repeatable. A service like --service's, whose models (as its
    /// /v1/models lists them) the hub's OpenAI-compatible endpoint offers.
    #[arg(long = "openai", env = "COCOON_OPENAI", value_delimiter = ',', value_parser = parse_openai)]
    openai: Vec<ServiceInfo>,
    /// A raw TCP service (SSH, a database) on this device's loopback, NAME:PORT;
    /// repeatable. Reached with `adi connect` or `adi proxy`, never as HTTP.
    #[arg(long = "tcp", env = "COCOON_TCP", value_delimiter = ',', value_parser = parse_tcp)]
    tcp: Vec<ServiceInfo>,
    /// How often OpenAI-compatible servers are asked for their models.
    #[arg(long, env = "ADI_OPENAI_REFRESH", default_value = "30s", value_parser = humantime::parse_duration)]
    openai_refresh: Duration,
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
    /// A private CA (PEM) to trust besides the public roots, for a hub served over TLS
    /// with a certificate of its own CA.
    #[arg(long, env = "ADI_CA_CERT")]
    ca_cert: Option<PathBuf>,
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

    /// The primary hub given, if any (the config file may name one too).
    pub(crate) fn hub(&self) -> Option<&str> {
        self.hub.first().map(String::as_str)
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
pub(crate) fn disabled_set(names: &[String]) -> Result<BTreeSet<String>> {
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

/// Every service the flags and the config file give, the flags' first, OpenAI-compatible
/// servers after plain ones, raw TCP services last; no name twice, whatever the kinds.
pub(crate) fn declared_services(
    mut services: Vec<ServiceInfo>,
    mut openai: Vec<ServiceInfo>,
    mut tcp: Vec<ServiceInfo>,
    file: &adi_cocoon::config_file::CocoonFile,
) -> Result<Vec<ServiceInfo>> {
    services.extend(file_services(&file.services)?);
    services.append(&mut openai);
    services.extend(file_openai(&file.openai)?);
    services.append(&mut tcp);
    services.extend(file_tcp(&file.tcp)?);
    adi_cocoon::services::unique(&services)?;
    Ok(services)
}

/// The config file's services, checked as the flags' are.
fn file_services(services: &[adi_cocoon::config_file::FileService]) -> Result<Vec<ServiceInfo>> {
    services
        .iter()
        .map(|s| {
            adi_cocoon::services::check(&s.name, s.port, s.health.as_deref())
                .context("in the config file's [[services]]")
        })
        .collect()
}

/// The config file's OpenAI-compatible servers, checked as the flags' are.
fn file_openai(servers: &[String]) -> Result<Vec<ServiceInfo>> {
    servers
        .iter()
        .map(|s| adi_cocoon::services::parse_openai(s).context("in the config file's openai list"))
        .collect()
}

/// The config file's raw TCP services, checked as the flags' are.
fn file_tcp(services: &[String]) -> Result<Vec<ServiceInfo>> {
    services
        .iter()
        .map(|s| adi_cocoon::services::parse_tcp(s).context("in the config file's tcp list"))
        .collect()
}

/// `NAME:PORT` of a raw TCP service, checked as every service declaration is.
pub fn parse_tcp(s: &str) -> Result<ServiceInfo, String> {
    adi_cocoon::services::parse_tcp(s).map_err(|e| e.to_string())
}

/// `NAME:PORT` of an OpenAI-compatible server, checked as every service declaration is.
pub fn parse_openai(s: &str) -> Result<ServiceInfo, String> {
    adi_cocoon::services::parse_openai(s).map_err(|e| e.to_string())
}

/// `NAME:PORT[/HEALTH]`, checked as every service declaration is.
pub fn parse_service(s: &str) -> Result<ServiceInfo, String> {
    adi_cocoon::services::parse(s).map_err(|e| e.to_string())
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

/// Runs the agent until a stop signal (then it drains) or a final refusal.
pub async fn run(mut args: RunArgs) -> Result<()> {
    let (data_dir, file) = data_dir_and_file(args.data_dir.clone(), args.config.as_deref())?;
    let given = if args.hub.is_empty() {
        file.hub_urls()
    } else {
        std::mem::take(&mut args.hub)
    };
    let mut hubs = given
        .iter()
        .map(|h| h.trim())
        .filter(|h| !h.is_empty())
        .map(normalize_hub)
        .collect::<Result<Vec<String>>>()?
        .into_iter();
    let hub = hubs.next().ok_or_else(|| {
        anyhow::anyhow!(
            "no hub given: pass --hub, set ADI_HUB, or put hub = \"...\" in the config file"
        )
    })?;
    let services = declared_services(
        std::mem::take(&mut args.services),
        std::mem::take(&mut args.openai),
        std::mem::take(&mut args.tcp),
        &file,
    )?;
    let mut config = CocoonConfig::new(
        hub,
        data_dir,
        args.name.or(file.name).unwrap_or_else(paths::hostname),
    );
    config.fallback_hubs = hubs.collect();
    config.setup_token = args.token;
    config.services = services;
    config.openai_refresh = args.openai_refresh;
    config.backoff_max = args.backoff_max;
    config.task_database_url = args.database_url.or(file.database_url);
    config.exec_allowed = !(args.no_exec || file.no_exec);
    config.max_concurrent_tasks = args
        .max_concurrent_tasks
        .or(file.max_concurrent_tasks)
        .unwrap_or(4);
    config.health_interval = args.health_interval;
    config.shutdown_grace = args.shutdown_grace;
    config.ca_cert = args.ca_cert.or(file.ca_cert);
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
            if let ConnState::Online { device_id, hub } = now {
                eprintln!("cocoon online as device {device_id} at {hub}");
            }
        }
    });
    let stopper = {
        let signal = crate::signals::shutdown();
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
                () = crate::signals::shutdown() => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn declared(args: &[&str], file: &str) -> Result<Vec<ServiceInfo>> {
        let cli = Cli::try_parse_from(std::iter::once("adi").chain(args.iter().copied()))?;
        let file = adi_cocoon::config_file::parse(file).map_err(anyhow::Error::msg)?;
        declared_services(cli.run.services, cli.run.openai, cli.run.tcp, &file)
    }

    #[test]
    fn openai_servers_come_from_flags_and_the_file_and_share_the_service_names() -> Result<()> {
        let all = declared(
            &[
                "--service",
                "web:80",
                "--openai",
                "llm:8080",
                "--openai",
                "emb:8081",
            ],
            "openai = [\"file-llm:9000\"]\n",
        )?;
        let shown: Vec<(&str, u16, adi_protocol::ServiceKind)> = all
            .iter()
            .map(|s| (s.name.as_str(), s.port, s.kind))
            .collect();
        use adi_protocol::ServiceKind::{Http, OpenAi};
        assert_eq!(
            shown,
            [
                ("web", 80, Http),
                ("llm", 8080, OpenAi),
                ("emb", 8081, OpenAi),
                ("file-llm", 9000, OpenAi)
            ]
        );
        let clash = declared(&["--service", "llm:80", "--openai", "llm:8080"], "")
            .expect_err("one name twice");
        assert!(
            clash.to_string().contains("\"llm\" is given twice"),
            "{clash}"
        );
        let clash = declared(&["--openai", "llm:8080"], "openai = [\"llm:1\"]\n")
            .expect_err("one name twice");
        assert!(clash.to_string().contains("twice"), "{clash}");
        let bad = declared(&[], "openai = [\"llm\"]\n").expect_err("not NAME:PORT");
        assert!(format!("{bad:#}").contains("openai list"), "{bad:#}");
        assert!(declared(&["--openai", "llm:8080/health"], "").is_err());
        assert!(declared(&["--openai", "x y:1"], "").is_err());
        Ok(())
    }

    #[test]
    fn tcp_services_come_from_flags_and_the_file_and_share_the_service_names() -> Result<()> {
        let all = declared(
            &["--service", "web:80", "--tcp", "ssh:22", "--tcp", "pg:5432"],
            "tcp = [\"redis:6379\"]\n",
        )?;
        let shown: Vec<(&str, u16, adi_protocol::ServiceKind)> = all
            .iter()
            .map(|s| (s.name.as_str(), s.port, s.kind))
            .collect();
        use adi_protocol::ServiceKind::{Http, Tcp};
        assert_eq!(
            shown,
            [
                ("web", 80, Http),
                ("ssh", 22, Tcp),
                ("pg", 5432, Tcp),
                ("redis", 6379, Tcp)
            ]
        );
        let clash =
            declared(&["--service", "ssh:80", "--tcp", "ssh:22"], "").expect_err("one name twice");
        assert!(
            clash.to_string().contains("\"ssh\" is given twice"),
            "{clash}"
        );
        let bad = declared(&[], "tcp = [\"ssh\"]\n").expect_err("not NAME:PORT");
        assert!(format!("{bad:#}").contains("tcp list"), "{bad:#}");
        assert!(declared(&["--tcp", "ssh:22/health"], "").is_err());
        Ok(())
    }

    #[test]
    fn tcp_services_come_from_the_environment_comma_separated() -> Result<()> {
        // Parsed as clap parses COCOON_TCP: the same delimiter as the flag's.
        let cli = Cli::try_parse_from(["adi", "--tcp", "ssh:22,pg:5432"])?;
        let names: Vec<&str> = cli.run.tcp.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["ssh", "pg"]);
        Ok(())
    }

    #[test]
    fn the_openai_refresh_is_a_duration() -> Result<()> {
        let cli = Cli::try_parse_from(["adi", "--openai-refresh", "500ms"])?;
        assert_eq!(cli.run.openai_refresh, Duration::from_millis(500));
        let cli = Cli::try_parse_from(["adi"])?;
        assert_eq!(cli.run.openai_refresh, Duration::from_secs(30));
        Ok(())
    }
}
