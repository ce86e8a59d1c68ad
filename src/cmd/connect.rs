//! `adi connect DEVICE SERVICE`: joins this process's stdin and stdout to a device's raw
//! TCP service through the hub, for programs that talk over a pipe:
//! `ssh -o ProxyCommand='adi connect %h ssh' user@gpu-box`.
//!
//! One `GET /proxy/{device}/{service}` with `Upgrade: adi-tcp` and the session's bearer;
//! on `101` the connection carries the service's bytes both ways. The end of stdin
//! half-closes it (the service sees its end and its answer still comes back); the
//! service closing ends the command. Nothing but the service's bytes is ever written to
//! stdout: what goes wrong is said on stderr.
//!
//! [`open`] is also how `adi proxy` opens one stream per accepted connection of a tcp
//! service.

use std::io::Read;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use reqwest::header;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use adi_protocol::TCP_UPGRADE;

use crate::client::{HubArgs, HubClient};

#[derive(Args)]
pub struct ConnectArgs {
    /// Device id or name (ssh's %h in a ProxyCommand).
    device: String,
    /// The device's raw TCP service, as it declared it (`--tcp NAME:PORT`).
    service: String,
    #[command(flatten)]
    hub: HubArgs,
}

/// Bytes read from stdin at once.
const CHUNK: usize = 64 * 1024;
/// Chunks read from stdin ahead of the hub taking them: a few, so a fast producer
/// waits instead of filling memory.
const AHEAD: usize = 4;

pub async fn run(args: ConnectArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let url = stream_url(&client.base, &args.device, &args.service)?;
    let http = stream_client()?;
    let stream = match open(&http, &url, &client.token).await? {
        Opened::Stream(stream) => stream,
        Opened::Refused(refusal) => return Err(anyhow!("{refusal}")),
    };
    pipe(stream).await
}

/// `{hub}/proxy/{device}/{service}`, each name one path segment whatever it holds.
pub(crate) fn stream_url(hub: &str, device: &str, service: &str) -> Result<String> {
    let mut url = reqwest::Url::parse(hub).with_context(|| format!("hub URL {hub:?}"))?;
    url.path_segments_mut()
        .map_err(|()| anyhow!("hub URL {hub:?} cannot carry a path"))?
        .pop_if_empty()
        .extend(["proxy", device, service]);
    Ok(url.into())
}

/// An HTTP/1 client for upgrades: the hub's TLS trust, no redirects.
pub(crate) fn stream_client() -> Result<reqwest::Client> {
    Ok(crate::client::trusting_builder()?
        .redirect(reqwest::redirect::Policy::none())
        .tcp_nodelay(true)
        .build()?)
}

/// A raw TCP stream to a service, or why the hub would not open one.
pub(crate) enum Opened {
    /// The hub answered `101`: the service's bytes, both ways.
    Stream(reqwest::Upgraded),
    /// Any other answer.
    Refused(Refusal),
}

/// The hub's answer when it opens no stream.
#[derive(Debug)]
pub(crate) struct Refusal {
    /// Its status.
    pub status: reqwest::StatusCode,
    /// Its words: the hub's error message, or what came back.
    pub message: String,
    /// The hub refused the bearer itself (not a service or a device): a fresh session
    /// may succeed.
    pub unauthorized: bool,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the hub refused the stream ({}): {}",
            self.status, self.message
        )?;
        if self.unauthorized {
            f.write_str(" — run `adi login` again or check ADI_API_KEY")?;
        }
        Ok(())
    }
}

/// Asks the hub at `url` (from [`stream_url`]) for a raw TCP stream, presenting `token`.
pub(crate) async fn open(http: &reqwest::Client, url: &str, token: &str) -> Result<Opened> {
    let resp = http
        .get(url)
        .bearer_auth(token)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, TCP_UPGRADE)
        .send()
        .await
        .map_err(|e| crate::client::unreachable(url, e))?;
    let status = resp.status();
    if status == reqwest::StatusCode::SWITCHING_PROTOCOLS {
        let stream = resp
            .upgrade()
            .await
            .context("the hub's answer switched protocols but the connection did not")?;
        return Ok(Opened::Stream(stream));
    }
    let body = resp.bytes().await.unwrap_or_default();
    let error = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            let e = v.get("error")?;
            Some((
                e.get("code")?.as_str()?.to_owned(),
                e.get("message")?.as_str()?.to_owned(),
            ))
        });
    let refusal = match error {
        Some((code, message)) => Refusal {
            status,
            unauthorized: code == "unauthorized",
            message,
        },
        None => Refusal {
            status,
            unauthorized: false,
            message: match adi_protocol::http::excerpt(&body) {
                e if e.is_empty() => "no adi error in its answer; is this an adi hub?".into(),
                e => e,
            },
        },
    };
    Ok(Opened::Refused(refusal))
}

/// Copies stdin to the stream and the stream to stdout until the service closes.
async fn pipe(stream: reqwest::Upgraded) -> Result<()> {
    let (mut from_hub, mut to_hub) = tokio::io::split(stream);
    let mut stdin = stdin_chunks();
    let upstream = async move {
        while let Some(chunk) = stdin.recv().await {
            let chunk = chunk.context("reading stdin")?;
            to_hub
                .write_all(&chunk)
                .await
                .context("sending to the hub")?;
        }
        // Half-closed: the service reads its end, and its answer still comes back.
        to_hub.shutdown().await.context("ending the stream")?;
        Ok::<(), anyhow::Error>(())
    };
    let downstream = async move {
        let mut stdout = tokio::io::stdout();
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = from_hub
                .read(&mut buf)
                .await
                .context("reading from the hub")?;
            if n == 0 {
                return Ok::<(), anyhow::Error>(());
            }
            stdout
                .write_all(&buf[..n])
                .await
                .context("writing stdout")?;
            // A program on the other end of the pipe (ssh) waits for these bytes.
            stdout.flush().await.context("writing stdout")?;
        }
    };
    tokio::pin!(upstream, downstream);
    tokio::select! {
        biased;
        done = &mut downstream => done,
        sent = &mut upstream => {
            sent?;
            downstream.await
        }
    }
}

/// Stdin, read on a thread of its own: a blocking read cannot be cancelled, and one the
/// async runtime owned would keep this process from exiting when the service closes
/// while stdin is still open.
fn stdin_chunks() -> mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = mpsc::channel(AHEAD);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; CHUNK];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx.blocking_send(Ok(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_urls_keep_the_hub_path_and_encode_the_names() -> Result<()> {
        assert_eq!(
            stream_url("http://hub:8080", "gpu-box", "ssh")?,
            "http://hub:8080/proxy/gpu-box/ssh"
        );
        assert_eq!(
            stream_url("https://example.com/adi", "my box", "pg")?,
            "https://example.com/adi/proxy/my%20box/pg"
        );
        assert_eq!(
            stream_url("http://hub/", "a/b", "ssh")?,
            "http://hub/proxy/a%2Fb/ssh"
        );
        Ok(())
    }
}
