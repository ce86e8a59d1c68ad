//! Self-distribution and the one-process dev setup: `curl HUB/install.sh | sh -s -- T`
//! installs the hub's own `adi` and enrols the device; `adi dev` brings up a hub with a
//! cocoon attached and prints how to sign in.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};

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
        version_of(&installed)?,
        version_of(Path::new(ADI))?,
        "installed the hub's own build"
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

/// What `adi --version` prints, run from `path`.
fn version_of(path: &Path) -> Result<String> {
    let out = Command::new(path).arg("--version").output()?;
    ensure!(out.status.success(), "{} --version failed", path.display());
    Ok(String::from_utf8(out.stdout)?)
}

/// Whether the ELF file has DWARF debug info: a `.debug_info` section, read from its
/// section headers (64-bit little-endian, as this target builds).
fn has_debug_info(elf: &[u8]) -> Result<bool> {
    let u16_at = |at: usize| -> Result<usize> {
        let b = elf.get(at..at + 2).context("short ELF")?;
        Ok(usize::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let u64_at = |at: usize| -> Result<usize> {
        let b: [u8; 8] = elf.get(at..at + 8).context("short ELF")?.try_into()?;
        Ok(usize::try_from(u64::from_le_bytes(b))?)
    };
    ensure!(
        elf.starts_with(b"\x7fELF\x02\x01"),
        "not a 64-bit little-endian ELF"
    );
    let (table, size, count, names) = (u64_at(0x28)?, u16_at(0x3a)?, u16_at(0x3c)?, u16_at(0x3e)?);
    let strings = u64_at(table + names * size + 0x18)?;
    for i in 0..count {
        let name = strings
            + u32::from_le_bytes(
                elf.get(table + i * size..table + i * size + 4)
                    .context("short ELF")?
                    .try_into()?,
            ) as usize;
        if elf
            .get(name..)
            .is_some_and(|n| n.starts_with(b".debug_info\0"))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

#[tokio::test]
async fn download_serves_the_running_build_without_its_debug_info() -> Result<()> {
    let hub = Hub::start().await?;
    let running = std::fs::read(ADI)?;
    for _ in 0..2 {
        let resp = reqwest::get(format!("{}/download/adi", hub.url)).await?;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/octet-stream");
        let body = resp.bytes().await?;
        assert_eq!(&body[..4], b"\x7fELF");
        if has_debug_info(&running)? {
            assert!(
                body.len() < running.len() && !has_debug_info(&body)?,
                "served {} bytes with debug info kept; the running build is {}",
                body.len(),
                running.len()
            );
        } else {
            assert!(body.len() <= running.len());
        }
        // It runs, and is the same build.
        let dir = tempfile::tempdir()?;
        let served = dir.path().join("adi");
        std::fs::write(&served, &body)?;
        std::fs::set_permissions(&served, std::fs::Permissions::from_mode(0o755))?;
        assert_eq!(version_of(&served)?, version_of(Path::new(ADI))?);
    }
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
    // The device offers a demo page, and the output says where it is through the hub.
    let demo = field("demo:")?;
    let demo = demo.split_whitespace().next().unwrap_or_default();
    assert!(demo.starts_with(&format!("{url}/proxy/")), "{out}");
    let page = api.http.get(demo).bearer_auth(&api.jwt).send().await?;
    assert_eq!(page.status(), 200, "{demo}");
    assert!(
        page.text().await?.contains("Hello from this-machine"),
        "{demo}"
    );
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
