//! What the benchmarks share: a hub as its own process, a user and setup tokens through
//! the real CLI and REST API, and the process figures (`/proc`) they print.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// The `adi` binary built with the benchmark.
pub const ADI: &str = env!("CARGO_BIN_EXE_adi");

/// A free loopback port (bound, then released).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A hub process, killed on drop.
pub struct HubProcess {
    pub child: Child,
    pub url: String,
}

impl HubProcess {
    /// `adi signaling serve` on a free port with its catalog in `data_dir`; waits for
    /// `/healthz`.
    pub async fn start(data_dir: &Path, extra: &[&str], log: &Path) -> Result<Self> {
        let port = free_port()?;
        let out = std::fs::File::create(log)?;
        let err = out.try_clone()?;
        let child = Command::new(ADI)
            .args(["signaling", "serve", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env_remove("ADI_DATABASE_URL")
            .env(
                "RUST_LOG",
                std::env::var("ADI_BENCH_RUST_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("starting the hub")?;
        let hub = HubProcess {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::builder().no_proxy().build()?;
        let started = Instant::now();
        loop {
            if let Ok(r) = http.get(format!("{}/healthz", hub.url)).send().await {
                if r.status().is_success() {
                    return Ok(hub);
                }
            }
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "the hub did not come up; see {}",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `adi signaling user add NAME`; returns the API key.
pub fn create_user(data_dir: &Path, name: &str) -> Result<String> {
    let out = Command::new(ADI)
        .args(["signaling", "user", "add", name, "--data-dir"])
        .arg(data_dir)
        // Before the hub first starts, so there is no catalog yet.
        .arg("--create")
        .env_remove("ADI_DATABASE_URL")
        .output()
        .context("running adi signaling user add")?;
    if !out.status.success() {
        bail!(
            "adi signaling user add failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// A user's REST session.
pub struct HubApi {
    pub http: reqwest::Client,
    pub base: String,
    pub jwt: String,
}

impl HubApi {
    pub async fn login(base: &str, api_key: &str) -> Result<Self> {
        let http = reqwest::Client::builder().no_proxy().build()?;
        let v: serde_json::Value = http
            .post(format!("{base}/api/auth/token"))
            .json(&serde_json::json!({ "api_key": api_key }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let jwt = v["token"].as_str().context("no token")?.to_owned();
        Ok(HubApi {
            http,
            base: base.to_owned(),
            jwt,
        })
    }

    pub async fn setup_token(&self) -> Result<String> {
        let v: serde_json::Value = self
            .http
            .post(format!("{}/api/tokens", self.base))
            .bearer_auth(&self.jwt)
            .json(&serde_json::json!({"kind": "setup", "expires_in_secs": 3600}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(v["token"].as_str().context("no token")?.to_owned())
    }
}

/// Clock ticks per second of `/proc/PID/stat` times.
pub fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// User plus system CPU time of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

/// Resident set size of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")
}

/// The pid of the running process whose executable name is `name`, if there is one.
pub fn find_process(name: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let e = e.ok()?;
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim() == name).then_some(pid)
    })
}

/// The value at quantile `q` of sorted samples.
pub fn quantile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The median of a few figures.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        // The mean of the two middle values: taking either one would favour the
        // better (or the worse) of two rounds.
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
