//! Presence: online state follows heartbeats in the hub's RAM, a killed cocoon goes
//! offline quickly, and after a hub restart every cocoon is back, same ids, same owners.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::harness::{fresh_postgres, Api, Cocoon, Hub, HEARTBEAT};

#[tokio::test]
async fn killed_cocoon_is_offline_within_three_heartbeats() -> Result<()> {
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let mut doomed = Cocoon::start(&hub.url, "doomed", Some(&alice.setup_token(60).await?), &[])?;
    let survivor = Cocoon::start(
        &hub.url,
        "survivor",
        Some(&alice.setup_token(60).await?),
        &[],
    )?;
    let (doomed_id, survivor_id) = (doomed.device_id().await?, survivor.device_id().await?);
    alice
        .wait_online(&doomed_id, true, Duration::from_secs(5))
        .await?;

    doomed.proc.kill();
    alice.wait_online(&doomed_id, false, HEARTBEAT * 3).await?;
    let (_, view) = alice.cocoon(&doomed_id).await?;
    assert_eq!(view["status"], "offline");
    assert!(view["last_heartbeat_age_secs"].is_null(), "{view}");
    // The catalog still knows it; only presence changed.
    assert_eq!(view["name"], "doomed");
    let (_, other) = alice.cocoon(&survivor_id).await?;
    assert_eq!(other["online"], true);
    Ok(())
}

async fn restart_scenario(mut hub: Hub) -> Result<()> {
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let bob_key = hub.add_user("bob")?;
    let bob = Api::login(&hub.url, &bob_key).await?;
    let cocoons = [
        Cocoon::start(&hub.url, "a1", Some(&alice.setup_token(60).await?), &[])?,
        Cocoon::start(&hub.url, "a2", Some(&alice.setup_token(60).await?), &[])?,
        Cocoon::start(&hub.url, "b1", Some(&bob.setup_token(60).await?), &[])?,
    ];
    let mut ids = Vec::new();
    for c in &cocoons {
        ids.push(c.device_id().await?);
    }
    let before_alice = alice.cocoons().await?;

    hub.restart().await?;
    let restarted = Instant::now();
    // Old sessions stay valid: the JWT key lives in the catalog.
    for (api, id) in [(&alice, &ids[0]), (&alice, &ids[1]), (&bob, &ids[2])] {
        // Reconnect delay is capped at 1 s for these cocoons; allow that plus heartbeats.
        api.wait_online(id, true, Duration::from_secs(1) + HEARTBEAT * 4)
            .await?;
    }
    eprintln!(
        "all cocoons back {:?} after the restart",
        restarted.elapsed()
    );
    let after_alice = alice.cocoons().await?;
    let strip = |v: &[serde_json::Value]| {
        v.iter()
            .map(|c| (c["id"].clone(), c["name"].clone(), c["owners"].clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        strip(&before_alice),
        strip(&after_alice),
        "ids and owners survive a restart"
    );
    assert_eq!(bob.cocoons().await?.len(), 1);
    assert_eq!(alice.cocoon(&ids[2]).await?.0, 404);
    // A key issued before the restart still logs in after it.
    Api::login(&hub.url, &bob_key).await?;
    Ok(())
}

#[tokio::test]
async fn hub_restart_on_sqlite_keeps_ids_and_owners_and_cocoons_return() -> Result<()> {
    restart_scenario(Hub::start().await?).await
}

#[tokio::test]
async fn hub_restart_on_postgres_keeps_ids_and_owners_and_cocoons_return() -> Result<()> {
    let Some(db) = fresh_postgres().await else {
        return Ok(());
    };
    let result = async { restart_scenario(Hub::start_postgres(&db.url()).await?).await }.await;
    db.drop_database().await;
    result
}

#[tokio::test]
async fn load_is_reported_and_a_machine_without_nvidia_says_no_gpu_once() -> Result<()> {
    let hub = Hub::start().await?;
    let key = hub.add_user("alice")?;
    let alice = Api::login(&hub.url, &key).await?;
    let c = Cocoon::start(
        &hub.url,
        "probe",
        Some(&alice.setup_token(60).await?),
        &["--health-interval", "200ms"],
    )?;
    let id = c.device_id().await?;
    let load = crate::harness::wait_for("a load report", Duration::from_secs(10), || async {
        let (_, view) = alice.cocoon(&id).await?;
        Ok(view.get("load").filter(|l| !l.is_null()).cloned())
    })
    .await?;
    assert!(load["cpu_count"].as_u64().unwrap_or(0) >= 1, "{load}");
    assert!(load["ram_total_bytes"].as_u64().unwrap_or(0) > 0, "{load}");
    let cpu = load["cpu_percent"].as_f64().unwrap_or(-1.0);
    assert!((0.0..=100.0).contains(&cpu), "{load}");
    let gpus = load["gpus"].as_array().cloned().unwrap_or_default();
    assert_eq!(gpus.len(), gpus_the_driver_lists(), "{load}");
    if gpus.is_empty() {
        // Several samples later, "no GPU" was still said only once.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let said = c.proc.output().matches("no GPU").count();
        assert_eq!(said, 1, "{}", c.proc.output());
    } else {
        assert!(
            c.proc.output().contains("NVML loaded"),
            "{}",
            c.proc.output()
        );
        for g in &gpus {
            assert!(g["name"].as_str().is_some_and(|n| !n.is_empty()), "{g}");
            assert!(g["memory_total_bytes"].as_u64().unwrap_or(0) > 0, "{g}");
        }
    }
    let cfg = tempfile::tempdir()?;
    let (code, table, err) = crate::harness::cli(
        cfg.path(),
        &["cocoon", "list"],
        &[("ADI_HUB", hub.url.as_str()), ("ADI_API_KEY", key.as_str())],
    )?;
    assert_eq!(code, 0, "{err}");
    assert!(
        table.contains("CPU/RAM") && table.contains("cpu "),
        "{table}"
    );
    Ok(())
}

#[tokio::test]
async fn a_device_shows_its_hardware_and_load_from_its_first_moment_online() -> Result<()> {
    // No heartbeat comes within the test: whatever the hub knows came with the
    // registration.
    let hub = Hub::start_with(&["--heartbeat-interval", "30s"]).await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let c = Cocoon::start(&hub.url, "fresh", Some(&alice.setup_token(60).await?), &[])?;
    let id = c.device_id().await?;
    let (status, view) = alice.cocoon(&id).await?;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["online"], true, "{view}");
    let load = &view["load"];
    assert!(load["cpu_count"].as_u64().unwrap_or(0) >= 1, "{view}");
    assert!(load["ram_total_bytes"].as_u64().unwrap_or(0) > 0, "{view}");
    // The hardware is configuration: stored in the catalog at registration.
    assert_eq!(view["hardware"]["cpu_count"], load["cpu_count"], "{view}");
    assert_eq!(
        view["hardware"]["ram_total_bytes"], load["ram_total_bytes"],
        "{view}"
    );
    Ok(())
}

/// Size and modification time of the catalog's files, to tell whether it was written.
fn catalog_stamp(hub: &Hub) -> Vec<(u64, Option<std::time::SystemTime>)> {
    ["catalog.db", "catalog.db-wal"]
        .iter()
        .map(|f| {
            let meta = std::fs::metadata(hub.data_dir.join(f)).ok();
            (
                meta.as_ref().map_or(0, std::fs::Metadata::len),
                meta.and_then(|m| m.modified().ok()),
            )
        })
        .collect()
}

#[tokio::test]
async fn hardware_and_location_are_configuration_and_heartbeats_never_write_the_catalog(
) -> Result<()> {
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let mut cocoon = Cocoon::start(
        &hub.url,
        "rack-box",
        Some(&alice.setup_token(60).await?),
        &[
            "--location",
            "rack 3, shelf 2",
            "--health-interval",
            "200ms",
        ],
    )?;
    let id = cocoon.device_id().await?;
    let view = crate::harness::wait_for("hardware reported", Duration::from_secs(10), || async {
        let (_, v) = alice.cocoon(&id).await?;
        Ok(
            (v["hardware"]["cpu_count"].as_u64().unwrap_or(0) >= 1 && v["load"].is_object())
                .then_some(v),
        )
    })
    .await?;
    assert_eq!(view["location"], "rack 3, shelf 2");
    assert_eq!(
        view["hardware"]["ram_total_bytes"], view["load"]["ram_total_bytes"],
        "{view}"
    );
    // The hardware names exactly the GPUs the driver lists: none without a driver,
    // and the cocoon runs on.
    assert_eq!(
        view["hardware"]["gpus"].as_array().map_or(0, Vec::len),
        gpus_the_driver_lists(),
        "{view}"
    );

    // Six more heartbeats, each seen as the heartbeat age falling back: the catalog's
    // files stay as they were, load changes and all.
    let before = catalog_stamp(&hub);
    let mut last_age = f64::MAX;
    let mut beats = 0;
    let started = Instant::now();
    while beats <= 6 {
        anyhow::ensure!(
            started.elapsed() < HEARTBEAT * 20,
            "heartbeats stopped arriving"
        );
        let (_, v) = alice.cocoon(&id).await?;
        let age = v["last_heartbeat_age_secs"].as_f64().unwrap_or(f64::MAX);
        if age < last_age {
            beats += 1;
        }
        last_age = age;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(catalog_stamp(&hub), before, "a heartbeat wrote the catalog");

    // Hardware and location are kept while the device is offline; load is not.
    cocoon.proc.kill();
    alice.wait_online(&id, false, HEARTBEAT * 3).await?;
    let (_, offline) = alice.cocoon(&id).await?;
    assert!(offline["load"].is_null(), "{offline}");
    assert_eq!(offline["hardware"], view["hardware"]);
    assert_eq!(offline["location"], "rack 3, shelf 2");
    Ok(())
}

/// The GPUs `nvidia-smi -L` lists on this machine: 0 without an NVIDIA driver.
fn gpus_the_driver_lists() -> usize {
    std::process::Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or(0, |o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with("GPU "))
                .count()
        })
}
