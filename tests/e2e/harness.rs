//! Real processes for end-to-end tests: a hub (`adi signaling serve`) on a free port,
//! cocoons (`adi cocoon run`), and the CLI, each cleaned up on drop. Output is drained
//! into buffers so tests can wait on log lines and check what was logged.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use adi_storage::test_database::TestPostgres;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

pub const ADI: &str = env!("CARGO_BIN_EXE_adi");

/// Heartbeat interval the test hubs use, so offline detection is quick.
pub const HEARTBEAT: Duration = Duration::from_millis(500);

/// The NATS server cluster tests join.
pub fn nats_url() -> String {
    std::env::var("ADI_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// Polls `f` until it returns `Some`, or fails after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() > deadline {
            return Err(anyhow!(
                "timed out after {deadline:?} waiting for {what}; last error: {last_err:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process whose stdout and stderr are collected as they come.
pub struct Proc {
    child: Child,
    out: Arc<Mutex<String>>,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning adi")?;
        let out = Arc::new(Mutex::new(String::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let out = out.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut o = out.lock().expect("log lock");
                    o.push_str(&line);
                    o.push('\n');
                }
            });
        }
        Ok(Proc { child, out })
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        self.out.lock().expect("log lock").clone()
    }

    /// Waits until a printed line contains `needle`; returns that line.
    pub async fn wait_line(&self, needle: &str, deadline: Duration) -> Result<String> {
        let res = wait_for(&format!("a line with {needle:?}"), deadline, || async {
            Ok(self
                .output()
                .lines()
                .find(|l| l.contains(needle))
                .map(str::to_owned))
        })
        .await;
        res.with_context(|| format!("output so far:\n{}", self.output()))
    }

    /// Waits for the process to exit by itself; returns its exit code.
    pub async fn wait_exit(&mut self, deadline: Duration) -> Result<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                // Let the reader threads drain the pipes.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Ok(status.code().unwrap_or(-1));
            }
            if start.elapsed() > deadline {
                bail!(
                    "process did not exit within {deadline:?}; output:\n{}",
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, like a crash or a power cut.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a graceful exit.
    pub async fn terminate(&mut self) -> Result<()> {
        signal(self.child.id(), "TERM");
        self.wait_exit(Duration::from_secs(10)).await.map(|_| ())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// A hub process with its own data dir.
pub struct Hub {
    pub proc: Proc,
    pub url: String,
    pub port: u16,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl Hub {
    /// A hub on SQLite in a fresh temp dir, on a free port.
    pub async fn start() -> Result<Self> {
        Self::start_with(&[]).await
    }

    /// A hub on SQLite with extra `serve` flags (a `--heartbeat-interval` among them
    /// replaces the tests' short one).
    pub async fn start_with(extra: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let data_dir = dir.path().join("hub");
        let mut hub = Self::launch_with(&data_dir, None, 0, extra).await?;
        hub._dir = Some(dir);
        Ok(hub)
    }

    /// A hub on the SQLite catalog in `data_dir`, which the caller keeps.
    pub async fn start_in(data_dir: &Path) -> Result<Self> {
        Self::launch(data_dir, None, 0).await
    }

    /// One hub of a cluster: its catalog the given PostgreSQL database, joined to the
    /// others through the machine's NATS (`ADI_TEST_NATS`, default the loopback one).
    pub async fn start_cluster(database_url: &str, extra: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let data_dir = dir.path().join("hub");
        let nats = nats_url();
        let mut flags = vec!["--nats", nats.as_str()];
        flags.extend_from_slice(extra);
        let mut hub =
            Self::launch_with(&data_dir, Some(database_url.to_owned()), 0, &flags).await?;
        hub._dir = Some(dir);
        Ok(hub)
    }

    /// A hub whose catalog is the given PostgreSQL database.
    pub async fn start_postgres(database_url: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let data_dir = dir.path().join("hub");
        let mut hub = Self::launch(&data_dir, Some(database_url.to_owned()), 0).await?;
        hub._dir = Some(dir);
        Ok(hub)
    }

    async fn launch(data_dir: &Path, database_url: Option<String>, port: u16) -> Result<Self> {
        Self::launch_with(data_dir, database_url, port, &[]).await
    }

    async fn launch_with(
        data_dir: &Path,
        database_url: Option<String>,
        port: u16,
        extra: &[&str],
    ) -> Result<Self> {
        let mut cmd = Command::new(ADI);
        cmd.args(["signaling", "serve", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra);
        if !extra.contains(&"--heartbeat-interval") {
            cmd.arg("--heartbeat-interval")
                .arg(humantime::format_duration(HEARTBEAT).to_string());
        }
        cmd.env(
            "RUST_LOG",
            std::env::var("ADI_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        if let Some(url) = &database_url {
            cmd.arg("--database-url").arg(url);
        }
        let proc = Proc::spawn(&mut cmd)?;
        let line = proc
            .wait_line("adi hub listening on ", Duration::from_secs(20))
            .await?;
        let url = line
            .rsplit(' ')
            .next()
            .ok_or_else(|| anyhow!("no URL in {line:?}"))?
            .to_owned();
        let port = url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("no port in {url}"))?;
        Ok(Hub {
            proc,
            url,
            port,
            data_dir: data_dir.to_owned(),
            database_url,
            _dir: None,
        })
    }

    /// Stops this hub (SIGTERM) and starts a new process on the same port and catalog.
    pub async fn restart(&mut self) -> Result<()> {
        self.proc.terminate().await?;
        let mut next = Self::launch(&self.data_dir, self.database_url.clone(), self.port).await?;
        std::mem::swap(&mut self.proc, &mut next.proc);
        Ok(())
    }

    /// The key this hub signs its JWTs with, read from its SQLite catalog, so a test can
    /// mint tokens the hub would have issued (expired ones, say).
    pub async fn jwt_key(&self) -> Result<Vec<u8>> {
        use sqlx::Connection;
        let url = format!("sqlite:{}", self.data_dir.join("catalog.db").display());
        let mut conn = sqlx::SqliteConnection::connect(&url).await?;
        let (key,): (Vec<u8>,) =
            sqlx::query_as("SELECT value FROM hub_secrets WHERE name = 'jwt_key'")
                .fetch_one(&mut conn)
                .await?;
        Ok(key)
    }

    /// `adi signaling user add NAME`; returns the printed API key.
    pub fn add_user(&self, name: &str) -> Result<String> {
        let mut cmd = Command::new(ADI);
        cmd.args(["signaling", "user", "add", name, "--data-dir"])
            .arg(&self.data_dir);
        if let Some(url) = &self.database_url {
            cmd.arg("--database-url").arg(url);
        }
        let out = cmd.output()?;
        if !out.status.success() {
            bail!("user add failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let stdout = String::from_utf8(out.stdout)?;
        let lines: Vec<&str> = stdout.lines().collect();
        if lines.len() != 1 {
            bail!("user add must print exactly the key, got {stdout:?}");
        }
        Ok(lines[0].to_owned())
    }
}

/// A REST client holding one user's JWT.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub jwt: String,
    pub http: reqwest::Client,
}

impl Api {
    pub async fn login(hub: &str, api_key: &str) -> Result<Self> {
        let http = reqwest::Client::new();
        let resp: Value = http
            .post(format!("{hub}/api/auth/token"))
            .json(&serde_json::json!({ "api_key": api_key }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let jwt = resp["token"]
            .as_str()
            .ok_or_else(|| anyhow!("no token in {resp}"))?
            .to_owned();
        Ok(Api {
            base: hub.to_owned(),
            jwt,
            http,
        })
    }

    /// GET with the bearer token; returns status and JSON body.
    pub async fn get(&self, path: &str) -> Result<(u16, Value)> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.jwt)
            .send()
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    /// DELETE with the bearer token; returns status and JSON body.
    pub async fn delete(&self, path: &str) -> Result<(u16, Value)> {
        let resp = self
            .http
            .delete(format!("{}{path}", self.base))
            .bearer_auth(&self.jwt)
            .send()
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    /// PATCH JSON with the bearer token; returns status and JSON body.
    pub async fn patch(&self, path: &str, body: Value) -> Result<(u16, Value)> {
        let resp = self
            .http
            .patch(format!("{}{path}", self.base))
            .bearer_auth(&self.jwt)
            .json(&body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    /// POST JSON with the bearer token; returns status and JSON body.
    pub async fn post(&self, path: &str, body: Value) -> Result<(u16, Value)> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.jwt)
            .json(&body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    pub async fn setup_token(&self, expires_in_secs: u64) -> Result<String> {
        let (status, body) = self
            .post(
                "/api/tokens",
                serde_json::json!({"kind": "setup", "expires_in_secs": expires_in_secs}),
            )
            .await?;
        if status != 201 {
            bail!("setup token: {status} {body}");
        }
        Ok(body["token"].as_str().unwrap_or_default().to_owned())
    }

    /// The caller's devices, by id.
    pub async fn cocoons(&self) -> Result<Vec<Value>> {
        let (status, body) = self.get("/api/cocoons").await?;
        if status != 200 {
            bail!("list: {status} {body}");
        }
        Ok(body["cocoons"].as_array().cloned().unwrap_or_default())
    }

    pub async fn cocoon(&self, id: &str) -> Result<(u16, Value)> {
        self.get(&format!("/api/cocoons/{id}")).await
    }

    /// Waits until the device reports the wanted online state.
    pub async fn wait_online(&self, id: &str, online: bool, deadline: Duration) -> Result<()> {
        wait_for(
            &format!("device {id} online={online}"),
            deadline,
            || async {
                let (status, body) = self.cocoon(id).await?;
                Ok((status == 200 && body["online"].as_bool() == Some(online)).then_some(()))
            },
        )
        .await
    }
}

/// A cocoon process.
pub struct Cocoon {
    pub proc: Proc,
    pub data_dir: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Cocoon {
    /// Starts `adi cocoon run` in a fresh data dir.
    pub fn start(hub: &str, name: &str, token: Option<&str>, extra: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let data_dir = dir.path().join("cocoon");
        let mut c = Self::start_in(hub, name, token, &data_dir, extra)?;
        c._dir = Some(dir);
        Ok(c)
    }

    /// Starts `adi cocoon run` with a given data dir (to reuse an identity).
    pub fn start_in(
        hub: &str,
        name: &str,
        token: Option<&str>,
        data_dir: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        let mut cmd = Command::new(ADI);
        cmd.args([
            "cocoon",
            "run",
            "--hub",
            hub,
            "--name",
            name,
            "--backoff-max",
            "1s",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .env("RUST_LOG", "info");
        if let Some(t) = token {
            cmd.arg("--token").arg(t);
        }
        Ok(Cocoon {
            proc: Proc::spawn(&mut cmd)?,
            data_dir: data_dir.to_owned(),
            _dir: None,
        })
    }

    /// Waits for the cocoon to say it is online; returns its device id.
    pub async fn device_id(&self) -> Result<String> {
        let line = self
            .proc
            .wait_line("cocoon online as device ", Duration::from_secs(20))
            .await?;
        line.split("as device ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("no id in {line:?}"))
    }

    pub fn secret(&self) -> Result<String> {
        Ok(std::fs::read_to_string(
            self.data_dir.join("device.secret"),
        )?)
    }
}

/// A tiny HTTP server on a free loopback port that is not an adi hub: it answers every
/// request with `status` and a small HTML page, as a web server at a mistyped address
/// would. Returns its port.
pub async fn foreign_server(status: u16) -> Result<u16> {
    use axum::http::StatusCode;
    let status = StatusCode::from_u16(status)?;
    let app = axum::Router::new().fallback(move || async move {
        (
            status,
            [("content-type", "text/html")],
            format!("<html><body><h1>{status}</h1>This is some other server.</body></html>"),
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(port)
}

/// A loopback port nothing listens on.
pub fn closed_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Runs the CLI with its own config dir; returns (exit code, stdout, stderr).
pub fn cli(
    config_dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<(i32, String, String)> {
    let out = Command::new(ADI)
        .args(args)
        .env("ADI_CONFIG_DIR", config_dir)
        .env_remove("ADI_HUB")
        .env_remove("ADI_API_KEY")
        .envs(env.iter().copied())
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout)?,
        String::from_utf8(out.stderr)?,
    ))
}

/// A fresh PostgreSQL database on the machine's server; drop it with `drop_database`.
/// `None` (after saying SKIPPED) when the server is unreachable, a panic when `CI` is set.
pub async fn fresh_postgres() -> Option<TestPostgres> {
    TestPostgres::create("end-to-end").await
}

/// With `ADI_TEST_LOGS=1`, every hub and cocoon prints what it logged when it is
/// dropped, to see inside a failing test.
fn dump_logs(what: &str, proc: &mut Proc) {
    if std::env::var_os("ADI_TEST_LOGS").is_some() || std::thread::panicking() {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(secs) = std::env::var("ADI_TEST_HOLD_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            eprintln!("----- holding {what} pid {} for {secs} s -----", proc.pid());
            std::thread::sleep(Duration::from_secs(secs));
        }
        let status = proc.child.try_wait().ok().flatten();
        eprintln!(
            "----- {what} output (exit: {status:?}) -----\n{}",
            proc.output()
        );
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        dump_logs("hub", &mut self.proc);
    }
}

impl Drop for Cocoon {
    fn drop(&mut self) {
        dump_logs("cocoon", &mut self.proc);
    }
}

/// Headless Chromium driven over WebDriver: Debian's `chromium` and `chromium-driver`
/// (`ADI_TEST_CHROMIUM` and `ADI_TEST_CHROMEDRIVER` point elsewhere). Each browser has its
/// own chromedriver on a free port and its own profile; dropping it kills both.
pub struct Browser {
    pub client: fantoccini::Client,
    driver: Proc,
    _profile: tempfile::TempDir,
}

/// How long a browser wait may take before the test fails.
pub const BROWSER_WAIT: Duration = Duration::from_secs(20);

impl Browser {
    /// A browser whose window is `width` x `height`. Without Chromium or chromedriver
    /// this fails when `CI` is set, and otherwise says SKIPPED and returns `None`.
    pub async fn start(width: u32, height: u32) -> Result<Option<Self>> {
        Self::start_with(width, height, &[]).await
    }

    /// [`start`](Self::start) with more Chromium switches (`--force-dark-mode`, say).
    pub async fn start_with(width: u32, height: u32, switches: &[&str]) -> Result<Option<Self>> {
        use std::os::unix::process::CommandExt;
        let chromium =
            std::env::var("ADI_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let chromedriver = std::env::var("ADI_TEST_CHROMEDRIVER")
            .unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        let missing: Vec<&str> = [&chromium, &chromedriver]
            .into_iter()
            .filter(|p| !Path::new(p).exists())
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            if std::env::var("CI").map(|v| !v.is_empty()).unwrap_or(false) {
                bail!("{missing:?} not found and CI is set (apt-get install chromium chromium-driver)");
            }
            eprintln!(
                "*** SKIPPED: browser test needs {missing:?} (apt-get install chromium chromium-driver) ***"
            );
            return Ok(None);
        }
        let profile = tempfile::tempdir()?;
        let mut cmd = Command::new(&chromedriver);
        // Its own process group, so the drop can end Chromium with it.
        cmd.arg("--port=0").process_group(0);
        let driver = Proc::spawn(&mut cmd)?;
        let line = driver
            .wait_line("started successfully on port ", BROWSER_WAIT)
            .await?;
        let port: u16 = line
            .rsplit(' ')
            .next()
            .map(|p| p.trim_end_matches('.'))
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("no port in {line:?}"))?;
        let mut args: Vec<String> = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-sync",
            "--lang=en-US",
        ]
        .into_iter()
        .chain(switches.iter().copied())
        .map(String::from)
        .collect();
        args.push(format!("--window-size={width},{height}"));
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let caps = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": chromium, "args": args },
            // What the page logs, so a test can say it logged no error.
            "goog:loggingPrefs": { "browser": "ALL" },
        });
        let mut builder = fantoccini::ClientBuilder::new(
            hyper_util::client::legacy::connect::HttpConnector::new(),
        );
        builder.capabilities(caps.as_object().cloned().unwrap_or_default());
        let client = builder
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .with_context(|| {
                format!("starting Chromium; chromedriver said:\n{}", driver.output())
            })?;
        Ok(Some(Browser {
            client,
            driver,
            _profile: profile,
        }))
    }

    /// Ends the WebDriver session (Chromium quits), then chromedriver.
    pub async fn close(self) -> Result<()> {
        self.client.clone().close().await?;
        Ok(())
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page.
    pub async fn js(&self, script: &str, args: Vec<Value>) -> Result<Value> {
        Ok(self.client.execute(script, args).await?)
    }

    /// Polls `script` until it returns something truthy, and returns that. On timeout
    /// the error shows what the page said, to see why.
    pub async fn wait_js(&self, what: &str, script: &str, args: Vec<Value>) -> Result<Value> {
        let res = wait_for(what, BROWSER_WAIT, || async {
            let v = self.js(script, args.clone()).await?;
            let truthy = match &v {
                Value::Null | Value::Bool(false) => false,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            Ok(truthy.then_some(v))
        })
        .await;
        match res {
            Ok(v) => Ok(v),
            Err(e) => {
                let page = self
                    .js(
                        "return document.body ? document.body.innerText : ''",
                        vec![],
                    )
                    .await
                    .unwrap_or_default();
                Err(e.context(format!(
                    "the page shows:\n{}",
                    page.as_str().unwrap_or_default()
                )))
            }
        }
    }

    /// Waits until the element `css` is shown and its text contains `needle`.
    pub async fn wait_text(&self, css: &str, needle: &str) -> Result<String> {
        let v = self
            .wait_js(
                &format!("{css} showing {needle:?}"),
                "const e = document.querySelector(arguments[0]);
                 if (!e || !e.getClientRects().length) return null;
                 return e.innerText.includes(arguments[1]) ? e.innerText : null;",
                vec![css.into(), needle.into()],
            )
            .await?;
        Ok(v.as_str().unwrap_or_default().to_owned())
    }

    /// The shown element `css`, once there.
    pub async fn find(&self, css: &str) -> Result<fantoccini::elements::Element> {
        self.wait_js(
            &format!("{css} to be shown"),
            "const e = document.querySelector(arguments[0]); return !!(e && e.getClientRects().length);",
            vec![css.into()],
        )
        .await?;
        Ok(self.client.find(fantoccini::Locator::Css(css)).await?)
    }

    /// Clicks the element `css` as a person would.
    pub async fn click(&self, css: &str) -> Result<()> {
        self.find(css).await?.click().await?;
        Ok(())
    }

    /// Types into the field `css` (after clearing it) key by key.
    pub async fn type_into(&self, css: &str, text: &str) -> Result<()> {
        let field = self.find(css).await?;
        field.clear().await?;
        field.send_keys(text).await?;
        Ok(())
    }

    /// Opens the hub's UI and signs in with the API key, pressing Enter in the field.
    pub async fn sign_in(&self, hub: &str, api_key: &str) -> Result<()> {
        let url = self.client.current_url().await?;
        if !url.as_str().starts_with(hub) {
            self.client.goto(hub).await?;
        }
        let enter = fantoccini::key::Key::Enter;
        self.type_into("#api-key", &format!("{api_key}{enter}"))
            .await?;
        self.find("#nav").await?;
        Ok(())
    }

    /// Saves what the window shows as `target/screenshots/NAME.png`, a test artifact.
    pub async fn screenshot(&self, name: &str) -> Result<PathBuf> {
        let dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
            .join("screenshots");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, self.client.screenshot().await?)?;
        Ok(path)
    }
}

/// Chromium's log of what pages wrote to the console (a WebDriver command fantoccini
/// has no method for; each call returns the entries since the previous one).
#[derive(Debug)]
struct ConsoleLog;

impl fantoccini::wd::WebDriverCompatibleCommand for ConsoleLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.into()))
    }
}

/// axe-core, injected into pages by [`Browser::assert_accessible`]; test-only.
const AXE: &str = include_str!("axe/axe.min.js");

impl Browser {
    /// The errors pages logged to the console since the last call.
    pub async fn console_errors(&self) -> Result<Vec<String>> {
        let log = self.client.issue_cmd(ConsoleLog).await?;
        Ok(log
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
            .collect())
    }

    /// Runs axe-core on the page as it is shown and fails, listing each, on any
    /// violation whose impact is serious or critical.
    pub async fn assert_accessible(&self, what: &str) -> Result<()> {
        let loaded = self
            .js("return typeof window.axe === 'object'", vec![])
            .await?;
        if loaded != Value::Bool(true) {
            self.js(
                "const s = document.createElement('script'); s.textContent = arguments[0]; document.head.append(s); s.remove(); return true",
                vec![AXE.into()],
            )
            .await?;
        }
        let found = self
            .client
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 axe.run(document, { resultTypes: ['violations'] }).then((r) => done(
                   r.violations.filter((v) => v.impact === 'serious' || v.impact === 'critical')
                     .map((v) => v.impact + ' ' + v.id + ': ' + v.help + '\\n    ' +
                       v.nodes.slice(0, 5).map((n) => n.target.join(' ') + ' — ' + n.failureSummary.replace(/\\n/g, ' ')).join('\\n    '))
                 )).catch((e) => done(['axe failed: ' + e]));",
                vec![],
            )
            .await?;
        let found: Vec<String> = serde_json::from_value(found)?;
        anyhow::ensure!(
            found.is_empty(),
            "axe finds on {what}:\n{}",
            found.join("\n")
        );
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Chromium runs in chromedriver's process group: end them together.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.driver.pid())])
            .status();
    }
}

/// The directory a cocoon started by this test puts its task cgroups in: cgroup v2's
/// mount and this process's own cgroup (which the cocoon inherits), read from the kernel,
/// then `adi-tasks`. `None` after saying SKIPPED where that directory cannot be written;
/// an error instead when `CI` is set, where it must be writable.
pub fn task_cgroups_dir() -> Result<Option<PathBuf>> {
    let found = (|| -> Result<PathBuf> {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
        let mount = mounts
            .lines()
            .find_map(|line| {
                let (left, right) = line.split_once(" - ")?;
                (right.split_whitespace().next() == Some("cgroup2"))
                    .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
            })
            .context("no cgroup2 mount")?;
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let own = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no cgroup v2 line in /proc/self/cgroup")?;
        let dir = mount.join(own.trim_start_matches('/')).join("adi-tasks");
        let probe = dir.join(format!("test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&probe).with_context(|| probe.display().to_string())?;
        std::fs::remove_dir(&probe).with_context(|| probe.display().to_string())?;
        Ok(dir)
    })();
    match found {
        Ok(dir) => Ok(Some(dir)),
        Err(e) if std::env::var("CI").map(|v| !v.is_empty()).unwrap_or(false) => {
            bail!("cgroup v2 is not writable here and CI is set: {e:#}")
        }
        Err(e) => {
            eprintln!("*** SKIPPED: cgroup v2 is not writable here: {e:#} ***");
            Ok(None)
        }
    }
}

/// What a task test may leave behind if it fails: task cgroups, killed and removed, and
/// the `sleep 300`s its commands started, killed (checked by their command line, so a
/// reused pid is never hit).
#[derive(Default)]
pub struct Leftovers {
    pub cgroups: Vec<PathBuf>,
    pub pids: Vec<u32>,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        for pid in &self.pids {
            if std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == b"sleep\x00300\x00")
            {
                signal(*pid, "KILL");
            }
        }
        for cgroup in &self.cgroups {
            if !cgroup.exists() {
                continue;
            }
            let _ = std::fs::write(cgroup.join("cgroup.kill"), "1");
            let start = Instant::now();
            while std::fs::remove_dir(cgroup).is_err() && start.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
