//! Self-distribution and the one-process dev setup: `curl HUB/install.sh | sh -s -- T`
//! installs the hub's own `adi` and enrols the device; `adi dev` brings up a hub with a
//! cocoon attached and prints how to sign in.

use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, Result};

use crate::harness::{Api, Hub, Proc, ADI};

#[tokio::test]
async fn install_one_liner_installs_adi_and_enrols_the_device() -> Result<()> {
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let token = alice.setup_token(600).await?;
    let home = tempfile::tempdir()?;
    let prefix = home.path().join("prefix");

    let script = reqwest::get(format!("{}/install.sh", hub.url))
        .await?
        .text()
        .await?;
    assert!(script.starts_with("#!/bin/sh"));
    assert!(script.contains(&hub.url), "the script points at this hub");
    assert!(
        hub.proc.output().contains("no --public-url"),
        "the hub warns that install.sh takes the hub's address from each request"
    );

    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "curl -fsSL {}/install.sh | sh -s -- \"$TOKEN\"",
            hub.url
        ))
        .env("TOKEN", &token)
        .env("HOME", home.path())
        .env("ADI_PREFIX", &prefix)
        .env("ADI_COCOON_NAME", "installed")
        .env("ADI_COCOON_DATA_DIR", home.path().join("cocoon"))
        .env("RUST_LOG", "info");
    let proc = Proc::spawn(&mut cmd)?;
    proc.wait_line("cocoon online as device", Duration::from_secs(60))
        .await?;
    let installed = prefix.join("bin/adi");
    assert_eq!(
        std::fs::read(&installed)?,
        std::fs::read(ADI)?,
        "installed the hub's own binary"
    );
    let devices = alice.cocoons().await?;
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0]["name"], "installed");
    assert_eq!(devices[0]["online"], true);
    // The script exec'd into the installed adi: that process is the cocoon, and
    // stopping it takes the device offline.
    let running: Vec<u32> = std::fs::read_dir("/proc")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == installed)
        })
        .collect();
    let [cocoon] = running[..] else {
        anyhow::bail!("one process of the installed adi should run: {running:?}");
    };
    let id = devices[0]["id"].as_str().unwrap_or_default().to_owned();
    crate::harness::signal(cocoon, "TERM");
    alice
        .wait_online(&id, false, Duration::from_secs(10))
        .await?;
    drop(proc);

    // Without a token it installs and says how to enrol.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("curl -fsSL {}/install.sh | sh", hub.url))
        .env("HOME", home.path())
        .env("ADI_PREFIX", home.path().join("p2"))
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("adi cocoon run --hub"), "{text}");
    assert!(
        text.contains(&format!("adi install: using hub {}", hub.url))
            && text.contains("no --public-url"),
        "the script says which hub it uses and where that came from: {text}"
    );
    Ok(())
}

#[tokio::test]
async fn download_serves_the_running_executable() -> Result<()> {
    let hub = Hub::start().await?;
    let resp = reqwest::get(format!("{}/download/adi", hub.url)).await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    let body = resp.bytes().await?;
    assert_eq!(body.len() as u64, std::fs::metadata(ADI)?.len());
    assert_eq!(&body[..4], b"\x7fELF");
    Ok(())
}

#[tokio::test]
async fn adi_dev_runs_a_hub_with_a_local_cocoon() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cmd = Command::new(ADI);
    cmd.args([
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--name",
        "this-machine",
        "--data-dir",
    ])
    .arg(dir.path());
    let mut proc = Proc::spawn(&mut cmd)?;
    proc.wait_line("Ctrl-C stops both", Duration::from_secs(30))
        .await?;
    let out = proc.output();
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_owned()))
            .ok_or_else(|| anyhow!("no {name} in {out}"))
    };
    let url = field("hub:")?;
    let key = field("API key:")?;
    assert!(field("web UI:")?.starts_with(&url));
    let api = Api::login(&url, &key).await?;
    let devices = api.cocoons().await?;
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert_eq!(devices[0]["name"], "this-machine");
    assert_eq!(devices[0]["online"], true);
    let page = reqwest::get(format!("{url}/")).await?.text().await?;
    assert!(
        page.contains("<html") || page.contains("<!doctype html"),
        "web UI served"
    );

    // A second run over the same data dir is the same device, no new enrolment.
    proc.terminate().await?;
    let id = devices[0]["id"].as_str().unwrap_or_default().to_owned();
    let proc = Proc::spawn(&mut cmd)?;
    proc.wait_line("Ctrl-C stops both", Duration::from_secs(30))
        .await?;
    let out = proc.output();
    assert!(out.contains(&id), "same device id after restart: {out}");
    // Ctrl-C (SIGINT) stops both, cleanly.
    crate::harness::signal(proc.pid(), "INT");
    let mut proc = proc;
    assert_eq!(
        proc.wait_exit(Duration::from_secs(15)).await?,
        0,
        "{}",
        proc.output()
    );
    Ok(())
}
