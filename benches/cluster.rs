//! Several hubs as one cluster: what it costs to reach a device through a hub it is not
//! connected to, how fast the hubs agree on who is online, and how fast a killed hub's
//! devices are back on the others. Five sections, in one run:
//!
//! 1. **proxy**: proxied HTTP (`GET /proxy/{device}/web/1k` and `/1m`, 1 KiB and 1 MiB
//!    bodies) through hub A, where the device is connected (same hub), and through hub
//!    B, which forwards each request whole to hub A over HTTP (across hubs). The device
//!    is a real cocoon process (`adi cocoon run --service web:PORT`); the service is an
//!    axum server in this process. The load is `wrk` (with a Lua `done` hook that prints
//!    exact counts and percentiles), or without it a closed-loop generator in this
//!    process: one task and one keep-alive HTTP/1.1 connection per connection. Reports
//!    req/s, p50, p99, CPU per request of hub A, hub B, the cocoon and PostgreSQL with
//!    NATS, and the ratios across/same.
//! 2. **capabilities**: `POST /api/capabilities/embeddings/request` to hub A and to hub
//!    B (which makes one internal HTTP call to hub A per request), served by the same
//!    cocoon through a plugin manifest that points at an HTTP endpoint in this process;
//!    the same load generator. Reports req/s, p50, p99 and the ratios.
//! 3. **transport**: the data path between hubs, an HTTP/1.1 hop against NATS. A bare
//!    request whose reply is 1 KiB or 1 MiB, through the machine's `nats-server`
//!    (async-nats: one requesting connection, one responder task, as a hub has one NATS
//!    connection) and over one HTTP/1.1 hop between two tokio tasks of this process
//!    (axum server, pooled hyper client, as the hubs' own client), at the same
//!    concurrency. Reports req/s and p50, p99.
//! 4. **presence**: N simulated devices (default 10,000) spread over the three hubs,
//!    each a tokio task speaking the real protocol (`register` with its own random
//!    secret, a setup token minted through `POST /api/tokens` the first time, then a
//!    `heartbeat` and a ping every interval). Reports the time from the last device
//!    registered until every hub's `GET /api/hubs` says it `sees` all of them (each hub
//!    polled every 50 ms). The first round enrols the devices; later rounds reconnect
//!    them with their secrets.
//! 5. **failover**: F simulated devices (default 1,000) on hub A, each with the hubs
//!    `A, B, C` (every other device `A, C, B`) and the real cocoon's reconnect policy:
//!    on a lost connection, the next hub of its list after `CocoonConfig::backoff` of
//!    the round of hubs it is in. Hub A gets SIGKILL. Reports, from the kill: every
//!    device registered again (as the simulator sees it), every device held by a
//!    surviving hub (their own `devices` counts), the dead hub gone from each survivor's
//!    list, and every surviving hub seeing exactly the F devices with the dead hub
//!    forgotten. Each round kills hub A and starts a new hub in its place.
//!
//! The cluster is three hub processes (`adi signaling serve --database-url ... --nats
//! ...`, release build) on one fresh PostgreSQL database (made by
//! `adi_storage::test_database::TestPostgres` on `ADI_TEST_POSTGRES_URL`, default the
//! machine's server at 127.0.0.1:5432) and the machine's NATS (`--nats`, default
//! `nats://127.0.0.1:4222`). Every section's figures are medians over `--rounds` rounds
//! (an odd number, so each median is one round's figure); the proxy and capability runs
//! alternate their order from round to round. Around each load run of sections 1 to 3
//! the bench also reads the machine's CPU time (`/proc/stat`) and that of every process
//! (`/proc/PID/stat`). PostgreSQL and NATS serve the hubs: their CPU per request is
//! reported. Kernel threads, interrupts and softirq mostly carry the bench's own loopback
//! traffic. The rest is other work: a run during which it took more than a quarter of a
//! core is disturbed and measured again, up to three times; one still disturbed is left
//! out of the medians where quiet runs of the same path exist.
//!
//! ```text
//! cargo bench --bench cluster
//! cargo bench --bench cluster -- --duration 5s --warmup 1s --rounds 3 --only proxy,presence
//! ```
//!
//! Options: `--rounds N` (default 3), `--duration D` (measured window per load run,
//! whole seconds, default 10s), `--warmup D` (default 2s), `--concurrency N`
//! (connections of the proxy load, capability clients, requesters of the transport
//! section; default 16), `--threads N` (wrk threads, default 1), `--load
//! auto|wrk|builtin`, `--devices N` (presence, default 10000), `--failover-devices N`
//! (default 1000), `--heartbeat-interval D` (hubs and simulated devices, default 5s),
//! `--connect-concurrency N` (devices making their first connection at once, default
//! 128), `--mint-concurrency N` (setup-token requests in flight, default 32), `--nats
//! URL`, `--only proxy,capabilities,transport,presence,failover`. Unknown flags (such as
//! the `--bench` cargo adds) are ignored. Hubs log at `warn` (`ADI_BENCH_RUST_LOG`
//! changes it). The bench raises its `RLIMIT_NOFILE` to the hard limit: it holds one
//! socket per simulated device.
//!
//! This is a benchmark, not a test: it asserts nothing about the figures. It listens on
//! loopback only, kills every process it started and drops its database, also on error
//! and on Ctrl-C. Figures and their discussion are in `BENCHMARKS.md`.

mod support;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use adi_cocoon::CocoonConfig;
use adi_protocol::{
    decode, encode, DeviceSecret, DeviceToHub, ErrorCode, Heartbeat, HubToDevice, Register,
    DEFAULT_MAX_FRAME_BYTES, SUPPORTED_VERSIONS,
};
use adi_storage::test_database::TestPostgres;
use anyhow::{anyhow, bail, ensure, Context, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use rand::{Rng, RngCore};
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep, timeout};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use support::{clock_ticks_per_second, cpu_ticks, median, quantile, HubApi, HubProcess, ADI};

/// Hubs in the cluster.
const HUBS: usize = 3;
/// How often each hub's `/api/hubs` is read while waiting for it to agree.
const POLL: Duration = Duration::from_millis(50);
/// A load request slower than this is an error, not a latency.
const LOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a simulated device waits to connect or for the answer to its registration,
/// as the real cocoon does.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeat intervals without a frame from the hub before a device gives up on the
/// connection, as the real cocoon does.
const SILENT_INTERVALS: u32 = 3;
/// Read buffer of each simulated device's socket; this process is not measured.
const CLIENT_READ_BUFFER: usize = 4096;
/// How long the hubs may take to agree before a wait gives up.
const AGREE_TIMEOUT: Duration = Duration::from_secs(60);
/// Busy cores unaccounted for above which a load run counts as disturbed.
const NOISY_CORES: f64 = 0.25;
/// How many times a disturbed load run is measured again before it is kept as it is.
const RERUNS: usize = 3;
/// How the section tables treat disturbed runs.
const DISTURBED_NOTE: &str = "A run during which other processes on the machine (not the \
    hubs, the cocoon, this process, wrk, PostgreSQL or NATS; kernel threads not counted) used \
    more than a quarter of a core is disturbed: it is measured again, up to 3 times, and one \
    still disturbed is left out of the medians where quiet runs of the same path exist.";
/// The capability the cocoon offers.
const PROTOCOL: &str = "embeddings";
/// What the plugin endpoint answers.
const EMBEDDING: &str = r#"{"vector":[1.0,0.5,-1.0]}"#;
/// The body of each capability request.
const CAPABILITY_BODY: &str = r#"{"payload":{"text":"hello"}}"#;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = Options::parse(&args)?;
    let limit = rlimit::increase_nofile_limit(u64::MAX).context("raising RLIMIT_NOFILE")?;
    let wanted = opts.devices.max(opts.failover_devices) as u64 + 512;
    if limit < wanted {
        eprintln!("warning: RLIMIT_NOFILE is {limit}; {wanted} descriptors are wanted");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        let db = if opts.needs_cluster() {
            let db = TestPostgres::create("cluster bench")
                .await
                .context("PostgreSQL is unreachable (ADI_TEST_POSTGRES_URL)")?;
            Some(db)
        } else {
            None
        };
        let url = db.as_ref().map(TestPostgres::url);
        // The bench future owns every process it starts, each killed on drop: it ends
        // (done, failed, panicked or interrupted) before the database is dropped.
        let outcome = tokio::select! {
            r = std::panic::AssertUnwindSafe(bench(&opts, url.as_deref())).catch_unwind() => {
                r.unwrap_or_else(|_| Err(anyhow!("the bench panicked")))
            }
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        };
        if let Some(db) = db {
            db.drop_database().await;
        }
        outcome
    })
}

// ---------------------------------------------------------------------------------------
// Options.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Proxy,
    Capabilities,
    Transport,
    Presence,
    Failover,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    Auto,
    Wrk,
    Builtin,
}

#[derive(Debug, Clone)]
struct Options {
    rounds: usize,
    duration: Duration,
    warmup: Duration,
    concurrency: usize,
    threads: usize,
    load: Load,
    devices: usize,
    failover_devices: usize,
    heartbeat: Duration,
    connect_concurrency: usize,
    mint_concurrency: usize,
    nats: String,
    sections: Vec<Section>,
}

impl Options {
    fn parse(args: &[String]) -> Result<Self> {
        let mut opts = Options {
            rounds: 3,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            concurrency: 16,
            // One thread is plenty for the rates here. On a 2-core host a second one,
            // competing with three hubs and the cocoon, left about 1 % of wrk's
            // across-hub capability requests waiting 200-500 ms to be read (4.9 ms with
            // one thread, 6.8 ms with the built-in generator).
            threads: 1,
            load: Load::Auto,
            devices: 10_000,
            failover_devices: 1_000,
            heartbeat: Duration::from_secs(5),
            connect_concurrency: 128,
            mint_concurrency: 32,
            nats: "nats://127.0.0.1:4222".into(),
            sections: vec![
                Section::Transport,
                Section::Proxy,
                Section::Capabilities,
                Section::Presence,
                Section::Failover,
            ],
        };
        let mut i = 0;
        while i < args.len() {
            let (flag, inline) = match args[i].split_once('=') {
                Some((f, v)) => (f, Some(v.to_owned())),
                None => (args[i].as_str(), None),
            };
            let known = matches!(
                flag,
                "--rounds"
                    | "--duration"
                    | "--warmup"
                    | "--concurrency"
                    | "--threads"
                    | "--load"
                    | "--devices"
                    | "--failover-devices"
                    | "--heartbeat-interval"
                    | "--connect-concurrency"
                    | "--mint-concurrency"
                    | "--nats"
                    | "--only"
            );
            if !known {
                // `cargo bench` adds `--bench`; anything else unknown is ignored too.
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
            let duration = || humantime::parse_duration(&value).with_context(bad);
            match flag {
                "--rounds" => opts.rounds = value.parse().with_context(bad)?,
                "--duration" => opts.duration = duration()?,
                "--warmup" => opts.warmup = duration()?,
                "--concurrency" => opts.concurrency = value.parse().with_context(bad)?,
                "--threads" => opts.threads = value.parse().with_context(bad)?,
                "--load" => {
                    opts.load = match value.as_str() {
                        "auto" => Load::Auto,
                        "wrk" => Load::Wrk,
                        "builtin" => Load::Builtin,
                        _ => bail!("{}", bad()),
                    }
                }
                "--devices" => opts.devices = value.parse().with_context(bad)?,
                "--failover-devices" => opts.failover_devices = value.parse().with_context(bad)?,
                "--heartbeat-interval" => opts.heartbeat = duration()?,
                "--connect-concurrency" => {
                    opts.connect_concurrency = value.parse().with_context(bad)?
                }
                "--mint-concurrency" => opts.mint_concurrency = value.parse().with_context(bad)?,
                "--nats" => opts.nats = value,
                _ => {
                    opts.sections = value
                        .split(',')
                        .map(|s| match s.trim() {
                            "proxy" => Ok(Section::Proxy),
                            "capabilities" => Ok(Section::Capabilities),
                            "transport" => Ok(Section::Transport),
                            "presence" => Ok(Section::Presence),
                            "failover" => Ok(Section::Failover),
                            _ => Err(anyhow!("{}", bad())),
                        })
                        .collect::<Result<_>>()?
                }
            }
            i += 1;
        }
        ensure!(opts.rounds > 0, "--rounds must be at least 1");
        ensure!(
            opts.duration >= Duration::from_secs(1) && opts.duration.subsec_nanos() == 0,
            "--duration must be whole seconds, at least 1s (wrk counts in seconds)"
        );
        ensure!(
            opts.warmup.subsec_nanos() == 0,
            "--warmup must be whole seconds"
        );
        ensure!(opts.concurrency > 0, "--concurrency must be at least 1");
        ensure!(
            opts.devices > 0 && opts.failover_devices > 0,
            "--devices and --failover-devices must be at least 1"
        );
        ensure!(
            opts.connect_concurrency > 0 && opts.mint_concurrency > 0,
            "--connect-concurrency and --mint-concurrency must be at least 1"
        );
        ensure!(
            opts.threads > 0 && opts.threads <= opts.concurrency,
            "--threads must be 1 to --concurrency"
        );
        if opts.rounds % 2 != 1 {
            eprintln!("note: an even --rounds gives medians between two rounds' figures");
        }
        Ok(opts)
    }

    fn wants(&self, s: Section) -> bool {
        self.sections.contains(&s)
    }

    fn needs_cluster(&self) -> bool {
        self.sections.iter().any(|&s| s != Section::Transport)
    }
}

// ---------------------------------------------------------------------------------------
// Figures and the report.

/// One load run's figures.
#[derive(Debug, Clone, Default)]
struct LoadResult {
    /// Answers with a 2xx or 3xx status.
    requests: u64,
    seconds: f64,
    p50_us: f64,
    p99_us: f64,
    /// Failed requests and answers with another status.
    errors: u64,
}

impl LoadResult {
    fn rps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests as f64 / self.seconds
        } else {
            0.0
        }
    }

    fn from_latencies(mut lat: Vec<u32>, seconds: f64, errors: u64) -> Self {
        lat.sort_unstable();
        LoadResult {
            requests: lat.len() as u64,
            seconds,
            p50_us: f64::from(quantile(&lat, 0.50)),
            p99_us: f64::from(quantile(&lat, 0.99)),
            errors,
        }
    }
}

/// Medians of a measure over rounds.
#[derive(Debug, Clone, Copy, Default)]
struct Medians {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
}

fn medians(runs: &[LoadResult]) -> Medians {
    Medians {
        rps: median(runs.iter().map(LoadResult::rps).collect()),
        p50_us: median(runs.iter().map(|r| r.p50_us).collect()),
        p99_us: median(runs.iter().map(|r| r.p99_us).collect()),
        errors: runs.iter().map(|r| r.errors).sum(),
    }
}

/// A row of the summary, in `BENCHMARKS.md`'s columns.
struct Row {
    measure: String,
    adi: String,
    peer: String,
    ratio: String,
    target: String,
    met: String,
}

impl Row {
    fn new(measure: impl Into<String>, adi: impl Into<String>) -> Self {
        Row {
            measure: measure.into(),
            adi: adi.into(),
            peer: "—".into(),
            ratio: "—".into(),
            target: "—".into(),
            met: "—".into(),
        }
    }

    fn peer(mut self, peer: impl Into<String>, ratio: f64) -> Self {
        self.peer = peer.into();
        self.ratio = format!("{ratio:.2}");
        self
    }

    fn target(mut self, target: impl Into<String>, met: Option<bool>) -> Self {
        self.target = target.into();
        self.met = match met {
            Some(true) => "**met**".into(),
            Some(false) => "**missed**".into(),
            None => "—".into(),
        };
        self
    }
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    /// Section tables and notes, printed before the summary.
    details: String,
    /// One HTTP/1.1 hop's p50 at each size (1 KiB, 1 MiB), from the transport section:
    /// the "one extra hop" the across-hubs p50 is held to.
    hop_p50_us: [Option<f64>; 2],
}

fn thousands(v: f64) -> String {
    let digits = (v.round() as u64).to_string();
    let groups: Vec<&str> = digits
        .as_bytes()
        .rchunks(3)
        .rev()
        .map(|g| std::str::from_utf8(g).unwrap_or_default())
        .collect();
    groups.join(",")
}

fn micros(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

// ---------------------------------------------------------------------------------------
// The run.

async fn bench(opts: &Options, database_url: Option<&str>) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("adi-bench-cluster-")
        .tempdir()
        .context("creating a temp dir")?;
    let loader = Loader::new(opts, dir.path())?;
    eprintln!(
        "cluster bench: {} round(s), {} s per load run after {} s of warm-up, concurrency {}, \
         load {}, {} CPUs, scratch dir {}",
        opts.rounds,
        opts.duration.as_secs(),
        opts.warmup.as_secs(),
        opts.concurrency,
        loader.describe(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        dir.path().display()
    );
    let service_port = start_service().await?;
    let mut report = Report::default();
    if opts.wants(Section::Transport) {
        transport(opts, service_port, &mut report).await?;
    }
    if let Some(url) = database_url {
        let mut cluster = Cluster::start(opts, url, dir.path()).await?;
        let result = cluster_sections(opts, &mut cluster, &loader, service_port, &mut report).await;
        if result.is_err() {
            cluster.print_log_tails();
        }
        result?;
    }
    println!("\n{}", report.details);
    println!("## Summary\n");
    println!("| measure | adi | peer | ratio (adi/peer) | target | met? |");
    println!("|---|---|---|---|---|---|");
    for r in &report.rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.measure, r.adi, r.peer, r.ratio, r.target, r.met
        );
    }
    Ok(())
}

async fn cluster_sections(
    opts: &Options,
    cluster: &mut Cluster,
    loader: &Loader,
    service_port: u16,
    report: &mut Report,
) -> Result<()> {
    if opts.wants(Section::Proxy) || opts.wants(Section::Capabilities) {
        let mut cocoon = Cocoon::start(cluster, service_port).await?;
        if opts.wants(Section::Proxy) {
            proxy(opts, cluster, &mut cocoon, loader, report).await?;
        }
        if opts.wants(Section::Capabilities) {
            capabilities(opts, cluster, &mut cocoon, loader, report).await?;
        }
        // Its device must not count in the fleets' figures below.
        drop(cocoon);
    }
    if opts.wants(Section::Presence) {
        presence(opts, cluster, report).await?;
    }
    if opts.wants(Section::Failover) {
        failover(opts, cluster, report).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The cluster: three hub processes on one catalog, and the user who owns every device.

struct Cluster {
    hubs: Vec<HubProcess>,
    apis: Vec<HubApi>,
    logs: Vec<PathBuf>,
    api_key: String,
    dir: PathBuf,
    database_url: String,
    /// Hubs started so far, for fresh data dirs and log names.
    started: usize,
    args: Vec<String>,
}

/// One hub as `GET /api/hubs` lists it.
#[derive(Debug, Clone, Deserialize)]
struct HubEntry {
    url: String,
    devices: u64,
    #[serde(default)]
    this: bool,
    #[serde(default)]
    sees: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
struct HubList {
    hubs: Vec<HubEntry>,
}

impl HubList {
    fn this(&self) -> Option<&HubEntry> {
        self.hubs.iter().find(|h| h.this)
    }

    fn sees(&self) -> Option<u64> {
        self.this().and_then(|h| h.sees)
    }

    fn lists(&self, url: &str) -> bool {
        self.hubs.iter().any(|h| h.url == url)
    }
}

async fn hubs_view(api: &HubApi) -> Result<HubList> {
    let resp = timeout(
        Duration::from_secs(5),
        api.http
            .get(format!("{}/api/hubs", api.base))
            .bearer_auth(&api.jwt)
            .send(),
    )
    .await
    .context("GET /api/hubs timed out")??;
    ensure!(
        resp.status().is_success(),
        "GET /api/hubs: {}",
        resp.status()
    );
    Ok(resp.json().await?)
}

impl Cluster {
    async fn start(opts: &Options, database_url: &str, dir: &Path) -> Result<Self> {
        let args = vec![
            "--database-url".to_owned(),
            database_url.to_owned(),
            "--nats".to_owned(),
            opts.nats.clone(),
            "--heartbeat-interval".to_owned(),
            humantime::format_duration(opts.heartbeat).to_string(),
            // Every simulated device connects from this host's loopback.
            "--max-connections-per-source".to_owned(),
            "0".to_owned(),
        ];
        let mut c = Cluster {
            hubs: Vec::new(),
            apis: Vec::new(),
            logs: Vec::new(),
            api_key: String::new(),
            dir: dir.to_owned(),
            database_url: database_url.to_owned(),
            started: 0,
            args,
        };
        for _ in 0..HUBS {
            let (hub, log) = c.spawn_hub().await?;
            c.hubs.push(hub);
            c.logs.push(log);
        }
        // After the first hub has made the catalog's tables.
        c.api_key = c.add_user("bench")?;
        for i in 0..HUBS {
            let api = HubApi::login(&c.hubs[i].url, &c.api_key).await?;
            c.apis.push(api);
        }
        c.wait_mesh().await?;
        eprintln!(
            "cluster: hubs {} (pids {}) on a fresh PostgreSQL database, NATS {}",
            c.hubs
                .iter()
                .map(|h| h.url.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            c.hubs
                .iter()
                .map(|h| h.pid().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            opts.nats
        );
        Ok(c)
    }

    async fn spawn_hub(&mut self) -> Result<(HubProcess, PathBuf)> {
        self.started += 1;
        let data_dir = self.dir.join(format!("hub-{}", self.started));
        let log = self.dir.join(format!("hub-{}.log", self.started));
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let hub = HubProcess::start(&data_dir, &args, &log).await?;
        Ok((hub, log))
    }

    /// Replaces hub `i` (dead or alive) with a new process on a new port.
    async fn replace(&mut self, i: usize) -> Result<()> {
        let (hub, log) = self.spawn_hub().await?;
        self.hubs[i] = hub;
        self.logs[i] = log;
        self.apis[i] = HubApi::login(&self.hubs[i].url, &self.api_key).await?;
        self.wait_mesh().await
    }

    fn add_user(&self, name: &str) -> Result<String> {
        let out = Command::new(ADI)
            .args(["signaling", "user", "add", name, "--data-dir"])
            .arg(self.dir.join("hub-1"))
            .arg("--database-url")
            .arg(&self.database_url)
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

    /// The hubs' pids, then `other`'s.
    fn pids_with(&self, other: u32) -> Pids {
        [
            self.hubs[0].pid(),
            self.hubs[1].pid(),
            self.hubs[2].pid(),
            other,
        ]
    }

    /// Each hub's base URL and the user's session there.
    fn ends(&self) -> Vec<(String, String)> {
        self.apis
            .iter()
            .map(|a| (a.base.clone(), a.jwt.clone()))
            .collect()
    }

    fn urls(&self) -> Vec<String> {
        self.hubs.iter().map(|h| h.url.clone()).collect()
    }

    fn ws_url(&self, i: usize) -> String {
        format!(
            "{}/ws/cocoon",
            self.hubs[i].url.replacen("http://", "ws://", 1)
        )
    }

    fn check_alive(&mut self) -> Result<()> {
        for (hub, log) in self.hubs.iter_mut().zip(&self.logs) {
            if let Ok(Some(status)) = hub.child.try_wait() {
                bail!(
                    "hub {} exited ({status}); its log ends:\n{}",
                    hub.url,
                    log_tail(log)
                );
            }
        }
        Ok(())
    }

    /// Waits until every hub lists exactly the hubs running now.
    async fn wait_mesh(&self) -> Result<()> {
        let mut want = self.urls();
        want.sort();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut agreed = true;
            for api in &self.apis {
                let mut urls: Vec<String> = match hubs_view(api).await {
                    Ok(v) => v.hubs.into_iter().map(|h| h.url).collect(),
                    Err(_) => Vec::new(),
                };
                urls.sort();
                agreed &= urls == want;
            }
            if agreed {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the hubs did not list each other within 30 s"
            );
            sleep(POLL).await;
        }
    }

    /// Waits until every hub in `hubs` sees the same number of devices, steady over
    /// two polls; returns it.
    async fn settled_sees(&self, hubs: &[usize]) -> Result<u64> {
        let deadline = Instant::now() + AGREE_TIMEOUT;
        let mut last = None;
        loop {
            let mut seen = Vec::new();
            for &i in hubs {
                seen.push(hubs_view(&self.apis[i]).await.ok().and_then(|v| v.sees()));
            }
            let agreed = seen
                .first()
                .copied()
                .flatten()
                .filter(|first| seen.iter().all(|s| *s == Some(*first)));
            if let Some(n) = agreed {
                if last == Some(n) {
                    return Ok(n);
                }
            }
            last = agreed;
            ensure!(
                Instant::now() < deadline,
                "the hubs did not agree on the devices they see: {seen:?}"
            );
            sleep(POLL * 4).await;
        }
    }

    /// Waits until every hub in `hubs` sees exactly `n` devices.
    async fn wait_sees(&self, hubs: &[usize], n: u64) -> Result<()> {
        let apis: Vec<&HubApi> = hubs.iter().map(|&i| &self.apis[i]).collect();
        let mut last = Vec::new();
        let done = watch(&apis, Instant::now() + AGREE_TIMEOUT, |views| {
            last = views
                .iter()
                .map(|(v, _)| v.as_ref().and_then(HubList::sees))
                .collect();
            last.iter().all(|s| *s == Some(n))
        })
        .await;
        ensure!(done, "the hubs did not come to see {n} devices: {last:?}");
        Ok(())
    }

    /// Mints `n` setup tokens, spread over the hubs' APIs.
    async fn mint(&self, n: usize, concurrency: usize) -> Result<Vec<String>> {
        let started = Instant::now();
        let tokens: Vec<Result<String>> = futures_util::stream::iter(0..n)
            .map(|i| self.apis[i % self.apis.len()].setup_token())
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let tokens = tokens.into_iter().collect::<Result<Vec<_>>>()?;
        eprintln!(
            "minted {n} setup tokens in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Ok(tokens)
    }

    fn print_log_tails(&self) {
        for (hub, log) in self.hubs.iter().zip(&self.logs) {
            eprintln!("----- hub {} log ends -----\n{}", hub.url, log_tail(log));
        }
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Reads every hub of `apis` every [`POLL`], each on its own, and hands the answers
/// (`None` where a hub did not answer) with the instant each arrived to `seen`, until
/// it returns true or `deadline` passes; returns whether it did.
async fn watch(
    apis: &[&HubApi],
    deadline: Instant,
    mut seen: impl FnMut(&[(Option<HubList>, Instant)]) -> bool,
) -> bool {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let views = futures_util::future::join_all(apis.iter().map(|api| async move {
            let v = hubs_view(api).await.ok();
            (v, Instant::now())
        }))
        .await;
        if seen(&views) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The service and the cocoon of sections 1 and 2.

/// An axum server in this process: `GET /1k`, `GET /1m` (with a `content-length`), and
/// `POST /embed`, the capability plugin's endpoint. Returns its port.
async fn start_service() -> Result<u16> {
    use axum::routing::{get, post};
    use axum::serve::ListenerExt;
    let small = Bytes::from(vec![b'k'; 1024]);
    let large = Bytes::from(vec![b'm'; 1024 * 1024]);
    let app = axum::Router::new()
        .route("/1k", get(move || std::future::ready(small.clone())))
        .route("/1m", get(move || std::future::ready(large.clone())))
        .route(
            "/embed",
            post(|| {
                std::future::ready((
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    EMBEDDING,
                ))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the service")?;
    let port = listener.local_addr()?.port();
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("the service stopped: {e:#}");
        }
    });
    Ok(port)
}

/// A real cocoon on hub A with the service and the capability plugin; killed on drop.
struct Cocoon {
    child: Child,
    log: PathBuf,
    id: String,
}

impl Cocoon {
    async fn start(cluster: &Cluster, service_port: u16) -> Result<Self> {
        let plugins = cluster.dir.join("plugins");
        std::fs::create_dir_all(&plugins)?;
        std::fs::write(
            plugins.join("models.toml"),
            format!(
                "name = \"bench-models\"\n\n[[capabilities]]\nprotocol = \"{PROTOCOL}\"\n\
                 version = \"1.0.0\"\nhttp = \"http://127.0.0.1:{service_port}/embed\"\n\
                 idempotent = true\n"
            ),
        )?;
        let token = cluster.apis[0].setup_token().await?;
        let log = cluster.dir.join("cocoon.log");
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = Command::new(ADI)
            .args(["cocoon", "run", "--hub", &cluster.hubs[0].url])
            .args(["--name", "bench", "--token", &token, "--data-dir"])
            .arg(cluster.dir.join("cocoon"))
            .arg("--service")
            .arg(format!("web:{service_port}"))
            .arg("--plugins-dir")
            .arg(&plugins)
            .env(
                "RUST_LOG",
                std::env::var("ADI_BENCH_RUST_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("starting the cocoon")?;
        let mut cocoon = Cocoon {
            child,
            log,
            id: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let api = &cluster.apis[0];
        cocoon.id = loop {
            cocoon.check_alive()?;
            let list: serde_json::Value = api
                .http
                .get(format!("{}/api/cocoons", api.base))
                .bearer_auth(&api.jwt)
                .send()
                .await?
                .json()
                .await?;
            let id = list["cocoons"].as_array().and_then(|all| {
                all.iter()
                    .find(|c| c["name"] == "bench" && c["online"] == true)
                    .and_then(|c| c["id"].as_str())
                    .map(str::to_owned)
            });
            if let Some(id) = id {
                break id;
            }
            ensure!(
                Instant::now() < deadline,
                "the cocoon was not online within 30 s; its log ends:\n{}",
                log_tail(&cocoon.log)
            );
            sleep(POLL).await;
        };
        eprintln!(
            "cocoon: pid {} online on hub A as device {}",
            cocoon.child.id(),
            cocoon.id
        );
        Ok(cocoon)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!(
                "the cocoon exited ({status}); its log ends:\n{}",
                log_tail(&self.log)
            );
        }
        Ok(())
    }
}

impl Drop for Cocoon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Same hub (A, where the device is connected) or across hubs (B, which forwards).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Same,
    Across,
}

impl Via {
    fn hub(self) -> usize {
        match self {
            Via::Same => 0,
            Via::Across => 1,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Via::Same => "same hub (A)",
            Via::Across => "across hubs (B to A)",
        }
    }

    /// Both ways, in the order of `round`: every other round the other way first.
    fn order(round: usize) -> [Via; 2] {
        if round % 2 == 1 {
            [Via::Same, Via::Across]
        } else {
            [Via::Across, Via::Same]
        }
    }
}

/// Waits until `f` succeeds, for at most `limit`; returns its last error otherwise.
async fn retry<F, Fut>(what: &str, limit: Duration, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let deadline = Instant::now() + limit;
    loop {
        match f().await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e.context(what.to_owned())),
            Err(_) => sleep(POLL).await,
        }
    }
}

/// One request to `target`, checked, to fail early and clearly if a path does not work.
async fn check_once(target: &Target) -> Result<()> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()?;
    let req = match &target.body {
        Some(body) => http
            .post(&target.url)
            .header("content-type", "application/json")
            .body(body.clone()),
        None => http.get(&target.url),
    };
    let resp = req.bearer_auth(&target.jwt).send().await?;
    let status = resp.status();
    let body = resp.bytes().await?;
    ensure!(
        status.is_success() && target.expect_bytes.is_none_or(|n| n == body.len()),
        "{} answered {status} with {} bytes: {}",
        target.url,
        body.len(),
        String::from_utf8_lossy(&body[..body.len().min(200)])
    );
    Ok(())
}

/// One section-1 or section-2 run with the CPU of the hubs and the cocoon around it.
struct Measured {
    load: LoadResult,
    /// CPU µs per answered request: hub A, hub B, cocoon, PostgreSQL and NATS.
    cpu_us: [f64; 4],
    /// Cores other processes on the machine used over the window: work that makes the
    /// run's figures unreliable.
    other_cores: f64,
}

impl Measured {
    fn disturbed(&self) -> bool {
        self.other_cores > NOISY_CORES
    }
}

/// The processes a load run watches: hubs A, B, C and the cocoon.
type Pids = [u32; 4];

/// A load run, measured again (up to [`RERUNS`] times) while other work disturbs it.
async fn measure(
    loader: &Loader,
    target: &Target,
    opts: &Options,
    pids: Pids,
    clk: f64,
) -> Result<Measured> {
    let mut again = 0;
    loop {
        let m = measure_once(loader, target, opts, pids, clk).await?;
        if !m.disturbed() || again == RERUNS {
            return Ok(m);
        }
        again += 1;
        eprintln!(
            "other work took {:.2} cores; measuring again ({again} of {RERUNS})",
            m.other_cores
        );
    }
}

async fn measure_once(
    loader: &Loader,
    target: &Target,
    opts: &Options,
    pids: Pids,
    clk: f64,
) -> Result<Measured> {
    if !opts.warmup.is_zero() {
        loader.run(target, opts.warmup).await?;
    }
    let window = Window::open(&pids);
    let load = loader.run(target, opts.duration).await?;
    let used = window.close(clk);
    let n = load.requests.max(1) as f64;
    Ok(Measured {
        load,
        cpu_us: [used.procs[0], used.procs[1], used.procs[3], used.serving].map(|t| t * 1e6 / n),
        other_cores: used.other_cores,
    })
}

/// CPU readings around a measured window: of the watched processes, of this process
/// (with the children it has reaped, such as wrk) and of the whole machine.
struct Window {
    pids: Vec<u32>,
    procs: Vec<u64>,
    own: u64,
    others: HashMap<u32, (u64, Kind)>,
    machine: (u64, u64),
    started: Instant,
}

impl Window {
    fn open(pids: &[u32]) -> Self {
        Window {
            pids: pids.to_vec(),
            procs: pids.iter().map(|&p| cpu_ticks(p).unwrap_or(0)).collect(),
            own: own_ticks().unwrap_or(0),
            others: others_ticks(pids),
            machine: machine_ticks().unwrap_or((0, 0)),
            started: Instant::now(),
        }
    }

    /// What the window saw.
    fn close(self, clk: f64) -> Used {
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-3);
        let used: Vec<f64> = self
            .pids
            .iter()
            .zip(&self.procs)
            .map(|(&p, &b)| cpu_ticks(p).unwrap_or(b).saturating_sub(b) as f64 / clk)
            .collect();
        let own = own_ticks().unwrap_or(self.own).saturating_sub(self.own) as f64 / clk;
        // The machine's busy time less the bench's processes, those serving the hubs and
        // the kernel threads: what other processes took, also those that came and went
        // within the window (a build's compiler runs, say).
        let mut by_kind = [0u64; 3];
        for (pid, (t, kind)) in others_ticks(&self.pids) {
            let before = self.others.get(&pid).map_or(0, |b| b.0);
            by_kind[kind as usize] += t.saturating_sub(before);
        }
        let machine = machine_ticks().unwrap_or(self.machine);
        let (busy, total) = (
            machine.0.saturating_sub(self.machine.0),
            machine.1.saturating_sub(self.machine.1),
        );
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let busy_cores = if total > 0 {
            cpus * busy as f64 / total as f64
        } else {
            0.0
        };
        let serving = by_kind[Kind::Serving as usize] as f64 / clk;
        let kernel = by_kind[Kind::Kernel as usize] as f64 / clk;
        let accounted = used.iter().sum::<f64>() + own + serving + kernel;
        let other_cores = (busy_cores - accounted / elapsed)
            .max(by_kind[Kind::Other as usize] as f64 / clk / elapsed)
            .max(0.0);
        Used {
            procs: used,
            own,
            serving,
            other_cores,
        }
    }
}

/// CPU over a measured window.
struct Used {
    /// Each watched process's CPU seconds.
    procs: Vec<f64>,
    /// This process's CPU seconds, with the children it reaped.
    own: f64,
    /// CPU seconds of PostgreSQL and NATS, which serve the hubs (and whoever else uses
    /// them on this machine).
    serving: f64,
    /// Cores that other user-space processes used.
    other_cores: f64,
}

/// This process's CPU time in clock ticks, with that of the children it has reaped.
fn own_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime, cutime, cstime.
    (11..=14)
        .map(|i| -> Result<u64> { Ok(fields.get(i).context("stat field")?.parse()?) })
        .sum()
}

/// What a process on the machine is to the bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// PostgreSQL or NATS, which serve the hubs.
    Serving,
    /// A kernel thread: on loopback these mostly carry the bench's own traffic.
    Kernel,
    /// Anything else: other work on the machine.
    Other,
}

/// CPU ticks of every process on the machine but this one, its children (wrk) and
/// `mine`, by pid, with what it is.
fn others_ticks(mine: &[u32]) -> HashMap<u32, (u64, Kind)> {
    /// `PF_KTHREAD` in a process's flags.
    const KERNEL_THREAD: u64 = 0x0020_0000;
    let me = std::process::id();
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if pid == me || mine.contains(&pid) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some((head, rest)), Some(open)) = (stat.rsplit_once(')'), stat.find('(')) else {
            continue;
        };
        let name = head.get(open + 1..).unwrap_or_default();
        // After the name: state ppid pgrp session tty tpgid flags ... utime stime.
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let ppid = field(1);
        if ppid == u64::from(me) {
            continue;
        }
        let kind = if ppid == 2 || pid == 2 || field(6) & KERNEL_THREAD != 0 {
            Kind::Kernel
        } else if matches!(name, "postgres" | "nats-server") {
            Kind::Serving
        } else {
            Kind::Other
        };
        out.insert(pid, (field(11) + field(12), kind));
    }
    out
}

/// The machine's (busy, total) CPU ticks from `/proc/stat`. Busy is time in processes
/// (user, nice, system) and stolen by the host; interrupt and softirq time is left out,
/// since on loopback it is mostly the kernel carrying the bench's own traffic, and no
/// process is charged with it.
fn machine_ticks() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    let total: u64 = v.iter().take(8).sum();
    Ok((at(0) + at(1) + at(2) + at(7), total))
}

/// One row of a section's table: the medians of one path's runs. Runs disturbed by
/// other work on the machine are left out when undisturbed ones exist.
fn write_runs(d: &mut String, what: &str, via: Via, ms: &[Measured]) -> Result<Medians> {
    let disturbed = ms.iter().filter(|m| m.disturbed()).count();
    let kept: Vec<&Measured> = if disturbed < ms.len() {
        ms.iter().filter(|m| !m.disturbed()).collect()
    } else {
        ms.iter().collect()
    };
    let loads: Vec<LoadResult> = kept.iter().map(|m| m.load.clone()).collect();
    let f = medians(&loads);
    let cpu = |i: usize| median(kept.iter().map(|m| m.cpu_us[i]).collect());
    let note = disturbed_note(disturbed, ms.len());
    writeln!(
        d,
        "| {what} | {} | {} | {} | {} | {} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs | {note} |",
        via.label(),
        thousands(f.rps),
        micros(f.p50_us),
        micros(f.p99_us),
        f.errors,
        cpu(0),
        cpu(1),
        cpu(2),
        cpu(3),
    )?;
    Ok(f)
}

fn run_line(round: usize, what: &str, m: &Measured) -> String {
    format!(
        "round {round}, {what}: {:.0} req/s, p50 {}, p99 {}, {} errors; CPU/request hub A {:.0} \
         µs, hub B {:.0} µs, cocoon {:.0} µs, PostgreSQL + NATS {:.0} µs; other work on the \
         machine {:.2} cores{}",
        m.load.rps(),
        micros(m.load.p50_us),
        micros(m.load.p99_us),
        m.load.errors,
        m.cpu_us[0],
        m.cpu_us[1],
        m.cpu_us[2],
        m.cpu_us[3],
        m.other_cores,
        if m.disturbed() { " (DISTURBED)" } else { "" }
    )
}

// ---------------------------------------------------------------------------------------
// Section 1: proxied HTTP.

async fn proxy(
    opts: &Options,
    cluster: &mut Cluster,
    cocoon: &mut Cocoon,
    loader: &Loader,
    report: &mut Report,
) -> Result<()> {
    eprintln!("\n== proxy: same hub vs across hubs ==");
    let clk = clock_ticks_per_second();
    let ends = cluster.ends();
    let device = cocoon.id.clone();
    let target = |via: Via, path: &str, bytes: usize| {
        let (base, jwt) = &ends[via.hub()];
        Target {
            url: format!("{base}/proxy/{device}/web{path}"),
            jwt: jwt.clone(),
            body: None,
            expect_bytes: Some(bytes),
        }
    };
    let sizes = [("1 KiB", "/1k", 1024), ("1 MiB", "/1m", 1024 * 1024)];
    for via in [Via::Same, Via::Across] {
        let t = target(via, "/1k", 1024);
        // Hub B may hear of the device a moment after hub A has it.
        retry(
            &format!("a request {}", via.label()),
            Duration::from_secs(10),
            || check_once(&t),
        )
        .await?;
    }
    let pids = cluster.pids_with(cocoon.pid());
    // runs[size][via]
    let mut runs: Vec<[Vec<Measured>; 2]> = sizes.iter().map(|_| [vec![], vec![]]).collect();
    for round in 1..=opts.rounds {
        for (s, &(label, path, bytes)) in sizes.iter().enumerate() {
            for via in Via::order(round) {
                cluster.check_alive()?;
                cocoon.check_alive()?;
                let m = measure(loader, &target(via, path, bytes), opts, pids, clk).await?;
                eprintln!(
                    "{}",
                    run_line(round, &format!("{label}, {}", via.label()), &m)
                );
                runs[s][via as usize].push(m);
            }
        }
    }

    let d = &mut report.details;
    writeln!(
        d,
        "## Proxied HTTP, same hub vs across hubs\n\n{} connections, {} s per run after {} s of \
         warm-up, medians of {} rounds; load: {}. {DISTURBED_NOTE}\n",
        opts.concurrency,
        opts.duration.as_secs(),
        opts.warmup.as_secs(),
        opts.rounds,
        loader.describe()
    )?;
    writeln!(
        d,
        "| what | path | req/s | p50 | p99 | errors | CPU/req hub A | CPU/req hub B | \
         CPU/req cocoon | CPU/req PostgreSQL + NATS | runs disturbed |"
    )?;
    writeln!(d, "|---|---|---|---|---|---|---|---|---|---|---|")?;
    for (s, &(label, _, _)) in sizes.iter().enumerate() {
        let mut figures = [Medians::default(); 2];
        for via in [Via::Same, Via::Across] {
            figures[via as usize] = write_runs(d, label, via, &runs[s][via as usize])?;
        }
        let [same, across] = figures;
        let ratio = across.rps / same.rps;
        report.rows.push(
            Row::new(
                format!("proxied req/s, {label} body, across hubs vs same hub"),
                thousands(across.rps),
            )
            .peer(thousands(same.rps), ratio)
            .target("≥ 0.8", Some(ratio >= 0.8)),
        );
        let hop = report.hop_p50_us[s];
        let extra = across.p50_us - same.p50_us;
        let target = match hop {
            Some(h) => format!("≤ same + one hop ({})", micros(same.p50_us + h)),
            None => "≤ same + one hop (run transport)".into(),
        };
        report.rows.push(
            Row::new(
                format!("proxied p50, {label}, across hubs vs same hub"),
                micros(across.p50_us),
            )
            .peer(micros(same.p50_us), across.p50_us / same.p50_us)
            .target(target, hop.map(|h| extra <= h)),
        );
        report.rows.push(
            Row::new(
                format!("proxied p99, {label}, across hubs vs same hub"),
                micros(across.p99_us),
            )
            .peer(micros(same.p99_us), across.p99_us / same.p99_us),
        );
    }
    writeln!(d)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Section 2: capability round trips.

async fn capabilities(
    opts: &Options,
    cluster: &mut Cluster,
    cocoon: &mut Cocoon,
    loader: &Loader,
    report: &mut Report,
) -> Result<()> {
    eprintln!("\n== capabilities: same hub vs across hubs ==");
    let clk = clock_ticks_per_second();
    let ends = cluster.ends();
    let target = |via: Via| {
        let (base, jwt) = &ends[via.hub()];
        Target {
            url: format!("{base}/api/capabilities/{PROTOCOL}/request"),
            jwt: jwt.clone(),
            body: Some(CAPABILITY_BODY.to_owned()),
            expect_bytes: None,
        }
    };
    for via in [Via::Same, Via::Across] {
        let t = target(via);
        retry(
            &format!("a capability request {}", via.label()),
            Duration::from_secs(10),
            || check_once(&t),
        )
        .await?;
    }
    let pids = cluster.pids_with(cocoon.pid());
    let mut runs: [Vec<Measured>; 2] = [vec![], vec![]];
    for round in 1..=opts.rounds {
        for via in Via::order(round) {
            cluster.check_alive()?;
            cocoon.check_alive()?;
            let m = measure(loader, &target(via), opts, pids, clk).await?;
            eprintln!("{}", run_line(round, via.label(), &m));
            runs[via as usize].push(m);
        }
    }
    let d = &mut report.details;
    writeln!(
        d,
        "## Capability round trips, same hub vs across hubs\n\n{} clients, {} s per run after \
         {} s of warm-up, medians of {} rounds; `POST /api/capabilities/{PROTOCOL}/request`. \
         {DISTURBED_NOTE}\n",
        opts.concurrency,
        opts.duration.as_secs(),
        opts.warmup.as_secs(),
        opts.rounds
    )?;
    writeln!(
        d,
        "| what | path | req/s | p50 | p99 | errors | CPU/req hub A | CPU/req hub B | \
         CPU/req cocoon | CPU/req PostgreSQL + NATS | runs disturbed |"
    )?;
    writeln!(d, "|---|---|---|---|---|---|---|---|---|---|---|")?;
    let mut figures = [Medians::default(); 2];
    for via in [Via::Same, Via::Across] {
        figures[via as usize] = write_runs(d, "capability", via, &runs[via as usize])?;
    }
    writeln!(d)?;
    let [same, across] = figures;
    report.rows.push(
        Row::new(
            format!(
                "capability round trips/s, {} clients, across hubs vs same hub",
                opts.concurrency
            ),
            thousands(across.rps),
        )
        .peer(thousands(same.rps), across.rps / same.rps),
    );
    report.rows.push(
        Row::new(
            "capability p50, across hubs vs same hub",
            micros(across.p50_us),
        )
        .peer(micros(same.p50_us), across.p50_us / same.p50_us),
    );
    report.rows.push(
        Row::new(
            "capability p99, across hubs vs same hub",
            micros(across.p99_us),
        )
        .peer(micros(same.p99_us), across.p99_us / same.p99_us),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Section 3: the data path between hubs, one HTTP/1.1 hop against NATS request/reply.

async fn transport(opts: &Options, service_port: u16, report: &mut Report) -> Result<()> {
    eprintln!("\n== transport: one HTTP/1.1 hop vs NATS request/reply ==");
    let small = Bytes::from(vec![b'k'; 1024]);
    let large = Bytes::from(vec![b'm'; 1024 * 1024]);
    let responder = async_nats::connect(&opts.nats)
        .await
        .with_context(|| format!("connecting to NATS at {}", opts.nats))?;
    let subject = format!("adi.bench.hop.{}", uuid::Uuid::new_v4().simple());
    let mut sub = responder.subscribe(subject.clone()).await?;
    let replier = responder.clone();
    let (s, l) = (small.clone(), large.clone());
    let responding = tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let Some(reply) = msg.reply else { continue };
            let body = if &msg.payload[..] == b"/1m" {
                l.clone()
            } else {
                s.clone()
            };
            let _ = replier.publish(reply, body).await;
        }
    });
    responder.flush().await?;
    let requester = async_nats::connect(&opts.nats).await?;
    let max_payload = requester.server_info().max_payload;

    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    // As the hubs' own client for each other (`cluster::peer`).
    connector.set_nodelay(true);
    let http: hyper_util::client::legacy::Client<_, axum::body::Body> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(opts.concurrency.max(256))
            .build(connector);

    let nats_pid = support::find_process("nats-server");
    let sizes = [("1 KiB", "/1k", 1024usize), ("1 MiB", "/1m", 1024 * 1024)];
    // runs[size][0 = HTTP, 1 = NATS]
    let mut runs: Vec<[Vec<Hop>; 2]> = sizes.iter().map(|_| [vec![], vec![]]).collect();
    for round in 1..=opts.rounds {
        for (si, &(label, path, bytes)) in sizes.iter().enumerate() {
            let order = if round % 2 == 1 { [0, 1] } else { [1, 0] };
            for way in order {
                if way == 1 && bytes > max_payload {
                    eprintln!("NATS: {label} is above the server's max_payload ({max_payload})");
                    continue;
                }
                let r = if way == 0 {
                    let uri: axum::http::Uri =
                        format!("http://127.0.0.1:{service_port}{path}").parse()?;
                    let http = http.clone();
                    hop_run(opts, nats_pid, move || {
                        let (http, uri) = (http.clone(), uri.clone());
                        async move {
                            let resp = http.get(uri).await?;
                            ensure!(resp.status().is_success(), "status {}", resp.status());
                            let mut body =
                                axum::body::Body::new(resp.into_body()).into_data_stream();
                            let mut got = 0;
                            while let Some(chunk) = body.next().await {
                                got += chunk?.len();
                            }
                            ensure!(got == bytes, "{got} bytes");
                            Ok(())
                        }
                    })
                    .await
                } else {
                    let (nats, subject) = (requester.clone(), subject.clone());
                    hop_run(opts, nats_pid, move || {
                        let (nats, subject) = (nats.clone(), subject.clone());
                        async move {
                            let reply = nats
                                .request(subject, Bytes::from_static(path.as_bytes()))
                                .await?;
                            ensure!(
                                reply.payload.len() == bytes,
                                "{} bytes",
                                reply.payload.len()
                            );
                            Ok(())
                        }
                    })
                    .await
                };
                eprintln!(
                    "round {round}, {label}, {}: {:.0} req/s, p50 {}, p99 {}, {} errors; CPU/request \
                     {:.0} µs; other work on the machine {:.2} cores{}",
                    HOP_PATHS[way],
                    r.load.rps(),
                    micros(r.load.p50_us),
                    micros(r.load.p99_us),
                    r.load.errors,
                    r.cpu_us,
                    r.other_cores,
                    if r.disturbed() { " (DISTURBED)" } else { "" }
                );
                runs[si][way].push(r);
            }
        }
    }
    responding.abort();

    let d = &mut report.details;
    writeln!(
        d,
        "## The data path between hubs: one HTTP/1.1 hop vs NATS request/reply\n\n{} requests in \
         flight, {} s per run after {} s of warm-up, medians of {} rounds; a small request, a \
         reply of the size given; NATS server max_payload {max_payload} bytes. CPU per request \
         is this process's (both ends) and `nats-server`'s. {DISTURBED_NOTE}\n",
        opts.concurrency,
        opts.duration.as_secs(),
        opts.warmup.as_secs(),
        opts.rounds
    )?;
    writeln!(
        d,
        "| reply | path | req/s | p50 | p99 | errors | CPU/req | runs disturbed |"
    )?;
    writeln!(d, "|---|---|---|---|---|---|---|---|")?;
    for (si, &(label, _, _)) in sizes.iter().enumerate() {
        let mut figures = [Medians::default(); 2];
        for way in [0, 1] {
            let hops = &runs[si][way];
            if hops.is_empty() {
                continue;
            }
            let disturbed = hops.iter().filter(|h| h.disturbed()).count();
            let kept: Vec<&Hop> = if disturbed < hops.len() {
                hops.iter().filter(|h| !h.disturbed()).collect()
            } else {
                hops.iter().collect()
            };
            let loads: Vec<LoadResult> = kept.iter().map(|h| h.load.clone()).collect();
            let f = medians(&loads);
            writeln!(
                d,
                "| {label} | {} | {} | {} | {} | {} | {:.0} µs | {} |",
                HOP_PATHS[way],
                thousands(f.rps),
                micros(f.p50_us),
                micros(f.p99_us),
                f.errors,
                median(kept.iter().map(|h| h.cpu_us).collect()),
                disturbed_note(disturbed, hops.len())
            )?;
            figures[way] = f;
        }
        let [h, n] = figures;
        report.hop_p50_us[si] = Some(h.p50_us);
        report.rows.push(
            Row::new(
                format!(
                    "hub-to-hub data path req/s, {label} reply, {} in flight: one HTTP/1.1 \
                     hop vs NATS request/reply",
                    opts.concurrency
                ),
                thousands(h.rps),
            )
            .peer(thousands(n.rps), h.rps / n.rps),
        );
        report.rows.push(
            Row::new(
                format!("hub-to-hub data path p50, {label} reply: HTTP/1.1 hop vs NATS"),
                micros(h.p50_us),
            )
            .peer(micros(n.p50_us), h.p50_us / n.p50_us),
        );
    }
    writeln!(d)?;
    Ok(())
}

/// The two ways of the transport section, by index.
const HOP_PATHS: [&str; 2] = ["HTTP/1.1 hop", "NATS request/reply"];

/// How a table says which runs were disturbed.
fn disturbed_note(disturbed: usize, runs: usize) -> String {
    match disturbed {
        0 => "0".to_owned(),
        n if n == runs => format!("{n} of {n}, kept: none was quiet"),
        n => format!("{n} of {runs}, left out"),
    }
}

/// `concurrency` tasks each running `op` in a loop for `duration`.
async fn closed_loop<F, Fut>(concurrency: usize, duration: Duration, op: F) -> LoadResult
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let start = Instant::now();
    let until = start + duration;
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency {
        let op = op.clone();
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(1 << 14);
            let mut errors = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= until {
                    break;
                }
                let ok = matches!(timeout(LOAD_TIMEOUT, op()).await, Ok(Ok(())));
                if ok {
                    lat.push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
                } else {
                    errors += 1;
                }
            }
            (lat, errors)
        });
    }
    let mut all = Vec::new();
    let mut errors = 0;
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((lat, e)) => {
                all.extend(lat);
                errors += e;
            }
            Err(_) => errors += 1,
        }
    }
    LoadResult::from_latencies(all, duration.as_secs_f64(), errors)
}

/// A closed loop after a warm-up, with the CPU of this process and of `nats` (the
/// local `nats-server`, if there is one) around the measured window.
async fn hop_run<F, Fut>(opts: &Options, nats: Option<u32>, op: F) -> Hop
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let mut again = 0;
    loop {
        let h = hop_once(opts, nats, op.clone()).await;
        if !h.disturbed() || again == RERUNS {
            return h;
        }
        again += 1;
        eprintln!(
            "other work took {:.2} cores; measuring again ({again} of {RERUNS})",
            h.other_cores
        );
    }
}

async fn hop_once<F, Fut>(opts: &Options, nats: Option<u32>, op: F) -> Hop
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    if !opts.warmup.is_zero() {
        closed_loop(opts.concurrency, opts.warmup, op.clone()).await;
    }
    let pids: Vec<u32> = nats.into_iter().collect();
    let window = Window::open(&pids);
    let load = closed_loop(opts.concurrency, opts.duration, op).await;
    let used = window.close(clock_ticks_per_second());
    Hop {
        cpu_us: (used.own + used.procs.iter().sum::<f64>()) * 1e6 / load.requests.max(1) as f64,
        load,
        other_cores: used.other_cores,
    }
}

/// One transport run.
struct Hop {
    load: LoadResult,
    /// CPU µs per request of both ends (this process) and the broker (`nats-server`,
    /// for NATS; it is idle during the HTTP runs).
    cpu_us: f64,
    other_cores: f64,
}

impl Hop {
    fn disturbed(&self) -> bool {
        self.other_cores > NOISY_CORES
    }
}

// ---------------------------------------------------------------------------------------
// Section 4: presence convergence.

async fn presence(opts: &Options, cluster: &mut Cluster, report: &mut Report) -> Result<()> {
    let n = opts.devices;
    eprintln!("\n== presence: {n} devices over {HUBS} hubs ==");
    let all: Vec<usize> = (0..HUBS).collect();
    let base = cluster.settled_sees(&all).await?;
    let tokens = cluster.mint(n, opts.mint_concurrency).await?;
    let mut devices: Vec<SimDevice> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| SimDevice::new(format!("sim-{i}"), Some(t)))
        .collect();
    let expected = base + n as u64;
    let mut converged = Vec::new();
    let mut registering = Vec::new();
    for round in 1..=opts.rounds {
        cluster.check_alive()?;
        // Device i's hubs: hub i % 3 first, then the next two, as `--hub` lists them.
        let lists: Vec<Arc<[String]>> = (0..HUBS)
            .map(|first| {
                (0..HUBS)
                    .map(|k| cluster.ws_url((first + k) % HUBS))
                    .collect()
            })
            .collect();
        let routes = (0..n).map(|i| lists[i % HUBS].clone()).collect();
        let launched = Instant::now();
        let fleet = Fleet::launch(devices, routes, opts);
        let apis: Vec<&HubApi> = cluster.apis.iter().collect();
        let mut seen_at: Vec<Option<Instant>> = vec![None; HUBS];
        let mut last = vec![None; HUBS];
        let limit = Duration::from_secs(60) + Duration::from_millis(20) * n as u32;
        let zeros = vec![0; n];
        let (registered, agreed) = tokio::join!(
            fleet.wait_registered(&zeros, limit),
            watch(&apis, launched + limit + AGREE_TIMEOUT, |views| {
                for (i, (v, at)) in views.iter().enumerate() {
                    last[i] = v.as_ref().and_then(HubList::sees);
                    if seen_at[i].is_none() && last[i] == Some(expected) {
                        seen_at[i] = Some(*at);
                    }
                }
                seen_at.iter().all(Option::is_some)
            })
        );
        let result: Result<()> = (|| {
            registered?;
            ensure!(
                agreed,
                "round {round}: the hubs did not all come to see {expected} devices: {last:?}"
            );
            Ok(())
        })();
        let last_registered = fleet.last_registration();
        devices = fleet.stop().await;
        result?;
        let each: Vec<Duration> = seen_at
            .iter()
            .flatten()
            .map(|t| t.saturating_duration_since(last_registered))
            .collect();
        let worst = each.iter().copied().max().unwrap_or_default();
        let took = last_registered.saturating_duration_since(launched);
        eprintln!(
            "round {round}: {n} devices registered in {} ({}); every hub saw them {} after the \
             last registration (each: {})",
            secs(took),
            if round == 1 { "enrolment" } else { "reconnect" },
            secs(worst),
            each.iter().map(|d| secs(*d)).collect::<Vec<_>>().join(", ")
        );
        converged.push(worst.as_secs_f64());
        registering.push(took);
        // Every device gone again before the next round.
        cluster.wait_sees(&all, base).await?;
    }
    let conv = Duration::from_secs_f64(median(converged.clone()));
    let d = &mut report.details;
    writeln!(
        d,
        "## Presence convergence\n\n{n} simulated devices spread over {HUBS} hubs, heartbeat \
         every {}; each hub's `/api/hubs` read every {} ms\n",
        humantime::format_duration(opts.heartbeat),
        POLL.as_millis()
    )?;
    writeln!(
        d,
        "| round | registrations | all registered in | last registration to every hub seeing all |"
    )?;
    writeln!(d, "|---|---|---|---|")?;
    for (i, (c, t)) in converged.iter().zip(&registering).enumerate() {
        writeln!(
            d,
            "| {} | {} | {} | {} |",
            i + 1,
            if i == 0 { "enrolment" } else { "reconnect" },
            secs(*t),
            secs(Duration::from_secs_f64(*c))
        )?;
    }
    writeln!(d)?;
    report.rows.push(
        Row::new(
            format!(
                "presence: last of {} devices registered to every hub seeing all",
                thousands(n as f64)
            ),
            secs(conv),
        )
        .target("≤ 2 s", Some(conv <= Duration::from_secs(2))),
    );
    report.rows.push(Row::new(
        format!(
            "presence: {} devices enrolled over {HUBS} hubs (first round)",
            thousands(n as f64)
        ),
        secs(registering[0]),
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Section 5: failover.

/// What one failover round measured, from the kill.
struct Failover {
    /// Every device registered again, as the simulator saw it.
    reregistered: Duration,
    /// The surviving hubs' own `devices` counts add up to every device.
    held: Duration,
    /// The dead hub is gone from every survivor's list.
    forgotten: Duration,
    /// Every survivor sees exactly the devices, with the dead hub forgotten.
    visible: Duration,
    /// The most devices a survivor said it sees meanwhile: a device that moved is
    /// counted twice while the dead hub's entry for it is still remembered.
    peak_sees: u64,
}

async fn failover(opts: &Options, cluster: &mut Cluster, report: &mut Report) -> Result<()> {
    let n = opts.failover_devices;
    eprintln!("\n== failover: {n} devices on hub A, which is killed ==");
    let tokens = cluster.mint(n, opts.mint_concurrency).await?;
    let mut devices: Vec<SimDevice> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| SimDevice::new(format!("fo-{i}"), Some(t)))
        .collect();
    let all: Vec<usize> = (0..HUBS).collect();
    let survivors = [1, 2];
    let mut rounds = Vec::new();
    for round in 1..=opts.rounds {
        cluster.check_alive()?;
        let base = cluster.settled_sees(&all).await?;
        let survivors_held: u64 = {
            let mut held = 0;
            for &i in &survivors {
                held += hubs_view(&cluster.apis[i])
                    .await?
                    .this()
                    .map_or(0, |h| h.devices);
            }
            held
        };
        let expected = base + n as u64;
        let abc: Arc<[String]> = [0, 1, 2].map(|i| cluster.ws_url(i)).into();
        let acb: Arc<[String]> = [0, 2, 1].map(|i| cluster.ws_url(i)).into();
        let routes = (0..n)
            .map(|i| if i % 2 == 1 { acb.clone() } else { abc.clone() })
            .collect();
        let fleet = Fleet::launch(devices, routes, opts);
        let outcome: Result<Failover> = async {
            let limit = Duration::from_secs(60) + Duration::from_millis(20) * n as u32;
            fleet.wait_registered(&vec![0; n], limit).await?;
            cluster.wait_sees(&all, expected).await?;
            let before = fleet.sessions();
            let dead = cluster.hubs[0].url.clone();
            let killed = Instant::now();
            cluster.hubs[0].child.kill().context("killing hub A")?;
            let _ = cluster.hubs[0].child.wait();
            eprintln!("round {round}: hub A ({dead}) killed");
            let apis: Vec<&HubApi> = survivors.iter().map(|&i| &cluster.apis[i]).collect();
            let (mut held, mut forgotten, mut visible) = (None, [None; 2], [None; 2]);
            let mut last = Vec::new();
            let mut peak_sees = 0;
            let watched = watch(&apis, killed + AGREE_TIMEOUT, |views| {
                last = views
                    .iter()
                    .map(|(v, _)| v.as_ref().map(|v| (v.sees(), v.lists(&dead))))
                    .collect();
                let own: Option<u64> = views
                    .iter()
                    .map(|(v, _)| v.as_ref().and_then(HubList::this).map(|h| h.devices))
                    .sum();
                let latest = views
                    .iter()
                    .map(|(_, at)| *at)
                    .max()
                    .unwrap_or_else(Instant::now);
                if held.is_none() && own == Some(survivors_held + n as u64) {
                    held = Some(latest);
                }
                for (k, (v, at)) in views.iter().enumerate() {
                    let Some(v) = v else { continue };
                    peak_sees = peak_sees.max(v.sees().unwrap_or(0));
                    if forgotten[k].is_none() && !v.lists(&dead) {
                        forgotten[k] = Some(*at);
                    }
                    if visible[k].is_none() && !v.lists(&dead) && v.sees() == Some(expected) {
                        visible[k] = Some(*at);
                    }
                }
                held.is_some() && visible.iter().all(Option::is_some)
            })
            .await;
            // The simulator's own count, which the hubs' may have run ahead of.
            let deadline = killed + AGREE_TIMEOUT;
            while fleet.registered_since(&before) < n && Instant::now() < deadline {
                sleep(Duration::from_millis(5)).await;
            }
            let back = fleet.registered_since(&before);
            ensure!(
                watched && back == n,
                "round {round}: {back}/{n} devices back; survivors (sees, lists the dead hub): \
                 {last:?}"
            );
            let since = |t: Option<Instant>| {
                t.map_or(Duration::ZERO, |t| t.saturating_duration_since(killed))
            };
            let latest = |ts: [Option<Instant>; 2]| ts.into_iter().flatten().max();
            Ok(Failover {
                reregistered: since(fleet.last_registration_since(&before)),
                held: since(held),
                forgotten: since(latest(forgotten)),
                visible: since(latest(visible)),
                peak_sees,
            })
        }
        .await;
        devices = fleet.stop().await;
        let f = outcome?;
        eprintln!(
            "round {round}: all re-registered {}, held by survivors {}, dead hub forgotten {}, \
             all visible on every survivor {} (from the kill)",
            secs(f.reregistered),
            secs(f.held),
            secs(f.forgotten),
            secs(f.visible)
        );
        rounds.push(f);
        cluster.wait_sees(&survivors, base).await?;
        if round < opts.rounds {
            cluster.replace(0).await?;
        }
    }
    let m = |f: fn(&Failover) -> Duration| {
        Duration::from_secs_f64(median(rounds.iter().map(|r| f(r).as_secs_f64()).collect()))
    };
    let d = &mut report.details;
    writeln!(
        d,
        "## Failover\n\n{n} simulated devices on hub A with hubs A, B, C (every other one A, C, \
         B) and the cocoon's reconnect policy; hub A killed with SIGKILL; times from the kill; \
         survivors' `/api/hubs` read every {} ms\n",
        POLL.as_millis()
    )?;
    writeln!(
        d,
        "| round | all re-registered (simulator) | all held by survivors (their `devices`) | \
         dead hub gone from every list | all visible on every survivor (`sees` = N, dead hub \
         gone) | most a survivor saw meanwhile |"
    )?;
    writeln!(d, "|---|---|---|---|---|---|")?;
    for (i, f) in rounds.iter().enumerate() {
        writeln!(
            d,
            "| {} | {} | {} | {} | {} | {} |",
            i + 1,
            secs(f.reregistered),
            secs(f.held),
            secs(f.forgotten),
            secs(f.visible),
            thousands(f.peak_sees as f64)
        )?;
    }
    writeln!(d)?;
    let n = thousands(n as f64);
    let rereg = m(|f| f.reregistered);
    let visible = m(|f| f.visible);
    report.rows.push(
        Row::new(
            format!("failover: {n} devices re-registered (simulator), from kill -9 of their hub"),
            secs(rereg),
        )
        .target("≤ 10 s", Some(rereg <= Duration::from_secs(10))),
    );
    report.rows.push(Row::new(
        format!("failover: {n} devices held by the surviving hubs (their own counts)"),
        secs(m(|f| f.held)),
    ));
    report.rows.push(Row::new(
        "failover: dead hub gone from every survivor's list",
        secs(m(|f| f.forgotten)),
    ));
    report.rows.push(
        Row::new(
            format!("failover: {n} devices visible on every surviving hub, dead hub forgotten"),
            secs(visible),
        )
        .target("≤ 10 s", Some(visible <= Duration::from_secs(10))),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The simulated devices.

/// A simulated device's identity, kept from round to round.
struct SimDevice {
    name: String,
    secret: DeviceSecret,
    /// Spent at the first registration.
    token: Option<String>,
}

impl SimDevice {
    fn new(name: String, token: Option<String>) -> Self {
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        // 32 random bytes are 43 base64 characters, above the 32-character minimum.
        let secret =
            DeviceSecret::new(URL_SAFE_NO_PAD.encode(bytes)).expect("43 characters is long enough");
        SimDevice {
            name,
            secret,
            token,
        }
    }
}

struct FleetShared {
    /// Each device's hubs (WebSocket URLs), the first dialled first.
    routes: Vec<Arc<[String]>>,
    interval: Duration,
    /// Only its `backoff` is used: the reconnect policy of the real cocoon.
    policy: CocoonConfig,
    stop: CancellationToken,
    /// Bounds how many devices make their first connection at once.
    connect_gate: Arc<Semaphore>,
    epoch: Instant,
    /// Registrations per device.
    sessions: Vec<AtomicU32>,
    /// When each device last registered, in ns since `epoch`.
    registered_at: Vec<AtomicU64>,
    failed: AtomicUsize,
    last_failure: Mutex<Option<String>>,
}

/// One round's devices, each a task.
struct Fleet {
    shared: Arc<FleetShared>,
    tasks: JoinSet<(usize, SimDevice)>,
}

impl Fleet {
    fn launch(devices: Vec<SimDevice>, routes: Vec<Arc<[String]>>, opts: &Options) -> Self {
        let n = devices.len();
        let shared = Arc::new(FleetShared {
            routes,
            interval: opts.heartbeat,
            policy: CocoonConfig::new("http://127.0.0.1:1", "/nonexistent", "sim"),
            stop: CancellationToken::new(),
            connect_gate: Arc::new(Semaphore::new(opts.connect_concurrency)),
            epoch: Instant::now(),
            sessions: (0..n).map(|_| AtomicU32::new(0)).collect(),
            registered_at: (0..n).map(|_| AtomicU64::new(0)).collect(),
            failed: AtomicUsize::new(0),
            last_failure: Mutex::new(None),
        });
        let mut tasks = JoinSet::new();
        for (idx, device) in devices.into_iter().enumerate() {
            tasks.spawn(run_device(shared.clone(), idx, device));
        }
        Fleet { shared, tasks }
    }

    fn sessions(&self) -> Vec<u32> {
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

    fn at(&self, ns: u64) -> Instant {
        self.shared.epoch + Duration::from_nanos(ns)
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
        self.at(ns)
    }

    /// When the most recent registration of the devices that registered since the
    /// snapshot happened.
    fn last_registration_since(&self, before: &[u32]) -> Option<Instant> {
        let ns = self
            .shared
            .sessions
            .iter()
            .zip(before)
            .zip(&self.shared.registered_at)
            .filter(|((now, then), _)| now.load(Ordering::Acquire) > **then)
            .map(|(_, at)| at.load(Ordering::Acquire))
            .max()?;
        Some(self.at(ns))
    }

    async fn wait_registered(&self, before: &[u32], limit: Duration) -> Result<()> {
        let n = before.len();
        let started = Instant::now();
        let mut last_report = Instant::now();
        loop {
            let registered = self.registered_since(before);
            if registered == n {
                return Ok(());
            }
            let failed = self.shared.failed.load(Ordering::Acquire);
            if failed > 0 {
                let why = lock(&self.shared.last_failure).clone().unwrap_or_default();
                bail!("{failed} devices were refused for good, e.g.: {why}");
            }
            ensure!(
                started.elapsed() < limit,
                "only {registered}/{n} devices registered within {} s",
                limit.as_secs()
            );
            if last_report.elapsed() >= Duration::from_secs(5) {
                eprintln!(
                    "{registered}/{n} devices registered after {:.0} s",
                    started.elapsed().as_secs_f64()
                );
                last_report = Instant::now();
            }
            sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops every device (each sends a close frame) and hands back their identities.
    async fn stop(mut self) -> Vec<SimDevice> {
        self.shared.stop.cancel();
        let mut back = Vec::with_capacity(self.shared.sessions.len());
        let drained = timeout(Duration::from_secs(30), async {
            while let Some(done) = self.tasks.join_next().await {
                if let Ok(d) = done {
                    back.push(d);
                }
            }
        })
        .await;
        if drained.is_err() {
            eprintln!("{} device tasks did not stop in time", self.tasks.len());
            self.tasks.shutdown().await;
        }
        back.sort_by_key(|(i, _)| *i);
        back.into_iter().map(|(_, d)| d).collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How one session ended.
enum Outcome {
    Stopped,
    Refused(ErrorCode, String),
    Lost { registered: bool },
}

/// One device: sessions until stopped, moving along its list of hubs as the real cocoon
/// does (`hubs::Hubs::advance`): a lost or refused connection goes to the next hub after
/// `backoff(step)`, where the step counts whole rounds of the list failed in a row.
async fn run_device(
    shared: Arc<FleetShared>,
    idx: usize,
    mut device: SimDevice,
) -> (usize, SimDevice) {
    let hubs = shared.routes[idx].clone();
    let mut gate = tokio::select! {
        _ = shared.stop.cancelled() => return (idx, device),
        p = shared.connect_gate.clone().acquire_owned() => p.ok(),
    };
    let (mut current, mut attempt) = (0usize, 0u32);
    loop {
        let outcome = session(&shared, idx, &hubs[current], &mut device, &mut gate).await;
        // The gate bounds first connections only.
        gate = None;
        let registered = match outcome {
            Outcome::Stopped => return (idx, device),
            Outcome::Refused(code, message) if !code.is_retryable() => {
                shared.failed.fetch_add(1, Ordering::AcqRel);
                *lock(&shared.last_failure) = Some(format!("{code}: {message}"));
                return (idx, device);
            }
            Outcome::Refused(..) => false,
            Outcome::Lost { registered } => registered,
        };
        if registered {
            attempt = 0;
        }
        let step = attempt / u32::try_from(hubs.len()).unwrap_or(1).max(1);
        attempt = attempt.saturating_add(1);
        current = (current + 1) % hubs.len();
        let delay = shared.policy.backoff(step);
        tokio::select! {
            _ = shared.stop.cancelled() => return (idx, device),
            _ = sleep(delay) => {}
        }
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One WebSocket connection: register, then heartbeat until it ends.
async fn session(
    shared: &FleetShared,
    idx: usize,
    url: &str,
    device: &mut SimDevice,
    gate: &mut Option<OwnedSemaphorePermit>,
) -> Outcome {
    let config = WebSocketConfig::default()
        .read_buffer_size(CLIENT_READ_BUFFER)
        .max_message_size(Some(DEFAULT_MAX_FRAME_BYTES))
        .max_frame_size(Some(DEFAULT_MAX_FRAME_BYTES));
    let connect = tokio_tungstenite::connect_async_with_config(url, Some(config), true);
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
        services: Vec::new(),
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
    match decode::<HubToDevice>(answer.as_bytes(), DEFAULT_MAX_FRAME_BYTES) {
        Ok(HubToDevice::Registered(_)) => {}
        Ok(HubToDevice::Error { code, message }) => return Outcome::Refused(code, message),
        _ => return Outcome::Lost { registered: false },
    }
    // The token is spent; later registrations prove identity with the secret alone.
    device.token = None;
    shared.registered_at[idx].store(
        u64::try_from(shared.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX),
        Ordering::Release,
    );
    shared.sessions[idx].fetch_add(1, Ordering::AcqRel);
    *gate = None;
    heartbeat_loop(shared, &mut ws).await
}

async fn heartbeat_loop(shared: &FleetShared, ws: &mut Socket) -> Outcome {
    let every = shared.interval;
    // A random phase, so the fleet's heartbeats are spread over the interval.
    let offset = rand::thread_rng().gen_range(Duration::ZERO..every);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                // Like the real cocoon: a heartbeat, and a ping the hub must answer.
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

// ---------------------------------------------------------------------------------------
// The load generators of sections 1 and 2.

/// Where the load goes: a GET, or a POST of a JSON body.
struct Target {
    url: String,
    jwt: String,
    body: Option<String>,
    /// The body length a check expects, if it is known.
    expect_bytes: Option<usize>,
}

/// `wrk`, or the built-in generator.
struct Loader {
    wrk: Option<PathBuf>,
    threads: usize,
    connections: usize,
    script: PathBuf,
}

/// wrk's `done` hook: exact counts and percentiles (microseconds) on one line.
const WRK_DONE: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "ADI-BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d " ..
    "status=%d connect=%d read=%d write=%d timeout=%d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.status, e.connect, e.read, e.write, e.timeout))
end
"#;

impl Loader {
    fn new(opts: &Options, dir: &Path) -> Result<Self> {
        let found = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("wrk"))
                .find(|p| p.is_file())
        });
        let wrk = match opts.load {
            Load::Builtin => None,
            Load::Wrk => Some(found.context("--load wrk: wrk is not on PATH")?),
            Load::Auto => {
                if found.is_none() {
                    eprintln!(
                        "wrk is not on PATH (Debian/Ubuntu: apt-get install wrk); using the \
                         built-in load generator"
                    );
                }
                found
            }
        };
        Ok(Loader {
            wrk,
            threads: opts.threads,
            connections: opts.concurrency,
            script: dir.join("load.lua"),
        })
    }

    fn describe(&self) -> String {
        match &self.wrk {
            Some(_) if self.threads == 1 => "wrk, 1 thread".into(),
            Some(_) => format!("wrk, {} threads", self.threads),
            None => "built-in (tokio, one keep-alive connection per task)".into(),
        }
    }

    async fn run(&self, target: &Target, duration: Duration) -> Result<LoadResult> {
        let Some(wrk) = &self.wrk else {
            return builtin::run(target, self.connections, duration).await;
        };
        let mut script = String::new();
        if let Some(body) = &target.body {
            writeln!(
                script,
                "wrk.method = \"POST\"\nwrk.body = [==[{body}]==]\n\
                 wrk.headers[\"Content-Type\"] = \"application/json\""
            )?;
        }
        script.push_str(WRK_DONE);
        std::fs::write(&self.script, script).context("writing the wrk script")?;
        let out = tokio::process::Command::new(wrk)
            .arg("-t")
            .arg(self.threads.to_string())
            .arg("-c")
            .arg(self.connections.to_string())
            .arg("-d")
            .arg(format!("{}s", duration.as_secs()))
            .arg("--timeout")
            .arg(format!("{}s", LOAD_TIMEOUT.as_secs()))
            .arg("-s")
            .arg(&self.script)
            .arg("-H")
            .arg(format!("Authorization: Bearer {}", target.jwt))
            .arg(&target.url)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = timeout(duration + Duration::from_secs(30), out)
            .await
            .context("wrk did not finish")?
            .context("running wrk")?;
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
    let status = get("status")?;
    Ok(LoadResult {
        requests: (get("requests")? - status).max(0.0) as u64,
        seconds: get("duration_us")? / 1e6,
        p50_us: get("p50_us")?,
        p99_us: get("p99_us")?,
        errors: (status + get("connect")? + get("read")? + get("write")? + get("timeout")?) as u64,
    })
}

/// The built-in closed-loop generator: one task per connection, each with its own
/// keep-alive HTTP/1.1 connection, sending the next request as soon as the previous
/// answer is read in full (by `content-length` or chunk by chunk).
mod builtin {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use anyhow::{bail, ensure, Context, Result};
    use bytes::{Buf, BytesMut};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::{LoadResult, Target, LOAD_TIMEOUT};

    pub(super) async fn run(
        target: &Target,
        connections: usize,
        duration: Duration,
    ) -> Result<LoadResult> {
        let url = reqwest::Url::parse(&target.url).context("parsing the target URL")?;
        let host = url.host_str().context("URL without host")?.to_owned();
        let port = url.port_or_known_default().context("URL without port")?;
        let path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        let method = if target.body.is_some() { "POST" } else { "GET" };
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {}\r\n",
            target.jwt
        );
        match &target.body {
            Some(body) => request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )),
            None => request.push_str("\r\n"),
        }
        let request: Arc<[u8]> = request.into_bytes().into();
        let addr = format!("{host}:{port}");
        let start = Instant::now();
        let end = start + duration;
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..connections {
            let (request, addr) = (request.clone(), addr.clone());
            tasks.spawn(async move { connection(&addr, &request, end).await });
        }
        let (mut all, mut failed, mut refused, mut last) = (Vec::new(), 0, 0, start);
        while let Some(done) = tasks.join_next().await {
            let c = done.context("a load task failed")?;
            all.extend(c.latencies_us);
            failed += c.failed;
            refused += c.refused;
            last = last.max(c.last);
        }
        let seconds = last.duration_since(start).as_secs_f64().max(1e-3);
        // As wrk counts: latencies of every answer, refusals as errors, not throughput.
        let mut r = LoadResult::from_latencies(all, seconds, failed + refused);
        r.requests = r.requests.saturating_sub(refused);
        Ok(r)
    }

    /// What one connection measured.
    struct Connection {
        latencies_us: Vec<u32>,
        /// Requests without an answer (a closed connection, a timeout).
        failed: u64,
        /// Answers with a status other than 2xx or 3xx.
        refused: u64,
        /// When its last answer came.
        last: Instant,
    }

    async fn connection(addr: &str, request: &[u8], end: Instant) -> Connection {
        let mut c = Connection {
            latencies_us: Vec::with_capacity(1 << 14),
            failed: 0,
            refused: 0,
            last: Instant::now(),
        };
        let mut buf = BytesMut::with_capacity(64 * 1024);
        'connect: while Instant::now() < end {
            let Ok(mut stream) = TcpStream::connect(addr).await else {
                c.failed += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            buf.clear();
            while Instant::now() < end {
                let t0 = Instant::now();
                let answer =
                    tokio::time::timeout(LOAD_TIMEOUT, exchange(&mut stream, request, &mut buf))
                        .await;
                let Ok(Ok((status, close))) = answer else {
                    c.failed += 1;
                    continue 'connect;
                };
                c.last = Instant::now();
                c.latencies_us
                    .push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
                if !(200..400).contains(&status) {
                    c.refused += 1;
                }
                if close {
                    continue 'connect;
                }
            }
        }
        c
    }

    /// Sends one request and reads its answer; returns its status and whether the
    /// server closes the connection after it.
    async fn exchange(
        stream: &mut TcpStream,
        request: &[u8],
        buf: &mut BytesMut,
    ) -> Result<(u16, bool)> {
        stream.write_all(request).await?;
        let head_end = loop {
            if let Some(i) = find(buf, b"\r\n\r\n") {
                break i + 4;
            }
            ensure!(buf.len() < 64 * 1024, "answer head over 64 KiB");
            fill(stream, buf).await?;
        };
        let head = std::str::from_utf8(&buf[..head_end])
            .context("answer head")?
            .to_ascii_lowercase();
        buf.advance(head_end);
        let status: u16 = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .context("no status")?;
        let (mut length, mut chunked, mut close) = (None, false, false);
        for line in head.split("\r\n").skip(1) {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            match name.trim() {
                "content-length" => length = value.trim().parse::<usize>().ok(),
                "transfer-encoding" => chunked = value.contains("chunked"),
                "connection" => close = value.contains("close"),
                _ => {}
            }
        }
        if chunked {
            loop {
                let line = read_line(stream, buf).await?;
                let size = line.split(';').next().unwrap_or_default().trim();
                let size = usize::from_str_radix(size, 16).context("chunk size")?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    while !read_line(stream, buf).await?.is_empty() {}
                    break;
                }
                skip(stream, buf, size).await?;
                ensure!(
                    read_line(stream, buf).await?.is_empty(),
                    "chunk without CRLF"
                );
            }
        } else {
            let n = length.context("answer with neither content-length nor chunks")?;
            skip(stream, buf, n).await?;
        }
        Ok((status, close))
    }

    fn find(buf: &[u8], needle: &[u8]) -> Option<usize> {
        buf.windows(needle.len()).position(|w| w == needle)
    }

    async fn fill(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<()> {
        buf.reserve(64 * 1024);
        if stream.read_buf(buf).await? == 0 {
            bail!("connection closed");
        }
        Ok(())
    }

    async fn read_line(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<String> {
        loop {
            if let Some(i) = find(buf, b"\r\n") {
                let line = String::from_utf8_lossy(&buf[..i]).into_owned();
                buf.advance(i + 2);
                return Ok(line);
            }
            ensure!(buf.len() < 8192, "line over 8 KiB");
            fill(stream, buf).await?;
        }
    }

    /// Reads and drops `n` bytes.
    async fn skip(stream: &mut TcpStream, buf: &mut BytesMut, mut n: usize) -> Result<()> {
        loop {
            let take = n.min(buf.len());
            buf.advance(take);
            n -= take;
            if n == 0 {
                return Ok(());
            }
            fill(stream, buf).await?;
        }
    }
}
