//! Connection benchmark: memory and CPU per connected device, and restart recovery.
//!
//! One run connects N simulated cocoons (default 10,000), each heartbeating every
//! interval (default 5 s), in turn to three servers, each a separate process so its RSS
//! (`VmRSS` in `/proc/PID/status`) and CPU (`utime + stime` in `/proc/PID/stat`) are its
//! own:
//!
//! 1. a bare tokio-tungstenite echo server with tokio-tungstenite's defaults (128 KiB
//!    read buffer per connection);
//! 2. the same echo server with a 4 KiB read buffer, the size the hub uses
//!    (`HubConfig::ws_read_buffer_bytes`);
//! 3. the adi hub (`adi signaling serve`).
//!
//! Every simulated device speaks the real protocol from its own tokio task in this
//! process: `register` with its own random secret (and a setup token minted through
//! `POST /api/tokens` the first time), then a `heartbeat` text frame plus a WebSocket ping
//! every interval, starting at a random offset so traffic is spread like a real fleet.
//! The echo servers get exactly the same frames and send back what they receive.
//!
//! For each server the bench reports the RSS added per connected device,
//! `(RSS after the steady window - RSS before the first connection) / N`, and the
//! server's CPU share (% of one core) over the steady window (default: three heartbeat
//! intervals after every device is connected).
//!
//! Then it restarts the hub: SIGTERM (the hub closes every socket with "hub restarting"
//! and exits), and as soon as the old process has exited a new one is started on the
//! same port and data dir. The devices reconnect with the real cocoon's policy
//! (`CocoonConfig::backoff`, attempt counter reset after a registration, no setup token
//! after the first registration), and the bench reports how long it took until every
//! device was registered again, counted from the old hub's exit, from the new hub's
//! spawn and from the SIGTERM.
//!
//! For the hub, "before the first connection" is after the setup tokens are minted, and
//! the API check that every device is online comes after the RSS readings (listing all
//! devices allocates memory that is not connection memory).
//!
//! Run (release profile; about a minute for 10,000 devices once built, the first build
//! takes several minutes). Figures and their discussion are in `BENCHMARKS.md`:
//!
//! ```text
//! cargo bench --bench connections
//! cargo bench --bench connections -- --devices 1000 --interval 5s --settle 15s
//! ```
//!
//! Options: `--devices N`, `--interval DURATION`, `--settle DURATION`,
//! `--connect-concurrency N` (devices connecting at once, default 128: tokio listens with
//! a backlog of 128, so more would overflow the listen queue and cost SYN retransmits),
//! `--mint-concurrency N` (setup-token requests in flight, default 32). Unknown flags
//! (such as the `--bench` cargo adds) are ignored. Each process needs one file
//! descriptor per device; the bench raises its soft `RLIMIT_NOFILE` to the hard limit.
//!
//! This is a benchmark, not a test: it asserts nothing about the figures and always
//! stops by itself, killing the processes it started.

use std::fs::{self, OpenOptions};
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use adi_cocoon::CocoonConfig;
use adi_protocol::{
    decode, encode, DeviceSecret, DeviceToHub, ErrorCode, Heartbeat, HubToDevice, Register,
    ServiceInfo, DEFAULT_MAX_FRAME_BYTES, SUPPORTED_VERSIONS,
};
use anyhow::{anyhow, bail, ensure, Context, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use rand::{Rng, RngCore};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{interval_at, sleep, timeout, Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// The `adi` binary built by this package.
const ADI: &str = env!("CARGO_BIN_EXE_adi");
/// Read buffer of each cocoon socket in the hub (`HubConfig::ws_read_buffer_bytes`).
const HUB_READ_BUFFER: usize = 4096;
/// Read buffer of each simulated device's socket; this process is not measured.
const CLIENT_READ_BUFFER: usize = 4096;
/// How long a device waits to connect or for the answer to its registration (as the
/// real cocoon does).
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeat intervals without a frame from the server before a device gives up on
/// the connection (as the real cocoon does).
const SILENT_INTERVALS: u32 = 3;
/// How long the fleet may take to come back after the restart before the bench gives
/// up waiting.
const RESTART_TIMEOUT: Duration = Duration::from_secs(120);
/// Hidden flag that turns this executable into the echo server.
const ECHO_SERVER_FLAG: &str = "--echo-server";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(pos) = args.iter().position(|a| a == ECHO_SERVER_FLAG) {
        let port_file = args
            .get(pos + 1)
            .context("--echo-server needs a port file")?;
        let read_buffer = match args.get(pos + 2).map(String::as_str) {
            None | Some("default") => None,
            Some(n) => Some(n.parse().context("echo server read buffer size")?),
        };
        return echo_server::run(Path::new(port_file), read_buffer);
    }
    let opts = Options::parse(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(bench(opts))
}

/// Command-line options of the benchmark.
#[derive(Debug, Clone)]
struct Options {
    devices: usize,
    interval: Duration,
    settle: Duration,
    connect_concurrency: usize,
    mint_concurrency: usize,
}

impl Options {
    fn parse(args: &[String]) -> Result<Self> {
        let mut opts = Options {
            devices: 10_000,
            interval: Duration::from_secs(5),
            settle: Duration::ZERO,
            connect_concurrency: 128,
            mint_concurrency: 32,
        };
        let mut settle = None;
        let mut i = 0;
        while i < args.len() {
            let (flag, inline) = match args[i].split_once('=') {
                Some((f, v)) => (f, Some(v.to_owned())),
                None => (args[i].as_str(), None),
            };
            let known = matches!(
                flag,
                "--devices"
                    | "--interval"
                    | "--settle"
                    | "--connect-concurrency"
                    | "--mint-concurrency"
            );
            if !known {
                // `cargo bench` adds `--bench`; anything else we do not know is ignored too.
                i += 1;
                continue;
            }
            let value = match inline {
                Some(v) => v,
                None => {
                    i += 1;
                    args.get(i)
                        .cloned()
                        .with_context(|| format!("{flag} needs a value"))?
                }
            };
            let bad = || format!("bad value for {flag}: {value:?}");
            match flag {
                "--devices" => opts.devices = value.parse().with_context(bad)?,
                "--interval" => {
                    opts.interval = humantime::parse_duration(&value).with_context(bad)?
                }
                "--settle" => settle = Some(humantime::parse_duration(&value).with_context(bad)?),
                "--connect-concurrency" => {
                    opts.connect_concurrency = value.parse().with_context(bad)?
                }
                _ => opts.mint_concurrency = value.parse().with_context(bad)?,
            }
            i += 1;
        }
        ensure!(opts.devices > 0, "--devices must be at least 1");
        ensure!(
            opts.interval >= Duration::from_millis(100),
            "--interval must be at least 100ms (the hub refuses less)"
        );
        ensure!(
            opts.connect_concurrency > 0 && opts.mint_concurrency > 0,
            "concurrency must be at least 1"
        );
        opts.settle = settle.unwrap_or(opts.interval * 3);
        Ok(opts)
    }
}

/// What one server measured.
#[derive(Debug, Clone)]
struct Measurement {
    label: &'static str,
    baseline_kib: u64,
    connected_kib: u64,
    steady_kib: u64,
    connect_secs: f64,
    cpu_percent: f64,
    client_cpu_percent: f64,
    devices: usize,
}

impl Measurement {
    fn per_device_kib(&self) -> f64 {
        self.steady_kib.saturating_sub(self.baseline_kib) as f64 / self.devices as f64
    }
}

/// What the restart measured.
#[derive(Debug, Clone)]
struct Restart {
    exit_after_sigterm: Duration,
    back: usize,
    since_exit: Option<Duration>,
    since_spawn: Option<Duration>,
    first_back: Option<Duration>,
    listen_overflows: Option<u64>,
    hub_online: Option<usize>,
    rss_after_kib: Option<u64>,
}

async fn bench(opts: Options) -> Result<()> {
    let limit = rlimit::increase_nofile_limit(u64::MAX).context("raising RLIMIT_NOFILE")?;
    let needed = opts.devices as u64 + 256;
    ensure!(
        limit >= needed,
        "{} devices need about {needed} open files per process but the limit is {limit}; \
         lower --devices or raise the hard limit (ulimit -Hn)",
        opts.devices
    );
    let clk_tck = clock_ticks_per_second();
    let tmp = tempfile::Builder::new()
        .prefix("adi-bench-connections-")
        .tempdir()
        .context("creating a temp dir")?;
    eprintln!(
        "connections bench: {} devices, heartbeat every {}, steady window {}, {} CPUs, \
         RLIMIT_NOFILE {limit}, scratch dir {}",
        opts.devices,
        humantime::format_duration(opts.interval),
        humantime::format_duration(opts.settle),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        tmp.path().display()
    );

    let mut results = Vec::new();
    for (label, read_buffer) in [
        ("echo (tungstenite defaults)", None),
        ("echo (4 KiB read buffer)", Some(HUB_READ_BUFFER)),
    ] {
        eprintln!("\n== {label} ==");
        let m = measure_echo(&opts, tmp.path(), label, read_buffer, clk_tck).await?;
        report_line(&m);
        results.push(m);
    }

    eprintln!("\n== adi hub ==");
    let (hub, restart) = measure_hub(&opts, tmp.path(), clk_tck, false).await?;
    results.push(hub);
    eprintln!("\n== adi hub, devices with services ==");
    let (with_services, _) = measure_hub(&opts, tmp.path(), clk_tck, true).await?;
    results.push(with_services);
    let restart = restart.context("the hub run without services measures the restart")?;

    print_report(&opts, &results, &restart);
    Ok(())
}

fn report_line(m: &Measurement) {
    eprintln!(
        "{}: baseline {} MiB, connected {} MiB, steady {} MiB, {:.1} KiB/device, CPU {:.1} %",
        m.label,
        mib(m.baseline_kib),
        mib(m.connected_kib),
        mib(m.steady_kib),
        m.per_device_kib(),
        m.cpu_percent
    );
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn print_report(opts: &Options, results: &[Measurement], restart: &Restart) {
    let n = opts.devices;
    println!();
    println!(
        "devices: {n}, heartbeat {}, steady window {}",
        humantime::format_duration(opts.interval),
        humantime::format_duration(opts.settle)
    );
    println!(
        "{:<29} {:>11} {:>8} {:>11} {:>11} {:>10} {:>10} {:>11}",
        "server",
        "RSS/device",
        "CPU %",
        "total RSS",
        "baseline",
        "connected",
        "connect",
        "client CPU"
    );
    for m in results {
        println!(
            "{:<29} {:>7.1} KiB {:>8.1} {:>7} MiB {:>7} MiB {:>6} MiB {:>8.1} s {:>9.1} %",
            m.label,
            m.per_device_kib(),
            m.cpu_percent,
            mib(m.steady_kib),
            mib(m.baseline_kib),
            mib(m.connected_kib),
            m.connect_secs,
            m.client_cpu_percent
        );
    }
    if let [defaults, small, hub, with_services] = results {
        let ratio = |echo: &Measurement| {
            let e = echo.per_device_kib();
            if e > 0.0 {
                format!("{:.2}", hub.per_device_kib() / e)
            } else {
                "n/a".to_owned()
            }
        };
        println!(
            "hub / echo(defaults) = {}   hub / echo(4 KiB) = {}   (target <= 1.25)",
            ratio(defaults),
            ratio(small)
        );
        let e = defaults.per_device_kib();
        println!(
            "hub with services / echo(defaults) = {}   (their sockets read into 64 KiB)",
            if e > 0.0 {
                format!("{:.2}", with_services.per_device_kib() / e)
            } else {
                "n/a".to_owned()
            }
        );
    }
    println!("(CPU % is of one core over the steady window; client CPU is this bench process, which simulates the devices)");
    match (restart.since_exit, restart.since_spawn) {
        (Some(exit), Some(spawn)) => println!(
            "restart (SIGTERM): all {n} devices online again {:.2} s after the old hub exited \
             (target <= 6 s), {:.2} s after the new hub was spawned, {:.2} s after SIGTERM \
             (the old hub took {} ms to exit)",
            exit.as_secs_f64(),
            spawn.as_secs_f64(),
            (exit + restart.exit_after_sigterm).as_secs_f64(),
            restart.exit_after_sigterm.as_millis()
        ),
        _ => println!(
            "restart (SIGTERM): only {}/{n} devices came back within {} s of the old hub's exit",
            restart.back,
            RESTART_TIMEOUT.as_secs()
        ),
    }
    if let Some(first) = restart.first_back {
        println!(
            "restart: first device back {:.2} s after the old hub exited",
            first.as_secs_f64()
        );
    }
    if let Some(n) = restart.listen_overflows {
        println!(
            "restart: {n} connection attempts dropped by a full listen queue (the device's kernel retries such a SYN after 1 s)"
        );
    }
    match restart.hub_online {
        Some(online) => {
            println!("after the restart the hub API reports {online}/{n} devices online")
        }
        None => println!("after the restart the hub API could not be read"),
    }
    if let Some(kib) = restart.rss_after_kib {
        println!("restarted hub RSS with all devices back: {} MiB", mib(kib));
    }
}

// ---------------------------------------------------------------------------------------
// Servers as child processes.

/// A child process that is killed when this guard goes away, whatever the reason.
struct ServerProcess {
    label: &'static str,
    child: Child,
    log: Option<PathBuf>,
}

impl ServerProcess {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited (and is reaped).
    fn exited(&mut self) -> Result<bool> {
        Ok(self
            .child
            .try_wait()
            .with_context(|| format!("waiting for {}", self.label))?
            .is_some())
    }

    /// Sends SIGTERM, asking for a graceful shutdown.
    fn terminate(&self) -> Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .context("running kill -TERM")?;
        ensure!(status.success(), "kill -TERM {} failed", self.pid());
        Ok(())
    }

    /// The last lines of the process's log, for error messages.
    fn log_tail(&self) -> String {
        let Some(path) = &self.log else {
            return String::new();
        };
        let text = fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        format!("\nlast lines of {}:\n{tail}", path.display())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Resident set size of a process in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// CPU time (user + system, all threads) of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may contain spaces; the fields after it are numbers.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))?;
    // After ")": state(3) ppid(4) ... utime(14) stime(15).
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields
        .get(11)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no utime in /proc/{pid}/stat"))?;
    let stime: u64 = fields
        .get(12)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no stime in /proc/{pid}/stat"))?;
    Ok(utime + stime)
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// CPU use of a process over a window, as % of one core.
struct CpuWindow {
    pid: u32,
    ticks: u64,
    start: Instant,
    clk_tck: f64,
}

impl CpuWindow {
    fn start(pid: u32, clk_tck: f64) -> Result<Self> {
        Ok(CpuWindow {
            pid,
            ticks: cpu_ticks(pid)?,
            start: Instant::now(),
            clk_tck,
        })
    }

    fn percent(&self) -> Result<f64> {
        let used = cpu_ticks(self.pid)?.saturating_sub(self.ticks) as f64 / self.clk_tck;
        Ok(100.0 * used / self.start.elapsed().as_secs_f64())
    }
}

/// The kernel's count of connections dropped because a listen queue was full
/// (`TcpExt: ListenOverflows` in `/proc/net/netstat`; for the whole network namespace).
fn listen_overflows() -> Option<u64> {
    let text = fs::read_to_string("/proc/net/netstat").ok()?;
    let mut tcp_ext = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let names = tcp_ext.next()?.split_whitespace();
    let values = tcp_ext.next()?.split_whitespace();
    names
        .zip(values)
        .find(|(name, _)| *name == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
}

/// A free loopback port (bound, read, released: the server binds it right after).
fn free_port() -> Result<u16> {
    let listener = StdTcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

// ---------------------------------------------------------------------------------------
// Echo server runs.

async fn measure_echo(
    opts: &Options,
    scratch: &Path,
    label: &'static str,
    read_buffer: Option<usize>,
    clk_tck: f64,
) -> Result<Measurement> {
    let port_file = scratch.join(format!(
        "echo-{}.port",
        read_buffer.map_or("default".to_owned(), |n| n.to_string())
    ));
    let exe = std::env::current_exe().context("locating the bench executable")?;
    let child = Command::new(exe)
        .arg(ECHO_SERVER_FLAG)
        .arg(&port_file)
        .arg(read_buffer.map_or("default".to_owned(), |n| n.to_string()))
        // The echo server exits when this pipe closes, i.e. when the bench goes away.
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the echo server")?;
    let mut server = ServerProcess {
        label,
        child,
        log: None,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let port: u16 = loop {
        if let Ok(text) = fs::read_to_string(&port_file) {
            if let Ok(port) = text.trim().parse() {
                break port;
            }
        }
        ensure!(!server.exited()?, "the echo server exited during startup");
        ensure!(
            Instant::now() < deadline,
            "the echo server did not start within 30 s"
        );
        sleep(Duration::from_millis(10)).await;
    };
    let url = format!("ws://127.0.0.1:{port}/ws/cocoon");
    let fleet = Fleet::new(Mode::Echo, url, false, opts, vec![None; opts.devices]);
    let m = measure(&fleet, &mut server, label, opts, clk_tck, None).await;
    fleet.stop().await;
    drop(server);
    m
}

/// Connects the fleet, waits for the steady window and measures the server.
async fn measure(
    fleet: &Fleet,
    server: &mut ServerProcess,
    label: &'static str,
    opts: &Options,
    clk_tck: f64,
    hub_api: Option<&HubApi>,
) -> Result<Measurement> {
    sleep(Duration::from_millis(500)).await;
    let pid = server.pid();
    let baseline_kib = rss_kib(pid)?;
    let started = Instant::now();
    fleet.launch();
    fleet.wait_all_registered(server).await?;
    let connect_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{label}: all {} devices registered in {connect_secs:.1} s",
        opts.devices
    );
    let connected_kib = rss_kib(pid)?;
    let cpu = CpuWindow::start(pid, clk_tck)?;
    let client_cpu = CpuWindow::start(std::process::id(), clk_tck)?;
    sleep(opts.settle).await;
    let cpu_percent = cpu.percent()?;
    let client_cpu_percent = client_cpu.percent()?;
    let steady_kib = rss_kib(pid)?;
    ensure!(
        fleet.online() == opts.devices,
        "{label}: only {}/{} devices stayed connected through the steady window",
        fleet.online(),
        opts.devices
    );
    // Checked only now: listing every device allocates a few MiB in the hub, which
    // would otherwise be counted as connection memory.
    if let Some(api) = hub_api {
        let online = api
            .wait_online(opts.devices, Duration::from_secs(30))
            .await?;
        eprintln!(
            "{label}: the hub API reports {online}/{} online",
            opts.devices
        );
        ensure!(
            online == opts.devices,
            "{label}: the hub API reports only {online}/{} devices online",
            opts.devices
        );
    }
    Ok(Measurement {
        label,
        baseline_kib,
        connected_kib,
        steady_kib,
        connect_secs,
        cpu_percent,
        client_cpu_percent,
        devices: opts.devices,
    })
}

mod echo_server {
    //! The bare tokio-tungstenite echo server, run in its own process.

    use super::*;

    pub(super) fn run(port_file: &Path, read_buffer: Option<usize>) -> Result<()> {
        rlimit::increase_nofile_limit(u64::MAX).context("raising RLIMIT_NOFILE")?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the tokio runtime")?;
        runtime.block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .context("binding the echo server")?;
            let port = listener.local_addr()?.port();
            let tmp = port_file.with_extension("tmp");
            fs::write(&tmp, port.to_string()).context("writing the port file")?;
            fs::rename(&tmp, port_file).context("writing the port file")?;
            let config = read_buffer.map(|n| WebSocketConfig::default().read_buffer_size(n));
            let parent_gone = async {
                let mut stdin = tokio::io::stdin();
                let mut buf = [0u8; 64];
                while let Ok(n) = stdin.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            tokio::select! {
                _ = parent_gone => Ok(()),
                r = accept_loop(listener, config) => r,
            }
        })
    }

    async fn accept_loop(listener: TcpListener, config: Option<WebSocketConfig>) -> Result<()> {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(echo(stream, config));
                }
                Err(e) => {
                    eprintln!("echo server: accept failed: {e}");
                    sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    async fn echo(stream: TcpStream, config: Option<WebSocketConfig>) {
        let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, config).await else {
            return;
        };
        // Pings are answered by tungstenite itself; data frames go straight back.
        while let Some(Ok(msg)) = ws.next().await {
            let echo_back = match msg {
                Message::Text(_) | Message::Binary(_) => msg,
                Message::Close(_) => break,
                _ => continue,
            };
            if ws.send(echo_back).await.is_err() {
                break;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The hub run and the restart.

/// The hub's REST API, as the bench uses it.
struct HubApi {
    http: reqwest::Client,
    base: String,
    jwt: String,
}

#[derive(serde::Deserialize)]
struct TokenAnswer {
    token: String,
}

#[derive(serde::Deserialize)]
struct CocoonList {
    cocoons: Vec<CocoonEntry>,
}

#[derive(serde::Deserialize)]
struct CocoonEntry {
    online: bool,
}

impl HubApi {
    async fn login(http: reqwest::Client, base: String, api_key: &str) -> Result<Self> {
        let resp = http
            .post(format!("{base}/api/auth/token"))
            .json(&serde_json::json!({ "api_key": api_key }))
            .send()
            .await
            .context("POST /api/auth/token")?;
        ensure!(
            resp.status().is_success(),
            "POST /api/auth/token: {}",
            resp.status()
        );
        let jwt = resp.json::<TokenAnswer>().await?.token;
        Ok(HubApi { http, base, jwt })
    }

    async fn setup_token(&self) -> Result<String> {
        let resp = self
            .http
            .post(format!("{}/api/tokens", self.base))
            .bearer_auth(&self.jwt)
            .json(&serde_json::json!({ "kind": "setup", "expires_in_secs": 3600 }))
            .send()
            .await
            .context("POST /api/tokens")?;
        ensure!(
            resp.status() == reqwest::StatusCode::CREATED,
            "POST /api/tokens: {}",
            resp.status()
        );
        Ok(resp.json::<TokenAnswer>().await?.token)
    }

    async fn online_count(&self) -> Result<usize> {
        let resp = self
            .http
            .get(format!("{}/api/cocoons", self.base))
            .bearer_auth(&self.jwt)
            .send()
            .await
            .context("GET /api/cocoons")?;
        ensure!(
            resp.status().is_success(),
            "GET /api/cocoons: {}",
            resp.status()
        );
        let list: CocoonList = resp.json().await?;
        Ok(list.cocoons.iter().filter(|c| c.online).count())
    }

    /// Polls until `want` devices are online or `limit` passes; returns the last count.
    async fn wait_online(&self, want: usize, limit: Duration) -> Result<usize> {
        let deadline = Instant::now() + limit;
        loop {
            let online = self.online_count().await?;
            if online >= want || Instant::now() >= deadline {
                return Ok(online);
            }
            sleep(Duration::from_millis(200)).await;
        }
    }
}

fn spawn_hub(
    addr: SocketAddr,
    data_dir: &Path,
    interval: Duration,
    log: &Path,
) -> Result<ServerProcess> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    let child = Command::new(ADI)
        .args([
            "signaling",
            "serve",
            "--listen",
            &addr.to_string(),
            "--data-dir",
        ])
        .arg(data_dir)
        .args([
            "--heartbeat-interval",
            &humantime::format_duration(interval).to_string(),
            // Every simulated device connects from this host's loopback.
            "--max-connections-per-source",
            "0",
            "--max-connections",
            "1000000",
        ])
        .env_remove("ADI_DATABASE_URL")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .context("starting the hub")?;
    Ok(ServerProcess {
        label: "adi hub",
        child,
        log: Some(log.to_owned()),
    })
}

async fn wait_healthy(hub: &mut ServerProcess, http: &reqwest::Client, base: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(resp) = http.get(format!("{base}/healthz")).send().await {
            if resp.status().is_success() {
                return Ok(());
            }
        }
        if hub.exited()? {
            bail!("the hub exited during startup{}", hub.log_tail());
        }
        ensure!(
            Instant::now() < deadline,
            "the hub did not answer /healthz within 30 s{}",
            hub.log_tail()
        );
        sleep(Duration::from_millis(20)).await;
    }
}

fn create_user(data_dir: &Path) -> Result<String> {
    let out = Command::new(ADI)
        .args(["signaling", "user", "add", "bench", "--data-dir"])
        .arg(data_dir)
        // Before the hub first starts, so there is no catalog yet.
        .arg("--create")
        .env_remove("ADI_DATABASE_URL")
        .output()
        .context("running adi signaling user add")?;
    ensure!(
        out.status.success(),
        "adi signaling user add failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout)?.trim().to_owned();
    ensure!(!key.is_empty(), "adi signaling user add printed no API key");
    Ok(key)
}

async fn mint_tokens(api: &HubApi, n: usize, concurrency: usize) -> Result<Vec<String>> {
    let started = Instant::now();
    let results: Vec<Result<String>> = futures_util::stream::iter(0..n)
        .map(|_| api.setup_token())
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let tokens = results.into_iter().collect::<Result<Vec<_>>>()?;
    eprintln!(
        "minted {n} setup tokens in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(tokens)
}

/// A hub with a fleet of devices: without services, then the restart; or, with
/// `services`, devices that each declare one and so carry proxied bodies (their sockets
/// get the hub's larger read buffer), without the restart.
async fn measure_hub(
    opts: &Options,
    scratch: &Path,
    clk_tck: f64,
    services: bool,
) -> Result<(Measurement, Option<Restart>)> {
    let data_dir = scratch.join(if services { "hub-services" } else { "hub" });
    let api_key = create_user(&data_dir)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let base = format!("http://{addr}");
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()?;
    let mut hub = spawn_hub(addr, &data_dir, opts.interval, &scratch.join("hub-1.log"))?;
    wait_healthy(&mut hub, &http, &base).await?;
    eprintln!(
        "hub started (pid {}), RSS {} MiB",
        hub.pid(),
        mib(rss_kib(hub.pid())?)
    );
    let api = HubApi::login(http, base, &api_key).await?;
    let tokens = mint_tokens(&api, opts.devices, opts.mint_concurrency).await?;

    // A cocoon with services says so in its URL, as `CocoonConfig::ws_url` does.
    let (url, label) = if services {
        (
            format!("ws://{addr}/ws/cocoon?bodies=1"),
            "adi hub (with services)",
        )
    } else {
        (format!("ws://{addr}/ws/cocoon"), "adi hub")
    };
    let tokens = tokens.into_iter().map(Some).collect();
    let fleet = Fleet::new(Mode::Hub, url, services, opts, tokens);
    let result = async {
        let m = measure(&fleet, &mut hub, label, opts, clk_tck, Some(&api)).await?;
        report_line(&m);
        if services {
            return Ok((m, None));
        }
        eprintln!("\n== restart ==");
        let restart = restart_hub(opts, &fleet, &mut hub, addr, &data_dir, scratch, &api).await?;
        Ok((m, Some(restart)))
    }
    .await;
    fleet.stop().await;
    drop(hub);
    result
}

async fn restart_hub(
    opts: &Options,
    fleet: &Fleet,
    hub: &mut ServerProcess,
    addr: SocketAddr,
    data_dir: &Path,
    scratch: &Path,
    api: &HubApi,
) -> Result<Restart> {
    let before = fleet.sessions_snapshot();
    let overflows_before = listen_overflows();
    let sigterm = Instant::now();
    hub.terminate()?;
    let deadline = sigterm + Duration::from_secs(30);
    while !hub.exited()? {
        ensure!(
            Instant::now() < deadline,
            "the hub did not exit within 30 s of SIGTERM"
        );
        sleep(Duration::from_millis(1)).await;
    }
    let exited = Instant::now();
    let exit_after_sigterm = exited - sigterm;
    eprintln!(
        "old hub exited {} ms after SIGTERM",
        exit_after_sigterm.as_millis()
    );
    let new_hub = spawn_hub(addr, data_dir, opts.interval, &scratch.join("hub-2.log"))?;
    let spawned = Instant::now();
    *hub = new_hub;

    let deadline = exited + RESTART_TIMEOUT;
    let mut last_report = Instant::now();
    let back = loop {
        let back = fleet.registered_since(&before);
        if back == opts.devices || Instant::now() >= deadline {
            break back;
        }
        if hub.exited()? {
            bail!("the restarted hub exited{}", hub.log_tail());
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            eprintln!("restart: {back}/{} devices back", opts.devices);
            last_report = Instant::now();
        }
        sleep(Duration::from_millis(5)).await;
    };
    let listen_overflows = listen_overflows()
        .zip(overflows_before)
        .map(|(after, before)| after.saturating_sub(before));
    let first_back = fleet
        .first_registration_since(&before)
        .map(|t| t.saturating_duration_since(exited));
    let (since_exit, since_spawn) = if back == opts.devices {
        let last = fleet.last_registration();
        (
            Some(last.saturating_duration_since(exited)),
            Some(last.saturating_duration_since(spawned)),
        )
    } else {
        (None, None)
    };
    // RSS first: listing every device through the API allocates a few MiB.
    sleep(Duration::from_secs(1)).await;
    let rss_after_kib = rss_kib(hub.pid()).ok();
    let hub_online = api
        .wait_online(opts.devices, Duration::from_secs(30))
        .await
        .ok();
    Ok(Restart {
        exit_after_sigterm,
        back,
        since_exit,
        since_spawn,
        first_back,
        listen_overflows,
        hub_online,
        rss_after_kib,
    })
}

// ---------------------------------------------------------------------------------------
// The simulated devices.

/// What the devices are talking to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The adi hub: expect `registered`, reconnect like the real cocoon.
    Hub,
    /// An echo server: the first frame back counts as the answer to `register`.
    Echo,
}

/// The simulated devices of one server run, and what they report.
struct Fleet {
    shared: Arc<Shared>,
    tasks: Mutex<JoinSet<()>>,
    devices: Mutex<Vec<Device>>,
}

struct Device {
    name: String,
    secret: DeviceSecret,
    token: Option<String>,
}

struct Shared {
    mode: Mode,
    url: String,
    /// Devices declare a service, as a cocoon that carries proxied bodies does.
    services: bool,
    interval: Duration,
    /// Only its `backoff` is used: the reconnect policy of the real cocoon.
    policy: CocoonConfig,
    stop: CancellationToken,
    /// Bounds how many devices make their first connection at once.
    connect_gate: Arc<Semaphore>,
    epoch: Instant,
    online: AtomicUsize,
    /// Successful registrations per device.
    sessions: Vec<AtomicU32>,
    /// When each device last registered, in ns since `epoch`.
    registered_at: Vec<AtomicU64>,
    failed: AtomicUsize,
    last_failure: Mutex<Option<String>>,
}

impl Fleet {
    fn new(
        mode: Mode,
        url: String,
        services: bool,
        opts: &Options,
        tokens: Vec<Option<String>>,
    ) -> Self {
        let devices = tokens
            .into_iter()
            .enumerate()
            .map(|(i, token)| Device {
                name: format!("sim-{i}"),
                secret: random_secret(),
                token,
            })
            .collect::<Vec<_>>();
        let n = devices.len();
        let shared = Shared {
            mode,
            policy: CocoonConfig::new(url.clone(), "/nonexistent", "sim"),
            url,
            services,
            interval: opts.interval,
            stop: CancellationToken::new(),
            connect_gate: Arc::new(Semaphore::new(opts.connect_concurrency)),
            epoch: Instant::now(),
            online: AtomicUsize::new(0),
            sessions: (0..n).map(|_| AtomicU32::new(0)).collect(),
            registered_at: (0..n).map(|_| AtomicU64::new(0)).collect(),
            failed: AtomicUsize::new(0),
            last_failure: Mutex::new(None),
        };
        Fleet {
            shared: Arc::new(shared),
            tasks: Mutex::new(JoinSet::new()),
            devices: Mutex::new(devices),
        }
    }

    fn launch(&self) {
        let devices = std::mem::take(&mut *lock(&self.devices));
        let mut tasks = lock(&self.tasks);
        for (idx, device) in devices.into_iter().enumerate() {
            tasks.spawn(run_device(self.shared.clone(), idx, device));
        }
    }

    fn online(&self) -> usize {
        self.shared.online.load(Ordering::Acquire)
    }

    fn sessions_snapshot(&self) -> Vec<u32> {
        self.shared
            .sessions
            .iter()
            .map(|s| s.load(Ordering::Acquire))
            .collect()
    }

    /// How many devices registered at least once since the snapshot.
    fn registered_since(&self, before: &[u32]) -> usize {
        self.shared
            .sessions
            .iter()
            .zip(before)
            .filter(|(now, then)| now.load(Ordering::Acquire) > **then)
            .count()
    }

    /// When the earliest registration since the snapshot happened, if any did.
    fn first_registration_since(&self, before: &[u32]) -> Option<Instant> {
        let ns = self
            .shared
            .sessions
            .iter()
            .zip(before)
            .zip(&self.shared.registered_at)
            .filter(|((now, then), _)| now.load(Ordering::Acquire) > **then)
            .map(|(_, at)| at.load(Ordering::Acquire))
            .min()?;
        Some(self.shared.epoch + Duration::from_nanos(ns))
    }

    /// When the most recent registration happened.
    fn last_registration(&self) -> Instant {
        let ns = self
            .shared
            .registered_at
            .iter()
            .map(|t| t.load(Ordering::Acquire))
            .max()
            .unwrap_or(0);
        self.shared.epoch + Duration::from_nanos(ns)
    }

    async fn wait_all_registered(&self, server: &mut ServerProcess) -> Result<()> {
        let n = self.shared.sessions.len();
        // Generous: enrolment writes to the catalog once per device.
        let limit = Duration::from_secs(60) + Duration::from_millis(20) * n as u32;
        let started = Instant::now();
        let mut last_report = Instant::now();
        loop {
            let registered = self.registered_since(&vec![0; n]);
            if registered == n {
                return Ok(());
            }
            let failed = self.shared.failed.load(Ordering::Acquire);
            if failed > 0 {
                let why = lock(&self.shared.last_failure).clone().unwrap_or_default();
                bail!("{failed} devices were refused for good, e.g.: {why}");
            }
            if server.exited()? {
                bail!("{} exited{}", server.label, server.log_tail());
            }
            ensure!(
                started.elapsed() < limit,
                "only {registered}/{n} devices registered within {} s",
                limit.as_secs()
            );
            if last_report.elapsed() >= Duration::from_secs(5) {
                eprintln!(
                    "{}: {registered}/{n} devices registered after {:.0} s",
                    server.label,
                    started.elapsed().as_secs_f64()
                );
                last_report = Instant::now();
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops every device (each sends a close frame) and waits for them, briefly.
    async fn stop(&self) {
        self.shared.stop.cancel();
        let mut tasks = std::mem::take(&mut *lock(&self.tasks));
        let drained = timeout(Duration::from_secs(15), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            eprintln!(
                "{} device tasks did not stop in time; aborting them",
                tasks.len()
            );
        }
        tasks.shutdown().await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn random_secret() -> DeviceSecret {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    // 32 random bytes are 43 base64 characters, above the 32-character minimum.
    DeviceSecret::new(URL_SAFE_NO_PAD.encode(bytes)).expect("43 characters is long enough")
}

/// How one session ended.
enum Outcome {
    Stopped,
    Refused(ErrorCode, String),
    Lost { registered: bool },
}

/// One device: sessions until stopped, with the real cocoon's backoff in between.
async fn run_device(shared: Arc<Shared>, idx: usize, mut device: Device) {
    let mut gate = tokio::select! {
        _ = shared.stop.cancelled() => return,
        p = shared.connect_gate.clone().acquire_owned() => p.ok(),
    };
    let mut attempt: u32 = 0;
    loop {
        let outcome = session(&shared, idx, &mut device, &mut gate).await;
        // The gate bounds first connections only.
        gate = None;
        match outcome {
            Outcome::Stopped => return,
            Outcome::Refused(code, message) if !code.is_retryable() => {
                shared.failed.fetch_add(1, Ordering::AcqRel);
                *lock(&shared.last_failure) = Some(format!("{code}: {message}"));
                return;
            }
            Outcome::Refused(..) => {}
            Outcome::Lost { registered } => {
                if registered {
                    attempt = 0;
                }
            }
        }
        let delay = shared.policy.backoff(attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = sleep(delay) => {}
        }
    }
}

/// One WebSocket connection: register, then heartbeat until it ends.
async fn session(
    shared: &Shared,
    idx: usize,
    device: &mut Device,
    gate: &mut Option<OwnedSemaphorePermit>,
) -> Outcome {
    let config = WebSocketConfig::default()
        .read_buffer_size(CLIENT_READ_BUFFER)
        .max_message_size(Some(DEFAULT_MAX_FRAME_BYTES))
        .max_frame_size(Some(DEFAULT_MAX_FRAME_BYTES));
    let connect = tokio_tungstenite::connect_async_with_config(&shared.url, Some(config), true);
    let mut ws = tokio::select! {
        _ = shared.stop.cancelled() => return Outcome::Stopped,
        r = timeout(REGISTER_TIMEOUT, connect) => match r {
            Ok(Ok((ws, _))) => ws,
            _ => return Outcome::Lost { registered: false },
        },
    };
    let register = DeviceToHub::Register(Register {
        versions: SUPPORTED_VERSIONS.to_vec(),
        secret: device.secret.clone(),
        setup_token: device.token.clone(),
        name: device.name.clone(),
        services: if shared.services {
            vec![ServiceInfo {
                name: "web".into(),
                port: 8080,
                health_path: None,
                kind: adi_protocol::ServiceKind::Http,
                models: Vec::new(),
            }]
        } else {
            Vec::new()
        },
        capabilities: Vec::new(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        location: None,
        max_frame_bytes: None,
        instance: None,
        load: None,
    });
    if ws.send(Message::text(encode(&register))).await.is_err() {
        return Outcome::Lost { registered: false };
    }
    let answer = tokio::select! {
        _ = shared.stop.cancelled() => return Outcome::Stopped,
        r = timeout(REGISTER_TIMEOUT, ws.next()) => r,
    };
    let answer = match answer {
        Ok(Some(Ok(Message::Text(t)))) => t,
        _ => return Outcome::Lost { registered: false },
    };
    if shared.mode == Mode::Hub {
        match decode::<HubToDevice>(answer.as_bytes(), DEFAULT_MAX_FRAME_BYTES) {
            Ok(HubToDevice::Registered(_)) => {}
            Ok(HubToDevice::Error { code, message }) => return Outcome::Refused(code, message),
            _ => return Outcome::Lost { registered: false },
        }
    }
    // The token is spent; later reconnects prove identity with the secret alone.
    device.token = None;
    shared.registered_at[idx].store(
        u64::try_from(shared.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX),
        Ordering::Release,
    );
    shared.sessions[idx].fetch_add(1, Ordering::AcqRel);
    shared.online.fetch_add(1, Ordering::AcqRel);
    *gate = None;
    let outcome = heartbeat_loop(shared, &mut ws).await;
    shared.online.fetch_sub(1, Ordering::AcqRel);
    outcome
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn heartbeat_loop(shared: &Shared, ws: &mut Socket) -> Outcome {
    let every = shared.interval;
    // A random phase, so the fleet's heartbeats are spread over the interval.
    let offset = rand::thread_rng().gen_range(Duration::ZERO..every);
    let mut ticker = interval_at(Instant::now() + offset, every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = shared.stop.cancelled() => {
                let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
                return Outcome::Stopped;
            }
            _ = ticker.tick() => {
                if last_heard.elapsed() > every * SILENT_INTERVALS {
                    return Outcome::Lost { registered: true };
                }
                seq += 1;
                let hb = encode(&DeviceToHub::Heartbeat(Heartbeat {
                    seq,
                    services: Vec::new(),
                    load: None,
                }));
                // Like the real cocoon: a heartbeat, and a ping the server must answer.
                let sent = async {
                    ws.feed(Message::text(hb)).await?;
                    ws.feed(Message::Ping(Default::default())).await?;
                    ws.flush().await
                };
                if sent.await.is_err() {
                    return Outcome::Lost { registered: true };
                }
            }
            frame = ws.next() => {
                last_heard = Instant::now();
                match frame {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => {
                        return Outcome::Lost { registered: true };
                    }
                    Some(Ok(_)) => {}
                }
            }
        }
    }
}
