//! HTTP proxy benchmark: a loopback service reached directly, through the adi hub's
//! proxy (`/proxy/{device}/{service}/...` over the cocoon's WebSocket) and through
//! [rathole](https://github.com/rapiz1/rathole) as a plain TCP tunnel, in one run.
//!
//! What it starts, each as its own process so its RSS (`VmRSS`/`VmHWM` in
//! `/proc/PID/status`) and CPU (`utime + stime` in `/proc/PID/stat`) are its own:
//!
//! - the upstream service: this executable again with a hidden flag, an axum server on
//!   `127.0.0.1` answering `GET /1k` (1,024 bytes) and `GET /1m` (1 MiB), both with a
//!   `content-length`;
//! - the hub, `adi signaling serve` on SQLite in a temp dir, a user (`adi signaling user
//!   add`), a session (`POST /api/auth/token`) and a setup token (`POST /api/tokens`);
//! - a cocoon, `adi cocoon run --service web:PORT --tcp webtcp:PORT`, enrolled with that
//!   token: the same service as HTTP (reached at `/proxy/DEVICE/web/...`) and as raw TCP;
//! - `adi proxy DEVICE webtcp --listen 127.0.0.1:PORT`, the raw TCP forward a user runs
//!   on their own machine, with the user's API key;
//! - a rathole server and client on loopback (TCP transport, defaults otherwise) that
//!   forward a port to the same service. The rathole binary is taken from `--rathole
//!   PATH`, else `$ADI_BENCH_RATHOLE`, else the cache `<target dir>/bench-tools/rathole/
//!   bin/rathole`; when none exists it is built once with `cargo install rathole
//!   --version 0.5.0` into a temp dir (several minutes; without `--locked`, since the
//!   crate's own lockfile does not build on recent Rust) and copied into the cache.
//!
//! The load generator is `wrk` (`apt-get install wrk`) with a Lua `done` hook that
//! prints exact counts and latency percentiles; without `wrk` (or with `--load
//! builtin`) a Rust closed-loop generator runs in this process instead: one task and
//! one keep-alive HTTP/1.1 connection per connection, latencies sorted for the
//! percentiles. Every target gets the same request, `Authorization` header included
//! (the hub needs it and strips it; the others ignore it), the same connection count
//! and the same duration, after a warm-up run that is not counted.
//!
//! For each body size and path it reports req/s (answers with a 2xx or 3xx status
//! only; refusals such as the hub's 502 "device too busy" count as errors), p50 and p99
//! latency (of every answer, refusals included), throughput, errors, the CPU share of
//! every process over the measured window (and that CPU per request for the proxy's two
//! sides, with the part of it spent in the kernel: the system calls any relay must
//! make, which bound what userland work can win), the machine's busy cores and how much
//! of that no measured process accounts for (other work on the machine makes a run
//! unreliable; the report warns), and the
//! RSS of the proxy's two sides before, at the peak (sampled every 100 ms) and one
//! second after the run. The summary gives, for adi's HTTP path and its raw TCP path,
//! ratios to rathole on medians over rounds against the targets: req/s at least
//! rathole's, p99 and CPU per request (all of the path's processes) at most rathole's,
//! and the p50 the path adds over the direct one at most what rathole adds (run it with
//! `--connections 1 --threads 1` for what one user feels); and each proxy process's RSS
//! when idle, at the end and at its peak, to judge whether memory stays flat. Last, the
//! ceiling: from the
//! direct run's kernel time (the socket work of one HTTP exchange, which a proxy that
//! terminates HTTP does once more per request) and the rathole run's figures, the most
//! req/s, as a multiple of rathole's, that such a proxy could reach on this machine with
//! no userland work at all.
//!
//! ```text
//! cargo bench --bench proxy
//! cargo bench --bench proxy -- --duration 10s --warmup 2s --connections 64 --rounds 1
//! ```
//!
//! Options: `--duration D` (measured window per run, whole seconds, default 10s),
//! `--warmup D` (default 2s), `--connections N` (default 64), `--threads N` (wrk
//! threads, default: one per CPU, at most one per connection), `--rounds N` (repeat
//! every run, in alternating order; medians in the summary),
//! `--load auto|wrk|builtin`, `--only direct,adi,adi-tcp,rathole`, `--sizes 1k,1m`,
//! `--rathole PATH`, `--rust-log FILTER` (`RUST_LOG` for hub, cocoon and rathole;
//! default: each one's own default, `info`). Unknown flags (such as the `--bench` cargo
//! adds) are ignored.
//!
//! This is a benchmark, not a test: it asserts nothing about the figures. It listens on
//! loopback only, stops by itself and kills every process it started, also on error.
//! Figures and their discussion are in `BENCHMARKS.md`.

mod support;

use std::fmt::Write as _;
use std::fs;
use std::net::TcpListener as StdTcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};
use tokio::time::sleep;

/// The `adi` binary built by this package.
const ADI: &str = env!("CARGO_BIN_EXE_adi");
/// Hidden flag that turns this executable into the upstream service.
const SERVICE_FLAG: &str = "--upstream-service";
/// rathole release the bench installs when it has none.
const RATHOLE_VERSION: &str = "0.5.0";
/// How often RSS is sampled during a run.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// How long to wait after a run before reading the "after" RSS.
const SETTLE: Duration = Duration::from_secs(1);
/// Busy cores unaccounted for above which a run counts as disturbed.
const NOISY_CORES: f64 = 0.25;
/// Request timeout for the load generators: a slow answer is a latency, not an error.
const LOAD_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(pos) = args.iter().position(|a| a == SERVICE_FLAG) {
        let port_file = args
            .get(pos + 1)
            .context("--upstream-service needs a port file")?;
        return upstream::run(Path::new(port_file));
    }
    let opts = Options::parse(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        tokio::select! {
            r = bench(opts) => r,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        }
    })
}

/// Response body sizes the service offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Size {
    Small,
    Large,
}

impl Size {
    fn path(self) -> &'static str {
        match self {
            Size::Small => "/1k",
            Size::Large => "/1m",
        }
    }

    fn bytes(self) -> usize {
        match self {
            Size::Small => 1024,
            Size::Large => 1024 * 1024,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Size::Small => "1 KiB",
            Size::Large => "1 MiB",
        }
    }
}

/// The ways to reach the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Direct,
    /// HTTP through the hub's `/proxy/` and the cocoon.
    Adi,
    /// Raw TCP through `adi proxy DEVICE SERVICE --listen`, the hub and the cocoon, to
    /// the same service declared with `--tcp`.
    AdiTcp,
    Rathole,
}

impl Route {
    fn label(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Adi => "adi hub",
            Route::AdiTcp => "adi tcp",
            Route::Rathole => "rathole",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    Auto,
    Wrk,
    Builtin,
}

/// Command-line options of the benchmark.
#[derive(Debug, Clone)]
struct Options {
    duration: Duration,
    warmup: Duration,
    connections: usize,
    threads: usize,
    rounds: usize,
    load: Load,
    routes: Vec<Route>,
    sizes: Vec<Size>,
    rathole: Option<PathBuf>,
    rust_log: Option<String>,
}

impl Options {
    fn parse(args: &[String]) -> Result<Self> {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let mut opts = Options {
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            connections: 64,
            threads: 0,
            rounds: 1,
            load: Load::Auto,
            routes: vec![Route::Direct, Route::Adi, Route::AdiTcp, Route::Rathole],
            sizes: vec![Size::Small, Size::Large],
            rathole: std::env::var_os("ADI_BENCH_RATHOLE").map(PathBuf::from),
            rust_log: None,
        };
        let mut i = 0;
        while i < args.len() {
            let (flag, inline) = match args[i].split_once('=') {
                Some((f, v)) => (f, Some(v.to_owned())),
                None => (args[i].as_str(), None),
            };
            let known = matches!(
                flag,
                "--duration"
                    | "--warmup"
                    | "--connections"
                    | "--threads"
                    | "--rounds"
                    | "--load"
                    | "--only"
                    | "--sizes"
                    | "--rathole"
                    | "--rust-log"
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
                "--duration" => {
                    opts.duration = humantime::parse_duration(&value).with_context(bad)?
                }
                "--warmup" => opts.warmup = humantime::parse_duration(&value).with_context(bad)?,
                "--connections" => opts.connections = value.parse().with_context(bad)?,
                "--threads" => opts.threads = value.parse().with_context(bad)?,
                "--rounds" => opts.rounds = value.parse().with_context(bad)?,
                "--load" => {
                    opts.load = match value.as_str() {
                        "auto" => Load::Auto,
                        "wrk" => Load::Wrk,
                        "builtin" => Load::Builtin,
                        _ => bail!("{}", bad()),
                    }
                }
                "--only" => {
                    opts.routes = value
                        .split(',')
                        .map(|r| match r.trim() {
                            "direct" => Ok(Route::Direct),
                            "adi" => Ok(Route::Adi),
                            "adi-tcp" => Ok(Route::AdiTcp),
                            "rathole" => Ok(Route::Rathole),
                            _ => Err(anyhow!("{}", bad())),
                        })
                        .collect::<Result<_>>()?
                }
                "--sizes" => {
                    opts.sizes = value
                        .split(',')
                        .map(|s| match s.trim() {
                            "1k" => Ok(Size::Small),
                            "1m" => Ok(Size::Large),
                            _ => Err(anyhow!("{}", bad())),
                        })
                        .collect::<Result<_>>()?
                }
                "--rathole" => opts.rathole = Some(PathBuf::from(value)),
                _ => opts.rust_log = Some(value),
            }
            i += 1;
        }
        ensure!(
            opts.duration >= Duration::from_secs(1) && opts.duration.subsec_nanos() == 0,
            "--duration must be whole seconds, at least 1s (wrk counts in seconds)"
        );
        ensure!(
            opts.warmup.subsec_nanos() == 0,
            "--warmup must be whole seconds"
        );
        ensure!(opts.connections > 0, "--connections must be at least 1");
        if opts.threads == 0 {
            // wrk needs a connection per thread: one thread per CPU, at most one per
            // connection.
            opts.threads = cpus.min(opts.connections);
        }
        ensure!(
            opts.threads > 0 && opts.threads <= opts.connections,
            "--threads must be 1 to --connections"
        );
        ensure!(opts.rounds > 0, "--rounds must be at least 1");
        ensure!(
            !opts.routes.is_empty() && !opts.sizes.is_empty(),
            "nothing to run"
        );
        Ok(opts)
    }
}

/// What one load run measured.
#[derive(Debug, Clone, Default)]
struct LoadResult {
    /// Requests answered with a 2xx or 3xx: refusals are errors, not throughput.
    requests: u64,
    seconds: f64,
    bytes: u64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    errors: u64,
    /// Answers that were not 2xx/3xx, by status, with the first one's body (built-in
    /// generator only; wrk counts them without telling which).
    bad_statuses: std::collections::BTreeMap<u16, (u64, String)>,
}

impl LoadResult {
    fn rps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests as f64 / self.seconds
        } else {
            0.0
        }
    }

    fn mib_per_sec(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 / self.seconds / (1024.0 * 1024.0)
        } else {
            0.0
        }
    }
}

/// Memory of one process around a run, in KiB.
#[derive(Debug, Clone, Copy, Default)]
struct Rss {
    before: u64,
    peak: u64,
    after: u64,
}

/// One measured run.
#[derive(Debug, Clone)]
struct Run {
    size: Size,
    route: Route,
    round: usize,
    load: LoadResult,
    /// CPU as % of one core over the measured window: proxy server side (hub or
    /// rathole server), device side (cocoon or rathole client), service, load generator.
    cpu_server: Option<f64>,
    cpu_device: Option<f64>,
    cpu_service: f64,
    cpu_load: Option<f64>,
    /// The part of `cpu_service` and `cpu_load` spent in the kernel. In the direct run
    /// it is the socket work of one HTTP exchange, which every proxy that terminates
    /// HTTP does once more per request (see [`ceiling`]).
    sys_service: f64,
    sys_load: Option<f64>,
    /// The part of `cpu_server` and `cpu_device` spent in the kernel (system time):
    /// socket reads and writes, and on loopback the receiving side's TCP work too. It
    /// is what a relay cannot avoid, so it bounds what userland work can win.
    sys_server: Option<f64>,
    sys_device: Option<f64>,
    /// The client side's CPU where a path has one: `adi proxy` for raw TCP.
    cpu_client: Option<f64>,
    sys_client: Option<f64>,
    /// The whole machine's busy CPU over the window, in cores.
    machine_busy_cores: f64,
    /// Busy CPU not accounted to the processes above or to this one, in cores:
    /// something else ran on the machine (or the kernel worked outside them).
    other_cores: f64,
    rss_server: Option<Rss>,
    rss_device: Option<Rss>,
}

/// A child process that is killed when dropped, with its output in a log file.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, log_dir: &Path) -> Result<Self> {
        let log = log_dir.join(format!("{}.log", name.replace(' ', "-")));
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("cloning a log file handle")?;
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc { name, child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the end of the log if the process has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!(
                "{} exited ({status}); last output:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The adi side: hub and cocoon, and how to reach the service through them.
struct AdiSetup {
    hub: Proc,
    cocoon: Proc,
    url_base: String,
    jwt: String,
    /// `adi proxy` forwarding a loopback port to the service as raw TCP, and that port.
    forward: Option<(Proc, u16)>,
}

/// The rathole side: server and client, and the port the service is exposed at.
struct RatholeSetup {
    server: Proc,
    client: Proc,
    port: u16,
    version: String,
}

async fn bench(opts: Options) -> Result<()> {
    let clk_tck = clock_ticks_per_second();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let tmp = tempfile::Builder::new()
        .prefix("adi-bench-proxy-")
        .tempdir()
        .context("creating a temp dir")?;
    let dir = tmp.path();
    let wrk = match opts.load {
        Load::Builtin => None,
        Load::Wrk => Some(
            find_wrk()
                .context("--load wrk: wrk is not on PATH (Debian/Ubuntu: apt-get install wrk)")?,
        ),
        Load::Auto => {
            let w = find_wrk();
            if w.is_none() {
                eprintln!(
                    "wrk is not on PATH (Debian/Ubuntu: apt-get install wrk); \
                     using the built-in load generator"
                );
            }
            w
        }
    };
    let generator = match &wrk {
        Some(path) => format!("wrk ({})", wrk_version(path)),
        None => "built-in (tokio, one keep-alive connection per task)".to_owned(),
    };
    eprintln!(
        "proxy bench: {} connections, {} s per run after a {} s warm-up, {} round(s), \
         {cpus} CPUs, load generator {generator}, scratch dir {}",
        opts.connections,
        opts.duration.as_secs(),
        opts.warmup.as_secs(),
        opts.rounds,
        dir.display()
    );

    let service = start_service(dir).await?;
    let service_port = service.1;
    let mut service = service.0;
    eprintln!("service: pid {} on 127.0.0.1:{service_port}", service.pid());

    let want_adi = opts.routes.contains(&Route::Adi) || opts.routes.contains(&Route::AdiTcp);
    let want_rathole = opts.routes.contains(&Route::Rathole);
    let mut adi = if want_adi {
        Some(start_adi(&opts, dir, service_port).await?)
    } else {
        None
    };
    let mut rathole = if want_rathole {
        match find_or_install_rathole(&opts).await {
            Ok(bin) => Some(start_rathole(&opts, dir, &bin, service_port).await?),
            Err(e) => {
                eprintln!("rathole is unavailable, its runs are skipped: {e:#}");
                None
            }
        }
    } else {
        None
    };

    let jwt = adi.as_ref().map(|a| a.jwt.clone()).unwrap_or_default();
    let idle_hub = adi.as_ref().map(|a| rss_kib(a.hub.pid())).transpose()?;
    let idle_cocoon = adi.as_ref().map(|a| rss_kib(a.cocoon.pid())).transpose()?;
    let idle_forward = adi
        .as_ref()
        .and_then(|a| a.forward.as_ref())
        .map(|(f, _)| rss_kib(f.pid()))
        .transpose()?;
    let idle_rathole = rathole
        .as_ref()
        .map(|r| Ok::<_, anyhow::Error>((rss_kib(r.server.pid())?, rss_kib(r.client.pid())?)))
        .transpose()?;

    let script = dir.join("report.lua");
    fs::write(&script, WRK_SCRIPT).context("writing the wrk script")?;

    let mut runs = Vec::new();
    for round in 1..=opts.rounds {
        // Every other round runs the paths in the opposite order, so no path always
        // follows the same one (and its leftover heat, page cache or CPU frequency).
        let mut routes = opts.routes.clone();
        if round % 2 == 0 {
            routes.reverse();
        }
        for &size in &opts.sizes {
            for &route in &routes {
                let (url, server_pid, device_pid, client_pid) = match route {
                    Route::Direct => (
                        format!("http://127.0.0.1:{service_port}{}", size.path()),
                        None,
                        None,
                        None,
                    ),
                    Route::Adi => {
                        let Some(a) = adi.as_mut() else { continue };
                        a.hub.check_alive()?;
                        a.cocoon.check_alive()?;
                        (
                            format!("{}{}", a.url_base, size.path()),
                            Some(a.hub.pid()),
                            Some(a.cocoon.pid()),
                            None,
                        )
                    }
                    Route::AdiTcp => {
                        let Some(a) = adi.as_mut() else { continue };
                        let Some((forward, port)) = a.forward.as_mut() else {
                            continue;
                        };
                        forward.check_alive()?;
                        let (port, client) = (*port, forward.pid());
                        a.hub.check_alive()?;
                        a.cocoon.check_alive()?;
                        (
                            format!("http://127.0.0.1:{port}{}", size.path()),
                            Some(a.hub.pid()),
                            Some(a.cocoon.pid()),
                            Some(client),
                        )
                    }
                    Route::Rathole => {
                        let Some(r) = rathole.as_mut() else { continue };
                        r.server.check_alive()?;
                        r.client.check_alive()?;
                        (
                            format!("http://127.0.0.1:{}{}", r.port, size.path()),
                            Some(r.server.pid()),
                            Some(r.client.pid()),
                            None,
                        )
                    }
                };
                service.check_alive()?;
                eprintln!(
                    "\n== {} via {} (round {round}/{}) ==",
                    size.label(),
                    route.label(),
                    opts.rounds
                );
                let target = Target {
                    url: &url,
                    jwt: &jwt,
                    expect_bytes: size.bytes(),
                };
                check_once(&target).await.with_context(|| {
                    format!("a single {} request via {}", size.label(), route.label())
                })?;
                let pids = Pids {
                    server: server_pid,
                    device: device_pid,
                    client: client_pid,
                    service: service.pid(),
                };
                let load = Loader {
                    opts: &opts,
                    wrk: wrk.as_deref(),
                    script: &script,
                    target: &target,
                };
                let run = measure(&load, (size, route, round), pids, clk_tck).await?;
                eprintln!("{}", run_line(&run));
                runs.push(run);
            }
        }
    }

    let mut report = String::new();
    let final_mem = |pid: u32| -> Result<(u64, u64)> { Ok((rss_kib(pid)?, hwm_kib(pid)?)) };
    let mut memory = Vec::new();
    if let Some(a) = &adi {
        memory.push(("adi hub", idle_hub.unwrap_or(0), final_mem(a.hub.pid())?));
        memory.push((
            "adi cocoon",
            idle_cocoon.unwrap_or(0),
            final_mem(a.cocoon.pid())?,
        ));
    }
    if let Some((forward, _)) = adi.as_ref().and_then(|a| a.forward.as_ref()) {
        memory.push((
            "adi proxy",
            idle_forward.unwrap_or(0),
            final_mem(forward.pid())?,
        ));
    }
    if let (Some(r), Some((idle_s, idle_c))) = (&rathole, idle_rathole) {
        memory.push(("rathole server", idle_s, final_mem(r.server.pid())?));
        memory.push(("rathole client", idle_c, final_mem(r.client.pid())?));
    }
    write_report(
        &mut report,
        &opts,
        &generator,
        rathole.as_ref().map(|r| r.version.as_str()),
        cpus,
        &runs,
        &memory,
    )?;
    println!("\n{report}");
    drop(rathole);
    drop(adi);
    drop(service);
    Ok(())
}

/// Which processes to watch during a run.
#[derive(Debug, Clone, Copy)]
struct Pids {
    server: Option<u32>,
    device: Option<u32>,
    client: Option<u32>,
    service: u32,
}

/// Where the load goes.
struct Target<'a> {
    url: &'a str,
    jwt: &'a str,
    expect_bytes: usize,
}

/// One request, to fail early and clearly if a path does not work at all.
async fn check_once(target: &Target<'_>) -> Result<()> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut req = client.get(target.url);
    if !target.jwt.is_empty() {
        req = req.bearer_auth(target.jwt);
    }
    let resp = req.send().await?;
    let status = resp.status();
    let body = resp.bytes().await?;
    ensure!(
        status.is_success() && body.len() == target.expect_bytes,
        "GET {} answered {status} with {} bytes (expected 200 with {}): {}",
        target.url,
        body.len(),
        target.expect_bytes,
        String::from_utf8_lossy(&body[..body.len().min(200)])
    );
    Ok(())
}

/// How to put load on a target.
struct Loader<'a> {
    opts: &'a Options,
    wrk: Option<&'a Path>,
    script: &'a Path,
    target: &'a Target<'a>,
}

impl Loader<'_> {
    /// Runs the load for `duration`; while wrk runs its pid is in `pid_slot`.
    async fn run(
        &self,
        duration: Duration,
        pid_slot: &std::sync::Mutex<Option<u32>>,
    ) -> Result<LoadResult> {
        let Some(wrk) = self.wrk else {
            return builtin::run(self.target, self.opts.connections, duration).await;
        };
        let mut cmd = tokio::process::Command::new(wrk);
        cmd.arg("-t")
            .arg(self.opts.threads.to_string())
            .arg("-c")
            .arg(self.opts.connections.to_string())
            .arg("-d")
            .arg(format!("{}s", duration.as_secs()))
            .arg("--timeout")
            .arg(format!("{}s", LOAD_TIMEOUT.as_secs()))
            .arg("-s")
            .arg(self.script)
            .arg("-H")
            .arg(format!("Authorization: Bearer {}", self.target.jwt))
            .arg(self.target.url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn().context("starting wrk")?;
        *lock(pid_slot) = child.id();
        let out =
            tokio::time::timeout(duration + Duration::from_secs(30), child.wait_with_output())
                .await
                .context("wrk did not finish")?
                .context("running wrk")?;
        *lock(pid_slot) = None;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "wrk failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        parse_wrk(&stdout).with_context(|| format!("reading wrk's output:\n{stdout}"))
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Warm-up, then the measured run with CPU and memory around it.
async fn measure(
    load: &Loader<'_>,
    (size, route, round): (Size, Route, usize),
    pids: Pids,
    clk_tck: f64,
) -> Result<Run> {
    let load_pid = Arc::new(std::sync::Mutex::new(None::<u32>));
    if !load.opts.warmup.is_zero() {
        let w = load.run(load.opts.warmup, &load_pid).await?;
        eprintln!("warm-up: {:.0} req/s, {} errors", w.rps(), w.errors);
    }
    let watched: Vec<u32> = [pids.server, pids.device].into_iter().flatten().collect();
    let before: Vec<u64> = watched.iter().map(|&p| rss_kib(p)).collect::<Result<_>>()?;
    let ticks_before = Ticks::read(pids)?;
    let machine_before = machine_ticks()?;
    let started = Instant::now();

    // Peak RSS while the load runs, and the load generator's CPU: wrk is a child that
    // is gone when it has finished, so its CPU is sampled while it runs.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let watched = watched.clone();
        let load_pid = load_pid.clone();
        tokio::task::spawn_blocking(move || {
            let mut peak = vec![0u64; watched.len()];
            let mut load_ticks: Option<(u32, CpuTicks, CpuTicks)> = None;
            while !stop.load(Ordering::Relaxed) {
                for (i, &p) in watched.iter().enumerate() {
                    if let Ok(r) = rss_kib(p) {
                        peak[i] = peak[i].max(r);
                    }
                }
                let current = *lock(&load_pid);
                if let Some(p) = current {
                    if let Ok(t) = cpu_split(p) {
                        load_ticks = Some(match load_ticks {
                            Some((lp, first, _)) if lp == p => (p, first, t),
                            _ => (p, t, t),
                        });
                    }
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
            (peak, load_ticks)
        })
    };
    let own_before = cpu_split(std::process::id())?;
    let result = load.run(load.opts.duration, &load_pid).await;
    let own_after = cpu_split(std::process::id())?;
    let elapsed = started.elapsed().as_secs_f64();
    let ticks_after = Ticks::read(pids)?;
    let machine_after = machine_ticks()?;
    stop.store(true, Ordering::Relaxed);
    let (peak, load_ticks) = sampler.await.context("the RSS sampler failed")?;
    let result = result?;
    let after_now: Vec<u64> = watched.iter().map(|&p| rss_kib(p)).collect::<Result<_>>()?;
    sleep(SETTLE).await;
    let after: Vec<u64> = watched.iter().map(|&p| rss_kib(p)).collect::<Result<_>>()?;

    let pct = |d: u64| 100.0 * d as f64 / clk_tck / elapsed;
    // Of two readings of one process, all its CPU or its kernel part over the window.
    let (all, kernel) = (|t: CpuTicks| t.total, |t: CpuTicks| t.system);
    let delta =
        |b: CpuTicks, a: CpuTicks, part: fn(CpuTicks) -> u64| pct(part(a).saturating_sub(part(b)));
    // wrk's first sample is taken up to one interval after it started, so its figures
    // are a slight underestimate.
    let load_part = |part: fn(CpuTicks) -> u64| match load.wrk {
        Some(_) => load_ticks.map(|(_, first, last)| delta(first, last, part)),
        None => Some(delta(own_before, own_after, part)),
    };
    let (cpu_load, sys_load) = (load_part(all), load_part(kernel));
    let rss = |i: usize| Rss {
        before: before[i],
        peak: peak[i].max(before[i]).max(after_now[i]),
        after: after[i],
    };
    let (busy, total) = (
        machine_after.0.saturating_sub(machine_before.0),
        machine_after.1.saturating_sub(machine_before.1),
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let machine_busy_cores = if total > 0 {
        cpus * busy as f64 / total as f64
    } else {
        0.0
    };
    // One side's share over the window, of all its CPU or of its kernel part.
    let side = |b: Option<CpuTicks>, a: Option<CpuTicks>, part: fn(CpuTicks) -> u64| {
        b.zip(a).map(|(b, a)| delta(b, a, part))
    };
    let cpu_server = side(ticks_before.server, ticks_after.server, all);
    let cpu_device = side(ticks_before.device, ticks_after.device, all);
    let sys_server = side(ticks_before.server, ticks_after.server, kernel);
    let sys_device = side(ticks_before.device, ticks_after.device, kernel);
    let cpu_client = side(ticks_before.client, ticks_after.client, all);
    let sys_client = side(ticks_before.client, ticks_after.client, kernel);
    let cpu_service = delta(ticks_before.service, ticks_after.service, all);
    let sys_service = delta(ticks_before.service, ticks_after.service, kernel);
    // With wrk this process only waits, but count it too.
    let own = match load.wrk {
        Some(_) => delta(own_before, own_after, all),
        None => 0.0,
    };
    let ours = cpu_server.unwrap_or(0.0)
        + cpu_device.unwrap_or(0.0)
        + cpu_client.unwrap_or(0.0)
        + cpu_service
        + cpu_load.unwrap_or(0.0)
        + own;
    Ok(Run {
        size,
        route,
        round,
        load: result,
        cpu_server,
        cpu_device,
        cpu_service,
        cpu_load,
        sys_service,
        sys_load,
        sys_server,
        sys_device,
        cpu_client,
        sys_client,
        machine_busy_cores,
        other_cores: (machine_busy_cores - ours / 100.0).max(0.0),
        rss_server: pids.server.map(|_| rss(0)),
        rss_device: pids.device.map(|_| rss(1)),
    })
}

/// CPU ticks of the watched processes.
struct Ticks {
    server: Option<CpuTicks>,
    device: Option<CpuTicks>,
    client: Option<CpuTicks>,
    service: CpuTicks,
}

impl Ticks {
    fn read(p: Pids) -> Result<Self> {
        Ok(Ticks {
            server: p.server.map(cpu_split).transpose()?,
            device: p.device.map(cpu_split).transpose()?,
            client: p.client.map(cpu_split).transpose()?,
            service: cpu_split(p.service)?,
        })
    }
}

/// wrk's `done` hook: exact counts and percentiles (microseconds) on one line.
const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "ADI-BENCH requests=%d duration_us=%d bytes=%d p50_us=%d p99_us=%d max_us=%d " ..
    "status=%d connect=%d read=%d write=%d timeout=%d\n",
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(99), latency.max,
    e.status, e.connect, e.read, e.write, e.timeout))
end
"#;

fn parse_wrk(stdout: &str) -> Result<LoadResult> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("ADI-BENCH "))
        .context("no ADI-BENCH line")?;
    let get = |key: &str| -> Result<f64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {key} in {line:?}"))
    };
    Ok(LoadResult {
        requests: (get("requests")? - get("status")?).max(0.0) as u64,
        seconds: get("duration_us")? / 1e6,
        bytes: get("bytes")? as u64,
        p50_us: get("p50_us")?,
        p99_us: get("p99_us")?,
        max_us: get("max_us")?,
        errors: (get("status")? + get("connect")? + get("read")? + get("write")? + get("timeout")?)
            as u64,
        bad_statuses: Default::default(),
    })
}

fn find_wrk() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("wrk"))
            .find(|p| p.is_file())
    })
}

fn wrk_version(path: &Path) -> String {
    // `wrk -v` prints its version and exits with 1.
    Command::new(path)
        .arg("-v")
        .output()
        .ok()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines()
                .next()
                .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
                .unwrap_or_default()
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "version unknown".to_owned())
}

/// Starts the upstream service (this executable again) and returns its port.
async fn start_service(dir: &Path) -> Result<(Proc, u16)> {
    let port_file = dir.join("service.port");
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg(SERVICE_FLAG).arg(&port_file);
    let mut proc = Proc::spawn("service", &mut cmd, dir)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = fs::read_to_string(&port_file) {
            if let Ok(port) = text.trim().parse() {
                return Ok((proc, port));
            }
        }
        proc.check_alive()?;
        ensure!(
            Instant::now() < deadline,
            "the service did not start in 10 s"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// Starts hub and cocoon, enrols the cocoon with the service, returns the proxy URL.
async fn start_adi(opts: &Options, dir: &Path, service_port: u16) -> Result<AdiSetup> {
    let hub_dir = dir.join("hub");
    let cocoon_dir = dir.join("cocoon");
    let port = free_port()?;
    let hub_url = format!("http://127.0.0.1:{port}");
    let mut cmd = Command::new(ADI);
    cmd.args(["signaling", "serve", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(&hub_dir);
    if let Some(filter) = &opts.rust_log {
        cmd.env("RUST_LOG", filter);
    }
    let mut hub = Proc::spawn("adi hub", &mut cmd, dir)?;
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()?;
    let readyz = format!("{hub_url}/readyz");
    wait_until(
        "the hub to answer /readyz",
        Duration::from_secs(20),
        &mut [&mut hub],
        || {
            let (http, readyz) = (http.clone(), readyz.clone());
            async move {
                let up = http
                    .get(readyz)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                Ok(up.then_some(()))
            }
        },
    )
    .await?;

    let out = Command::new(ADI)
        .args(["signaling", "user", "add", "bench", "--data-dir"])
        .arg(&hub_dir)
        .output()
        .context("running adi signaling user add")?;
    ensure!(
        out.status.success(),
        "adi signaling user add failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let api_key = String::from_utf8(out.stdout)
        .context("API key is not UTF-8")?
        .trim()
        .to_owned();
    let session: Value = http
        .post(format!("{hub_url}/api/auth/token"))
        .json(&json!({ "api_key": api_key }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let jwt = session["token"]
        .as_str()
        .with_context(|| format!("no token in {session}"))?
        .to_owned();
    let setup: Value = http
        .post(format!("{hub_url}/api/tokens"))
        .bearer_auth(&jwt)
        .json(&json!({ "kind": "setup", "expires_in_secs": 3600 }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let setup_token = setup["token"]
        .as_str()
        .with_context(|| format!("no token in {setup}"))?
        .to_owned();

    let mut cmd = Command::new(ADI);
    cmd.args([
        "cocoon", "run", "--hub", &hub_url, "--name", "bench", "--token",
    ])
    .arg(&setup_token)
    .arg("--data-dir")
    .arg(&cocoon_dir)
    .arg("--service")
    .arg(format!("web:{service_port}"))
    .arg("--tcp")
    .arg(format!("webtcp:{service_port}"));
    if let Some(filter) = &opts.rust_log {
        cmd.env("RUST_LOG", filter);
    }
    let mut cocoon = Proc::spawn("adi cocoon", &mut cmd, dir)?;
    let list_url = format!("{hub_url}/api/cocoons");
    let device_id = wait_until(
        "the cocoon to be online",
        Duration::from_secs(30),
        &mut [&mut hub, &mut cocoon],
        || {
            let (http, list_url, jwt) = (http.clone(), list_url.clone(), jwt.clone());
            async move {
                let list: Value = http
                    .get(list_url)
                    .bearer_auth(jwt)
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                Ok(list["cocoons"].as_array().and_then(|all| {
                    all.iter()
                        .find(|c| c["name"] == "bench" && c["online"] == true)
                        .and_then(|c| c["id"].as_str())
                        .map(str::to_owned)
                }))
            }
        },
    )
    .await?;
    eprintln!(
        "adi: hub pid {} on {hub_url}, cocoon pid {} online as device {device_id}",
        hub.pid(),
        cocoon.pid()
    );
    let forward = if opts.routes.contains(&Route::AdiTcp) {
        let port = free_port()?;
        let mut cmd = Command::new(ADI);
        cmd.args(["proxy", &device_id, "webtcp", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .env("ADI_HUB", &hub_url)
            .env("ADI_API_KEY", &api_key)
            .env("ADI_CONFIG_DIR", dir.join("cli"));
        if let Some(filter) = &opts.rust_log {
            cmd.env("RUST_LOG", filter);
        }
        let mut forward = Proc::spawn("adi proxy", &mut cmd, dir)?;
        wait_until(
            "adi proxy to listen",
            Duration::from_secs(20),
            &mut [&mut hub, &mut cocoon, &mut forward],
            || async move {
                Ok(tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                    .then_some(()))
            },
        )
        .await?;
        eprintln!(
            "adi proxy: pid {} forwarding 127.0.0.1:{port}",
            forward.pid()
        );
        Some((forward, port))
    } else {
        None
    };
    Ok(AdiSetup {
        url_base: format!("{hub_url}/proxy/{device_id}/web"),
        hub,
        cocoon,
        jwt,
        forward,
    })
}

/// The rathole binary: given, cached, or built now with `cargo install`.
async fn find_or_install_rathole(opts: &Options) -> Result<PathBuf> {
    if let Some(path) = &opts.rathole {
        ensure!(path.is_file(), "no rathole at {}", path.display());
        return Ok(path.clone());
    }
    // CARGO_BIN_EXE_adi is <target dir>/<profile>/adi.
    let target_dir = Path::new(ADI)
        .parent()
        .and_then(Path::parent)
        .context("cannot tell the target dir from the adi binary's path")?;
    let cache = target_dir.join("bench-tools").join("rathole");
    let cached = cache.join("bin").join("rathole");
    if cached.is_file() {
        eprintln!("rathole: using the cached {}", cached.display());
        return Ok(cached);
    }
    let root = tempfile::Builder::new()
        .prefix("adi-bench-rathole-")
        .tempdir()
        .context("creating a temp dir for cargo install")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!(
        "rathole: not cached at {}; building it with `cargo install rathole --version \
         {RATHOLE_VERSION} --root {}` (first run only, takes several minutes)",
        cached.display(),
        root.path().display()
    );
    let status = tokio::process::Command::new(cargo)
        .args(["install", "rathole", "--version", RATHOLE_VERSION, "--root"])
        .arg(root.path())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .context("running cargo install rathole")?;
    ensure!(status.success(), "cargo install rathole failed ({status})");
    fs::create_dir_all(cached.parent().context("cache path has no parent")?)
        .context("creating the rathole cache dir")?;
    fs::copy(root.path().join("bin").join("rathole"), &cached)
        .context("copying rathole into the cache")?;
    eprintln!("rathole: cached at {}", cached.display());
    Ok(cached)
}

/// Starts a rathole server and client on loopback forwarding a port to the service.
async fn start_rathole(
    opts: &Options,
    dir: &Path,
    bin: &Path,
    service_port: u16,
) -> Result<RatholeSetup> {
    // `rathole --version` prints a build report; the version is on its own line.
    let version = Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Build Version:"))
                .map(|v| format!("rathole {}", v.trim()))
        })
        .unwrap_or_else(|| "rathole (version unknown)".to_owned());
    let control = free_port()?;
    let exposed = free_port()?;
    let token = uuid::Uuid::new_v4().simple().to_string();
    let server_toml = dir.join("rathole-server.toml");
    let client_toml = dir.join("rathole-client.toml");
    fs::write(
        &server_toml,
        format!(
            "[server]\nbind_addr = \"127.0.0.1:{control}\"\n\n\
             [server.services.web]\ntoken = \"{token}\"\nbind_addr = \"127.0.0.1:{exposed}\"\n"
        ),
    )?;
    fs::write(
        &client_toml,
        format!(
            "[client]\nremote_addr = \"127.0.0.1:{control}\"\n\n\
             [client.services.web]\ntoken = \"{token}\"\nlocal_addr = \"127.0.0.1:{service_port}\"\n"
        ),
    )?;
    let spawn = |name: &'static str, mode: &str, config: &Path| {
        let mut cmd = Command::new(bin);
        cmd.arg(mode).arg(config);
        if let Some(filter) = &opts.rust_log {
            cmd.env("RUST_LOG", filter);
        }
        Proc::spawn(name, &mut cmd, dir)
    };
    let mut server = spawn("rathole server", "--server", &server_toml)?;
    let mut client = spawn("rathole client", "--client", &client_toml)?;
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()?;
    let url = format!("http://127.0.0.1:{exposed}/1k");
    wait_until(
        "rathole to forward to the service",
        Duration::from_secs(30),
        &mut [&mut server, &mut client],
        || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let ok = match http.get(url).send().await {
                    Ok(r) if r.status().is_success() => {
                        r.bytes().await.is_ok_and(|b| b.len() == 1024)
                    }
                    _ => false,
                };
                Ok(ok.then_some(()))
            }
        },
    )
    .await?;
    eprintln!(
        "{version}: server pid {} (control 127.0.0.1:{control}, service exposed at \
         127.0.0.1:{exposed}), client pid {}",
        server.pid(),
        client.pid()
    );
    Ok(RatholeSetup {
        server,
        client,
        port: exposed,
        version,
    })
}

/// Polls `f` until it yields something, for at most `deadline`; fails at once if one
/// of `procs` has exited.
async fn wait_until<T, F, Fut>(
    what: &str,
    deadline: Duration,
    procs: &mut [&mut Proc],
    mut f: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let until = Instant::now() + deadline;
    let mut last_err = None;
    loop {
        for p in procs.iter_mut() {
            p.check_alive()?;
        }
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= until {
            return Err(match last_err {
                Some(e) => e.context(format!("waiting for {what}")),
                None => anyhow!("timed out after {deadline:?} waiting for {what}"),
            });
        }
        sleep(Duration::from_millis(100)).await;
    }
}

fn free_port() -> Result<u16> {
    let l = StdTcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

fn run_line(r: &Run) -> String {
    let statuses: String = r
        .load
        .bad_statuses
        .iter()
        .map(|(s, (n, text))| format!(" [{n} x {s} {text}]"))
        .collect();
    format!(
        "{:.0} req/s, p50 {}, p99 {}, max {}, {:.1} MiB/s, {} errors{statuses}; CPU % server {} \
         device {} service {:.0} load {}; machine {:.2} cores busy, {:.2} of them other",
        r.load.rps(),
        fmt_us(r.load.p50_us),
        fmt_us(r.load.p99_us),
        fmt_us(r.load.max_us),
        r.load.mib_per_sec(),
        r.load.errors,
        opt_pct(r.cpu_server),
        opt_pct(r.cpu_device),
        r.cpu_service,
        opt_pct(r.cpu_load),
        r.machine_busy_cores,
        r.other_cores,
    )
}

fn opt_pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"))
}

fn fmt_us(us: f64) -> String {
    if us >= 1_000_000.0 {
        format!("{:.2} s", us / 1e6)
    } else if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn median(v: Vec<f64>) -> Option<f64> {
    let m = support::median(v);
    (!m.is_nan()).then_some(m)
}

/// CPU time per request of one side, in µs.
fn cpu_us_per_request(pct: Option<f64>, r: &LoadResult) -> String {
    match pct {
        Some(p) if r.rps() > 0.0 => format!("{:.0}", p / 100.0 * 1e6 / r.rps()),
        _ => "-".to_owned(),
    }
}

/// A device side's figure, with ` + ` the client side's where the path has one.
fn with_client(device: String, client: Option<f64>, r: &LoadResult) -> String {
    match client {
        Some(_) => format!("{device} + {}", cpu_us_per_request(client, r)),
        None => device,
    }
}

fn write_report(
    out: &mut String,
    opts: &Options,
    generator: &str,
    rathole_version: Option<&str>,
    cpus: usize,
    runs: &[Run],
    memory: &[(&str, u64, (u64, u64))],
) -> Result<()> {
    writeln!(
        out,
        "{} connections, {} s per run after a {} s warm-up, load generator {generator}, \
         {cpus} CPUs{}",
        opts.connections,
        opts.duration.as_secs(),
        opts.warmup.as_secs(),
        rathole_version.map_or_else(String::new, |v| format!(", {v}"))
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| size | path | round | req/s | p50 | p99 | max | MiB/s | errors | CPU % server side | CPU % device side | CPU % service | CPU % load gen | cores busy | CPU µs/req server + device | of it in the kernel |"
    )?;
    writeln!(
        out,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )?;
    for r in runs {
        writeln!(
            out,
            "| {} | {} | {} | {:.0} | {} | {} | {} | {:.1} | {} | {} | {} | {:.0} | {} | {:.2} ({:.2}) | {} + {} | {} + {} |",
            r.size.label(),
            r.route.label(),
            r.round,
            r.load.rps(),
            fmt_us(r.load.p50_us),
            fmt_us(r.load.p99_us),
            fmt_us(r.load.max_us),
            r.load.mib_per_sec(),
            r.load.errors,
            opt_pct(r.cpu_server),
            opt_pct(r.cpu_device),
            r.cpu_service,
            opt_pct(r.cpu_load),
            r.machine_busy_cores,
            r.other_cores,
            cpu_us_per_request(r.cpu_server, &r.load),
            with_client(cpu_us_per_request(r.cpu_device, &r.load), r.cpu_client, &r.load),
            cpu_us_per_request(r.sys_server, &r.load),
            with_client(cpu_us_per_request(r.sys_device, &r.load), r.sys_client, &r.load),
        )?;
    }
    let noisy: Vec<String> = runs
        .iter()
        .filter(|r| r.other_cores > NOISY_CORES)
        .map(|r| {
            format!(
                "{} via {} ({:.2} cores)",
                r.size.label(),
                r.route.label(),
                r.other_cores
            )
        })
        .collect();
    if !noisy.is_empty() {
        writeln!(out)?;
        writeln!(
            out,
            "WARNING: other processes used the CPU during {}; those figures are unreliable \
             (the summary leaves them out where it has undisturbed runs of the same kind).",
            noisy.join(", ")
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "Server side is the hub or the rathole server, device side the cocoon or the rathole client. RSS in MiB, before the run / peak during it / 1 s after it:"
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| size | path | round | server side RSS | device side RSS |"
    )?;
    writeln!(out, "|---|---|---|---|---|")?;
    let fmt_rss = |r: Option<Rss>| {
        r.map_or_else(
            || "-".to_owned(),
            |r| format!("{} / {} / {}", mib(r.before), mib(r.peak), mib(r.after)),
        )
    };
    for r in runs.iter().filter(|r| r.route != Route::Direct) {
        writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            r.size.label(),
            r.route.label(),
            r.round,
            fmt_rss(r.rss_server),
            fmt_rss(r.rss_device)
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "| process | RSS idle (before any load) | RSS at the end | peak (VmHWM) |"
    )?;
    writeln!(out, "|---|---|---|---|")?;
    for (name, idle, (end, hwm)) in memory {
        writeln!(
            out,
            "| {name} | {} MiB | {} MiB | {} MiB |",
            mib(*idle),
            mib(*end),
            mib(*hwm)
        )?;
    }

    // Targets, on the medians over rounds; runs disturbed by other work on the machine
    // are left out when there are undisturbed ones of the same kind.
    let med = |size: Size, route: Route, f: fn(&LoadResult) -> f64| {
        median(pick(runs, size, route).iter().map(|r| f(&r.load)).collect())
    };
    // CPU µs per request of all of a path's own processes, median over its runs.
    let cpu_per_request = |size: Size, route: Route| {
        median(
            pick(runs, size, route)
                .iter()
                .filter(|r| r.load.rps() > 0.0)
                .filter_map(|r| {
                    let all = r.cpu_server? + r.cpu_device? + r.cpu_client.unwrap_or(0.0);
                    Some(all / 100.0 * 1e6 / r.load.rps())
                })
                .collect(),
        )
    };
    let verdict = |met: bool| if met { "met" } else { "**missed**" };
    writeln!(out)?;
    writeln!(
        out,
        "Targets, on medians over rounds: req/s at least rathole's; p99, CPU per request \
         (every process of the path: hub + cocoon, + adi proxy for raw TCP; rathole server + \
         client) and the p50 added over the direct path at most rathole's."
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| size | path | req/s | × rathole (≥ 1) | p99 | × rathole (≤ 1) | CPU µs/req | × rathole (≤ 1) | p50 added over direct | rathole's (≥ it) |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|---|---|---|")?;
    for &size in &opts.sizes {
        let rps = |route| med(size, route, LoadResult::rps);
        let p50 = |route| med(size, route, |l| l.p50_us);
        let p99 = |route| med(size, route, |l| l.p99_us);
        let show = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
        for route in [Route::Adi, Route::AdiTcp] {
            let Some(own) = rps(route) else { continue };
            let ratio = |a: Option<f64>, r: Option<f64>, higher_is_better: bool| match (a, r) {
                (Some(a), Some(r)) if r > 0.0 => {
                    let x = a / r;
                    format!(
                        "{x:.2} {}",
                        verdict(if higher_is_better { x >= 1.0 } else { x <= 1.0 })
                    )
                }
                _ => "-".to_owned(),
            };
            let added = |route| Some(p50(route)? - p50(Route::Direct)?);
            let added_verdict = match (added(route), added(Route::Rathole)) {
                (Some(a), Some(r)) => format!("{} {}", fmt_us(r.max(0.0)), verdict(a <= r)),
                _ => "-".to_owned(),
            };
            writeln!(
                out,
                "| {} | {} | {own:.0} | {} | {} | {} | {} | {} | {} | {added_verdict} |",
                size.label(),
                route.label(),
                ratio(Some(own), rps(Route::Rathole), true),
                p99(route).map_or_else(|| "-".to_owned(), fmt_us),
                ratio(p99(route), p99(Route::Rathole), false),
                show(cpu_per_request(size, route)),
                ratio(
                    cpu_per_request(size, route),
                    cpu_per_request(size, Route::Rathole),
                    false
                ),
                added(route).map_or_else(|| "-".to_owned(), |a| fmt_us(a.max(0.0))),
            )?;
        }
        if let (Some(r), Some(d)) = (rps(Route::Rathole), rps(Route::Direct)) {
            writeln!(
                out,
                "| {} | rathole (direct) | {r:.0} ({d:.0}) | | {} | | {} | | {} | |",
                size.label(),
                p99(Route::Rathole).map_or_else(|| "-".to_owned(), fmt_us),
                show(cpu_per_request(size, Route::Rathole)),
                match (p50(Route::Rathole), p50(Route::Direct)) {
                    (Some(r), Some(d)) => fmt_us((r - d).max(0.0)),
                    _ => "-".to_owned(),
                }
            )?;
        }
    }
    write_ceiling(out, opts, runs)
}

/// The runs of one kind the summary uses: the undisturbed ones, or all of them when
/// every one was disturbed.
fn pick(runs: &[Run], size: Size, route: Route) -> Vec<&Run> {
    let same: Vec<&Run> = runs
        .iter()
        .filter(|r| r.size == size && r.route == route)
        .collect();
    let clean: Vec<&Run> = same
        .iter()
        .copied()
        .filter(|r| r.other_cores <= NOISY_CORES)
        .collect();
    if clean.is_empty() {
        same
    } else {
        clean
    }
}

/// What one request costs, in CPU µs, on the way through a proxy (medians over rounds).
#[derive(Debug, Clone, Copy)]
struct Ceiling {
    /// Service and load generator, in the rathole run: the same for every path.
    ends: f64,
    /// rathole's server and client together.
    rathole: f64,
    /// The kernel's work for one HTTP exchange (service and load generator in the
    /// direct run): a proxy that terminates HTTP receives each request and sends each
    /// answer on the client's connection, and sends and receives them again on a
    /// connection to the service, so it does at least this much per request, whatever
    /// it does in userland and however its link between the two sides batches.
    exchange_kernel: f64,
}

impl Ceiling {
    /// The most req/s, as a multiple of rathole's, that a proxy doing nothing but that
    /// kernel work could reach on this machine, with every core busy as in these runs.
    fn ratio(&self) -> f64 {
        (self.ends + self.rathole) / (self.ends + self.exchange_kernel)
    }
}

fn ceiling(runs: &[Run], size: Size) -> Option<Ceiling> {
    let per_request = |route: Route, f: fn(&Run) -> Option<f64>| {
        median(
            pick(runs, size, route)
                .iter()
                .filter(|r| r.load.rps() > 0.0)
                .filter_map(|r| f(r).map(|pct| pct / 100.0 * 1e6 / r.load.rps()))
                .collect(),
        )
    };
    Some(Ceiling {
        ends: per_request(Route::Rathole, |r| Some(r.cpu_service + r.cpu_load?))?,
        rathole: per_request(Route::Rathole, |r| Some(r.cpu_server? + r.cpu_device?))?,
        exchange_kernel: per_request(Route::Direct, |r| Some(r.sys_service + r.sys_load?))?,
    })
}

/// Where a proxy that terminates HTTP at both ends can get at best, from this run's own
/// figures: what limits the req/s targets on this machine.
fn write_ceiling(out: &mut String, opts: &Options, runs: &[Run]) -> Result<()> {
    let rows: Vec<(Size, Ceiling)> = opts
        .sizes
        .iter()
        .filter_map(|&s| ceiling(runs, s).map(|c| (s, c)))
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(out)?;
    writeln!(
        out,
        "Ceiling: CPU µs per request of the parts every path shares (service and load \
         generator), of rathole, and of the kernel's work for one HTTP exchange (the direct \
         run's service and load generator, in the kernel). A proxy that terminates HTTP \
         does that exchange's socket work once more per request, so even with no other \
         work it reaches at most (shared + rathole) / (shared + exchange) of rathole's \
         req/s while the cores are saturated:"
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| size | shared | rathole | one exchange, kernel | at most, adi / rathole req/s |"
    )?;
    writeln!(out, "|---|---|---|---|---|")?;
    for (size, c) in rows {
        writeln!(
            out,
            "| {} | {:.0} | {:.0} | {:.0} | {:.2} |",
            size.label(),
            c.ends,
            c.rathole,
            c.exchange_kernel,
            c.ratio()
        )?;
    }
    Ok(())
}

/// Resident set size of a process in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS:")
}

/// Peak resident set size of a process in KiB (`VmHWM`).
fn hwm_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))
}

/// CPU time (user + system, all threads) of a process, in clock ticks.
/// A process's CPU time in clock ticks: all of it, and the part in the kernel.
#[derive(Debug, Clone, Copy)]
struct CpuTicks {
    total: u64,
    system: u64,
}

fn cpu_split(pid: u32) -> Result<CpuTicks> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may contain spaces; the fields after it are numbers.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))?;
    // After ")": state(3) ppid(4) ... utime(14) stime(15).
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))
    };
    let (user, system) = (field(11)?, field(12)?);
    Ok(CpuTicks {
        total: user + system,
        system,
    })
}

/// The machine's (busy, total) CPU ticks from `/proc/stat`.
fn machine_ticks() -> Result<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok((total.saturating_sub(idle), total))
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

/// The built-in closed-loop load generator: one task per connection, each with its own
/// keep-alive HTTP/1.1 connection, sending the next request as soon as the previous
/// response is read in full.
mod builtin {
    use super::{LoadResult, Target, LOAD_TIMEOUT};
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use anyhow::{bail, ensure, Context, Result};
    use bytes::{Buf, BytesMut};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::time::sleep;

    /// What one connection measured.
    #[derive(Default)]
    struct ConnStats {
        latencies_us: Vec<u32>,
        bytes: u64,
        errors: u64,
        bad_statuses: BTreeMap<u16, (u64, String)>,
        last_done: Option<Instant>,
    }

    pub(super) async fn run(
        target: &Target<'_>,
        connections: usize,
        duration: Duration,
    ) -> Result<LoadResult> {
        let url = reqwest::Url::parse(target.url).context("parsing the target URL")?;
        let host = url.host_str().context("URL without host")?.to_owned();
        let port = url.port_or_known_default().context("URL without port")?;
        let path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        let mut request = format!("GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n");
        if !target.jwt.is_empty() {
            request.push_str(&format!("Authorization: Bearer {}\r\n", target.jwt));
        }
        request.push_str("\r\n");
        let request: Arc<[u8]> = request.into_bytes().into();
        let addr = format!("{host}:{port}");
        let start = Instant::now();
        let end = start + duration;
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..connections {
            let request = request.clone();
            let addr = addr.clone();
            tasks.spawn(async move { connection(&addr, &request, end).await });
        }
        let mut all = Vec::new();
        let mut bytes = 0;
        let mut errors = 0;
        let mut bad_statuses = BTreeMap::new();
        let mut last = start;
        while let Some(stats) = tasks.join_next().await {
            let stats = stats.context("a load task failed")?;
            all.extend_from_slice(&stats.latencies_us);
            bytes += stats.bytes;
            errors += stats.errors;
            for (status, (n, text)) in stats.bad_statuses {
                bad_statuses.entry(status).or_insert((0, text)).0 += n;
            }
            if let Some(t) = stats.last_done {
                last = last.max(t);
            }
        }
        all.sort_unstable();
        let pct = |q: f64| -> f64 {
            if all.is_empty() {
                return 0.0;
            }
            let rank = ((q * all.len() as f64).ceil() as usize).clamp(1, all.len());
            f64::from(all[rank - 1])
        };
        Ok(LoadResult {
            requests: (all.len() as u64)
                .saturating_sub(bad_statuses.values().map(|(n, _)| n).sum()),
            seconds: last.duration_since(start).as_secs_f64().max(1e-3),
            bytes,
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            max_us: all.last().map_or(0.0, |&v| f64::from(v)),
            errors,
            bad_statuses,
        })
    }

    async fn connection(addr: &str, request: &[u8], end: Instant) -> ConnStats {
        let mut stats = ConnStats::default();
        let mut buf = BytesMut::with_capacity(64 * 1024);
        'reconnect: while Instant::now() < end {
            let mut stream = match TcpStream::connect(addr).await {
                Ok(s) => s,
                Err(_) => {
                    stats.errors += 1;
                    sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            buf.clear();
            while Instant::now() < end {
                let t0 = Instant::now();
                let answer =
                    tokio::time::timeout(LOAD_TIMEOUT, exchange(&mut stream, request, &mut buf))
                        .await;
                match answer {
                    Ok(Ok((status, len, text))) => {
                        let done = Instant::now();
                        let us = done.duration_since(t0).as_micros();
                        stats
                            .latencies_us
                            .push(u32::try_from(us).unwrap_or(u32::MAX));
                        stats.bytes += len as u64;
                        stats.last_done = Some(done);
                        if !(200..400).contains(&status) {
                            stats.errors += 1;
                            let entry = stats
                                .bad_statuses
                                .entry(status)
                                .or_insert_with(|| (0, text.unwrap_or_default()));
                            entry.0 += 1;
                        }
                    }
                    _ => {
                        stats.errors += 1;
                        continue 'reconnect;
                    }
                }
            }
        }
        stats
    }

    /// Sends one request and reads its response; returns status and body length.
    async fn exchange(
        stream: &mut TcpStream,
        request: &[u8],
        buf: &mut BytesMut,
    ) -> Result<(u16, usize, Option<String>)> {
        stream.write_all(request).await?;
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            ensure!(buf.len() < 64 * 1024, "response head over 64 KiB");
            if stream.read_buf(buf).await? == 0 {
                bail!("connection closed");
            }
        };
        let head = std::str::from_utf8(&buf[..head_end]).context("response head")?;
        let status: u16 = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .context("no status")?;
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .context("response without content-length")?;
        if !(200..400).contains(&status) && len <= 4096 {
            // Keep a refusal's text: it says why.
            while buf.len() < head_end + len {
                if stream.read_buf(buf).await? == 0 {
                    bail!("connection closed in the body");
                }
            }
            let text = String::from_utf8_lossy(&buf[head_end..head_end + len]).into_owned();
            buf.advance(head_end + len);
            return Ok((status, len, Some(text)));
        }
        let have = buf.len() - head_end;
        if have >= len {
            buf.advance(head_end + len);
            return Ok((status, len, None));
        }
        let mut remaining = len - have;
        buf.clear();
        while remaining > 0 {
            buf.reserve(64 * 1024);
            let n = stream.read_buf(buf).await?;
            if n == 0 {
                bail!("connection closed in the body");
            }
            if n > remaining {
                buf.advance(remaining);
                remaining = 0;
            } else {
                remaining -= n;
                buf.clear();
            }
        }
        Ok((status, len, None))
    }
}

/// The upstream service, run as a separate process so it does not share a runtime
/// with the load generator.
mod upstream {
    use std::fs;
    use std::path::Path;

    use anyhow::{Context, Result};
    use axum::routing::get;
    use axum::serve::ListenerExt;
    use bytes::Bytes;

    pub(super) fn run(port_file: &Path) -> Result<()> {
        // The bench holds our stdin; when it goes away (even killed), so do we.
        std::thread::spawn(|| {
            let mut sink = [0u8; 64];
            let mut stdin = std::io::stdin();
            while std::io::Read::read(&mut stdin, &mut sink).is_ok_and(|n| n > 0) {}
            std::process::exit(0);
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the service runtime")?;
        runtime.block_on(async {
            let small = Bytes::from(vec![b'k'; 1024]);
            let large = Bytes::from(vec![b'm'; 1024 * 1024]);
            let app = axum::Router::new()
                .route("/1k", get(move || std::future::ready(small.clone())))
                .route("/1m", get(move || std::future::ready(large.clone())));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .context("binding the service")?;
            let port = listener.local_addr()?.port();
            let tmp = port_file.with_extension("tmp");
            fs::write(&tmp, port.to_string())?;
            fs::rename(&tmp, port_file)?;
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(listener, app).await.context("serving")?;
            Ok(())
        })
    }
}
