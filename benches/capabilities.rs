//! Capability round trips through the hub beside NATS request/reply, in one run.
//!
//! - **adi**: a hub process (`adi signaling serve`, SQLite catalog in a temp dir). One
//!   serving device offers `bench.echo:1.0.0` and answers each `capability` request
//!   with the payload it got. Each requester is a device of its own (its own secret,
//!   enrolled with a setup token, its own WebSocket) that sends `capability_request` and
//!   waits for `capability_response` before sending the next: the cocoon-to-cocoon path,
//!   with the hub choosing the device, checking ownership, and counting load.
//! - **NATS**: the machine's `nats-server` (127.0.0.1:4222 unless `--nats URL`). One
//!   responder connection subscribed to `bench.echo` replies with the payload; each
//!   requester has its own connection and calls `request` in a loop.
//!
//! Both sides' devices speak their protocol from this process (the adi ones with the
//! real wire types and codec), so what differs is the broker in the middle. The payload
//! is the same 256 bytes of JSON on both. For 1, 16 and 64 concurrent requesters, each
//! round measures `--duration` after `--warmup`, adi and NATS alternating; the figures
//! are medians over `--rounds`. CPU is the broker process's time per round trip
//! (`nats-server` found by name; its figure includes anything else using that server).
//!
//! ```text
//! cargo bench --bench capabilities
//! cargo bench --bench capabilities -- --concurrency 1,16,64 --duration 5s --rounds 3
//! ```
//!
//! A benchmark, not a test: it asserts nothing about the figures.

mod support;

use std::time::{Duration, Instant};

use adi_protocol::{
    decode_hub_frame, encode, CapabilityOffer, CapabilityOutcome, CapabilityQuery, DeviceReply,
    DeviceRequest, DeviceSecret, DeviceToHub, Heartbeat, HubToDevice, Outcome, Payload, Register,
    SUPPORTED_VERSIONS,
};
use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use rand::distributions::{Alphanumeric, DistString};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use support::{cpu_ticks, find_process, median, quantile, HubApi, HubProcess};

const PROTOCOL: &str = "bench.echo";
const HEARTBEAT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
struct Args {
    concurrency: Vec<usize>,
    duration: Duration,
    warmup: Duration,
    rounds: usize,
    payload: usize,
    nats: String,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        concurrency: vec![1, 16, 64],
        duration: Duration::from_secs(5),
        warmup: Duration::from_secs(1),
        rounds: 3,
        payload: 256,
        nats: "127.0.0.1:4222".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--concurrency" => {
                a.concurrency = value()?
                    .split(',')
                    .map(|s| s.trim().parse())
                    .collect::<Result<_, _>>()?
            }
            "--duration" => a.duration = humantime::parse_duration(&value()?)?,
            "--warmup" => a.warmup = humantime::parse_duration(&value()?)?,
            "--rounds" => a.rounds = value()?.parse()?,
            "--payload" => a.payload = value()?.parse()?,
            "--nats" => a.nats = value()?,
            _ => {} // cargo's own flags, such as --bench
        }
    }
    Ok(a)
}

/// A JSON payload of exactly `size` bytes when encoded (for sizes of 16 and up).
fn payload(size: usize) -> serde_json::Value {
    let filler = size.saturating_sub(r#"{"data":""}"#.len());
    let s = Alphanumeric.sample_string(&mut rand::thread_rng(), filler);
    serde_json::json!({ "data": s })
}

/// One measured run: latencies in microseconds and the broker's CPU ticks.
struct Run {
    latencies: Vec<u32>,
    elapsed: Duration,
    broker_ticks: Option<u64>,
    errors: u64,
}

struct Figures {
    rps: f64,
    p50: u32,
    p99: u32,
    cpu_us: Option<f64>,
    errors: u64,
}

impl Run {
    fn figures(mut self, clk: f64) -> Figures {
        self.latencies.sort_unstable();
        let n = self.latencies.len() as f64;
        Figures {
            rps: n / self.elapsed.as_secs_f64(),
            p50: quantile(&self.latencies, 0.5),
            p99: quantile(&self.latencies, 0.99),
            cpu_us: self.broker_ticks.map(|t| t as f64 / clk * 1e6 / n.max(1.0)),
            errors: self.errors,
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects and registers a device; returns the socket after `registered`.
async fn register(ws_url: &str, token: String, offers: Vec<CapabilityOffer>) -> Result<Ws> {
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await?;
    let secret = DeviceSecret::new(Alphanumeric.sample_string(&mut rand::thread_rng(), 43))?;
    let reg = DeviceToHub::Register(Register {
        versions: SUPPORTED_VERSIONS.to_vec(),
        secret,
        setup_token: Some(token),
        name: "bench".into(),
        services: vec![],
        capabilities: offers,
        agent_version: "bench".into(),
        location: None,
        max_frame_bytes: None,
        instance: None,
        load: None,
    });
    ws.send(Message::text(encode(&reg))).await?;
    match ws.next().await {
        Some(Ok(Message::Text(t))) => match decode_hub_frame(t.as_str(), usize::MAX)? {
            HubToDevice::Registered(_) => Ok(ws),
            other => bail!("registration refused: {other:?}"),
        },
        other => bail!("no registration answer: {other:?}"),
    }
}

fn heartbeat() -> Message {
    Message::text(encode(&DeviceToHub::Heartbeat(Heartbeat::default())))
}

/// The serving device: a reader that turns requests into answers and a writer that
/// sends whatever answers are ready before flushing once.
async fn serve_echo(ws: Ws) {
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(1024);
    let writer = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                m = rx.recv() => {
                    let Some(m) = m else { return };
                    if sink.feed(m).await.is_err() { return; }
                    while let Ok(m) = rx.try_recv() {
                        if sink.feed(m).await.is_err() { return; }
                    }
                    if sink.flush().await.is_err() { return; }
                }
                _ = ticker.tick() => {
                    if sink.send(heartbeat()).await.is_err() { return; }
                }
            }
        }
    });
    while let Some(Ok(msg)) = stream.next().await {
        let Message::Text(t) = msg else { continue };
        if let Ok(HubToDevice::Request {
            request_id,
            request: DeviceRequest::Capability { payload, .. },
            ..
        }) = decode_hub_frame(t.as_str(), usize::MAX)
        {
            let answer = DeviceToHub::Response {
                request_id,
                outcome: Outcome::Ok(DeviceReply::Capability { payload }),
            };
            if tx.send(Message::text(encode(&answer))).await.is_err() {
                break;
            }
        }
    }
    writer.abort();
}

/// A command to a requester: run until the instant, then hand back the latencies.
struct Go {
    warm_until: Instant,
    until: Instant,
    done: oneshot::Sender<(Vec<u32>, u64)>,
}

/// One requesting device, idle (heartbeating) between runs.
async fn adi_requester(mut ws: Ws, payload: Payload, mut go: mpsc::Receiver<Go>) {
    let query = CapabilityQuery::new(PROTOCOL, Some("1.0.0")).expect("valid query");
    let mut next_id = 1u64;
    let mut last_beat = Instant::now();
    let mut ticker = tokio::time::interval(HEARTBEAT);
    loop {
        let cmd = tokio::select! {
            c = go.recv() => match c { Some(c) => c, None => return },
            _ = ticker.tick() => {
                if ws.send(heartbeat()).await.is_err() { return; }
                last_beat = Instant::now();
                continue;
            }
        };
        let mut lat = Vec::with_capacity(1 << 16);
        let mut errors = 0;
        loop {
            let now = Instant::now();
            if now >= cmd.until {
                break;
            }
            if last_beat.elapsed() >= HEARTBEAT {
                let _ = ws.feed(heartbeat()).await;
                last_beat = now;
            }
            let frame = encode(&DeviceToHub::CapabilityRequest {
                request_id: next_id,
                capability: query.clone(),
                payload: payload.clone(),
                prefer_device: None,
                deadline_ms: 10_000,
            });
            next_id += 1;
            if ws.send(Message::text(frame)).await.is_err() {
                errors += 1;
                break;
            }
            let ok = loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => match decode_hub_frame(t.as_str(), usize::MAX) {
                        Ok(HubToDevice::CapabilityResponse { outcome, .. }) => {
                            break matches!(outcome, CapabilityOutcome::Ok(_))
                        }
                        _ => continue,
                    },
                    Some(Ok(_)) => continue,
                    _ => break false,
                }
            };
            if !ok {
                errors += 1;
            } else if now >= cmd.warm_until {
                lat.push(u32::try_from(now.elapsed().as_micros()).unwrap_or(u32::MAX));
            }
        }
        let _ = cmd.done.send((lat, errors));
    }
}

async fn nats_requester(
    client: async_nats::Client,
    payload: bytes::Bytes,
    warm_until: Instant,
    until: Instant,
) -> (Vec<u32>, u64) {
    let mut lat = Vec::with_capacity(1 << 16);
    let mut errors = 0;
    loop {
        let now = Instant::now();
        if now >= until {
            break;
        }
        match client.request(PROTOCOL, payload.clone()).await {
            Ok(_) if now >= warm_until => {
                lat.push(u32::try_from(now.elapsed().as_micros()).unwrap_or(u32::MAX))
            }
            Ok(_) => {}
            Err(_) => errors += 1,
        }
    }
    (lat, errors)
}

async fn run_adi(
    requesters: &[mpsc::Sender<Go>],
    n: usize,
    args: &Args,
    hub_pid: u32,
) -> Result<Run> {
    let start = Instant::now();
    let warm_until = start + args.warmup;
    let until = warm_until + args.duration;
    let mut waits = Vec::new();
    for r in requesters.iter().take(n) {
        let (tx, rx) = oneshot::channel();
        r.send(Go {
            warm_until,
            until,
            done: tx,
        })
        .await
        .context("requester gone")?;
        waits.push(rx);
    }
    tokio::time::sleep_until(warm_until.into()).await;
    let ticks_before = cpu_ticks(hub_pid)?;
    let mut latencies = Vec::new();
    let mut errors = 0;
    for w in waits {
        let (l, e) = w.await.context("requester ended")?;
        latencies.extend(l);
        errors += e;
    }
    let ticks = cpu_ticks(hub_pid)?.saturating_sub(ticks_before);
    Ok(Run {
        latencies,
        elapsed: args.duration,
        broker_ticks: Some(ticks),
        errors,
    })
}

async fn run_nats(clients: &[async_nats::Client], n: usize, args: &Args) -> Result<Run> {
    let data = bytes::Bytes::from(serde_json::to_vec(&payload(args.payload))?);
    let start = Instant::now();
    let warm_until = start + args.warmup;
    let until = warm_until + args.duration;
    let server = find_process("nats-server");
    let tasks: Vec<_> = clients
        .iter()
        .take(n)
        .map(|c| tokio::spawn(nats_requester(c.clone(), data.clone(), warm_until, until)))
        .collect();
    tokio::time::sleep_until(warm_until.into()).await;
    let before = server.and_then(|p| cpu_ticks(p).ok());
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        latencies.extend(l);
        errors += e;
    }
    let ticks = match (server, before) {
        (Some(p), Some(b)) => cpu_ticks(p).ok().map(|a| a.saturating_sub(b)),
        _ => None,
    };
    Ok(Run {
        latencies,
        elapsed: args.duration,
        broker_ticks: ticks,
        errors,
    })
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(args))
}

async fn bench(args: Args) -> Result<()> {
    let max = args.concurrency.iter().copied().max().unwrap_or(1);
    let clk = support::clock_ticks_per_second();
    let tmp = tempfile::tempdir()?;
    let data_dir = tmp.path().join("hub");
    let key = support::create_user(&data_dir, "bench")?;
    let hub = HubProcess::start(
        &data_dir,
        &["--heartbeat-interval", "5s"],
        &tmp.path().join("hub.log"),
    )
    .await?;
    let api = HubApi::login(&hub.url, &key).await?;
    let ws_url = format!("{}/ws/cocoon", hub.url.replacen("http://", "ws://", 1));
    let echo = CapabilityOffer::new(PROTOCOL, "1.0.0")?;
    let server = register(&ws_url, api.setup_token().await?, vec![echo]).await?;
    tokio::spawn(serve_echo(server));
    let body = Payload::from(payload(args.payload));
    let mut requesters = Vec::new();
    for _ in 0..max {
        let ws = register(&ws_url, api.setup_token().await?, vec![]).await?;
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(adi_requester(ws, body.clone(), rx));
        requesters.push(tx);
    }

    let nats_url = args.nats.clone();
    let responder = async_nats::connect(&nats_url)
        .await
        .with_context(|| format!("connecting to NATS at {nats_url}"))?;
    let mut sub = responder.subscribe(PROTOCOL).await?;
    let replier = responder.clone();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            if let Some(reply) = msg.reply {
                let _ = replier.publish(reply, msg.payload).await;
            }
        }
    });
    responder.flush().await?;
    let mut nats_clients = Vec::new();
    for _ in 0..max {
        nats_clients.push(async_nats::connect(&nats_url).await?);
    }
    let hub_pid = hub.pid();
    eprintln!(
        "hub {} pid {hub_pid}; NATS {nats_url}; {max} requesters each side; payload {} bytes",
        hub.url,
        serde_json::to_vec(&body)?.len()
    );

    let mut rows = Vec::new();
    for &n in &args.concurrency {
        let mut adi = Vec::new();
        let mut nats = Vec::new();
        for round in 0..args.rounds {
            // Alternate which goes first, so drift on the machine hits both alike.
            if round % 2 == 0 {
                adi.push(run_adi(&requesters, n, &args, hub_pid).await?.figures(clk));
                nats.push(run_nats(&nats_clients, n, &args).await?.figures(clk));
            } else {
                nats.push(run_nats(&nats_clients, n, &args).await?.figures(clk));
                adi.push(run_adi(&requesters, n, &args, hub_pid).await?.figures(clk));
            }
            let (a, b) = (adi.last().expect("ran"), nats.last().expect("ran"));
            eprintln!(
                "c={n} round {round}: adi {:.0}/s p50 {} us p99 {} us; NATS {:.0}/s p50 {} us p99 {} us",
                a.rps, a.p50, a.p99, b.rps, b.p50, b.p99
            );
        }
        rows.push((n, adi, nats));
    }

    println!();
    println!(
        "capability round trips, {} B payload, medians of {} rounds of {:?}",
        args.payload, args.rounds, args.duration
    );
    println!(
        "| requesters | adi req/s | NATS req/s | adi/NATS | adi p50 | NATS p50 | adi p99 | NATS p99 | hub CPU/req | nats-server CPU/req | errors adi/NATS |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (n, adi, nats) in rows {
        let m = |v: &[Figures], f: fn(&Figures) -> f64| median(v.iter().map(f).collect());
        let (ar, nr) = (m(&adi, |f| f.rps), m(&nats, |f| f.rps));
        let cpu = |v: &[Figures]| {
            let xs: Vec<f64> = v.iter().filter_map(|f| f.cpu_us).collect();
            if xs.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.1} us", median(xs))
            }
        };
        println!(
            "| {n} | {ar:.0} | {nr:.0} | {:.2} | {:.0} us | {:.0} us | {:.0} us | {:.0} us | {} | {} | {}/{} |",
            ar / nr,
            m(&adi, |f| f64::from(f.p50)),
            m(&nats, |f| f64::from(f.p50)),
            m(&adi, |f| f64::from(f.p99)),
            m(&nats, |f| f64::from(f.p99)),
            cpu(&adi),
            cpu(&nats),
            adi.iter().map(|f| f.errors).sum::<u64>(),
            nats.iter().map(|f| f.errors).sum::<u64>(),
        );
    }
    drop(hub);
    Ok(())
}
