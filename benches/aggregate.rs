//! Aggregate benchmark: latency of the merged first page of a user's tasks
//! (`GET /api/aggregate/tasks?limit=50`) over 1, 10 and 100 devices holding 10,000 tasks
//! each, beside the same work done by NATS scatter-gather, and one device's page query
//! through its task store beside the same page read with rusqlite directly, all measured
//! in the same run.
//!
//! The NATS peer: every device its own NATS connection (to the machine's `nats-server`,
//! 127.0.0.1:4222 unless `--nats URL`) and its own SQLite file (the very file its cocoon
//! uses, read with rusqlite directly, a cached prepared statement), answering a request
//! on one subject with its newest 50 tasks as JSON; the requester publishes once,
//! gathers every answer, decodes each, merges them with the hub's own merge
//! (`aggregate::merge`) and encodes the merged answer as the hub does. Its devices run
//! as tasks in this process, like the cocoons, so both share the same two worker
//! threads (the default runtime on this machine's two cores).
//!
//! Everything runs in this one process (with jemalloc, as the `adi` binary), the way
//! `adi dev` wires it: an in-process hub
//! (`adi_signaling::spawn`, SQLite catalog in a temp dir, listening on 127.0.0.1:0), one
//! user with an API key exchanged for a JWT through `POST /api/auth/token`, and real
//! cocoons (`adi_cocoon::start`), each with its own data dir and its own SQLite task
//! store, enrolled with setup tokens and connected over loopback WebSockets.
//!
//! Seeding: 10,000 tasks are created once, through the task store, into a seed file
//! that is then closed (which checkpoints its WAL) and copied into every device's data
//! dir before its cocoon starts. Task ids and `created_at` therefore repeat across
//! devices; the merged order breaks ties by device id, so for a latency benchmark this
//! is the same work as distinct tasks.
//!
//! The fleet grows in steps (1, then 10, then 100 devices). At each step, once every
//! device is online and answers, the bench measures sequentially, on one keep-alive
//! HTTP client, after a warm-up:
//!
//! - `merged p1`: the merged first page, checking each answer has a full page and every
//!   device `ok` (problems are counted and printed, never fatal), and then the NATS
//!   peer's merged first page, checked the same way; the two alternate for `--rounds`
//!   rounds and each figure is the median over the rounds;
//! - `merged p2`: the second page, with the first page's `next_cursor`;
//! - `1-dev REST`: one device's page through the hub,
//!   `GET /api/cocoons/{id}/tasks?limit=50` (one WebSocket round trip, no merge);
//! - `local`: the device's own query, `store.list(&TaskFilter::default(), None, 50)` on
//!   the first device's store, which is what each device runs during the fan-out;
//! - `bare`: the same page read from the same file with rusqlite directly on the
//!   calling thread (the store's SQL, a cached prepared statement, rows into tasks),
//!   each read in turn with one of `local`'s, so both meet the same disturbances;
//! - the process CPU time per merged request (hub, cocoons and client share the
//!   process and its cores);
//! - thread switches per request (every thread's voluntary and involuntary context
//!   switches, from `/proc`), for adi in this process and for the NATS peer in this
//!   process and in `nats-server`: what a request pays in sleeps and wake-ups.
//!
//! At the end it times, without any network, the pieces the hub and devices repeat per
//! device (encoding and decoding one device's 50-task answer frame) and the merge of
//! 100 device pages, so the scaling can be attributed.
//!
//! Run (release profile; about a minute once built, the first build takes a few):
//!
//! ```text
//! cargo bench --bench aggregate
//! cargo bench --bench aggregate -- --max-devices 10 --iterations 50
//! ```
//!
//! Options: `--max-devices N` (default 100; the steps are 1, 10, 100 up to N, plus N),
//! `--tasks N` (tasks per device, default 10,000), `--iterations N` (measured requests
//! per scenario and round; default 500 up to 10 devices, 200 above), `--warmup N`
//! (default 20), `--limit N` (page size, default 50), `--rounds N` (odd, default 3),
//! `--nats URL`. Unknown flags (such as the `--bench` cargo adds) are ignored. Figures
//! and their discussion are in `BENCHMARKS.md`.
//!
//! This is a benchmark, not a test: it asserts nothing about the figures, always stops
//! by itself and removes its temp dir.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use adi_cocoon::{CocoonConfig, CocoonHandle};
use adi_protocol::tasks::{NewTask, Position, Task, TaskFilter, TaskPage};
use adi_protocol::views::AggregateTasks;
use adi_protocol::{DeviceId, DeviceReply, DeviceToHub, Outcome, DEFAULT_MAX_FRAME_BYTES};
use adi_signaling::aggregate::{self, DeviceStatus, Part, PartStatus};
use adi_signaling::{HubConfig, HubHandle};
use adi_task_store::{SqliteTaskStore, TaskStore};
use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::Connection;

/// The allocator the `adi` binary runs with, so the hub and cocoons here allocate as
/// they do in production (the NATS peer, in the same process, gets it too).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Fleet sizes measured, in order (the fleet only grows).
const STEPS: [usize; 3] = [1, 10, 100];
/// How long one device may take to come online.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound on any single HTTP request of the bench.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How many problem descriptions are printed per scenario.
const MAX_PRINTED_PROBLEMS: usize = 5;
/// Local queries run to measure their CPU time (the clock ticks at 10 ms).
const LOCAL_CPU_ITERATIONS: usize = 4000;

/// Command-line settings.
#[derive(Debug, Clone)]
struct Args {
    max_devices: usize,
    tasks: usize,
    iterations: Option<usize>,
    warmup: usize,
    limit: u32,
    rounds: usize,
    nats: String,
}

impl Args {
    fn parse() -> Result<Self> {
        let mut args = Args {
            max_devices: 100,
            tasks: 10_000,
            iterations: None,
            warmup: 20,
            limit: 50,
            rounds: 3,
            nats: "127.0.0.1:4222".into(),
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = |name: &str| -> Result<String> {
                it.next().ok_or_else(|| anyhow!("{name} needs a value"))
            };
            match flag.as_str() {
                "--max-devices" => args.max_devices = value(&flag)?.parse()?,
                "--tasks" => args.tasks = value(&flag)?.parse()?,
                "--iterations" => args.iterations = Some(value(&flag)?.parse()?),
                "--warmup" => args.warmup = value(&flag)?.parse()?,
                "--limit" => args.limit = value(&flag)?.parse()?,
                "--rounds" => args.rounds = value(&flag)?.parse()?,
                "--nats" => args.nats = value(&flag)?,
                _ => {} // `--bench` and anything else cargo passes.
            }
        }
        if args.max_devices == 0 || args.tasks == 0 || args.limit == 0 {
            bail!("--max-devices, --tasks and --limit must be at least 1");
        }
        if args.iterations == Some(0) {
            bail!("--iterations must be at least 1");
        }
        if args.rounds.is_multiple_of(2) {
            bail!("--rounds must be odd, so that the median is one round's figure");
        }
        Ok(args)
    }

    fn steps(&self) -> Vec<usize> {
        let mut steps: Vec<usize> = STEPS
            .iter()
            .copied()
            .filter(|&n| n <= self.max_devices)
            .collect();
        if steps.last() != Some(&self.max_devices) {
            steps.push(self.max_devices);
        }
        steps
    }

    fn iterations_for(&self, devices: usize) -> usize {
        self.iterations
            .unwrap_or(if devices <= 10 { 500 } else { 200 })
    }
}

/// Summary of one series of latencies.
#[derive(Debug, Clone, Copy)]
struct Summary {
    p50: Duration,
    p99: Duration,
    mean: Duration,
    max: Duration,
}

impl Summary {
    fn of(samples: &[Duration]) -> Self {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let total: Duration = sorted.iter().sum();
        let n = u32::try_from(sorted.len().max(1)).unwrap_or(u32::MAX);
        Summary {
            p50: percentile(&sorted, 50.0),
            p99: percentile(&sorted, 99.0),
            mean: total / n,
            max: sorted.last().copied().unwrap_or_default(),
        }
    }
}

impl Summary {
    /// Each figure's median over rounds (an odd number of them, so it is one round's).
    fn median_of(rounds: &[Summary]) -> Self {
        let mid = |f: fn(&Summary) -> Duration| {
            let mut v: Vec<Duration> = rounds.iter().map(f).collect();
            v.sort_unstable();
            v.get(v.len() / 2).copied().unwrap_or_default()
        };
        Summary {
            p50: mid(|s| s.p50),
            p99: mid(|s| s.p99),
            mean: mid(|s| s.mean),
            max: mid(|s| s.max),
        }
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// What one scenario measured.
struct Scenario {
    devices: usize,
    iterations: usize,
    merged: Summary,
    merged_rounds: Vec<Summary>,
    nats: Summary,
    nats_rounds: Vec<Summary>,
    second_page: Summary,
    single_rest: Summary,
    local: Summary,
    bare: Summary,
    cpu_per_merged: Option<Duration>,
    cpu_per_nats: Option<Duration>,
    nats_server_cpu_per_request: Option<Duration>,
    cpu_per_single: Option<Duration>,
    cpu_per_local: Option<Duration>,
    /// Times the process's threads went to sleep or were preempted, per merged request.
    switches_per_merged: Option<f64>,
    /// The same per NATS scatter-gather, in this process and in `nats-server`.
    switches_per_nats: Option<f64>,
    nats_server_switches_per_request: Option<f64>,
    problems: Problems,
}

/// Answers that were not a full page from every device.
#[derive(Default)]
struct Problems {
    short_pages: usize,
    non_ok_parts: usize,
    missing_parts: usize,
    http_errors: usize,
    samples: Vec<String>,
}

impl Problems {
    fn note(&mut self, what: String) {
        if self.samples.len() < MAX_PRINTED_PROBLEMS {
            self.samples.push(what);
        }
    }

    fn total(&self) -> usize {
        self.short_pages + self.non_ok_parts + self.missing_parts + self.http_errors
    }
}

/// The hub, the user's credentials and the fleet.
struct Bench {
    args: Args,
    hub: HubHandle,
    user: adi_signaling::catalog::User,
    http: reqwest::Client,
    jwt: String,
    root: tempfile::TempDir,
    seed_file: PathBuf,
    cocoons: Vec<CocoonHandle>,
    device_ids: Vec<DeviceId>,
    device_files: Vec<PathBuf>,
    nats: NatsPeer,
    clk_tck: f64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse()?;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => println!("RLIMIT_NOFILE raised to {n}"),
        Err(e) => println!("could not raise RLIMIT_NOFILE: {e}"),
    }
    let started = Instant::now();
    let mut bench = Bench::start(args.clone()).await?;
    let outcome = bench.run().await;
    bench.stop().await;
    let scenarios = outcome?;
    print_table(&args, &scenarios);
    println!("\ntotal run time {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

impl Bench {
    async fn start(args: Args) -> Result<Self> {
        let root = tempfile::tempdir().context("creating the temp dir")?;
        let seed_dir = root.path().join("seed");
        let seeded = Instant::now();
        let seed_file = seed(&seed_dir, args.tasks).await?;
        let seed_bytes = std::fs::metadata(&seed_file).map_or(0, |m| m.len());
        println!(
            "seeded {} tasks in {:.1} s ({:.1} MiB, copied to every device)",
            args.tasks,
            seeded.elapsed().as_secs_f64(),
            seed_bytes as f64 / (1024.0 * 1024.0)
        );

        let hub = adi_signaling::spawn(HubConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            data_dir: root.path().join("hub"),
            ..HubConfig::default()
        })
        .await
        .context("starting the hub")?;
        let catalog = hub.catalog();
        let (user, api_key) = adi_signaling::auth::add_user(catalog.as_ref(), "bench")
            .await
            .context("creating the user")?;
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .context("building the HTTP client")?;
        let login: Value = http
            .post(format!("{}/api/auth/token", hub.url()))
            .json(&serde_json::json!({ "api_key": api_key }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let jwt = login["token"]
            .as_str()
            .ok_or_else(|| anyhow!("no token in {login}"))?
            .to_owned();
        let nats = NatsPeer::connect(&args.nats).await?;
        Ok(Bench {
            args,
            hub,
            user,
            http,
            jwt,
            root,
            seed_file,
            cocoons: Vec::new(),
            device_ids: Vec::new(),
            device_files: Vec::new(),
            nats,
            clk_tck: clock_ticks_per_second(),
        })
    }

    async fn run(&mut self) -> Result<Vec<Scenario>> {
        let mut scenarios = Vec::new();
        for devices in self.args.steps() {
            let grown = Instant::now();
            self.grow_to(devices).await?;
            self.wait_until_all_answer().await?;
            println!(
                "\n{devices} device(s) online and answering ({:.1} s to add)",
                grown.elapsed().as_secs_f64()
            );
            let scenario = self.measure().await?;
            print_scenario(&scenario);
            scenarios.push(scenario);
        }
        self.print_breakdown().await?;
        Ok(scenarios)
    }

    /// Starts cocoons until the fleet has `n`, each on a copy of the seed store.
    async fn grow_to(&mut self, n: usize) -> Result<()> {
        let catalog = self.hub.catalog();
        let first_new = self.cocoons.len();
        for i in first_new..n {
            let dir = self.root.path().join("devices").join(format!("d{i:03}"));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {dir:?}"))?;
            std::fs::copy(&self.seed_file, dir.join("tasks.db"))
                .with_context(|| format!("copying the seed store to {dir:?}"))?;
            let token = adi_signaling::tokens::issue(
                catalog.as_ref(),
                self.user.id,
                adi_signaling::tokens::Grant::Setup,
                Duration::from_secs(600),
                adi_signaling::auth::unix_now_i64(),
            )
            .await
            .context("issuing a setup token")?;
            self.device_files.push(dir.join("tasks.db"));
            let mut config = CocoonConfig::new(self.hub.url(), &dir, format!("bench-{i:03}"));
            config.setup_token = Some(token.token);
            config.exec_allowed = false;
            let cocoon = adi_cocoon::start(config)
                .await
                .with_context(|| format!("starting cocoon {i}"))?;
            self.cocoons.push(cocoon);
        }
        for (i, cocoon) in self.cocoons.iter().enumerate().skip(first_new) {
            let id = tokio::time::timeout(ONLINE_TIMEOUT, cocoon.online())
                .await
                .with_context(|| format!("cocoon {i} did not come online in time"))?
                .with_context(|| format!("cocoon {i} was refused"))?;
            let total = cocoon.runner().store().stats().await?.total;
            if usize::try_from(total).ok() != Some(self.args.tasks) {
                bail!("device {i} holds {total} tasks, not {}", self.args.tasks);
            }
            let file = self
                .device_files
                .get(i)
                .ok_or_else(|| anyhow!("no file for device {i}"))?;
            self.nats
                .add_device(&self.args.nats, file, id.clone(), format!("bench-{i:03}"))
                .await?;
            self.device_ids.push(id);
        }
        Ok(())
    }

    /// Polls the merged view until every device is listed `ok` (bounded).
    async fn wait_until_all_answer(&self) -> Result<()> {
        let n = self.cocoons.len();
        let mut last = String::new();
        for _ in 0..100 {
            match self.merged_page(None).await {
                Ok((_, page))
                    if page.devices.len() == n
                        && page.devices.iter().all(|d| d.status == PartStatus::Ok) =>
                {
                    return Ok(());
                }
                Ok((_, page)) => {
                    last = format!(
                        "{} of {n} devices listed, {} ok",
                        page.devices.len(),
                        page.devices
                            .iter()
                            .filter(|d| d.status == PartStatus::Ok)
                            .count()
                    );
                }
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the merged view never listed all {n} devices ok: {last}")
    }

    /// One merged page: wall time of the request until the whole body is in, then the
    /// parsed answer (parsing is not timed).
    async fn merged_page(&self, cursor: Option<&str>) -> Result<(Duration, AggregateTasks)> {
        let mut url = format!(
            "{}/api/aggregate/tasks?limit={}",
            self.hub.url(),
            self.args.limit
        );
        if let Some(c) = cursor {
            url.push_str("&cursor=");
            url.push_str(c);
        }
        let t0 = Instant::now();
        let resp = self.http.get(&url).bearer_auth(&self.jwt).send().await?;
        let status = resp.status();
        let body = resp.bytes().await?;
        let elapsed = t0.elapsed();
        if !status.is_success() {
            bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
        }
        let page: AggregateTasks =
            serde_json::from_slice(&body).context("parsing the merged page")?;
        Ok((elapsed, page))
    }

    /// One device's page through the hub (one WebSocket round trip, no merge).
    async fn device_page(&self, device: &DeviceId) -> Result<(Duration, usize)> {
        let url = format!(
            "{}/api/cocoons/{device}/tasks?limit={}",
            self.hub.url(),
            self.args.limit
        );
        let t0 = Instant::now();
        let resp = self.http.get(&url).bearer_auth(&self.jwt).send().await?;
        let status = resp.status();
        let body = resp.bytes().await?;
        let elapsed = t0.elapsed();
        if !status.is_success() {
            bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
        }
        let page: Value = serde_json::from_slice(&body)?;
        let n = page["tasks"].as_array().map_or(0, Vec::len);
        Ok((elapsed, n))
    }

    fn check(&self, page: &AggregateTasks, problems: &mut Problems) {
        let n = self.cocoons.len();
        let want = usize::try_from(self.args.limit)
            .unwrap_or(usize::MAX)
            .min(self.args.tasks.saturating_mul(n));
        if page.tasks.len() != want {
            problems.short_pages += 1;
            problems.note(format!("{} tasks instead of {want}", page.tasks.len()));
        }
        if page.devices.len() != n {
            problems.missing_parts += n.abs_diff(page.devices.len());
            problems.note(format!(
                "{} device parts instead of {n}",
                page.devices.len()
            ));
        }
        for d in page.devices.iter().filter(|d| d.status != PartStatus::Ok) {
            problems.non_ok_parts += 1;
            problems.note(describe(d));
        }
    }

    async fn measure(&mut self) -> Result<Scenario> {
        let devices = self.cocoons.len();
        let iterations = self.args.iterations_for(devices);
        let mut problems = Problems::default();

        // Merged first page, through the hub and through the NATS peer, in alternating
        // rounds so that both meet the same disturbances.
        let mut cursor = None;
        for _ in 0..self.args.warmup {
            let (_, page) = self.merged_page(None).await?;
            cursor = page.next_cursor;
            self.nats.merged(self.args.limit).await?;
        }
        let mut merged_rounds = Vec::with_capacity(self.args.rounds);
        let mut nats_rounds = Vec::with_capacity(self.args.rounds);
        let mut cpu_rounds = Vec::with_capacity(self.args.rounds);
        let mut nats_cpu_rounds = Vec::with_capacity(self.args.rounds);
        let mut nats_server_rounds = Vec::with_capacity(self.args.rounds);
        let mut switch_rounds = Vec::with_capacity(self.args.rounds);
        let mut nats_switch_rounds = Vec::with_capacity(self.args.rounds);
        let mut nats_server_switch_rounds = Vec::with_capacity(self.args.rounds);
        for _ in 0..self.args.rounds {
            let mut merged = Vec::with_capacity(iterations);
            let switches_before = switches("/proc/self");
            let cpu_before = self.process_cpu();
            for _ in 0..iterations {
                match self.merged_page(None).await {
                    Ok((elapsed, page)) => {
                        merged.push(elapsed);
                        self.check(&page, &mut problems);
                        cursor = page.next_cursor;
                    }
                    Err(e) => {
                        problems.http_errors += 1;
                        problems.note(format!("{e:#}"));
                    }
                }
            }
            cpu_rounds.push(self.cpu_per(cpu_before, merged.len()));
            switch_rounds.push(per_request(
                switches_before,
                switches("/proc/self"),
                merged.len(),
            ));
            merged_rounds.push(Summary::of(&merged));

            let mut nats = Vec::with_capacity(iterations);
            let server = nats_server_proc();
            let server_switches_before = server.as_deref().and_then(switches);
            let switches_before = switches("/proc/self");
            let cpu_before = self.process_cpu();
            let server_before = server
                .as_deref()
                .and_then(|s| self.cpu_of(&format!("{s}/stat")));
            for _ in 0..iterations {
                match self.nats.merged(self.args.limit).await {
                    Ok(answer) => {
                        nats.push(answer.elapsed);
                        self.check(&answer.page, &mut problems);
                    }
                    Err(e) => {
                        problems.http_errors += 1;
                        problems.note(format!("NATS: {e:#}"));
                    }
                }
            }
            nats_cpu_rounds.push(self.cpu_per(cpu_before, nats.len()));
            nats_switch_rounds.push(per_request(
                switches_before,
                switches("/proc/self"),
                nats.len(),
            ));
            nats_server_switch_rounds.push(per_request(
                server_switches_before,
                server.as_deref().and_then(switches),
                nats.len(),
            ));
            let server_after = server
                .as_deref()
                .and_then(|s| self.cpu_of(&format!("{s}/stat")));
            nats_server_rounds.push(match (server_before, server_after) {
                (Some(a), Some(b)) if b >= a && !nats.is_empty() => {
                    Some(Duration::from_secs_f64((b - a) / nats.len() as f64))
                }
                _ => None,
            });
            nats_rounds.push(Summary::of(&nats));
        }
        let cpu_per_merged = median(cpu_rounds);
        let cpu_per_nats = median(nats_cpu_rounds);
        let nats_server_cpu_per_request = median(nats_server_rounds);
        let switches_per_merged = median(switch_rounds);
        let switches_per_nats = median(nats_switch_rounds);
        let nats_server_switches_per_request = median(nats_server_switch_rounds);

        // Second page, with the first page's cursor.
        let mut second = Vec::with_capacity(iterations);
        if let Some(c) = cursor.as_deref() {
            for _ in 0..self.args.warmup.min(5) {
                self.merged_page(Some(c)).await?;
            }
            for _ in 0..iterations {
                match self.merged_page(Some(c)).await {
                    Ok((elapsed, page)) => {
                        second.push(elapsed);
                        self.check(&page, &mut problems);
                    }
                    Err(e) => {
                        problems.http_errors += 1;
                        problems.note(format!("page 2: {e:#}"));
                    }
                }
            }
        }

        // One device through the hub.
        let device = self
            .device_ids
            .first()
            .ok_or_else(|| anyhow!("no device"))?;
        for _ in 0..self.args.warmup {
            self.device_page(device).await?;
        }
        let mut single = Vec::with_capacity(iterations);
        let cpu_before = self.process_cpu();
        for _ in 0..iterations {
            let (elapsed, n) = self.device_page(device).await?;
            if n == 0 {
                problems.short_pages += 1;
                problems.note("single-device page was empty".into());
            }
            single.push(elapsed);
        }
        let cpu_per_single = self.cpu_per(cpu_before, single.len());

        // The device's local query.
        let store = self
            .cocoons
            .first()
            .ok_or_else(|| anyhow!("no cocoon"))?
            .runner()
            .store()
            .clone();
        // The same page read with rusqlite directly, on this thread, from the same file,
        // each query in turn with the store's, so both meet the same disturbances.
        let file = self
            .device_files
            .first()
            .ok_or_else(|| anyhow!("no device file"))?;
        let (local, bare) =
            local_and_bare_latencies(&store, file, self.args.warmup, iterations, self.args.limit)
                .await?;
        // CPU per local query, over enough queries for the clock-tick resolution.
        let cpu_iterations = iterations.max(LOCAL_CPU_ITERATIONS);
        let cpu_before = self.process_cpu();
        local_latencies(&store, 0, cpu_iterations, self.args.limit).await?;
        let cpu_per_local = self.cpu_per(cpu_before, cpu_iterations);

        Ok(Scenario {
            devices,
            iterations,
            merged: Summary::median_of(&merged_rounds),
            merged_rounds,
            nats: Summary::median_of(&nats_rounds),
            nats_rounds,
            second_page: Summary::of(&second),
            single_rest: Summary::of(&single),
            local: Summary::of(&local),
            bare: Summary::of(&bare),
            cpu_per_merged,
            cpu_per_nats,
            nats_server_cpu_per_request,
            switches_per_merged,
            switches_per_nats,
            nats_server_switches_per_request,
            cpu_per_single,
            cpu_per_local,
            problems,
        })
    }

    /// Times, without network, what is repeated per device (one answer frame encoded by
    /// the device and decoded by the hub) and the hub's merge of every device's page.
    async fn print_breakdown(&self) -> Result<()> {
        let store = self
            .cocoons
            .first()
            .ok_or_else(|| anyhow!("no cocoon"))?
            .runner()
            .store()
            .clone();
        // As a device sends it: unlabelled (the hub labels each task).
        let page = store
            .list(&TaskFilter::default(), None, self.args.limit)
            .await?;
        let iterations = self.args.iterations_for(1).max(200);

        let frame = adi_protocol::encode(&DeviceToHub::Response {
            request_id: 1,
            outcome: Outcome::Ok(DeviceReply::Tasks { page: page.clone() }),
        });
        let mut encode = Vec::with_capacity(iterations);
        let mut decode = Vec::with_capacity(iterations);
        let mut general = Vec::with_capacity(iterations);
        for i in 0..iterations {
            let msg = DeviceToHub::Response {
                request_id: i as u64,
                outcome: Outcome::Ok(DeviceReply::Tasks { page: page.clone() }),
            };
            let t0 = Instant::now();
            let text = adi_protocol::encode(&msg);
            encode.push(t0.elapsed());
            let t0 = Instant::now();
            let back = adi_protocol::decode_device_frame(&text, DEFAULT_MAX_FRAME_BYTES)
                .map_err(|e| anyhow!("decoding a device answer: {e}"))?;
            decode.push(t0.elapsed());
            std::hint::black_box(back);
            let t0 = Instant::now();
            let back: DeviceToHub = adi_protocol::decode(text.as_bytes(), DEFAULT_MAX_FRAME_BYTES)
                .map_err(|e| anyhow!("decoding a device answer: {e}"))?;
            general.push(t0.elapsed());
            std::hint::black_box(back);
        }

        let n = self.cocoons.len();
        let parts: Vec<Part<TaskPage>> = (0..n)
            .map(|i| {
                let id = synthetic_device_id(i);
                let mut p = page.clone();
                for t in &mut p.tasks {
                    t.device_id = Some(id.clone());
                }
                Part {
                    status: DeviceStatus {
                        device_id: id,
                        name: format!("bench-{i:03}"),
                        status: PartStatus::Ok,
                        error: None,
                    },
                    answer: Some(p),
                }
            })
            .collect();
        let mut merge = Vec::with_capacity(iterations);
        let mut body_len = 0;
        let mut encode_answer = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let t0 = Instant::now();
            let (tasks, next) = aggregate::merge(&parts, self.args.limit);
            merge.push(t0.elapsed());
            let answer = AggregateTasks {
                tasks,
                devices: parts.iter().map(|p| p.status.clone()).collect(),
                next_cursor: next.map(|c| c.encode()),
            };
            let t0 = Instant::now();
            let body = serde_json::to_vec(&answer)?;
            encode_answer.push(t0.elapsed());
            body_len = body.len();
        }

        let catalog = self.hub.catalog();
        let mut lookup = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let t0 = Instant::now();
            let owned = catalog.devices_of(self.user.id).await?;
            lookup.push(t0.elapsed());
            std::hint::black_box(owned);
        }

        // The floor any HTTP request to the hub pays on this client: no access check,
        // no device.
        let health = format!("{}/healthz", self.hub.url());
        let mut http = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let t0 = Instant::now();
            let resp = self.http.get(&health).send().await?;
            let status = resp.status();
            resp.bytes().await?;
            http.push(t0.elapsed());
            if !status.is_success() {
                bail!("GET /healthz: HTTP {status}");
            }
        }

        let (encode, decode) = (Summary::of(&encode), Summary::of(&decode));
        let general = Summary::of(&general);
        let http = Summary::of(&http);
        let lookup = Summary::of(&lookup);
        let (merge, encode_answer) = (Summary::of(&merge), Summary::of(&encode_answer));
        println!("\nper-piece costs, in process, no network ({iterations} iterations, p50):");
        println!(
            "  one device's answer frame ({} tasks, {} bytes): encode {} ms, decode {} ms \
             (the hub's direct path; {} ms the general way)",
            page.tasks.len(),
            frame.len(),
            ms(encode.p50),
            ms(decode.p50),
            ms(general.p50)
        );
        println!(
            "  merge of {n} device pages ({} tasks): {} ms; JSON of the merged answer \
             ({body_len} bytes): {} ms",
            n * page.tasks.len(),
            ms(merge.p50),
            ms(encode_answer.p50)
        );
        println!(
            "  the caller's {n} devices (devices_of, once per merged request, from the hub's \
             RAM view): {} ms",
            ms(lookup.p50)
        );
        println!(
            "  one HTTP round trip to the hub on the bench's client (GET /healthz): {} ms",
            ms(http.p50)
        );
        Ok(())
    }

    /// Process CPU time per operation since `before`, over `n` operations.
    fn cpu_per(&self, before: Option<f64>, n: usize) -> Option<Duration> {
        let after = self.process_cpu()?;
        let before = before?;
        (n > 0 && after >= before).then(|| Duration::from_secs_f64((after - before) / n as f64))
    }

    /// CPU seconds (user + system) this process has used, from `/proc/self/stat`.
    fn process_cpu(&self) -> Option<f64> {
        self.cpu_of("/proc/self/stat")
    }

    /// CPU seconds (user + system) of the process whose `stat` file is `path`.
    fn cpu_of(&self, path: &str) -> Option<f64> {
        let stat = std::fs::read_to_string(path).ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        Some((utime + stime) / self.clk_tck)
    }

    /// Stops every cocoon, then the hub; the temp dir goes when `self` is dropped.
    async fn stop(mut self) {
        self.nats.stop();
        for cocoon in &self.cocoons {
            cocoon.stop();
        }
        for cocoon in self.cocoons.drain(..) {
            if tokio::time::timeout(Duration::from_secs(10), cocoon.join())
                .await
                .is_err()
            {
                println!("a cocoon did not stop within 10 s");
            }
        }
        if tokio::time::timeout(Duration::from_secs(10), self.hub.shutdown())
            .await
            .is_err()
        {
            println!("the hub did not stop within 10 s");
        }
    }
}

fn describe(d: &DeviceStatus) -> String {
    format!(
        "{} ({}): {:?} {}",
        d.name,
        d.device_id,
        d.status,
        d.error.as_deref().unwrap_or("")
    )
}

/// A distinct, well-formed device id for the merge-only measurement.
fn synthetic_device_id(i: usize) -> DeviceId {
    let mut mac = [0u8; 16];
    mac[..8].copy_from_slice(&(i as u64).to_be_bytes());
    DeviceId::from_mac(&mac)
}

/// Creates `n` tasks in a fresh store under `dir`, then writes a consistent one-file
/// snapshot of it (`VACUUM INTO`, no WAL beside it) and returns that file's path.
///
/// Copying the store's own file is not safe: `close` can return before its worker
/// threads have closed SQLite, and the last close checkpoints the WAL into the main
/// file, so a copy could catch the file half checkpointed.
async fn seed(dir: &Path, n: usize) -> Result<PathBuf> {
    let db = dir.join("tasks.db");
    let store = SqliteTaskStore::open(&db)
        .await
        .context("opening the seed store")?;
    for i in 0..n {
        store
            .create(NewTask {
                title: format!("task {i}"),
                description: format!("seeded task number {i} for the aggregate benchmark"),
                ..NewTask::default()
            })
            .await
            .context("creating a seed task")?;
    }
    let snapshot = dir.join("snapshot.db");
    let mut conn = SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(&db))
        .await
        .context("opening the seed store for the snapshot")?;
    sqlx::query("VACUUM INTO ?")
        .bind(snapshot.to_string_lossy().into_owned())
        .execute(&mut conn)
        .await
        .context("writing the seed snapshot")?;
    conn.close().await?;
    store.close().await;
    Ok(snapshot)
}

/// The subject every NATS peer device answers on: one publish reaches them all.
const NATS_SUBJECT: &str = "bench.aggregate.tasks";
/// How long the NATS requester waits for every device, as the hub's default fan-out.
const NATS_DEADLINE: Duration = Duration::from_secs(5);

/// The listing query of the first page, as the task store builds it for no filter.
fn page_sql() -> String {
    "SELECT id, title, description, status, command, requirements, input, output, \
     exit_code, error, created_at, updated_at FROM tasks WHERE 1 = 1 \
     ORDER BY created_at DESC, id DESC LIMIT ?"
        .to_owned()
}

/// One NATS peer device's answer: its id (which the hub knows from the connection)
/// and its page.
#[derive(serde::Serialize, serde::Deserialize)]
struct NatsAnswer {
    device_id: DeviceId,
    page: TaskPage,
}

/// What one NATS scatter-gather produced.
struct NatsMerged {
    elapsed: Duration,
    page: AggregateTasks,
}

/// The NATS scatter-gather peer: every device its own NATS connection and its own
/// SQLite file (the cocoon's own copy of the seed, read with rusqlite directly), the
/// requester publishing once to all of them, gathering their JSON pages, decoding them,
/// merging with the hub's own merge and encoding the merged answer as the hub does.
struct NatsPeer {
    client: async_nats::Client,
    replies: async_nats::Subscriber,
    prefix: String,
    seq: u64,
    devices: Vec<tokio::task::JoinHandle<()>>,
    names: std::collections::HashMap<DeviceId, String>,
}

impl NatsPeer {
    async fn connect(url: &str) -> Result<Self> {
        let client = async_nats::connect(url)
            .await
            .with_context(|| format!("connecting to NATS at {url}"))?;
        let prefix = client.new_inbox();
        let replies = client.subscribe(format!("{prefix}.*")).await?;
        client.flush().await?;
        Ok(NatsPeer {
            client,
            replies,
            prefix,
            seq: 0,
            devices: Vec::new(),
            names: std::collections::HashMap::new(),
        })
    }

    /// Starts a device answering from `file`.
    async fn add_device(
        &mut self,
        url: &str,
        file: &Path,
        id: DeviceId,
        name: String,
    ) -> Result<()> {
        let client = async_nats::connect(url).await?;
        let mut requests = client.subscribe(NATS_SUBJECT).await?;
        client.flush().await?;
        let conn = rusqlite::Connection::open_with_flags(
            file,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("opening {file:?}"))?;
        let device_id = id.clone();
        self.devices.push(tokio::spawn(async move {
            let sql = page_sql();
            while let Some(msg) = requests.next().await {
                let Some(reply) = msg.reply else { continue };
                let limit = std::str::from_utf8(&msg.payload)
                    .ok()
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(50);
                let body = match bare_page(&conn, &sql, limit) {
                    Ok(page) => serde_json::to_vec(&NatsAnswer {
                        device_id: device_id.clone(),
                        page,
                    })
                    .unwrap_or_default(),
                    Err(_) => Vec::new(),
                };
                let _ = client.publish(reply, body.into()).await;
            }
        }));
        self.names.insert(id, name);
        Ok(())
    }

    /// One merged first page over every device.
    async fn merged(&mut self, limit: u32) -> Result<NatsMerged> {
        self.seq += 1;
        let reply = format!("{}.{}", self.prefix, self.seq);
        let n = self.devices.len();
        let t0 = Instant::now();
        self.client
            .publish_with_reply(NATS_SUBJECT, reply.clone(), limit.to_string().into())
            .await?;
        let until = tokio::time::Instant::now() + NATS_DEADLINE;
        let mut parts: Vec<Part<TaskPage>> = Vec::with_capacity(n);
        while parts.len() < n {
            let msg = match tokio::time::timeout_at(until, self.replies.next()).await {
                Ok(Some(msg)) => msg,
                Ok(None) => bail!("the NATS reply subscription ended"),
                Err(_) => break,
            };
            if msg.subject.as_str() != reply {
                continue; // A late answer to an earlier request.
            }
            let answer: NatsAnswer =
                serde_json::from_slice(&msg.payload).context("decoding a NATS device's answer")?;
            let mut page = answer.page;
            for t in &mut page.tasks {
                t.device_id = Some(answer.device_id.clone());
            }
            let name = self
                .names
                .get(&answer.device_id)
                .cloned()
                .unwrap_or_default();
            parts.push(Part {
                status: DeviceStatus {
                    device_id: answer.device_id,
                    name,
                    status: PartStatus::Ok,
                    error: None,
                },
                answer: Some(page),
            });
        }
        let (tasks, next) = aggregate::merge(&parts, limit);
        let mut devices: Vec<DeviceStatus> = parts.into_iter().map(|p| p.status).collect();
        devices.sort_by(|a, b| a.name.cmp(&b.name).then(a.device_id.cmp(&b.device_id)));
        let page = AggregateTasks {
            tasks,
            devices,
            next_cursor: next.map(|c| c.encode()),
        };
        let body = serde_json::to_vec(&page)?;
        let elapsed = t0.elapsed();
        std::hint::black_box(body);
        Ok(NatsMerged { elapsed, page })
    }

    fn stop(&mut self) {
        for device in self.devices.drain(..) {
            device.abort();
        }
    }
}

/// The first page read with rusqlite directly: a cached prepared statement, rows into
/// tasks as the device sends them.
fn bare_page(conn: &rusqlite::Connection, sql: &str, limit: u32) -> rusqlite::Result<TaskPage> {
    let mut statement = conn.prepare_cached(sql)?;
    let tasks = statement
        .query_map([limit], task_of)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let next = (tasks.len() == usize::try_from(limit).unwrap_or(usize::MAX))
        .then(|| tasks.last())
        .flatten()
        .map(|t| Position {
            created_at: t.created_at,
            id: t.id,
        });
    Ok(TaskPage { tasks, next })
}

/// A task row, decoded as a device decodes it.
fn task_of(row: &rusqlite::Row<'_>) -> rusqlite::Result<Task> {
    fn bad(i: usize, e: impl std::fmt::Display) -> rusqlite::Error {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            e.to_string().into(),
        )
    }
    fn json<T: serde::de::DeserializeOwned>(
        row: &rusqlite::Row<'_>,
        i: usize,
    ) -> rusqlite::Result<Option<T>> {
        row.get::<_, Option<String>>(i)?
            .map(|s| serde_json::from_str(&s).map_err(|e| bad(i, e)))
            .transpose()
    }
    Ok(Task {
        id: row.get::<_, String>(0)?.parse().map_err(|e| bad(0, e))?,
        title: row.get(1)?,
        description: row.get(2)?,
        status: row.get::<_, String>(3)?.parse().map_err(|e| bad(3, e))?,
        command: json(row, 4)?,
        requirements: json(row, 5)?.unwrap_or_default(),
        input: json(row, 6)?,
        output: json(row, 7)?,
        exit_code: row.get(8)?,
        error: row.get(9)?,
        created_at: row.get(10)?,
        updated_at: row.get(11)?,
        device_id: None,
    })
}

/// Latencies of [`bare_page`] on `file`, on the calling thread.
/// The store's page query and the same page read with rusqlite directly, in turn.
async fn local_and_bare_latencies(
    store: &Arc<dyn TaskStore>,
    file: &Path,
    warmup: usize,
    iterations: usize,
    limit: u32,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let conn = rusqlite::Connection::open_with_flags(
        file,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let sql = page_sql();
    let filter = TaskFilter::default();
    for _ in 0..warmup {
        bare_page(&conn, &sql, limit)?;
        store.list(&filter, None, limit).await?;
    }
    let mut local = Vec::with_capacity(iterations);
    let mut bare = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        local.push(timed_list(store, &filter, limit).await?);
        let t0 = Instant::now();
        let page = bare_page(&conn, &sql, limit)?;
        bare.push(t0.elapsed());
        std::hint::black_box(page);
    }
    Ok((local, bare))
}

async fn local_latencies(
    store: &Arc<dyn TaskStore>,
    warmup: usize,
    iterations: usize,
    limit: u32,
) -> Result<Vec<Duration>> {
    let filter = TaskFilter::default();
    for _ in 0..warmup {
        store.list(&filter, None, limit).await?;
    }
    let mut out = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        out.push(timed_list(store, &filter, limit).await?);
    }
    Ok(out)
}

/// How long one page query through the store took.
async fn timed_list(
    store: &Arc<dyn TaskStore>,
    filter: &TaskFilter,
    limit: u32,
) -> Result<Duration> {
    let t0 = Instant::now();
    let page = store.list(filter, None, limit).await?;
    let elapsed = t0.elapsed();
    std::hint::black_box(page);
    Ok(elapsed)
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|&t| t > 0.0)
        .unwrap_or(100.0)
}

fn print_scenario(s: &Scenario) {
    for (i, (a, n)) in s.merged_rounds.iter().zip(&s.nats_rounds).enumerate() {
        println!(
            "  round {}: merged p1 p50 {} ms p99 {} ms | NATS scatter-gather p50 {} ms p99 {} ms",
            i + 1,
            ms(a.p50),
            ms(a.p99),
            ms(n.p50),
            ms(n.p99)
        );
    }
    println!(
        "  merged p1: p50 {} ms  p99 {} ms  mean {} ms  max {} ms  ({} requests per round, median of {} rounds)",
        ms(s.merged.p50),
        ms(s.merged.p99),
        ms(s.merged.mean),
        ms(s.merged.max),
        s.iterations,
        s.merged_rounds.len()
    );
    println!(
        "  NATS:      p50 {} ms  p99 {} ms  mean {} ms  max {} ms  (adi/NATS p50 {:.2}, p99 {:.2})",
        ms(s.nats.p50),
        ms(s.nats.p99),
        ms(s.nats.mean),
        ms(s.nats.max),
        ratio(s.merged.p50, s.nats.p50),
        ratio(s.merged.p99, s.nats.p99)
    );
    println!(
        "  merged p2: p50 {} ms  p99 {} ms  mean {} ms",
        ms(s.second_page.p50),
        ms(s.second_page.p99),
        ms(s.second_page.mean)
    );
    println!(
        "  1-dev REST: p50 {} ms  p99 {} ms  mean {} ms",
        ms(s.single_rest.p50),
        ms(s.single_rest.p99),
        ms(s.single_rest.mean)
    );
    println!(
        "  local:     p50 {} ms  p99 {} ms  mean {} ms",
        ms(s.local.p50),
        ms(s.local.p99),
        ms(s.local.mean)
    );
    println!(
        "  bare rusqlite: p50 {} ms  p99 {} ms  mean {} ms  (store/bare p50 {:.2})",
        ms(s.bare.p50),
        ms(s.bare.p99),
        ms(s.bare.mean),
        ratio(s.local.p50, s.bare.p50)
    );
    let cpu = |d: Option<Duration>| d.map_or_else(|| "-".to_owned(), ms);
    println!(
        "  process CPU per operation: merged p1 {} ms, 1-dev REST {} ms, local {} ms",
        cpu(s.cpu_per_merged),
        cpu(s.cpu_per_single),
        cpu(s.cpu_per_local)
    );
    println!(
        "  CPU per NATS scatter-gather: this process {} ms, nats-server {} ms",
        cpu(s.cpu_per_nats),
        cpu(s.nats_server_cpu_per_request)
    );
    let switches = |n: Option<f64>| n.map_or_else(|| "-".to_owned(), |n| format!("{n:.1}"));
    println!(
        "  thread switches per request: merged p1 {} in this process; NATS {} in this process + {} in nats-server",
        switches(s.switches_per_merged),
        switches(s.switches_per_nats),
        switches(s.nats_server_switches_per_request)
    );
    let p = &s.problems;
    println!(
        "  checks: {} problems (short pages {}, non-ok parts {}, missing parts {}, HTTP errors {})",
        p.total(),
        p.short_pages,
        p.non_ok_parts,
        p.missing_parts,
        p.http_errors
    );
    for sample in &p.samples {
        println!("    - {sample}");
    }
}

/// The median of the figures there are (rounds whose clock could not be read left out).
/// The `/proc` directory of the local `nats-server` (the first process of that name).
fn nats_server_proc() -> Option<String> {
    let pid = std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim() == "nats-server").then(|| e.file_name())
    })?;
    Some(format!("/proc/{}", pid.to_string_lossy()))
}

/// How many times the threads of the process at `proc_dir` have stopped running, by
/// waiting (voluntary) or being preempted: each is a sleep and a wake-up, the cost a
/// request pays in hand-offs between threads and processes.
fn switches(proc_dir: &str) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("{proc_dir}/task"))
        .ok()?
        .flatten()
    {
        // A thread that ended between the listing and the read counts no more.
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        for line in status.lines() {
            if let Some(n) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += n.trim().parse::<u64>().ok()?;
            }
        }
    }
    Some(total)
}

/// A count's growth per request.
fn per_request(before: Option<u64>, after: Option<u64>, n: usize) -> Option<f64> {
    let (before, after) = (before?, after?);
    (n > 0 && after >= before).then(|| (after - before) as f64 / n as f64)
}

/// The median of the figures there are (rounds whose figure could not be read left out).
fn median<T: PartialOrd + Copy>(figures: Vec<Option<T>>) -> Option<T> {
    let mut figures: Vec<T> = figures.into_iter().flatten().collect();
    figures.sort_unstable_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    figures.get(figures.len() / 2).copied()
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

fn print_table(args: &Args, scenarios: &[Scenario]) {
    println!(
        "\nmerged first page, adi (GET /api/aggregate/tasks?limit={}) vs NATS scatter-gather, \
         ms, medians of {} rounds:",
        args.limit, args.rounds
    );
    println!(
        "{:>7}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}  {:>10}  {:>10}  {:>10}",
        "devices",
        "adi p50",
        "NATS p50",
        "ratio",
        "adi p99",
        "NATS p99",
        "ratio",
        "store p50",
        "bare p50",
        "store/bare"
    );
    for s in scenarios {
        println!(
            "{:>7}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}  {:>10}  {:>10}  {:>10}",
            s.devices,
            ms(s.merged.p50),
            ms(s.nats.p50),
            format!("{:.2}x", ratio(s.merged.p50, s.nats.p50)),
            ms(s.merged.p99),
            ms(s.nats.p99),
            format!("{:.2}x", ratio(s.merged.p99, s.nats.p99)),
            ms(s.local.p50),
            ms(s.bare.p50),
            format!("{:.2}x", ratio(s.local.p50, s.bare.p50)),
        );
    }
    println!(
        "\nmerged first page (GET /api/aggregate/tasks?limit={}) vs one device's local query, ms:",
        args.limit
    );
    println!(
        "{:>7}  {:>12}  {:>10}  {:>10}  {:>9}  {:>9}  {:>16}  {:>10}  {:>10}  {:>13}  {:>10}  {:>8}",
        "devices",
        "tasks/device",
        "merged p50",
        "merged p99",
        "local p50",
        "local p99",
        "merged/local p50",
        "page2 p50",
        "page2 p99",
        "1-dev REST p50",
        "CPU/merged",
        "problems"
    );
    for s in scenarios {
        let ratio = s.merged.p50.as_secs_f64() / s.local.p50.as_secs_f64().max(1e-9);
        println!(
            "{:>7}  {:>12}  {:>10}  {:>10}  {:>9}  {:>9}  {:>16}  {:>10}  {:>10}  {:>13}  {:>10}  {:>8}",
            s.devices,
            args.tasks,
            ms(s.merged.p50),
            ms(s.merged.p99),
            ms(s.local.p50),
            ms(s.local.p99),
            format!("{ratio:.1}x"),
            ms(s.second_page.p50),
            ms(s.second_page.p99),
            ms(s.single_rest.p50),
            s.cpu_per_merged.map_or_else(|| "-".into(), ms),
            s.problems.total()
        );
    }
    if let Some(first) = scenarios.first() {
        for s in scenarios.iter().skip(1) {
            let added = (s.devices - first.devices) as f64;
            let wall = (s.merged.p50.as_secs_f64() - first.merged.p50.as_secs_f64()) / added;
            let cpu = match (s.cpu_per_merged, first.cpu_per_merged) {
                (Some(a), Some(b)) => {
                    format!("{:.3}", (a.as_secs_f64() - b.as_secs_f64()) / added * 1e3)
                }
                _ => "-".into(),
            };
            println!(
                "from {} to {} devices: +{:.3} ms merged p50 and +{cpu} ms process CPU per added device",
                first.devices,
                s.devices,
                wall * 1e3
            );
        }
    }
}
