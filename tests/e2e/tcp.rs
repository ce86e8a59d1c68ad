//! Raw TCP services through the hub: a device's `--tcp` services reached with
//! `adi connect` (stdin and stdout), `adi proxy` (a local port) and raw `adi-tcp`
//! upgrades. Test services on loopback: an echo, one that answers once its input ends,
//! one that closes at once, and one that reports what it read and when it saw the end;
//! then a real OpenSSH server (ssh and scp through `adi connect` as the ProxyCommand)
//! and the machine's PostgreSQL through `adi proxy` with psql.

use std::future::Future;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::harness::{cli, closed_port, foreign_server, wait_for, Api, Cocoon, Hub, Proc, ADI};
use crate::proxy::vm_kib;

const MIB: usize = 1024 * 1024;
/// Long enough for a debug build on a busy machine, short enough to fail a hung test.
const WAIT: Duration = Duration::from_secs(20);

/// Serves each connection accepted on a fresh loopback port with `serve`, on a task of
/// its own; returns the port.
async fn tcp_service<F, Fut>(serve: F) -> Result<u16>
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(serve(socket));
        }
    });
    Ok(port)
}

/// Sends back what it reads; ends its side when the input ends.
async fn echo(mut socket: TcpStream) {
    let (mut read, mut write) = socket.split();
    let _ = tokio::io::copy(&mut read, &mut write).await;
    let _ = write.shutdown().await;
}

/// Reads to the end, then answers with the byte count and the SHA-256 of what it read.
async fn count(mut socket: TcpStream) {
    let mut hash = Sha256::new();
    let mut n = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match socket.read(&mut buf).await {
            Ok(0) => break,
            Ok(k) => {
                n += k;
                hash.update(&buf[..k]);
            }
            Err(_) => return,
        }
    }
    let answer = format!("{n} {:x}\n", hash.finalize());
    let _ = socket.write_all(answer.as_bytes()).await;
    let _ = socket.shutdown().await;
}

/// Says goodbye and closes at once.
async fn closer(mut socket: TcpStream) {
    let _ = socket.write_all(b"bye\n").await;
}

/// What the watching service saw on a connection that sent anything (health probes
/// send nothing and are not reported).
#[derive(Debug, PartialEq)]
enum Watched {
    /// Its first bytes.
    Data(Vec<u8>),
    /// Its end (or a reset), with everything it sent.
    Closed(Vec<u8>),
}

/// A service that reports to `seen` what each connection sent, and when it ended.
fn watcher(
    seen: mpsc::UnboundedSender<Watched>,
) -> impl Fn(TcpStream) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + 'static {
    move |mut socket: TcpStream| {
        let seen = seen.clone();
        Box::pin(async move {
            let mut all = Vec::new();
            let mut buf = vec![0u8; 4096];
            loop {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if all.is_empty() {
                            let _ = seen.send(Watched::Data(buf[..n].to_vec()));
                        }
                        all.extend_from_slice(&buf[..n]);
                    }
                }
            }
            if !all.is_empty() {
                let _ = seen.send(Watched::Closed(all));
            }
        })
    }
}

/// A device `box` of alice's with the test services, and what it takes to reach them.
struct Setup {
    hub: Hub,
    alice: Api,
    alice_key: String,
    device: String,
    cocoon: Cocoon,
    cfg: tempfile::TempDir,
    watched: mpsc::UnboundedReceiver<Watched>,
    http: reqwest::Client,
}

async fn setup(extra: &[&str]) -> Result<Setup> {
    let (seen, watched) = mpsc::unbounded_channel();
    let ports = [
        tcp_service(echo).await?,
        tcp_service(count).await?,
        tcp_service(closer).await?,
        tcp_service(watcher(seen)).await?,
    ];
    let web = foreign_server(200).await?;
    let hub = Hub::start().await?;
    let alice_key = hub.add_user("alice")?;
    let alice = Api::login(&hub.url, &alice_key).await?;
    let mut args: Vec<String> = ["echo", "count", "closer", "watch"]
        .iter()
        .zip(ports)
        .flat_map(|(name, port)| ["--tcp".to_owned(), format!("{name}:{port}")])
        .collect();
    args.extend(["--service".to_owned(), format!("web:{web}")]);
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cocoon = Cocoon::start(&hub.url, "box", Some(&alice.setup_token(60).await?), &args)?;
    let device = cocoon.device_id().await?;
    Ok(Setup {
        hub,
        alice,
        alice_key,
        device,
        cocoon,
        cfg: tempfile::tempdir()?,
        watched,
        http: reqwest::Client::builder().no_proxy().build()?,
    })
}

impl Setup {
    /// Opens a raw TCP stream to `service` as `jwt`, by an `adi-tcp` upgrade.
    async fn open_as(&self, jwt: &str, service: &str) -> Result<reqwest::Upgraded> {
        let resp = self
            .http
            .get(format!("{}/proxy/box/{service}", self.hub.url))
            .bearer_auth(jwt)
            .header("connection", "upgrade")
            .header("upgrade", "adi-tcp")
            .send()
            .await?;
        if resp.status() != 101 {
            bail!("{}: {}", resp.status(), resp.text().await?);
        }
        assert_eq!(resp.headers()["upgrade"], "adi-tcp");
        Ok(resp.upgrade().await?)
    }

    async fn open(&self, service: &str) -> Result<reqwest::Upgraded> {
        self.open_as(&self.alice.jwt, service).await
    }

    /// `adi connect box SERVICE` with alice's key, its stdin, stdout and stderr piped.
    fn connect(&self, service: &str) -> Result<tokio::process::Child> {
        Ok(tokio::process::Command::new(ADI)
            .args(["connect", "box", service])
            .env("ADI_CONFIG_DIR", self.cfg.path())
            .env("ADI_HUB", &self.hub.url)
            .env("ADI_API_KEY", &self.alice_key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?)
    }

    /// The device as the hub shows it to alice.
    async fn view(&self) -> Result<Value> {
        let (status, body) = self.alice.cocoon(&self.device).await?;
        if status != 200 {
            bail!("{status}: {body}");
        }
        Ok(body)
    }

    /// Waits until the hub counts `n` raw TCP streams open to the device.
    async fn wait_streams(&self, n: u64) -> Result<()> {
        wait_for(&format!("{n} open tcp streams"), WAIT, || async {
            Ok((self.view().await?["tcp_streams"].as_u64() == Some(n)).then_some(()))
        })
        .await
    }

    async fn next_watched(&mut self) -> Result<Watched> {
        tokio::time::timeout(WAIT, self.watched.recv())
            .await
            .context("the service saw nothing")?
            .context("the service stopped")
    }
}

/// `len` bytes that differ with `seed`, made a megabyte at a time and never held whole.
fn pattern(seed: u64, len: usize) -> impl Iterator<Item = Vec<u8>> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut left = len;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let n = left.min(MIB);
        left -= n;
        let mut chunk = Vec::with_capacity(n + 8);
        while chunk.len() < n {
            // xorshift64
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.extend_from_slice(&state.to_le_bytes());
        }
        chunk.truncate(n);
        Some(chunk)
    })
}

/// Writes `len` bytes of `seed`'s pattern, then ends the writing side; returns their
/// digest.
async fn send_pattern<W: AsyncWrite + Unpin>(mut to: W, seed: u64, len: usize) -> Result<String> {
    let mut hash = Sha256::new();
    for chunk in pattern(seed, len) {
        hash.update(&chunk);
        to.write_all(&chunk).await?;
    }
    to.shutdown().await?;
    Ok(format!("{:x}", hash.finalize()))
}

/// Reads to the end; returns the byte count and digest.
async fn digest_of<R: AsyncRead + Unpin>(mut from: R) -> Result<(usize, String)> {
    let mut hash = Sha256::new();
    let mut n = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let k = from.read(&mut buf).await?;
        if k == 0 {
            return Ok((n, format!("{:x}", hash.finalize())));
        }
        n += k;
        hash.update(&buf[..k]);
    }
}

/// Sends `len` bytes through `adi connect box echo` and reads them back, at once;
/// returns the digests sent and received, and the count received.
async fn echo_through_adi_connect(
    s: &Setup,
    seed: u64,
    len: usize,
) -> Result<(String, String, usize)> {
    let mut child = s.connect("echo")?;
    let stdin = child.stdin.take().context("stdin")?;
    let stdout = child.stdout.take().context("stdout")?;
    let (sent, got) = tokio::join!(send_pattern(stdin, seed, len), digest_of(stdout));
    let status = tokio::time::timeout(WAIT, child.wait()).await??;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err).await?;
    }
    assert!(status.success(), "adi connect: {status}: {err}");
    let (n, got) = got?;
    Ok((sent?, got, n))
}

#[tokio::test]
async fn sixty_four_mib_cross_each_way_through_adi_connect_in_flat_memory() -> Result<()> {
    let s = setup(&[]).await?;
    let hub_pid = s.hub.proc.pid();
    let cocoon_pid = s.cocoon.proc.pid();
    // Warm up, then take the baseline.
    let (sent, got, _) = echo_through_adi_connect(&s, 1, MIB).await?;
    assert_eq!(sent, got);
    let (hub_before, cocoon_before) = (vm_kib(hub_pid, "VmHWM:"), vm_kib(cocoon_pid, "VmHWM:"));

    let (sent, got, n) = echo_through_adi_connect(&s, 2, 64 * MIB).await?;
    assert_eq!(n, 64 * MIB);
    assert_eq!(sent, got, "the bytes came back intact and in order");

    let hub_growth = vm_kib(hub_pid, "VmHWM:").saturating_sub(hub_before);
    let cocoon_growth = vm_kib(cocoon_pid, "VmHWM:").saturating_sub(cocoon_before);
    eprintln!(
        "peak RSS growth over 64 MiB each way: hub {hub_growth} KiB, cocoon {cocoon_growth} KiB"
    );
    // A flow-control window is 1 MiB per stream and direction; slack for allocators.
    assert!(hub_growth < 48 * 1024, "hub peak grew by {hub_growth} KiB");
    assert!(
        cocoon_growth < 48 * 1024,
        "cocoon peak grew by {cocoon_growth} KiB"
    );
    s.wait_streams(0).await?;
    Ok(())
}

#[tokio::test]
async fn a_half_closed_stream_still_gets_its_answer() -> Result<()> {
    let s = setup(&[]).await?;
    // adi connect: the end of stdin half-closes, and the answer is printed.
    let mut child = s.connect("count")?;
    let stdin = child.stdin.take().context("stdin")?;
    let sent = send_pattern(stdin, 3, 3 * MIB + 17).await?;
    let out = tokio::time::timeout(WAIT, child.wait_with_output()).await??;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout)?,
        format!("{} {sent}\n", 3 * MIB + 17)
    );

    // A raw upgrade: shut down the writing side, read the answer.
    let stream = s.open("count").await?;
    let (read, write) = tokio::io::split(stream);
    let sent = send_pattern(write, 4, 100_000).await?;
    let mut answer = String::new();
    let mut read = read;
    tokio::time::timeout(WAIT, read.read_to_string(&mut answer)).await??;
    assert_eq!(answer, format!("100000 {sent}\n"));
    Ok(())
}

#[tokio::test]
async fn many_parallel_streams_each_carry_their_own_bytes() -> Result<()> {
    const STREAMS: u64 = 32;
    let s = setup(&[]).await?;
    let mut open = Vec::new();
    for _ in 0..STREAMS {
        open.push(s.open("echo").await?);
    }
    // Counted while open, and shown to the device's members.
    s.wait_streams(STREAMS).await?;
    let transfers = open.into_iter().enumerate().map(|(i, stream)| {
        tokio::spawn(async move {
            let (read, write) = tokio::io::split(stream);
            let len = MIB + (i * 4099);
            let (sent, got) =
                tokio::join!(send_pattern(write, 100 + i as u64, len), digest_of(read));
            let (n, got) = got?;
            anyhow::ensure!(n == len, "stream {i}: {n} of {len} bytes came back");
            anyhow::ensure!(sent? == got, "stream {i}: other bytes came back");
            Ok(())
        })
    });
    let transfers = futures_util::future::join_all(transfers);
    for done in tokio::time::timeout(WAIT, transfers).await? {
        done.context("transfer task")??;
    }
    s.wait_streams(0).await?;
    Ok(())
}

#[tokio::test]
async fn either_side_closing_ends_the_stream_on_the_other() -> Result<()> {
    let mut s = setup(&[]).await?;

    // The service closes: a raw client reads its last words and the end.
    let mut stream = s.open("closer").await?;
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut got)).await??;
    assert_eq!(got, b"bye\n");
    drop(stream);
    // adi connect exits by itself though its stdin stays open.
    let mut child = s.connect("closer")?;
    let _stdin = child.stdin.take();
    let mut stdout = child.stdout.take().context("stdout")?;
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .context("adi connect did not exit when the service closed")??;
    assert!(status.success(), "{status}");
    let mut printed = Vec::new();
    stdout.read_to_end(&mut printed).await?;
    assert_eq!(printed, b"bye\n");

    // The client closes (without a half-close first): the service sees its end.
    let mut stream = s.open("watch").await?;
    stream.write_all(b"hi from a raw client").await?;
    stream.flush().await?;
    assert_eq!(
        s.next_watched().await?,
        Watched::Data(b"hi from a raw client".to_vec())
    );
    drop(stream);
    assert_eq!(
        s.next_watched().await?,
        Watched::Closed(b"hi from a raw client".to_vec())
    );

    // adi connect is killed: the service sees its end too.
    let mut child = s.connect("watch")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(b"hi from adi connect").await?;
    stdin.flush().await?;
    assert_eq!(
        s.next_watched().await?,
        Watched::Data(b"hi from adi connect".to_vec())
    );
    child.start_kill()?;
    child.wait().await?;
    assert_eq!(
        s.next_watched().await?,
        Watched::Closed(b"hi from adi connect".to_vec())
    );
    s.wait_streams(0).await?;
    Ok(())
}

#[tokio::test]
async fn a_stream_ends_at_once_when_its_device_or_its_hub_goes_away() -> Result<()> {
    let mut s = setup(&[]).await?;
    // The device's agent dies: the client's connection closes, though it is idle.
    let mut stream = s.open("watch").await?;
    stream.write_all(b"before the agent dies").await?;
    stream.flush().await?;
    assert!(matches!(s.next_watched().await?, Watched::Data(_)));
    s.cocoon.proc.kill();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
        .await
        .context("the client's stream outlived its device's connection")?;
    assert!(rest.is_empty(), "{ended:?}");
    // (Its own connection to the service died with the agent.)
    assert!(matches!(s.next_watched().await?, Watched::Closed(_)));

    // The hub dies: the device closes its connection to the service.
    let mut s = setup(&[]).await?;
    let mut stream = s.open("watch").await?;
    stream.write_all(b"before the hub dies").await?;
    stream.flush().await?;
    assert!(matches!(s.next_watched().await?, Watched::Data(_)));
    s.hub.proc.kill();
    assert_eq!(
        s.next_watched().await?,
        Watched::Closed(b"before the hub dies".to_vec())
    );
    Ok(())
}

#[tokio::test]
async fn a_member_removed_loses_the_streams_they_hold_at_once() -> Result<()> {
    let mut s = setup(&[]).await?;
    let bob_key = s.hub.add_user("bob")?;
    let bob_cfg = tempfile::tempdir()?;
    let (hub, alice_key) = (s.hub.url.clone(), s.alice_key.clone());
    let alice_env = [
        ("ADI_HUB", hub.as_str()),
        ("ADI_API_KEY", alice_key.as_str()),
    ];
    let bob_env = [("ADI_HUB", hub.as_str()), ("ADI_API_KEY", bob_key.as_str())];
    let (code, share, err) = cli(
        s.cfg.path(),
        &["cocoon", "generate-token", "--share", "box"],
        &alice_env,
    )?;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cli(bob_cfg.path(), &["cocoon", "claim", share.trim()], &bob_env)?;
    assert_eq!(code, 0, "{err}");
    let bob = Api::login(&s.hub.url, &bob_key).await?;
    // A user of the device opens streams as an owner does.
    let mut stream = s.open_as(&bob.jwt, "watch").await?;
    stream.write_all(b"bob was here").await?;
    stream.flush().await?;
    assert!(matches!(s.next_watched().await?, Watched::Data(_)));
    let (code, _, err) = cli(
        s.cfg.path(),
        &["cocoon", "remove-member", "box", "bob"],
        &alice_env,
    )?;
    assert_eq!(code, 0, "{err}");
    // Cut on the hub: the service sees the end, and so does bob, though both are idle.
    assert_eq!(
        s.next_watched().await?,
        Watched::Closed(b"bob was here".to_vec())
    );
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
        .await
        .context("the removed member's stream went on")?;
    s.wait_streams(0).await?;
    let refused = s.open_as(&bob.jwt, "watch").await.expect_err("removed");
    assert!(refused.to_string().starts_with("404"), "{refused}");
    Ok(())
}

#[tokio::test]
async fn a_tcp_service_is_reached_only_as_a_stream_by_those_who_may_proxy() -> Result<()> {
    let s = setup(&[]).await?;
    // Listed with its kind, by the API and the CLI.
    let (status, body) = s
        .alice
        .get(&format!("/api/cocoons/{}/services", s.device))
        .await?;
    assert_eq!(status, 200, "{body}");
    let kind_of = |name: &str| {
        body["services"]
            .as_array()
            .and_then(|l| l.iter().find(|v| v["name"] == name))
            .map(|v| v["kind"].clone())
    };
    assert_eq!(kind_of("echo"), Some(Value::from("tcp")));
    assert_eq!(kind_of("web"), Some(Value::from("http")));
    let env = [
        ("ADI_HUB", s.hub.url.as_str()),
        ("ADI_API_KEY", s.alice_key.as_str()),
    ];
    let (code, out, err) = cli(s.cfg.path(), &["cocoon", "services", "box"], &env)?;
    assert_eq!(code, 0, "{err}");
    let echo_row = out
        .lines()
        .find(|l| l.starts_with("echo"))
        .unwrap_or_default();
    assert!(echo_row.split_whitespace().nth(1) == Some("tcp"), "{out}");

    // Plain HTTP to a tcp service is refused with what to use instead.
    let resp = s
        .http
        .get(format!("{}/proxy/box/echo/", s.hub.url))
        .bearer_auth(&s.alice.jwt)
        .send()
        .await?;
    assert_eq!(resp.status(), 400);
    let message = resp.json::<Value>().await?["error"]["message"].clone();
    let message = message.as_str().unwrap_or_default();
    assert!(
        message.contains("adi connect box echo") && message.contains("adi proxy"),
        "{message}"
    );
    // So is another upgrade to it, and an adi-tcp upgrade to an HTTP service.
    let resp = s
        .http
        .get(format!("{}/proxy/box/echo", s.hub.url))
        .bearer_auth(&s.alice.jwt)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .send()
        .await?;
    assert_eq!(resp.status(), 400);
    let refused = s.open("web").await.expect_err("web speaks HTTP");
    assert!(
        refused.to_string().starts_with("400") && refused.to_string().contains("not a TCP service"),
        "{refused}"
    );
    let refused = s.open("nope").await.expect_err("no such service");
    assert!(refused.to_string().starts_with("404"), "{refused}");

    // Without a session, or as a stranger, nothing is learnt.
    let refused = s
        .open_as("not-a-jwt", "echo")
        .await
        .expect_err("no session");
    assert!(refused.to_string().starts_with("401"), "{refused}");
    let bob_key = s.hub.add_user("bob")?;
    let bob = Api::login(&s.hub.url, &bob_key).await?;
    let resp = s
        .http
        .get(format!("{}/proxy/{}/echo", s.hub.url, s.device))
        .bearer_auth(&bob.jwt)
        .header("connection", "upgrade")
        .header("upgrade", "adi-tcp")
        .send()
        .await?;
    assert_eq!(resp.status(), 404, "a stranger's device is not found");
    // A key without the proxy scope opens no stream, as it proxies no HTTP request.
    let (code, out, err) = cli(
        s.cfg.path(),
        &["keys", "create", "reader", "--scope", "devices:read"],
        &env,
    )?;
    assert_eq!(code, 0, "{err}");
    let reader = Api::login(&s.hub.url, out.trim()).await?;
    let http_status = s
        .http
        .get(format!("{}/proxy/box/web/", s.hub.url))
        .bearer_auth(&reader.jwt)
        .send()
        .await?
        .status();
    assert!(http_status.is_client_error(), "{http_status}");
    let refused = s
        .open_as(&reader.jwt, "echo")
        .await
        .expect_err("no proxy scope");
    assert!(
        refused.to_string().starts_with(http_status.as_str()),
        "{refused} vs {http_status}"
    );

    // adi connect says why on stderr, and writes nothing on stdout.
    let (code, out, err) = cli(s.cfg.path(), &["connect", "box", "web"], &env)?;
    assert_ne!(code, 0);
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("not a TCP service"), "{err}");
    let bob_env = [
        ("ADI_HUB", s.hub.url.as_str()),
        ("ADI_API_KEY", bob_key.as_str()),
    ];
    let device = s.device.clone();
    let (code, out, err) = cli(s.cfg.path(), &["connect", &device, "echo"], &bob_env)?;
    assert_ne!(code, 0);
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("404"), "{err}");
    Ok(())
}

#[tokio::test]
async fn adi_proxy_forwards_each_connection_of_a_tcp_service_as_a_stream() -> Result<()> {
    let s = setup(&[]).await?;
    let (_fwd, addr) = forward(&s, "echo").await?;
    let addr = &addr;
    // Several connections at once, each its own stream, half-closes passed on.
    let clients = (0..4u64).map(|i| async move {
        let socket = TcpStream::connect(addr.as_str()).await?;
        let (read, write) = socket.into_split();
        let (sent, got) = tokio::join!(send_pattern(write, 200 + i, 2 * MIB), digest_of(read));
        let (n, got) = got?;
        anyhow::ensure!(
            n == 2 * MIB && sent? == got,
            "connection {i}: other bytes came back"
        );
        Ok(())
    });
    for done in futures_util::future::join_all(clients).await {
        done?;
    }
    let (_fwd, addr) = forward(&s, "count").await?;
    let mut socket = TcpStream::connect(addr.as_str()).await?;
    socket.write_all(b"four").await?;
    socket.shutdown().await?;
    let mut answer = String::new();
    tokio::time::timeout(WAIT, socket.read_to_string(&mut answer)).await??;
    assert!(answer.starts_with("4 "), "{answer}");
    s.wait_streams(0).await?;
    Ok(())
}

/// Starts `adi proxy box SERVICE --listen 127.0.0.1:0` for a tcp service; returns it
/// and the address it listens on.
async fn forward(s: &Setup, service: &str) -> Result<(Proc, String)> {
    let mut cmd = std::process::Command::new(ADI);
    cmd.args(["proxy", "box", service, "--listen", "127.0.0.1:0"])
        .env("ADI_CONFIG_DIR", s.cfg.path())
        .env("ADI_HUB", &s.hub.url)
        .env("ADI_API_KEY", &s.alice_key);
    let fwd = Proc::spawn(&mut cmd)?;
    let line = fwd.wait_line("forwarding tcp://", WAIT).await?;
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("tcp://"))
        .unwrap_or_default()
        .to_owned();
    Ok((fwd, addr))
}

/// Whether `program` is here; if not, an error in CI and SKIPPED elsewhere.
fn have(program: &str, package: &str, test: &str) -> Result<bool> {
    if Path::new(program).exists() {
        return Ok(true);
    }
    if std::env::var("CI").is_ok_and(|v| !v.is_empty()) {
        bail!("{program} not found and CI is set (apt-get install {package})");
    }
    eprintln!("*** SKIPPED: {test} needs {program} (apt-get install {package}) ***");
    Ok(false)
}

/// Runs `program` with `args` and `envs`; its stdout, or an error with its output.
fn run(program: &str, args: &[&str], envs: &[(&str, &str)]) -> Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {args:?}: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// [`run`] on a thread of its own, so this test's runtime goes on meanwhile.
async fn run_apart(program: &str, args: &[&str], envs: &[(&str, &str)]) -> Result<String> {
    let program = program.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let envs: Vec<(String, String)> = envs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run(&program, &args, &envs)
    })
    .await?
}

#[tokio::test]
async fn ssh_and_scp_reach_a_real_sshd_through_adi_connect() -> Result<()> {
    let test = "the OpenSSH test";
    if !(have("/usr/sbin/sshd", "openssh-server", test)?
        && have("/usr/bin/ssh", "openssh-client", test)?
        && have("/usr/bin/scp", "openssh-client", test)?
        && have("/usr/bin/ssh-keygen", "openssh-client", test)?)
    {
        return Ok(());
    }
    // sshd started as root wants its privilege separation directory, which the
    // Debian package makes only when it starts its own service.
    if run("id", &["-u"], &[])?.trim() == "0" {
        std::fs::create_dir_all("/run/sshd")?;
    }
    let user = run("id", &["-un"], &[])?.trim().to_owned();
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let path = |name: &str| d.join(name).to_string_lossy().into_owned();
    for key in ["host_key", "id"] {
        run(
            "/usr/bin/ssh-keygen",
            &["-q", "-t", "ed25519", "-N", "", "-f", &path(key)],
            &[],
        )?;
    }
    std::fs::copy(d.join("id.pub"), d.join("authorized_keys"))?;
    let port = closed_port()?;
    std::fs::write(
        d.join("sshd_config"),
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
             UsePAM no\nStrictModes no\nPidFile none\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
             PermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n",
            path("host_key"),
            path("authorized_keys"),
        ),
    )?;
    let sshd = Proc::spawn(std::process::Command::new("/usr/sbin/sshd").args([
        "-D",
        "-e",
        "-f",
        &path("sshd_config"),
    ]))?;
    sshd.wait_line(&format!("Server listening on 127.0.0.1 port {port}"), WAIT)
        .await?;

    let s = setup(&["--tcp", &format!("ssh:{port}")]).await?;
    let cfg = s.cfg.path().to_string_lossy().into_owned();
    let env = [
        ("ADI_HUB", s.hub.url.as_str()),
        ("ADI_API_KEY", s.alice_key.as_str()),
        ("ADI_CONFIG_DIR", cfg.as_str()),
    ];
    // The one-liner the README gives; %h is the device's name.
    let proxy_command = format!("ProxyCommand='{ADI}' connect %h ssh");
    let identity = path("id");
    let options = [
        "-F",
        "/dev/null",
        "-o",
        &proxy_command,
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "LogLevel=ERROR",
        "-i",
        &identity,
    ];
    let target = format!("{user}@box");
    let mut args = options.to_vec();
    args.extend([target.as_str(), "echo", "hello"]);
    assert_eq!(run_apart("/usr/bin/ssh", &args, &env).await?, "hello\n");

    // scp both ways, with the same ProxyCommand.
    let mut bytes = Vec::new();
    for chunk in pattern(7, 3 * MIB + 5) {
        bytes.extend_from_slice(&chunk);
    }
    std::fs::write(d.join("local.bin"), &bytes)?;
    let remote = format!("{target}:{}", path("remote.bin"));
    let back = path("back.bin");
    for (from, to) in [(path("local.bin"), remote.clone()), (remote, back.clone())] {
        let mut args = options.to_vec();
        args.extend([from.as_str(), to.as_str()]);
        run_apart("/usr/bin/scp", &args, &env).await?;
    }
    assert!(
        std::fs::read(d.join("remote.bin"))? == bytes,
        "uploaded intact"
    );
    assert!(std::fs::read(&back)? == bytes, "downloaded intact");
    s.wait_streams(0).await?;
    Ok(())
}

#[tokio::test]
async fn psql_reaches_postgres_through_adi_proxy() -> Result<()> {
    if !have(
        "/usr/bin/psql",
        "postgresql-client",
        "the PostgreSQL TCP test",
    )? {
        return Ok(());
    }
    let Some(db) = crate::harness::fresh_postgres().await else {
        return Ok(());
    };
    let options = db.options();
    let host = options.get_host().to_owned();
    if !matches!(host.as_str(), "127.0.0.1" | "localhost" | "::1") {
        eprintln!("*** SKIPPED: PostgreSQL at {host} is not on this machine's loopback ***");
        db.drop_database().await;
        return Ok(());
    }
    let pg = format!("pg:{}", options.get_port());
    let s = setup(&["--tcp", &pg]).await?;
    let (_fwd, addr) = forward(&s, "pg").await?;
    let (_, port) = addr.rsplit_once(':').context("an address")?;
    let user = options.get_username().to_owned();
    let database = options.get_database().unwrap_or("postgres").to_owned();
    let psql = |sql: &'static str| {
        let args = [
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-U",
            &user,
            "-d",
            &database,
            "-At",
            "-c",
            sql,
        ];
        async move { run_apart("/usr/bin/psql", &args, &[("PGCONNECT_TIMEOUT", "10")]).await }
    };
    let outcome = async {
        assert_eq!(psql("select 1").await?, "1\n");
        // A real exchange: a table filled and read back over the stream.
        psql("create table t as select generate_series(1, 100000) as x").await?;
        assert_eq!(psql("select sum(x) from t").await?, "5000050000\n");
        s.wait_streams(0).await
    }
    .await;
    db.drop_database().await;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reaches_a_device_connected_to_another_hub_of_the_cluster() -> Result<()> {
    let nats = crate::harness::nats_url();
    let reachable = TcpStream::connect(nats.trim_start_matches("nats://")).await;
    if let Err(e) = reachable {
        if std::env::var("CI").is_ok_and(|v| !v.is_empty()) {
            bail!("NATS at {nats} is unreachable ({e}) and CI is set; scripts/test starts it");
        }
        eprintln!("*** SKIPPED: the cluster TCP test needs NATS at {nats}: {e} ***");
        return Ok(());
    }
    let Some(db) = crate::harness::fresh_postgres().await else {
        return Ok(());
    };
    let outcome = async {
        let a = Hub::start_cluster(&db.url(), &[]).await?;
        let b = Hub::start_cluster(&db.url(), &[]).await?;
        let key = a.add_user("alice")?;
        let (on_a, on_b) = (
            Api::login(&a.url, &key).await?,
            Api::login(&b.url, &key).await?,
        );
        let port = tcp_service(count).await?;
        let cocoon = Cocoon::start(
            &a.url,
            "box",
            Some(&on_a.setup_token(60).await?),
            &["--tcp", &format!("count:{port}")],
        )?;
        let id = cocoon.device_id().await?;
        on_b.wait_online(&id, true, WAIT).await?;
        // adi connect through hub b, whose device is on hub a: the half-close crosses
        // both hubs and the answer comes back.
        let cfg = tempfile::tempdir()?;
        let mut child = tokio::process::Command::new(ADI)
            .args(["connect", "box", "count"])
            .env("ADI_CONFIG_DIR", cfg.path())
            .env("ADI_HUB", &b.url)
            .env("ADI_API_KEY", &key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let sent = send_pattern(stdin, 9, 5 * MIB).await?;
        let out = tokio::time::timeout(WAIT, child.wait_with_output()).await??;
        anyhow::ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        anyhow::ensure!(String::from_utf8(out.stdout)? == format!("{} {sent}\n", 5 * MIB));
        Ok(())
    }
    .await;
    db.drop_database().await;
    outcome
}

#[tokio::test]
async fn a_half_close_crosses_a_tls_hub() -> Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    // A CA of the test's own, and the hub's certificate for 127.0.0.1 from it.
    let dir = tempfile::tempdir()?;
    let d = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "adi tcp test CA");
    let ca_key = KeyPair::generate()?;
    let ca = ca.self_signed(&ca_key)?;
    let mut hub_cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])?;
    hub_cert.distinguished_name.push(DnType::CommonName, "hub");
    let hub_key = KeyPair::generate()?;
    let hub_cert = hub_cert.signed_by(&hub_key, &ca, &ca_key)?;
    std::fs::write(d("ca.pem"), ca.pem())?;
    std::fs::write(d("cert.pem"), hub_cert.pem())?;
    std::fs::write(d("key.pem"), hub_key.serialize_pem())?;
    let hub = Hub::start_with(&["--tls-cert", &d("cert.pem"), "--tls-key", &d("key.pem")]).await?;
    let key = hub.add_user("alice")?;
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes())?)
        .build()?;
    let signed: Value = http
        .post(format!("{}/api/auth/token", hub.url))
        .json(&serde_json::json!({ "api_key": key }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let made: Value = http
        .post(format!("{}/api/tokens", hub.url))
        .bearer_auth(signed["token"].as_str().unwrap_or_default())
        .json(&serde_json::json!({"kind": "setup"}))
        .send()
        .await?
        .json()
        .await?;
    let port = tcp_service(count).await?;
    let cocoon = Cocoon::start(
        &hub.url,
        "box",
        made["token"].as_str(),
        &["--tcp", &format!("count:{port}"), "--ca-cert", &d("ca.pem")],
    )?;
    cocoon.device_id().await?;
    // The end of stdin is TLS's close_notify and a TCP half-close; the answer still
    // comes back over the same connection.
    let cfg = tempfile::tempdir()?;
    let mut child = tokio::process::Command::new(ADI)
        .args(["connect", "box", "count"])
        .env("ADI_CONFIG_DIR", cfg.path())
        .env("ADI_HUB", &hub.url)
        .env("ADI_API_KEY", &key)
        .env("ADI_CA_CERT", d("ca.pem"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdin = child.stdin.take().context("stdin")?;
    let sent = send_pattern(stdin, 11, 2 * MIB).await?;
    let out = tokio::time::timeout(WAIT, child.wait_with_output()).await??;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout)?,
        format!("{} {sent}\n", 2 * MIB)
    );
    Ok(())
}
