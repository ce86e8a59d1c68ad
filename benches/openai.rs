//! The hub's OpenAI-compatible endpoint beside the same model server reached directly,
//! in one run.
//!
//! What it starts:
//!
//! - a stub OpenAI-compatible server in this process (axum on `127.0.0.1:0`) standing in
//!   for llama.cpp or vLLM: `GET /v1/models` lists one model; `POST /v1/chat/completions`
//!   answers `"stream": true` as a model server does, `--chunks` server-sent events
//!   (`data: {chat.completion.chunk}`, about 200 bytes each) then `data: [DONE]`, with a
//!   delay between two chunks (none for throughput, `--ttft-delay` for time to first
//!   token, so that the first chunk travels alone), and answers a request without
//!   `stream` with one `chat.completion` JSON body holding the same tokens. Its sockets
//!   have `TCP_NODELAY`, as a model server's (uvicorn's, through asyncio) and the hub's;
//! - a hub, `adi signaling serve` on SQLite in a temp dir, a user (`adi signaling user
//!   add`), a session (`POST /api/auth/token`) and an API key with the `capabilities`
//!   scope (`POST /api/keys`), the credential OpenAI clients send;
//! - a cocoon, `adi cocoon run --openai llm:PORT`, enrolled with a setup token; the bench
//!   waits until the hub's `/v1/models` lists the stub's model.
//!
//! The two paths get the same requests, bearer included (the stub ignores it): "adi" is
//! `POST {hub}/v1/chat/completions`, which the hub routes by model to the cocoon and
//! streams back over the device's WebSocket; "direct" is the stub's own URL. Every
//! client is a `reqwest` client with keep-alive and `TCP_NODELAY`, one per concurrent
//! client, on both paths. What it measures, each round running the adi and direct runs
//! of every measure back to back, in alternating order from round to round:
//!
//! 1. **Time to first token**: `--ttft-clients` clients each send streamed requests one
//!    after another (started evenly spread over one stream's length), `--ttft-requests`
//!    in all per path; the time from sending a request until its first complete
//!    `data:` event has arrived. Each stream is read to its end, so the connection is
//!    kept. p50 and p99 per path, and the difference.
//! 2. **Streamed chunks/s** at each `--concurrency`: each client loops streamed requests
//!    (no delay between chunks) and counts the chunks (events other than `[DONE]`) that
//!    arrive within `--duration`, after `--warmup` not counted.
//! 3. **Completions/s** at each `--concurrency`: the same with non-streamed chat
//!    requests, counting answers with status 200 read whole.
//!
//! Each run also gives the CPU of the hub and the cocoon per chunk or per completion
//! (`utime + stime`), this process's own (stub and clients), and the machine's busy
//! cores that no measured process accounts for: above a quarter of a core the run is
//! disturbed, and the pair of runs (adi and direct) is measured again, up to `--retries`
//! times, the last pair kept whatever it is; the report counts the disturbed runs kept.
//! The summary takes medians over `--rounds` (an odd number, so each median is one
//! round's figure). Its ceiling is the direct path's CPU per chunk or completion (all
//! measured processes) over the adi path's: the most of direct's rate the adi path can
//! reach with the same CPU to spend.
//!
//! ```text
//! cargo bench --bench openai
//! cargo bench --bench openai -- --rounds 3 --duration 10s --warmup 1s --concurrency 1,16
//! ```
//!
//! Options: `--rounds N` (default 3), `--duration D` (measured window of a throughput
//! run, default 10s), `--warmup D` (default 1s), `--concurrency 1,16` (clients of the
//! throughput runs), `--chunks N` (content chunks per streamed answer, default 32),
//! `--ttft-delay D` (between two chunks in the time-to-first-token runs, default 20ms),
//! `--ttft-requests N` (per path and round, default 300), `--ttft-clients N` (default 8),
//! `--retries N` (default 3).
//! Unknown flags (such as the `--bench` cargo adds) are ignored. `ADI_BENCH_RUST_LOG` in
//! the environment is `RUST_LOG` for hub and cocoon (default `warn`).
//!
//! A benchmark, not a test: it asserts nothing about the figures. It listens on loopback
//! only and kills the processes it started, also on error. Figures and their discussion
//! are in `BENCHMARKS.md`.

mod support;

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde_json::{json, Value};

use support::{cpu_ticks, median, quantile, HubApi, HubProcess, ADI};

/// The model the stub serves.
const MODEL: &str = "bench-model";
/// Busy cores unaccounted for above which a run counts as disturbed.
const NOISY_CORES: f64 = 0.25;
/// A request that takes longer than this is an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
struct Args {
    rounds: usize,
    duration: Duration,
    warmup: Duration,
    concurrency: Vec<usize>,
    chunks: usize,
    ttft_delay: Duration,
    ttft_requests: usize,
    ttft_clients: usize,
    retries: usize,
    rust_log: String,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        rounds: 3,
        duration: Duration::from_secs(10),
        warmup: Duration::from_secs(1),
        concurrency: vec![1, 16],
        chunks: 32,
        ttft_delay: Duration::from_millis(20),
        ttft_requests: 300,
        ttft_clients: 8,
        retries: 3,
        rust_log: std::env::var("ADI_BENCH_RUST_LOG").unwrap_or_else(|_| "warn".into()),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--rounds" => a.rounds = value()?.parse()?,
            "--duration" => a.duration = humantime::parse_duration(&value()?)?,
            "--warmup" => a.warmup = humantime::parse_duration(&value()?)?,
            "--concurrency" => {
                a.concurrency = value()?
                    .split(',')
                    .map(|s| s.trim().parse())
                    .collect::<Result<_, _>>()?
            }
            "--chunks" => a.chunks = value()?.parse()?,
            "--ttft-delay" => a.ttft_delay = humantime::parse_duration(&value()?)?,
            "--ttft-requests" => a.ttft_requests = value()?.parse()?,
            "--ttft-clients" => a.ttft_clients = value()?.parse()?,
            "--retries" => a.retries = value()?.parse()?,
            _ => {} // cargo's own flags, such as --bench
        }
    }
    ensure!(a.rounds > 0, "--rounds must be at least 1");
    ensure!(a.chunks > 0, "--chunks must be at least 1");
    ensure!(a.ttft_clients > 0, "--ttft-clients must be at least 1");
    ensure!(
        a.concurrency.iter().all(|&c| c > 0),
        "--concurrency must name client counts of at least 1"
    );
    Ok(a)
}

/// The stand-in model server.
mod stub {
    use super::*;

    /// What every answer is made of, built once so the stub costs little per request.
    pub struct Stub {
        /// The streamed answer's events, `data: [DONE]` last.
        events: Vec<Bytes>,
        /// The non-streamed answer.
        whole: Bytes,
        /// Delay between two content chunks, in microseconds.
        pub delay_us: AtomicU64,
    }

    impl Stub {
        pub fn set_delay(&self, d: Duration) {
            let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
            self.delay_us.store(us, Ordering::Relaxed);
        }
    }

    #[derive(serde::Deserialize)]
    struct ChatRequest {
        model: String,
        #[serde(default)]
        stream: bool,
    }

    async fn models() -> Json<Value> {
        Json(json!({"object": "list", "data": [
            {"id": MODEL, "object": "model", "created": 0, "owned_by": "bench"}
        ]}))
    }

    async fn chat(State(s): State<Arc<Stub>>, Json(req): Json<ChatRequest>) -> Response {
        if req.model != MODEL {
            return (
                axum::http::StatusCode::NOT_FOUND,
                Json(json!({"error": {"message": "no such model", "type": "invalid_request_error", "code": "model_not_found"}})),
            )
                .into_response();
        }
        if !req.stream {
            return (
                [(header::CONTENT_TYPE, "application/json")],
                s.whole.clone(),
            )
                .into_response();
        }
        let delay = Duration::from_micros(s.delay_us.load(Ordering::Relaxed));
        // The last content chunk is followed at once by `[DONE]`, as model servers do.
        let content = s.events.len() - 1;
        let events = s.clone();
        let stream = futures_util::stream::unfold(0usize, move |i| {
            let events = events.clone();
            async move {
                let event = events.events.get(i)?.clone();
                if i > 0 && i < content && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Some((Ok::<_, Infallible>(event), i + 1))
            }
        });
        (
            [
                (header::CONTENT_TYPE, "text/event-stream"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            Body::from_stream(stream),
        )
            .into_response()
    }

    /// Starts the stub on a free loopback port; it serves until the process ends.
    pub async fn start(chunks: usize) -> Result<(Arc<Stub>, u16)> {
        let mut events = Vec::with_capacity(chunks + 1);
        let mut text = String::new();
        for i in 0..chunks {
            let token = format!("tok{i} ");
            text.push_str(&token);
            let last = i + 1 == chunks;
            let chunk = json!({"id": "chatcmpl-bench", "object": "chat.completion.chunk",
                "created": 0, "model": MODEL, "system_fingerprint": "fp_bench",
                "choices": [{"index": 0, "delta": {"content": token}, "logprobs": null,
                    "finish_reason": if last { json!("stop") } else { Value::Null }}]});
            events.push(Bytes::from(format!("data: {chunk}\n\n")));
        }
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
        let whole = serde_json::to_vec(&json!({
            "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": null,
                "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks}
        }))?;
        let s = Arc::new(Stub {
            events,
            whole: Bytes::from(whole),
            delay_us: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/v1/models", get(models))
            .route("/v1/chat/completions", post(chat))
            .with_state(s.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        // As model servers do (uvicorn, through asyncio, sets it on every socket), and as
        // the hub does: each chunk leaves when it is written, without waiting for the
        // client's acknowledgement of the one before.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                eprintln!("stub: TCP_NODELAY not set: {e}");
            }
        });
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("stub server ended: {e:#}");
            }
        });
        Ok((s, port))
    }
}

/// A cocoon process, killed on drop.
struct CocoonProcess {
    child: Child,
    log: PathBuf,
}

impl CocoonProcess {
    fn start(hub: &str, token: &str, stub_port: u16, dir: &Path, rust_log: &str) -> Result<Self> {
        let log = dir.join("cocoon.log");
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = Command::new(ADI)
            .args(["cocoon", "run", "--hub", hub, "--name", "bench", "--token"])
            .arg(token)
            .arg("--data-dir")
            .arg(dir.join("cocoon"))
            .arg("--openai")
            .arg(format!("llm:{stub_port}"))
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("starting the cocoon")?;
        Ok(CocoonProcess { child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            bail!("the cocoon exited ({status}); its log:\n{log}");
        }
        Ok(())
    }
}

impl Drop for CocoonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which way a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Adi,
    Direct,
}

impl Route {
    fn label(self) -> &'static str {
        match self {
            Route::Adi => "adi",
            Route::Direct => "direct",
        }
    }
}

/// Where the requests go and what they carry.
struct Target {
    route: Route,
    url: String,
    key: String,
    streamed: Bytes,
    whole: Bytes,
    /// Content chunks per streamed answer.
    chunks: u64,
}

fn client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .timeout(REQUEST_TIMEOUT)
        .build()?)
}

/// Counts server-sent events (each ends with an empty line) in a stream's pieces.
#[derive(Default)]
struct Events {
    count: u64,
    last_was_newline: bool,
}

impl Events {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            let newline = b == b'\n';
            if newline && self.last_was_newline {
                self.count += 1;
                self.last_was_newline = false;
            } else {
                self.last_was_newline = newline;
            }
        }
    }
}

async fn send(http: &reqwest::Client, t: &Target, body: &Bytes) -> Result<reqwest::Response> {
    let resp = http
        .post(&t.url)
        .bearer_auth(&t.key)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.clone())
        .send()
        .await?;
    ensure!(resp.status().is_success(), "status {}", resp.status());
    Ok(resp)
}

/// One streamed request read to its end: time to the first complete event, and events.
async fn one_stream(http: &reqwest::Client, t: &Target) -> Result<(Duration, u64)> {
    let start = Instant::now();
    let mut resp = send(http, t, &t.streamed).await?;
    let mut events = Events::default();
    let mut first = None;
    while let Some(piece) = resp.chunk().await? {
        events.feed(&piece);
        if first.is_none() && events.count > 0 {
            first = Some(start.elapsed());
        }
    }
    Ok((first.context("a stream without events")?, events.count))
}

/// CPU ticks of the measured processes and the machine, at one moment.
#[derive(Clone, Copy)]
struct Ticks {
    hub: u64,
    cocoon: u64,
    bench: u64,
    machine_busy: u64,
}

impl Ticks {
    fn read(pids: Pids) -> Result<Self> {
        Ok(Ticks {
            hub: cpu_ticks(pids.hub)?,
            cocoon: cpu_ticks(pids.cocoon)?,
            bench: cpu_ticks(std::process::id())?,
            machine_busy: machine_busy_ticks()?,
        })
    }
}

/// Busy ticks of all CPUs together (`/proc/stat`: everything but idle and iowait).
fn machine_busy_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat is empty")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy = fields.iter().take(8).enumerate();
    Ok(busy
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum())
}

#[derive(Clone, Copy)]
struct Pids {
    hub: u32,
    cocoon: u32,
}

/// CPU over a measured window, in seconds of CPU.
#[derive(Clone, Copy, Default)]
struct Cpu {
    hub: f64,
    cocoon: f64,
    bench: f64,
    /// Busy CPU no measured process accounts for.
    other: f64,
}

impl Cpu {
    fn between(a: Ticks, b: Ticks, clk: f64) -> Self {
        let d = |x: u64, y: u64| y.saturating_sub(x) as f64 / clk;
        let (hub, cocoon, bench) = (d(a.hub, b.hub), d(a.cocoon, b.cocoon), d(a.bench, b.bench));
        Cpu {
            hub,
            cocoon,
            bench,
            other: (d(a.machine_busy, b.machine_busy) - hub - cocoon - bench).max(0.0),
        }
    }
}

/// What a throughput run's clients counted.
#[derive(Default)]
struct Tally {
    /// Chunks or completions within the measured window.
    items: u64,
    /// Body pieces of streamed answers as the client got them (HTTP chunks), warm-up
    /// included.
    pieces: u64,
    /// Requests answered, warm-up included.
    requests: u64,
    errors: u64,
}

/// A throughput run: items (chunks or completions) per second.
struct Load {
    route: Route,
    tally: Tally,
    window: Duration,
    cpu: Cpu,
}

impl Load {
    fn rate(&self) -> f64 {
        self.tally.items as f64 / self.window.as_secs_f64()
    }

    /// Hub + cocoon CPU per item, in microseconds.
    fn adi_cpu_us(&self) -> f64 {
        (self.cpu.hub + self.cpu.cocoon) * 1e6 / (self.tally.items.max(1) as f64)
    }

    /// CPU of every measured process (hub, cocoon, this one) per item, in microseconds.
    fn total_cpu_us(&self) -> f64 {
        (self.cpu.hub + self.cpu.cocoon + self.cpu.bench) * 1e6 / (self.tally.items.max(1) as f64)
    }

    fn other_cores(&self) -> f64 {
        self.cpu.other / self.window.as_secs_f64()
    }

    fn disturbed(&self) -> bool {
        self.other_cores() > NOISY_CORES
    }

    fn line(&self, what: &str) -> String {
        let w = self.window.as_secs_f64();
        format!(
            "{:>6} {what}: {:.0}/s ({} requests, {} errors{}); CPU cores: hub {:.2}, cocoon {:.2}, bench {:.2}, other {:.2}{}",
            self.route.label(),
            self.rate(),
            self.tally.requests,
            self.tally.errors,
            if self.tally.pieces > 0 {
                format!(
                    ", {:.1} body pieces per stream",
                    self.tally.pieces as f64 / self.tally.requests.max(1) as f64
                )
            } else {
                String::new()
            },
            self.cpu.hub / w,
            self.cpu.cocoon / w,
            self.cpu.bench / w,
            self.other_cores(),
            if self.disturbed() { "  DISTURBED" } else { "" }
        )
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Streamed,
    Whole,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Streamed => "streamed chunks",
            Kind::Whole => "completions",
        }
    }
}

/// `clients` clients looping requests of `kind` for warm-up plus window; counts what
/// arrives within the window.
async fn throughput(
    t: &Arc<Target>,
    kind: Kind,
    clients: usize,
    args: &Args,
    pids: Pids,
    clk: f64,
) -> Result<Load> {
    let warm_until = Instant::now() + args.warmup;
    let until = warm_until + args.duration;
    let mut workers = Vec::with_capacity(clients);
    for _ in 0..clients {
        let (t, http) = (t.clone(), client()?);
        workers.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            while Instant::now() < until {
                let r = match kind {
                    Kind::Streamed => stream_until(&http, &t, warm_until, until).await,
                    Kind::Whole => whole(&http, &t).await.map(|()| {
                        let done = Instant::now();
                        (u64::from(done >= warm_until && done < until), 0)
                    }),
                };
                match r {
                    Ok((n, pieces)) => {
                        tally.items += n;
                        tally.pieces += pieces;
                        tally.requests += 1;
                    }
                    Err(_) => tally.errors += 1,
                }
            }
            tally
        }));
    }
    tokio::time::sleep_until(warm_until.into()).await;
    let before = Ticks::read(pids)?;
    tokio::time::sleep_until(until.into()).await;
    let after = Ticks::read(pids)?;
    let mut all = Tally::default();
    for w in workers {
        let one = w.await?;
        all.items += one.items;
        all.pieces += one.pieces;
        all.requests += one.requests;
        all.errors += one.errors;
    }
    Ok(Load {
        route: t.route,
        tally: all,
        window: args.duration,
        cpu: Cpu::between(before, after, clk),
    })
}

/// One streamed request; the content chunks that arrived between `from` and `until`,
/// and the pieces the body came in. Stops reading at `until` (the connection is then
/// dropped, at the end of the run).
async fn stream_until(
    http: &reqwest::Client,
    t: &Target,
    from: Instant,
    until: Instant,
) -> Result<(u64, u64)> {
    let mut resp = send(http, t, &t.streamed).await?;
    let mut events = Events::default();
    let (mut counted, mut pieces) = (0, 0);
    while let Some(piece) = resp.chunk().await? {
        pieces += 1;
        let before = events.count;
        events.feed(&piece);
        let now = Instant::now();
        if now >= from {
            // Events past the content chunks are `[DONE]`, not a chunk.
            counted += events.count.min(t.chunks) - before.min(t.chunks);
        }
        if now >= until {
            break;
        }
    }
    Ok((counted, pieces))
}

/// One non-streamed request, read whole.
async fn whole(http: &reqwest::Client, t: &Target) -> Result<()> {
    let resp = send(http, t, &t.whole).await?;
    let body = resp.bytes().await?;
    ensure!(!body.is_empty(), "an empty answer");
    Ok(())
}

/// A time-to-first-token run: every sample in microseconds, sorted.
struct Ttft {
    route: Route,
    samples: Vec<u32>,
    errors: u64,
    cpu: Cpu,
    elapsed: Duration,
}

impl Ttft {
    fn p(&self, q: f64) -> f64 {
        f64::from(quantile(&self.samples, q)) / 1000.0
    }

    fn disturbed(&self) -> bool {
        self.cpu.other / self.elapsed.as_secs_f64() > NOISY_CORES
    }

    fn line(&self) -> String {
        let other = self.cpu.other / self.elapsed.as_secs_f64();
        format!(
            "{:>6} time to first token: p50 {:.3} ms, p99 {:.3} ms ({} requests, {} errors); other CPU {:.2} cores{}",
            self.route.label(),
            self.p(0.5),
            self.p(0.99),
            self.samples.len(),
            self.errors,
            other,
            if self.disturbed() { "  DISTURBED" } else { "" }
        )
    }
}

async fn ttft(t: &Arc<Target>, args: &Args, pids: Pids, clk: f64) -> Result<Ttft> {
    let per_client = args.ttft_requests.div_ceil(args.ttft_clients);
    // One stream's length, over which the clients' first requests are spread.
    let stream_len = args.ttft_delay * u32::try_from(args.chunks)?;
    let mut workers = Vec::with_capacity(args.ttft_clients);
    for i in 0..args.ttft_clients {
        let (t, http) = (t.clone(), client()?);
        let offset = stream_len * u32::try_from(i)? / u32::try_from(args.ttft_clients)?;
        workers.push(tokio::spawn(async move {
            // A first request opens the connection and is not counted.
            let _ = one_stream(&http, &t).await;
            tokio::time::sleep(offset).await;
            let mut samples = Vec::with_capacity(per_client);
            let mut errors = 0u64;
            for _ in 0..per_client {
                match one_stream(&http, &t).await {
                    Ok((first, _)) => {
                        samples.push(u32::try_from(first.as_micros()).unwrap_or(u32::MAX))
                    }
                    Err(_) => errors += 1,
                }
            }
            (samples, errors)
        }));
    }
    let start = Instant::now();
    let before = Ticks::read(pids)?;
    let mut samples = Vec::with_capacity(per_client * args.ttft_clients);
    let mut errors = 0;
    for w in workers {
        let (s, e) = w.await?;
        samples.extend(s);
        errors += e;
    }
    let after = Ticks::read(pids)?;
    samples.sort_unstable();
    Ok(Ttft {
        route: t.route,
        samples,
        errors,
        cpu: Cpu::between(before, after, clk),
        elapsed: start.elapsed(),
    })
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        tokio::select! {
            r = bench(args) => r,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        }
    })
}

/// An API key with the `capabilities` scope, as one hands to an OpenAI client.
async fn capabilities_key(api: &HubApi) -> Result<String> {
    let made: Value = api
        .http
        .post(format!("{}/api/keys", api.base))
        .bearer_auth(&api.jwt)
        .json(&json!({"name": "bench", "scopes": ["capabilities"]}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(made["key"]
        .as_str()
        .with_context(|| format!("no key in {made}"))?
        .to_owned())
}

/// Waits until the hub lists the stub's model for `key`.
async fn wait_for_model(hub: &str, key: &str, cocoon: &mut CocoonProcess) -> Result<()> {
    let http = client()?;
    let started = Instant::now();
    loop {
        cocoon.check_alive()?;
        let listed: Option<Value> = match http
            .get(format!("{hub}/v1/models"))
            .bearer_auth(key)
            .send()
            .await
        {
            Ok(r) => r.json().await.ok(),
            Err(_) => None,
        };
        let served = listed.as_ref().is_some_and(|v| {
            v["data"]
                .as_array()
                .is_some_and(|d| d.iter().any(|m| m["id"] == MODEL))
        });
        if served {
            return Ok(());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the hub did not list {MODEL}: {listed:?}; cocoon log:\n{}",
            std::fs::read_to_string(&cocoon.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The figures of one measure, by route, over the rounds.
#[derive(Default)]
struct Series {
    adi: Vec<f64>,
    direct: Vec<f64>,
}

impl Series {
    fn push(&mut self, route: Route, v: f64) {
        match route {
            Route::Adi => self.adi.push(v),
            Route::Direct => self.direct.push(v),
        }
    }

    fn medians(&self) -> (f64, f64) {
        (median(self.adi.clone()), median(self.direct.clone()))
    }
}

async fn bench(args: Args) -> Result<()> {
    let clk = support::clock_ticks_per_second();
    let (stub, stub_port) = stub::start(args.chunks).await?;
    let tmp = tempfile::tempdir()?;
    let data_dir = tmp.path().join("hub");
    let user_key = support::create_user(&data_dir, "bench")?;
    let hub = HubProcess::start(&data_dir, &[], &tmp.path().join("hub.log")).await?;
    let api = HubApi::login(&hub.url, &user_key).await?;
    let key = capabilities_key(&api).await?;
    let mut cocoon = CocoonProcess::start(
        &hub.url,
        &api.setup_token().await?,
        stub_port,
        tmp.path(),
        &args.rust_log,
    )?;
    wait_for_model(&hub.url, &key, &mut cocoon).await?;
    let pids = Pids {
        hub: hub.pid(),
        cocoon: cocoon.pid(),
    };
    eprintln!(
        "hub {} pid {}, cocoon pid {}, stub 127.0.0.1:{stub_port}; {} chunks per stream",
        hub.url, pids.hub, pids.cocoon, args.chunks
    );

    let messages = json!([
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Write a short poem about loopback interfaces."}
    ]);
    let streamed = Bytes::from(serde_json::to_vec(&json!({
        "model": MODEL, "messages": messages, "stream": true, "max_tokens": args.chunks
    }))?);
    let whole_body = Bytes::from(serde_json::to_vec(&json!({
        "model": MODEL, "messages": messages, "max_tokens": args.chunks
    }))?);
    let target = |route, url: String| {
        Arc::new(Target {
            route,
            url,
            key: key.clone(),
            streamed: streamed.clone(),
            whole: whole_body.clone(),
            chunks: args.chunks as u64,
        })
    };
    let adi = target(Route::Adi, format!("{}/v1/chat/completions", hub.url));
    let direct = target(
        Route::Direct,
        format!("http://127.0.0.1:{stub_port}/v1/chat/completions"),
    );
    // Both paths answer before anything is measured.
    for t in [&adi, &direct] {
        let (_, events) = one_stream(&client()?, t)
            .await
            .with_context(|| format!("a streamed request, {}", t.route.label()))?;
        ensure!(
            events == args.chunks as u64 + 1,
            "{}: {events} events, not {}",
            t.route.label(),
            args.chunks + 1
        );
        whole(&client()?, t)
            .await
            .with_context(|| format!("a chat request, {}", t.route.label()))?;
    }

    let mut ttft_p50 = Series::default();
    let mut ttft_p99 = Series::default();
    let mut chunks: Vec<Series> = args.concurrency.iter().map(|_| Series::default()).collect();
    let mut chunk_cpu: Vec<Series> = args.concurrency.iter().map(|_| Series::default()).collect();
    let mut done: Vec<Series> = args.concurrency.iter().map(|_| Series::default()).collect();
    let mut done_cpu: Vec<Series> = args.concurrency.iter().map(|_| Series::default()).collect();
    let mut chunk_total: Vec<Series> = args.concurrency.iter().map(|_| Series::default()).collect();
    let mut done_total: Vec<Series> = args.concurrency.iter().map(|_| Series::default()).collect();
    let (mut errors, mut disturbed) = (0u64, 0usize);
    for round in 0..args.rounds {
        // Alternate which goes first, so drift on the machine hits both alike.
        let order = if round % 2 == 0 {
            [&adi, &direct]
        } else {
            [&direct, &adi]
        };
        eprintln!("round {round}");
        stub.set_delay(args.ttft_delay);
        for attempt in 0..=args.retries {
            let mut runs = Vec::with_capacity(2);
            for t in order {
                let r = ttft(t, &args, pids, clk).await?;
                eprintln!("{}", r.line());
                runs.push(r);
            }
            let noisy = runs.iter().filter(|r| r.disturbed()).count();
            if noisy > 0 && attempt < args.retries {
                eprintln!("disturbed by other work on the machine; once more");
                continue;
            }
            for r in runs {
                ttft_p50.push(r.route, r.p(0.5));
                ttft_p99.push(r.route, r.p(0.99));
                errors += r.errors;
            }
            disturbed += noisy;
            break;
        }
        stub.set_delay(Duration::ZERO);
        for (kind, rates, cpu, total) in [
            (
                Kind::Streamed,
                &mut chunks,
                &mut chunk_cpu,
                &mut chunk_total,
            ),
            (Kind::Whole, &mut done, &mut done_cpu, &mut done_total),
        ] {
            for (i, &c) in args.concurrency.iter().enumerate() {
                for attempt in 0..=args.retries {
                    let mut runs = Vec::with_capacity(2);
                    for t in order {
                        let r = throughput(t, kind, c, &args, pids, clk).await?;
                        eprintln!("{}", r.line(&format!("{}, {c} clients", kind.label())));
                        runs.push(r);
                    }
                    let noisy = runs.iter().filter(|r| r.disturbed()).count();
                    if noisy > 0 && attempt < args.retries {
                        eprintln!("disturbed by other work on the machine; once more");
                        continue;
                    }
                    for r in runs {
                        rates[i].push(r.route, r.rate());
                        cpu[i].push(r.route, r.adi_cpu_us());
                        total[i].push(r.route, r.total_cpu_us());
                        errors += r.tally.errors;
                    }
                    disturbed += noisy;
                    break;
                }
            }
        }
    }

    println!();
    println!(
        "OpenAI-compatible endpoint, medians of {} rounds; {} chunks per stream; throughput {:?} after {:?} of warm-up; time to first token over {} requests per path and round, {} clients, {:?} between chunks",
        args.rounds,
        args.chunks,
        args.duration,
        args.warmup,
        args.ttft_requests,
        args.ttft_clients,
        args.ttft_delay
    );
    println!("| measure | adi | direct | ratio (adi/direct) | target | met? |");
    println!("|---|---|---|---|---|---|");
    for (name, s) in [("p50", &ttft_p50), ("p99", &ttft_p99)] {
        let (a, d) = s.medians();
        println!(
            "| time to first token {name} | {a:.2} ms | {d:.2} ms | {:+.2} ms | ≤ direct + 2 ms | {} |",
            a - d,
            met(a - d <= 2.0)
        );
    }
    for (i, &c) in args.concurrency.iter().enumerate() {
        let (a, d) = chunks[i].medians();
        println!(
            "| streamed chunks/s, {c} client{} | {} | {} | {:.2} | ≥ 0.95 | {} |",
            plural(c),
            thousands(a),
            thousands(d),
            a / d,
            met(a / d >= 0.95)
        );
    }
    for (i, &c) in args.concurrency.iter().enumerate() {
        let (a, d) = done[i].medians();
        println!(
            "| completions/s (non-streamed chat), {c} client{} | {} | {} | {:.2} | ≥ 0.95 | {} |",
            plural(c),
            thousands(a),
            thousands(d),
            a / d,
            met(a / d >= 0.95)
        );
    }
    for (i, &c) in args.concurrency.iter().enumerate() {
        println!(
            "| hub + cocoon CPU per streamed chunk, {c} client{} | {:.1} µs | — | — | — | — |",
            plural(c),
            median(chunk_cpu[i].adi.clone())
        );
    }
    for (i, &c) in args.concurrency.iter().enumerate() {
        println!(
            "| hub + cocoon CPU per completion, {c} client{} | {:.1} µs | — | — | — | — |",
            plural(c),
            median(done_cpu[i].adi.clone())
        );
    }
    // With the same CPU to spend, the adi path reaches at most the direct path's CPU per
    // item over its own, of direct's rate.
    for (i, &c) in args.concurrency.iter().enumerate() {
        let (ca, cd) = chunk_total[i].medians();
        let (da, dd) = done_total[i].medians();
        println!(
            "| ceiling at {c} client{}: most of direct's rate the adi path reaches with the same CPU (hub, cocoon, bench), chunks / completions | {:.1} / {:.1} µs | {:.1} / {:.1} µs | {:.2} / {:.2} | — | — |",
            plural(c),
            ca,
            da,
            cd,
            dd,
            cd / ca,
            dd / da
        );
    }
    println!();
    println!("errors: {errors}; disturbed runs kept (other work on the machine): {disturbed}");
    drop(cocoon);
    drop(hub);
    Ok(())
}

fn met(ok: bool) -> &'static str {
    if ok {
        "**met**"
    } else {
        "**missed**"
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// A rate with thousands separators, as the other tables print them.
fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
