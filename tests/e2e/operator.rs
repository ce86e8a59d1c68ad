//! What the person running a hub meets first, through the real binary: an admin
//! command that refuses a data dir without a catalog instead of making one no hub uses,
//! a busy port named once, and logs without colour codes when they go to a file.

use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use crate::harness::{Api, Hub, ADI};

#[tokio::test]
async fn user_add_refuses_a_data_dir_without_a_catalog_unless_asked_to_create_one() -> Result<()> {
    let root = tempfile::tempdir()?;
    let typo = root.path().join("hbu");
    let out = Command::new(ADI)
        .args(["signaling", "user", "add", "alice", "--data-dir"])
        .arg(&typo)
        .env_remove("ADI_DATA_DIR")
        .env_remove("ADI_DATABASE_URL")
        .output()?;
    let err = String::from_utf8(out.stderr)?;
    assert!(!out.status.success(), "{err}");
    assert!(out.stdout.is_empty(), "no key printed");
    assert!(
        err.contains(&typo.join("catalog.db").display().to_string()) && err.contains("--create"),
        "{err}"
    );
    assert!(!typo.exists(), "nothing was made at the mistyped path");

    // The help says where the catalog is when no --data-dir is given.
    let xdg = root.path().join("xdg");
    let help = Command::new(ADI)
        .args(["signaling", "user", "add", "--help"])
        .env("XDG_DATA_HOME", &xdg)
        .env_remove("ADI_DATA_DIR")
        .output()?;
    let help = String::from_utf8(help.stdout)?;
    assert!(
        help.contains(&format!("[default: {}]", xdg.join("adi/hub").display())),
        "{help}"
    );

    // Asked to, it makes the catalog, and a hub started on it takes the key.
    let dir = root.path().join("new-hub");
    let out = Command::new(ADI)
        .args([
            "signaling",
            "user",
            "add",
            "alice",
            "--create",
            "--data-dir",
        ])
        .arg(&dir)
        .env_remove("ADI_DATABASE_URL")
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout)?.trim().to_owned();
    let hub = Hub::start_in(&dir).await?;
    Api::login(&hub.url, &key).await?;
    Ok(())
}

#[tokio::test]
async fn a_busy_port_is_named_once() -> Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?;
    let dir = tempfile::tempdir()?;
    let out = Command::new(ADI)
        .args([
            "signaling",
            "serve",
            "--listen",
            &addr.to_string(),
            "--data-dir",
        ])
        .arg(dir.path())
        .output()?;
    let err = String::from_utf8(out.stderr)?;
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
    assert_eq!(err.matches("in use").count(), 1, "{err}");
    Ok(())
}

#[tokio::test]
async fn logs_written_to_a_pipe_carry_no_colour_codes() -> Result<()> {
    let hub = Hub::start().await?;
    // A line from the log, not one printed directly.
    hub.proc
        .wait_line("hub listening", Duration::from_secs(10))
        .await?;
    let out = hub.proc.output();
    assert!(out.contains("INFO"), "{out}");
    assert!(!out.contains('\u{1b}'), "{out:?}");
    Ok(())
}
