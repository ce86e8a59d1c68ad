//! What the hub and the devices keep, end to end through real processes: files holding
//! secrets or user data are owner-only whatever the umask, and loose ones are tightened
//! with one warning each; the hub's keys may live in a key file instead of the catalog;
//! a write the catalog or a task store cannot make is refused (503, or a retryable
//! refusal for a device), never acknowledged, and the hub recovers alone once space is
//! back; `/readyz` says whether the catalog can write; an empty, foreign or damaged
//! catalog file stops the hub instead of being replaced.
//!
//! The full-disk tests mount a small tmpfs (which needs root); where that is impossible
//! they fail under `CI=true` and say SKIPPED otherwise.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{fresh_postgres, wait_for, Api, Proc, ADI, HEARTBEAT};
use crate::wire::{next, secret, Ws};

/// How long a process may take to start, or a state to be reached.
const WAIT: Duration = Duration::from_secs(20);

/// `adi ARGS` under umask 000, so every mode a file gets is the one adi asked for.
fn permissive(args: &[&str]) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("umask 000 && exec \"$0\" \"$@\"")
        .arg(ADI)
        .args(args);
    cmd
}

fn adi(args: &[&str]) -> Command {
    let mut cmd = Command::new(ADI);
    cmd.args(args);
    cmd
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// `signaling serve` on `data_dir` (with the test heartbeat), plus `extra` flags.
fn hub_args(data_dir: &Path, listen: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "signaling",
        "serve",
        "--listen",
        listen,
        "--data-dir",
        path_str(data_dir),
        "--heartbeat-interval",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.push(humantime::format_duration(HEARTBEAT).to_string());
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// A hub process, once it listens.
struct Served {
    proc: Proc,
    url: String,
}

impl Served {
    async fn start(mut cmd: Command) -> Result<Self> {
        cmd.env("RUST_LOG", "info");
        let proc = Proc::spawn(&mut cmd)?;
        let line = proc.wait_line("adi hub listening on ", WAIT).await?;
        let url = line
            .rsplit(' ')
            .next()
            .ok_or_else(|| anyhow!("no URL in {line:?}"))?
            .to_owned();
        Ok(Served { proc, url })
    }

    async fn on(data_dir: &Path, extra: &[&str]) -> Result<Self> {
        let args = hub_args(data_dir, "127.0.0.1:0", extra);
        Self::start(adi(&args.iter().map(String::as_str).collect::<Vec<_>>())).await
    }

    fn listen(&self) -> String {
        self.url.trim_start_matches("http://").to_owned()
    }

    fn ws(&self) -> String {
        format!("{}/ws/cocoon", self.url.replacen("http", "ws", 1))
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("ADI_TEST_LOGS").is_some() {
            eprintln!("----- hub output -----\n{}", self.proc.output());
        }
    }
}

/// Runs `cmd` to the end; fails unless it succeeds. Returns stdout and stderr.
fn run(mut cmd: Command) -> Result<(String, String)> {
    let out = cmd
        .env_remove("ADI_HUB")
        .env_remove("ADI_API_KEY")
        .output()?;
    let stdout = String::from_utf8(out.stdout)?;
    let stderr = String::from_utf8(out.stderr)?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    Ok((stdout, stderr))
}

/// `adi signaling user add NAME` on `data_dir`; the printed API key.
fn add_user(mut cmd: Command, data_dir: &Path, name: &str, extra: &[&str]) -> Result<String> {
    cmd.args(["signaling", "user", "add", name, "--data-dir"])
        .arg(data_dir)
        .args(extra);
    Ok(run(cmd)?.0.trim().to_owned())
}

/// `adi cocoon run` against `hub`, reconnecting every second at most.
fn cocoon(mut cmd: Command, hub: &str, data_dir: &Path, token: Option<&str>) -> Result<Proc> {
    cmd.args(["cocoon", "run", "--hub", hub, "--name", "storage"])
        .args(["--backoff-max", "1s", "--data-dir"])
        .arg(data_dir)
        .env("RUST_LOG", "info");
    if let Some(t) = token {
        cmd.arg("--token").arg(t);
    }
    Proc::spawn(&mut cmd)
}

/// The device id a cocoon prints once it is online.
async fn device_id(proc: &Proc) -> Result<String> {
    let line = proc.wait_line("cocoon online as device ", WAIT).await?;
    line.split("as device ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no id in {line:?}"))
}

fn mode(path: &Path) -> Result<u32> {
    Ok(std::fs::symlink_metadata(path)
        .with_context(|| format!("{} is missing", path.display()))?
        .permissions()
        .mode()
        & 0o777)
}

/// Every directory under `root` (itself included) and every file in them.
fn tree(root: &Path) -> Result<Vec<PathBuf>> {
    let mut all = vec![root.to_owned()];
    let mut i = 0;
    while i < all.len() {
        if all[i].is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(&all[i])?
                .map(|e| e.map(|e| e.path()))
                .collect::<std::io::Result<_>>()?;
            entries.sort();
            all.extend(entries);
        }
        i += 1;
    }
    Ok(all)
}

/// Fails unless every directory under `root` is 0700 and every file 0600.
fn assert_owner_only(root: &Path) -> Result<()> {
    let mut loose = Vec::new();
    for p in tree(root)? {
        let want = if p.is_dir() { 0o700 } else { 0o600 };
        let got = mode(&p)?;
        if got != want {
            loose.push(format!("{} is {got:o}, not {want:o}", p.display()));
        }
    }
    ensure!(loose.is_empty(), "not owner-only:\n{}", loose.join("\n"));
    Ok(())
}

/// Opens every path up to group and others (dirs 0777, files 0666).
fn loosen(paths: &[PathBuf]) -> Result<()> {
    for p in paths {
        let m = if p.is_dir() { 0o777 } else { 0o666 };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m))?;
    }
    Ok(())
}

/// The line a process logs when it tightens `path`.
fn tightened(path: &Path) -> String {
    format!("tightened {}:", path.display())
}

/// Fails unless `output` holds exactly one tightening warning for each of `paths`.
fn assert_warned_once(output: &str, paths: &[PathBuf]) -> Result<()> {
    for p in paths {
        let needle = tightened(p);
        let n = output.lines().filter(|l| l.contains(&needle)).count();
        ensure!(
            n == 1,
            "{n} warnings with {needle:?}, not 1; output:\n{output}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn secrets_and_user_data_are_owner_only_whatever_the_umask() -> Result<()> {
    let root = tempfile::tempdir()?;
    let at = |p: &str| root.path().join(p);
    let (hub_dir, cocoon_dir, config) = (at("hub"), at("cocoon"), at("config"));

    let args = hub_args(&hub_dir, "127.0.0.1:0", &[]);
    let mut hub = Served::start(permissive(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    ))
    .await?;
    let key = add_user(permissive(&[]), &hub_dir, "alice", &[])?;
    let mut login = permissive(&["login", "--hub", &hub.url, "--api-key", &key]);
    login.env("ADI_CONFIG_DIR", &config);
    run(login)?;
    let api = Api::login(&hub.url, &key).await?;
    let mut device = cocoon(
        permissive(&[]),
        &hub.url,
        &cocoon_dir,
        Some(&api.setup_token(600).await?),
    )?;
    let id = device_id(&device).await?;
    // A task, so the task store has written since it opened.
    let (status, body) = api
        .post(
            &format!("/api/cocoons/{id}/tasks"),
            json!({"title": "umask"}),
        )
        .await?;
    ensure!(status == 201, "task create: {status} {body}");
    for f in ["catalog.db", "catalog.db-wal", "catalog.db-shm"] {
        ensure!(hub_dir.join(f).exists(), "{f} missing");
    }
    for f in [
        "device.secret",
        "tasks.db",
        "tasks.db-wal",
        "tasks.db-shm",
        "local-api.json",
    ] {
        ensure!(cocoon_dir.join(f).exists(), "{f} missing");
    }
    ensure!(config.join("session.json").exists(), "session.json missing");
    for dir in [&hub_dir, &cocoon_dir, &config] {
        assert_owner_only(dir)?;
    }

    // The service's environment file holds the setup token.
    let svc_dir = at("svc");
    let units = at("units");
    let install = |force: bool| {
        let mut args = vec!["cocoon", "service", "install", "--no-start"];
        if force {
            args.push("--force");
        }
        args.extend(["--unit-dir", path_str(&units), "--", "--hub", &hub.url]);
        args.extend(["--token", "adi_setup_x.y", "--data-dir", path_str(&svc_dir)]);
        run(permissive(&args))
    };
    install(false)?;
    ensure!(svc_dir.join("service.env").exists(), "service.env missing");
    assert_owner_only(&svc_dir)?;

    // `adi dev` keeps a hub and a cocoon in one state dir.
    let dev_dir = at("dev");
    let mut dev = Proc::spawn(
        permissive(&["dev", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&dev_dir)
            .env("RUST_LOG", "info"),
    )?;
    dev.wait_line("adi dev is running", WAIT).await?;
    ensure!(dev_dir.join("hub/catalog.db").exists());
    ensure!(dev_dir.join("cocoon/device.secret").exists());
    assert_owner_only(&dev_dir)?;
    dev.terminate().await?;

    // A crash leaves the WAL files behind; loosen everything and start again.
    hub.proc.kill();
    device.kill();
    let hub_paths = tree(&hub_dir)?;
    let device_paths: Vec<PathBuf> = tree(&cocoon_dir)?
        .into_iter()
        .filter(|p| !p.ends_with("local-api.json"))
        .collect();
    ensure!(hub_paths.iter().any(|p| p.ends_with("catalog.db-wal")));
    ensure!(device_paths.iter().any(|p| p.ends_with("tasks.db-shm")));
    let config_paths = tree(&config)?;
    loosen(&hub_paths)?;
    loosen(&device_paths)?;
    loosen(&config_paths)?;
    loosen(&tree(&svc_dir)?)?;

    let hub = Served::start(adi(&hub_args(&hub_dir, &hub.listen(), &[])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()))
    .await?;
    assert_owner_only(&hub_dir)?;
    assert_warned_once(&hub.proc.output(), &hub_paths)?;

    let device = cocoon(adi(&[]), &hub.url, &cocoon_dir, None)?;
    device_id(&device).await?;
    assert_owner_only(&cocoon_dir)?;
    assert_warned_once(&device.output(), &device_paths)?;

    let mut list = adi(&["cocoon", "list"]);
    list.env("ADI_CONFIG_DIR", &config);
    let (_, stderr) = run(list)?;
    assert_owner_only(&config)?;
    assert_warned_once(&stderr, &config_paths)?;

    let (stdout, _) = install(true)?;
    assert_owner_only(&svc_dir)?;
    ensure!(stdout.contains("service.env"), "{stdout}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The hub key file
// ---------------------------------------------------------------------------------------

/// The hub secrets the SQLite catalog at `data_dir` holds, as `name=bytes`.
async fn catalog_secrets(data_dir: &Path) -> Result<Vec<String>> {
    use sqlx::Connection;
    let url = format!("sqlite:{}?mode=ro", data_dir.join("catalog.db").display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await?;
    let names: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT name, value FROM hub_secrets ORDER BY name")
            .fetch_all(&mut conn)
            .await?;
    conn.close().await?;
    Ok(names
        .into_iter()
        .map(|(n, v)| format!("{n}={v:?}"))
        .collect())
}

#[tokio::test]
async fn the_key_file_takes_the_keys_out_of_the_catalog_and_keeps_device_ids() -> Result<()> {
    let root = tempfile::tempdir()?;
    let hub_dir = root.path().join("hub");
    let key_file = root.path().join("keys").join("hub.key");
    let key_flag = ["--key-file", path_str(&key_file)];

    let mut hub = Served::on(&hub_dir, &[]).await?;
    let api = Api::login(&hub.url, &add_user(adi(&[]), &hub_dir, "alice", &[])?).await?;
    let device = cocoon(
        adi(&[]),
        &hub.url,
        &root.path().join("cocoon"),
        Some(&api.setup_token(600).await?),
    )?;
    let id = device_id(&device).await?;
    let before = catalog_secrets(&hub_dir).await?;
    ensure!(
        before.iter().any(|s| s.starts_with("jwt_key=")),
        "{before:?}"
    );
    let listen = hub.listen();
    hub.proc.terminate().await?;

    // Moved: the file holds the keys, the catalog no longer does.
    let args = hub_args(&hub_dir, &listen, &key_flag);
    let mut hub = Served::start(adi(&args.iter().map(String::as_str).collect::<Vec<_>>())).await?;
    ensure!(
        mode(&key_file)? == 0o600,
        "key file mode {:o}",
        mode(&key_file)?
    );
    let after = catalog_secrets(&hub_dir).await?;
    ensure!(
        !after
            .iter()
            .any(|s| s.starts_with("jwt_key=") || s.starts_with("device_id_key=")),
        "the catalog still holds keys: {after:?}"
    );
    // Same JWT key: the session from before is still good. Same device-id key: the
    // device reconnects as itself.
    api.wait_online(&id, true, WAIT).await?;
    ensure!(api.cocoons().await?.len() == 1);

    // And again from the file alone, made owner-only again if it was opened up.
    hub.proc.terminate().await?;
    loosen(std::slice::from_ref(&key_file))?;
    let hub = Served::start(adi(&args.iter().map(String::as_str).collect::<Vec<_>>())).await?;
    ensure!(mode(&key_file)? == 0o600);
    assert_warned_once(&hub.proc.output(), std::slice::from_ref(&key_file))?;
    api.wait_online(&id, true, WAIT).await?;
    let (status, body) = api.get(&format!("/api/cocoons/{id}")).await?;
    ensure!(status == 200, "{status} {body}");
    drop(hub);
    Ok(())
}

/// Starts `signaling serve ARGS`, expecting it to refuse: a non-zero exit with stderr
/// naming `what` and `why`.
async fn refused(args: &[String], what: &Path, why: &str) -> Result<String> {
    let mut cmd = adi(&args.iter().map(String::as_str).collect::<Vec<_>>());
    cmd.env("RUST_LOG", "info");
    let mut proc = Proc::spawn(&mut cmd)?;
    let code = proc.wait_exit(WAIT).await?;
    let output = proc.output();
    ensure!(code != 0, "the hub started:\n{output}");
    ensure!(
        output.contains(&what.display().to_string()) && output.contains(why),
        "the refusal should name {} and say {why:?}:\n{output}",
        what.display()
    );
    Ok(output)
}

#[tokio::test]
async fn a_key_file_that_does_not_match_the_catalog_is_refused() -> Result<()> {
    let root = tempfile::tempdir()?;
    let hub_dir = root.path().join("hub");
    // Keys of another hub.
    let foreign = root.path().join("other.key");
    let other = Served::on(
        &root.path().join("other"),
        &["--key-file", path_str(&foreign)],
    )
    .await?;
    drop(other);
    ensure!(foreign.exists());

    let mut hub = Served::on(&hub_dir, &[]).await?;
    hub.proc.terminate().await?;
    let before = catalog_secrets(&hub_dir).await?;
    let args = hub_args(&hub_dir, "127.0.0.1:0", &["--key-file", path_str(&foreign)]);
    refused(&args, &foreign, "differ").await?;
    ensure!(
        catalog_secrets(&hub_dir).await? == before,
        "the refused start changed the catalog's keys"
    );

    // Once the keys moved to a file, the catalog will not start without it (it would
    // otherwise make new keys and every device a new id).
    let key_file = root.path().join("hub.key");
    let mut hub = Served::on(&hub_dir, &["--key-file", path_str(&key_file)]).await?;
    hub.proc.terminate().await?;
    let args = hub_args(&hub_dir, "127.0.0.1:0", &[]);
    refused(&args, &hub_dir.join("catalog.db"), "--key-file").await?;
    Ok(())
}

async fn register(url: &str, secret: &str, token: Option<&str>) -> Result<(Ws, Value)> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    let mut frame = json!({"type": "register", "versions": [1], "secret": secret, "name": "raw"});
    if let Some(t) = token {
        frame["setup_token"] = json!(t);
    }
    ws.send(Message::text(frame.to_string())).await?;
    let reply = next(&mut ws).await?;
    Ok((ws, reply))
}

#[tokio::test]
async fn hubs_on_one_postgres_catalog_share_one_key_file() -> Result<()> {
    let Some(database) = fresh_postgres().await else {
        return Ok(());
    };
    let db = database.url();
    let result = async {
        let root = tempfile::tempdir()?;
        let key_file = root.path().join("hub.key");
        let shared = ["--database-url", &db, "--key-file", path_str(&key_file)];
        // Started together: both find no key file, one writes it, both use it.
        let (dir_a, dir_b) = (root.path().join("a"), root.path().join("b"));
        let (a, b) = tokio::join!(Served::on(&dir_a, &shared), Served::on(&dir_b, &shared));
        let (a, b) = (a?, b?);
        for hub in [&a, &b] {
            ensure!(
                !hub.proc.output().contains("shared catalog"),
                "a hub with a key file warned about the catalog:\n{}",
                hub.proc.output()
            );
        }
        ensure!(mode(&key_file)? == 0o600);
        let key = add_user(adi(&[]), &dir_a, "alice", &["--database-url", &db])?;
        let on_a = Api::login(&a.url, &key).await?;
        // A session from one hub is good on the other.
        let on_b = Api {
            base: b.url.clone(),
            ..on_a.clone()
        };
        let (status, body) = on_b.get("/api/cocoons").await?;
        ensure!(
            status == 200,
            "hub b refused hub a's session: {status} {body}"
        );
        // One secret, one device id, whichever hub derives it.
        let s = secret();
        let (ws_a, on_hub_a) = register(&a.ws(), &s, Some(&on_a.setup_token(60).await?)).await?;
        ensure!(on_hub_a["type"] == "registered", "{on_hub_a}");
        drop(ws_a);
        let (_ws_b, on_hub_b) = register(&b.ws(), &s, None).await?;
        ensure!(on_hub_b["type"] == "registered", "{on_hub_b}");
        ensure!(on_hub_a["device_id"] == on_hub_b["device_id"]);

        // Without a key file, a PostgreSQL catalog holds the signing key: say so once.
        let Some(db2) = fresh_postgres().await else {
            return Ok(());
        };
        let plain = Served::on(&root.path().join("c"), &["--database-url", &db2.url()]).await;
        db2.drop_database().await;
        let plain = plain?;
        let output = plain.proc.output();
        let n = output
            .lines()
            .filter(|l| l.contains("shared catalog"))
            .count();
        ensure!(n == 1, "{n} warnings about the shared catalog:\n{output}");
        Ok(())
    }
    .await;
    database.drop_database().await;
    result
}

// ---------------------------------------------------------------------------------------
// A full disk
// ---------------------------------------------------------------------------------------

/// A small tmpfs mounted for one test, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it). Where that fails it is an
    /// error under `CI=true`, and otherwise says SKIPPED and returns `None`.
    fn mount(size: &str) -> Result<Option<Self>> {
        let dir = tempfile::tempdir()?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        let why = match out {
            Ok(o) if o.status.success() => return Ok(Some(Tmpfs { dir })),
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_owned(),
            Err(e) => e.to_string(),
        };
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            bail!("cannot mount a tmpfs and CI is set: {why}");
        }
        eprintln!("*** SKIPPED: cannot mount a tmpfs (needs root): {why} ***");
        Ok(None)
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn filler(&self) -> PathBuf {
        self.path().join("filler")
    }

    /// Writes to a file until the filesystem is full; again after a store freed some of
    /// it (SQLite may drop its write-ahead log when a write fails).
    fn fill(&self) -> Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.filler())?;
        let chunk = vec![0x5a; 64 * 1024];
        loop {
            match f.write(&chunk) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => return Ok(()),
                Err(e) => return Err(e).context("filling the tmpfs"),
            }
        }
    }

    fn free(&self) -> Result<()> {
        Ok(std::fs::remove_file(self.filler())?)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

async fn create_setup_token(api: &Api) -> Result<(u16, Value)> {
    api.post(
        "/api/tokens",
        json!({"kind": "setup", "expires_in_secs": 600}),
    )
    .await
}

/// Fails unless `body` is the API's error shape with code `unavailable` and a reason.
fn assert_unavailable(status: u16, body: &Value, reason: &str) -> Result<()> {
    ensure!(status == 503, "{status} {body}");
    ensure!(body["error"]["code"] == "unavailable", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    ensure!(
        message.contains(reason),
        "{message:?} should say {reason:?}"
    );
    Ok(())
}

#[tokio::test]
async fn token_creation_on_a_full_disk_is_503_and_every_201_is_usable() -> Result<()> {
    let Some(fs) = Tmpfs::mount("4m")? else {
        return Ok(());
    };
    let hub_dir = fs.path().join("hub");
    let hub = Served::on(&hub_dir, &[]).await?;
    let api = Api::login(&hub.url, &add_user(adi(&[]), &hub_dir, "alice", &[])?).await?;
    let mut given = vec![api.setup_token(600).await?];

    fs.fill()?;
    let mut refusals = 0;
    for _ in 0..20 {
        let (status, body) = create_setup_token(&api).await?;
        if status == 201 {
            given.push(body["token"].as_str().unwrap_or_default().to_owned());
        } else {
            assert_unavailable(status, &body, "disk full")?;
            refusals += 1;
        }
    }
    ensure!(refusals > 0, "no token creation was refused on a full disk");

    fs.free()?;
    let (status, body) = create_setup_token(&api).await?;
    ensure!(status == 201, "after space came back: {status} {body}");
    given.push(body["token"].as_str().unwrap_or_default().to_owned());
    // Each token acknowledged was stored: each enrols a device.
    for token in &given {
        let (_ws, reply) = register(&hub.ws(), &secret(), Some(token)).await?;
        ensure!(reply["type"] == "registered", "{token}: {reply}");
    }
    ensure!(api.cocoons().await?.len() == given.len());
    Ok(())
}

#[tokio::test]
async fn enrolment_on_a_full_disk_is_refused_retryably_and_succeeds_once_space_is_back(
) -> Result<()> {
    let Some(fs) = Tmpfs::mount("4m")? else {
        return Ok(());
    };
    let hub_dir = fs.path().join("hub");
    let hub = Served::on(&hub_dir, &[]).await?;
    let api = Api::login(&hub.url, &add_user(adi(&[]), &hub_dir, "alice", &[])?).await?;
    let mut tokens = Vec::new();
    for _ in 0..8 {
        tokens.push(api.setup_token(600).await?);
    }
    let mut tokens = tokens.into_iter();

    // The first write after the disk filled up is the device's enrolment: refused as
    // retryable, so the device keeps trying. (A refused write can leave room that the
    // next one reuses; a retry may then be stored, and acknowledged, while the disk is
    // still full.)
    fs.fill()?;
    let token = tokens.next().context("a token")?;
    let root = tempfile::tempdir()?;
    let mut device = cocoon(adi(&[]), &hub.url, root.path(), Some(&token))?;
    device
        .wait_line("hub refused (unavailable)", WAIT)
        .await
        .context("the device was not refused as retryable")?;
    fs.free()?;
    let id = device_id(&device).await?;
    api.wait_online(&id, true, WAIT).await?;
    device.kill();
    let (_ws, reply) = register(&hub.ws(), &secret(), Some(&token)).await?;
    ensure!(reply["code"] == "token_used", "enrolled once: {reply}");

    // On the wire: the refusal names the outage, and the close says "try again later".
    fs.fill()?;
    let mut acknowledged = 1;
    let mut refusal = None;
    for token in tokens {
        fs.fill()?;
        let (mut ws, reply) = register(&hub.ws(), &secret(), Some(&token)).await?;
        if reply["type"] == "registered" {
            acknowledged += 1;
            continue;
        }
        refusal = Some((reply, next(&mut ws).await?));
        break;
    }
    let (reply, close) = refusal.context("no enrolment was refused on a full disk")?;
    ensure!(reply["code"] == "unavailable", "{reply}");
    ensure!(
        reply["message"]
            .as_str()
            .is_some_and(|m| m.contains("disk full")),
        "{reply}"
    );
    ensure!(
        close["close"] == 1013,
        "a full disk is 'try again later': {close}"
    );

    fs.free()?;
    // Every enrolment acknowledged was stored.
    ensure!(api.cocoons().await?.len() == acknowledged);
    Ok(())
}

#[tokio::test]
async fn readyz_is_503_while_the_catalog_cannot_write_and_200_once_it_can() -> Result<()> {
    let Some(fs) = Tmpfs::mount("4m")? else {
        return Ok(());
    };
    let hub_dir = fs.path().join("hub");
    let hub = Served::on(&hub_dir, &[]).await?;
    let http = reqwest::Client::new();
    let get = |path: &'static str| {
        let http = http.clone();
        let url = format!("{}{path}", hub.url);
        async move {
            let resp = http.get(url).send().await?;
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            Ok::<_, anyhow::Error>((status, body))
        }
    };
    ensure!(get("/readyz").await?.0 == 200);

    fs.fill()?;
    let (status, body) = wait_for("/readyz to say 503", WAIT, || async {
        let (status, body) = get("/readyz").await?;
        Ok((status != 200).then_some((status, body)))
    })
    .await?;
    assert_unavailable(status, &body, "disk full")?;
    ensure!(get("/healthz").await?.0 == 200, "liveness stays up");

    fs.free()?;
    wait_for("/readyz to say 200", WAIT, || async {
        Ok((get("/readyz").await?.0 == 200).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_task_create_on_a_full_device_disk_is_refused_and_works_once_space_is_back() -> Result<()>
{
    let Some(fs) = Tmpfs::mount("4m")? else {
        return Ok(());
    };
    let root = tempfile::tempdir()?;
    let hub_dir = root.path().join("hub");
    let hub = Served::on(&hub_dir, &[]).await?;
    let api = Api::login(&hub.url, &add_user(adi(&[]), &hub_dir, "alice", &[])?).await?;
    let device = cocoon(
        adi(&[]),
        &hub.url,
        &fs.path().join("cocoon"),
        Some(&api.setup_token(600).await?),
    )?;
    let id = device_id(&device).await?;
    let path = format!("/api/cocoons/{id}/tasks");

    fs.fill()?;
    let mut refusals = 0;
    for i in 0..10 {
        let (status, body) = api
            .post(&path, json!({"title": format!("full {i}")}))
            .await?;
        if status != 201 {
            assert_unavailable(status, &body, "disk full")?;
            refusals += 1;
        }
    }
    ensure!(refusals > 0, "no task create was refused on a full disk");

    fs.free()?;
    let (status, body) = api.post(&path, json!({"title": "after"})).await?;
    ensure!(status == 201, "{status} {body}");
    let (status, list) = api.get(&path).await?;
    ensure!(status == 200, "{status} {list}");
    let titles: Vec<&str> = list["tasks"]
        .as_array()
        .map(|a| a.iter().filter_map(|t| t["title"].as_str()).collect())
        .unwrap_or_default();
    ensure!(
        titles.len() == 10 - refusals + 1 && titles.contains(&"after"),
        "{titles:?}"
    );
    drop(device);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Catalogs that must not be used
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn an_empty_or_foreign_catalog_file_is_refused_not_replaced() -> Result<()> {
    let root = tempfile::tempdir()?;
    let hub_dir = root.path().join("hub");
    std::fs::create_dir_all(&hub_dir)?;
    let catalog = hub_dir.join("catalog.db");
    let args = hub_args(&hub_dir, "127.0.0.1:0", &[]);

    std::fs::write(&catalog, b"")?;
    refused(&args, &catalog, "empty").await?;
    ensure!(
        std::fs::read(&catalog)?.is_empty(),
        "the empty file was replaced"
    );

    let text = b"my notes, not a database\n".repeat(200);
    std::fs::write(&catalog, &text)?;
    refused(&args, &catalog, "not an SQLite database").await?;
    ensure!(
        std::fs::read(&catalog)? == text,
        "the foreign file was changed"
    );

    std::fs::remove_file(&catalog)?;
    {
        use sqlx::Connection;
        let url = format!("sqlite:{}?mode=rwc", catalog.display());
        let mut conn = sqlx::SqliteConnection::connect(&url).await?;
        sqlx::query("CREATE TABLE notes (body TEXT)")
            .execute(&mut conn)
            .await?;
        conn.close().await?;
    }
    let before = std::fs::read(&catalog)?;
    refused(&args, &catalog, "not an adi catalog").await?;
    ensure!(
        std::fs::read(&catalog)? == before,
        "the foreign database was changed"
    );
    Ok(())
}

#[tokio::test]
async fn a_damaged_catalog_is_refused_naming_the_file_and_the_first_error() -> Result<()> {
    let root = tempfile::tempdir()?;
    let hub_dir = root.path().join("hub");
    let mut hub = Served::on(&hub_dir, &[]).await?;
    add_user(adi(&[]), &hub_dir, "alice", &[])?;
    hub.proc.terminate().await?;
    let catalog = hub_dir.join("catalog.db");
    // Break the b-tree page of the users table: the file still opens, and every
    // schema read works, but an integrity check fails.
    let root_page: i64 = {
        use sqlx::Connection;
        let url = format!("sqlite:{}", catalog.display());
        let mut conn = sqlx::SqliteConnection::connect(&url).await?;
        // Everything into the main file, where the damage goes.
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&mut conn)
            .await?;
        let (page,): (i64,) =
            sqlx::query_as("SELECT rootpage FROM sqlite_schema WHERE name = 'users'")
                .fetch_one(&mut conn)
                .await?;
        conn.close().await?;
        page
    };
    let mut bytes = std::fs::read(&catalog)?;
    let page_size = match u16::from_be_bytes([bytes[16], bytes[17]]) {
        1 => 65536,
        n => usize::from(n),
    };
    let offset = usize::try_from(root_page - 1)? * page_size;
    bytes[offset] = 0;
    std::fs::write(&catalog, &bytes)?;

    let args = hub_args(&hub_dir, "127.0.0.1:0", &[]);
    let output = refused(&args, &catalog, "integrity check: ").await?;
    ensure!(
        output.contains("users"),
        "the first error names what is broken:\n{output}"
    );
    ensure!(
        std::fs::read(&catalog)? == bytes,
        "the damaged file was changed"
    );
    Ok(())
}
