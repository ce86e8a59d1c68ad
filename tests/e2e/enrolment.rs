//! Enrolment with one-time setup tokens: a device joins once, comes back with its
//! secret alone, and every bad token is refused with a message naming the reason,
//! leaving nothing half-created.

use std::time::Duration;

use anyhow::Result;

use crate::harness::{cli, closed_port, foreign_server, wait_for, Api, Cocoon, Hub};

/// Starts a cocoon that must be refused; returns its output.
async fn refused(hub: &Hub, token: Option<&str>) -> Result<String> {
    let mut c = Cocoon::start(&hub.url, "refused", token, &[])?;
    let code = c.proc.wait_exit(Duration::from_secs(20)).await?;
    assert_ne!(code, 0, "a refused cocoon must exit non-zero");
    Ok(c.proc.output())
}

#[tokio::test]
async fn bad_tokens_are_refused_and_say_why() -> Result<()> {
    let hub = Hub::start().await?;
    let alice_key = hub.add_user("alice")?;
    let alice = Api::login(&hub.url, &alice_key).await?;

    // A good token enrols once; the same token again is "already used".
    let token = alice.setup_token(3600).await?;
    let first = Cocoon::start(&hub.url, "first", Some(&token), &[])?;
    first.device_id().await?;
    let out = refused(&hub, Some(&token)).await?;
    assert!(
        out.contains("token_used") && out.contains("already used"),
        "{out}"
    );

    // Expired.
    let short = alice.setup_token(1).await?;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let out = refused(&hub, Some(&short)).await?;
    assert!(
        out.contains("token_expired") && out.contains("expired"),
        "{out}"
    );

    // Unknown: right format, never issued.
    let unknown = format!("adi_setup_0123456789abcdef_{}", "A".repeat(43));
    let out = refused(&hub, Some(&unknown)).await?;
    assert!(
        out.contains("token_unknown") && out.contains("unknown"),
        "{out}"
    );

    // A real token's id with a wrong secret is just as unknown.
    let real = alice.setup_token(3600).await?;
    let forged = format!("{}{}", &real[..real.len() - 43], "B".repeat(43));
    let out = refused(&hub, Some(&forged)).await?;
    assert!(out.contains("token_unknown"), "{out}");

    // Malformed.
    let out = refused(&hub, Some("let-me-in")).await?;
    assert!(
        out.contains("token_malformed") && out.contains("malformed"),
        "{out}"
    );

    // A share token is not a setup token.
    let (status, share) = alice
        .post(
            "/api/tokens",
            serde_json::json!({"kind": "share", "device_id": first.device_id().await?}),
        )
        .await?;
    assert_eq!(status, 201);
    let out = refused(&hub, share["token"].as_str()).await?;
    assert!(out.contains("share token"), "{out}");

    // No token and never enrolled.
    let out = refused(&hub, None).await?;
    assert!(out.contains("not_enrolled"), "{out}");

    // None of that created a device, and the unused token still works.
    assert_eq!(alice.cocoons().await?.len(), 1);
    let late = Cocoon::start(&hub.url, "late", Some(&real), &[])?;
    late.device_id().await?;
    assert_eq!(alice.cocoons().await?.len(), 2);

    // The hub logged each refusal, without the tokens themselves.
    let logs = hub.proc.output();
    for reason in [
        "token_used",
        "token_expired",
        "token_unknown",
        "token_malformed",
        "not_enrolled",
    ] {
        assert!(logs.contains(reason), "hub did not log {reason}:\n{logs}");
    }
    for t in [&token, &short, &real, &forged] {
        assert!(
            !logs.contains(t.as_str()),
            "a token appeared in the hub log"
        );
    }
    Ok(())
}

#[tokio::test]
async fn same_data_dir_is_the_same_device_without_a_token() -> Result<()> {
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let dir = tempfile::tempdir()?;
    let token = alice.setup_token(3600).await?;
    let mut c = Cocoon::start_in(&hub.url, "laptop", Some(&token), dir.path(), &[])?;
    let id = c.device_id().await?;
    c.proc.terminate().await?;
    alice
        .wait_online(&id, false, Duration::from_secs(5))
        .await?;

    let again = Cocoon::start_in(&hub.url, "laptop-renamed", None, dir.path(), &[])?;
    assert_eq!(again.device_id().await?, id);
    let list = alice.cocoons().await?;
    assert_eq!(list.len(), 1);
    assert_eq!(
        list[0]["name"], "laptop-renamed",
        "a rename is a configuration change"
    );

    // The secret file is private and long.
    let secret = again.secret()?;
    assert!(secret.trim().len() >= 32);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("device.secret"))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    Ok(())
}

#[tokio::test]
async fn cli_generate_token_and_run_enrols_a_device() -> Result<()> {
    let hub = Hub::start().await?;
    let key = hub.add_user("carol")?;
    let cfg = tempfile::tempdir()?;
    let env = [("ADI_HUB", hub.url.as_str()), ("ADI_API_KEY", key.as_str())];
    let (code, out, err) = cli(
        cfg.path(),
        &["cocoon", "generate-token", "--expires", "10m"],
        &env,
    )?;
    assert_eq!(code, 0, "{err}");
    let token = out.trim();
    assert_eq!(out.lines().count(), 1, "only the token on stdout: {out:?}");
    assert!(
        err.contains("install.sh"),
        "the hint names the one-liner: {err}"
    );
    let c = Cocoon::start(&hub.url, "from-cli", Some(token), &[])?;
    let id = c.device_id().await?;
    let (code, out, _) = cli(cfg.path(), &["cocoon", "list", "--json"], &env)?;
    assert_eq!(code, 0);
    assert!(out.contains(&id));

    // Without a session or key the CLI says what to do.
    let empty = tempfile::tempdir()?;
    let (code, _, err) = cli(empty.path(), &["cocoon", "list", "--hub", &hub.url], &[])?;
    assert_ne!(code, 0);
    assert!(err.contains("adi login"), "{err}");
    // A wrong key is refused in plain words.
    let (code, _, err) = cli(
        empty.path(),
        &[
            "login",
            "--hub",
            &hub.url,
            "--api-key",
            "adi_key_0000000000000000_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ],
        &[],
    )?;
    assert_ne!(code, 0);
    assert!(err.contains("invalid API key"), "{err}");
    Ok(())
}

#[tokio::test]
async fn one_token_two_racing_devices_enrols_exactly_one() -> Result<()> {
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let token = alice.setup_token(3600).await?;
    let mut a = Cocoon::start(&hub.url, "a", Some(&token), &[])?;
    let mut b = Cocoon::start(&hub.url, "b", Some(&token), &[])?;
    wait_for("one winner", Duration::from_secs(20), || async {
        let outs = (a.proc.output(), b.proc.output());
        let online = [&outs.0, &outs.1]
            .iter()
            .filter(|o| o.contains("cocoon online as"))
            .count();
        let used = [&outs.0, &outs.1]
            .iter()
            .filter(|o| o.contains("token_used"))
            .count();
        Ok((online + used == 2).then_some(()))
    })
    .await?;
    assert_eq!(alice.cocoons().await?.len(), 1);
    a.proc.kill();
    b.proc.kill();
    Ok(())
}

#[tokio::test]
async fn the_config_file_supplies_hub_name_and_services_and_typos_are_refused() -> Result<()> {
    use crate::harness::{Proc, ADI};
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("cocoon.toml"),
        format!(
            "hub = \"{}\"\nname = \"from-file\"\n\n[[services]]\nname = \"grafana\"\nport = 3000\nhealth = \"/api/health\"\n",
            hub.url
        ),
    )?;
    let mut cmd = std::process::Command::new(ADI);
    cmd.args(["cocoon", "run", "--data-dir"])
        .arg(dir.path())
        .args([
            "--token",
            &alice.setup_token(60).await?,
            "--service",
            "api:8092",
        ]);
    let proc = Proc::spawn(&mut cmd)?;
    proc.wait_line("cocoon online as device", Duration::from_secs(20))
        .await?;
    let list = alice.cocoons().await?;
    assert_eq!(list[0]["name"], "from-file");
    let names: Vec<&str> = list[0]["services"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        names,
        vec!["api", "grafana"],
        "flags and file services together"
    );
    assert_eq!(list[0]["services"][1]["health_path"], "/api/health");
    drop(proc);

    let bad = tempfile::tempdir()?;
    std::fs::write(
        bad.path().join("cocoon.toml"),
        "name = \"x\"\nhbu = \"typo\"\n",
    )?;
    let out = std::process::Command::new(ADI)
        .args(["cocoon", "run", "--hub", &hub.url, "--data-dir"])
        .arg(bad.path())
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cocoon.toml") && err.contains("hbu") && err.contains("line 2"),
        "{err}"
    );
    // A service the proxy could not route is refused from the file as from a flag.
    std::fs::write(
        bad.path().join("cocoon.toml"),
        "name = \"x\"\n[[services]]\nname = \"../etc\"\nport = 80\n",
    )?;
    let out = std::process::Command::new(ADI)
        .args(["cocoon", "run", "--hub", &hub.url, "--data-dir"])
        .arg(bad.path())
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("service name \"../etc\"") && err.contains("[[services]]"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn a_second_agent_on_a_data_dir_in_use_refuses_and_touches_nothing() -> Result<()> {
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let dir = tempfile::tempdir()?;
    let token = alice.setup_token(3600).await?;
    let first = Cocoon::start_in(&hub.url, "laptop", Some(&token), dir.path(), &[])?;
    let id = first.device_id().await?;
    let files = |name: &str| std::fs::read(dir.path().join(name));
    let (secret, local_api) = (files("device.secret")?, files("local-api.json")?);

    let mut second = Cocoon::start_in(
        &hub.url,
        "laptop-2",
        None,
        dir.path(),
        &["--local-api", "off"],
    )?;
    assert_ne!(second.proc.wait_exit(Duration::from_secs(10)).await?, 0);
    let said = second.proc.output();
    assert!(said.contains("is in use by another adi cocoon"), "{said}");
    assert!(
        said.contains(&format!("pid {}", first.proc.pid())),
        "{said}"
    );
    // The running agent's files are as they were (`--local-api off` would have removed
    // its local-api.json), and it is still the device, online, under its own name.
    assert_eq!(files("device.secret")?, secret);
    assert_eq!(files("local-api.json")?, local_api);
    alice.wait_online(&id, true, Duration::from_secs(5)).await?;
    let (_, view) = alice.cocoon(&id).await?;
    assert_eq!(view["name"], "laptop");
    Ok(())
}

#[tokio::test]
async fn two_agents_with_one_secret_do_not_flap_the_older_one_stops_and_says_why() -> Result<()> {
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let token = alice.setup_token(3600).await?;
    let mut a = Cocoon::start(&hub.url, "box-a", Some(&token), &["--service", "web:8001"])?;
    let id = a.device_id().await?;
    // A copy of the data dir on another machine: the same secret, another agent.
    let copy = tempfile::tempdir()?;
    std::fs::write(copy.path().join("device.secret"), a.secret()?)?;
    let b = Cocoon::start_in(
        &hub.url,
        "box-b",
        None,
        copy.path(),
        &["--service", "web:8002"],
    )?;
    assert_eq!(b.device_id().await?, id);

    // The displaced agent stops for good, says why, and is not restarted by its unit.
    assert_eq!(a.proc.wait_exit(Duration::from_secs(20)).await?, 78);
    let said = a.proc.output();
    assert!(said.contains("duplicate_agent"), "{said}");
    assert!(
        said.contains("another agent with this device's secret"),
        "{said}"
    );

    // The catalog holds the newer agent's name and services, and they stay so.
    for _ in 0..3 {
        tokio::time::sleep(crate::harness::HEARTBEAT).await;
        let (_, view) = alice.cocoon(&id).await?;
        assert_eq!(view["name"], "box-b", "{view}");
        assert_eq!(view["services"][0]["port"], 8002, "{view}");
        assert_eq!(view["online"], true, "{view}");
    }
    // The owner sees that the device was connected from two places.
    let (_, view) = alice.cocoon(&id).await?;
    let conflict = &view["conflict"];
    assert!(conflict["at"].as_i64().is_some(), "{view}");
    assert!(
        conflict["displaced_from"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{view}"
    );
    assert_ne!(
        conflict["displaced_from"], conflict["connected_from"],
        "{view}"
    );
    assert!(
        !b.proc.output().contains("hub connection lost"),
        "{}",
        b.proc.output()
    );
    Ok(())
}

#[tokio::test]
async fn a_cocoon_pointed_at_something_else_says_it_is_no_adi_hub_and_stops() -> Result<()> {
    for status in [404, 501] {
        let url = format!("http://127.0.0.1:{}", foreign_server(status).await?);
        let mut c = Cocoon::start(&url, "lost", Some("adi_setup_x_y"), &[])?;
        let code = c.proc.wait_exit(Duration::from_secs(20)).await?;
        let out = c.proc.output();
        // Retrying cannot help until the address changes: the systemd unit does not
        // restart on this status either.
        assert_eq!(code, 78, "{out}");
        assert!(
            out.contains(&format!("{url} is not an adi hub")) && out.contains(&status.to_string()),
            "{out}"
        );
        assert!(!out.contains("retrying"), "{out}");
    }
    Ok(())
}

#[tokio::test]
async fn a_cocoon_keeps_trying_an_unreachable_hub_saying_when_it_tries_next() -> Result<()> {
    let url = format!("http://127.0.0.1:{}", closed_port()?);
    let mut c = Cocoon::start(&url, "patient", Some("adi_setup_x_y"), &[])?;
    let wanted = format!("cannot connect to the hub at {url}");
    let retries = wait_for("three retries", Duration::from_secs(20), || async {
        let out = c.proc.output();
        let lines: Vec<String> = out
            .lines()
            .filter(|l| l.contains(&wanted))
            .map(str::to_owned)
            .collect();
        Ok((lines.len() >= 3).then_some(lines))
    })
    .await?;
    for line in &retries {
        assert!(
            line.contains("Connection refused") && line.contains("retrying in "),
            "{line}"
        );
    }
    assert!(c.proc.is_running(), "{}", c.proc.output());
    Ok(())
}

/// A token's public id: the 16 hex characters after its `adi_setup_`/`adi_share_`.
fn token_id(token: &str) -> &str {
    &token[10..26]
}

#[tokio::test]
async fn a_maker_lists_their_tokens_and_revokes_an_unused_one_which_then_enrols_nothing(
) -> Result<()> {
    let hub = Hub::start().await?;
    let alice_key = hub.add_user("alice")?;
    let bob_key = hub.add_user("bob")?;
    let cfg = tempfile::tempdir()?;
    let alice_env = [
        ("ADI_HUB", hub.url.as_str()),
        ("ADI_API_KEY", alice_key.as_str()),
    ];
    let mint = |args: &[&str]| -> Result<String> {
        let mut all = vec!["cocoon", "generate-token"];
        all.extend_from_slice(args);
        let (code, out, err) = cli(cfg.path(), &all, &alice_env)?;
        assert_eq!(code, 0, "{err}");
        Ok(out.trim().to_owned())
    };
    let used = mint(&[])?;
    let device = Cocoon::start(&hub.url, "nas", Some(&used), &[])?;
    let device_id = device.device_id().await?;
    let setup = mint(&["--expires", "2h"])?;
    let share = mint(&["--share", "nas"])?;

    // The listing shows each token's id and state, never a secret.
    let (code, out, err) = cli(cfg.path(), &["cocoon", "tokens", "--json"], &alice_env)?;
    assert_eq!(code, 0, "{err}");
    for token in [&used, &setup, &share] {
        let secret = &token[token.len() - 43..];
        assert!(!out.contains(secret), "a secret is listed: {out}");
    }
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    let state_of = |listed: &[serde_json::Value], token: &str| -> String {
        let id = token_id(token);
        listed
            .iter()
            .find(|t| t["id"] == id)
            .map(|t| t["state"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_else(|| format!("{id} not listed"))
    };
    assert_eq!(listed.len(), 3, "{out}");
    assert_eq!(state_of(&listed, &used), "used");
    assert_eq!(state_of(&listed, &setup), "active");
    assert_eq!(state_of(&listed, &share), "active");
    let share_entry = listed
        .iter()
        .find(|t| t["kind"] == "share")
        .expect("the share token is listed");
    assert_eq!(share_entry["device_id"], device_id.as_str());
    let (code, table, _) = cli(cfg.path(), &["cocoon", "tokens"], &alice_env)?;
    assert_eq!(code, 0);
    assert!(
        table.starts_with("ID") && table.contains("expires in") && table.contains("used"),
        "{table}"
    );

    // Bob sees none of them and cannot revoke one: it is as if it did not exist.
    let bob = Api::login(&hub.url, &bob_key).await?;
    let (status, body) = bob.get("/api/tokens").await?;
    assert_eq!(status, 200);
    assert_eq!(body["tokens"].as_array().map(Vec::len), Some(0), "{body}");
    let setup_id = token_id(&setup);
    let (status, _) = bob.delete(&format!("/api/tokens/{setup_id}")).await?;
    assert_eq!(status, 404);

    // Alice revokes the setup token by its id and the share token whole.
    let (code, out, err) = cli(
        cfg.path(),
        &["cocoon", "revoke-token", setup_id],
        &alice_env,
    )?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("revoked setup token"), "{out}");
    let (code, _, err) = cli(cfg.path(), &["cocoon", "revoke-token", &share], &alice_env)?;
    assert_eq!(code, 0, "{err}");
    // A used token cannot be taken back.
    let (code, _, err) = cli(cfg.path(), &["cocoon", "revoke-token", &used], &alice_env)?;
    assert_ne!(code, 0);
    assert!(err.contains("already used"), "{err}");

    // The revoked tokens are refused, saying so, and enrol or share nothing.
    let out = refused(&hub, Some(&setup)).await?;
    assert!(
        out.contains("token_revoked") && out.contains("revoked"),
        "{out}"
    );
    let bob_cfg = tempfile::tempdir()?;
    let (code, _, err) = cli(
        bob_cfg.path(),
        &["cocoon", "claim", &share],
        &[
            ("ADI_HUB", hub.url.as_str()),
            ("ADI_API_KEY", bob_key.as_str()),
        ],
    )?;
    assert_ne!(code, 0);
    assert!(err.contains("revoked"), "{err}");
    assert_eq!(bob.cocoons().await?.len(), 0);
    let alice = Api::login(&hub.url, &alice_key).await?;
    assert_eq!(alice.cocoons().await?.len(), 1);
    let (_, body) = alice.get("/api/tokens").await?;
    let listed = body["tokens"].as_array().cloned().unwrap_or_default();
    assert_eq!(state_of(&listed, &setup), "revoked");
    assert_eq!(state_of(&listed, &share), "revoked");
    Ok(())
}
