//! A cocoon given several hubs: one that cannot be reached is passed over for the next,
//! and a device whose hub is killed is on another hub of the same catalog within a
//! couple of seconds, with the same identity.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::harness::{closed_port, fresh_postgres, wait_for, Api, Cocoon, Hub};

/// Waits until the cocoon says it is online at `hub`; returns the device id it names.
async fn online_at(cocoon: &Cocoon, hub: &str, deadline: Duration) -> Result<String> {
    let suffix = format!(" at {hub}");
    wait_for(&format!("the cocoon online at {hub}"), deadline, || async {
        Ok(cocoon
            .proc
            .output()
            .lines()
            .filter(|l| l.starts_with("cocoon online as device ") && l.ends_with(&suffix))
            .find_map(|l| l.split_whitespace().nth(4).map(str::to_owned)))
    })
    .await
    .map_err(|e| e.context(format!("output so far:\n{}", cocoon.proc.output())))
}

#[tokio::test]
async fn a_primary_hub_that_cannot_be_reached_is_passed_over_for_the_next() -> Result<()> {
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let dead = format!("http://127.0.0.1:{}", closed_port()?);
    let cocoon = Cocoon::start(
        &dead,
        "fallback",
        Some(&alice.setup_token(60).await?),
        &["--hub", &hub.url],
    )?;
    let id = online_at(&cocoon, &hub.url, Duration::from_secs(10)).await?;
    alice.wait_online(&id, true, Duration::from_secs(5)).await?;
    let out = cocoon.proc.output();
    assert!(
        out.contains(&format!("cannot connect to the hub at {dead}: "))
            && out.contains(&format!("; trying {} in ", hub.url)),
        "the log names the hub tried and the next one:\n{out}"
    );
    Ok(())
}

#[tokio::test]
async fn a_device_whose_hub_is_killed_is_on_another_hub_within_seconds() -> Result<()> {
    let Some(db) = fresh_postgres().await else {
        return Ok(());
    };
    let result = async {
        let (mut a, b) = (
            Hub::start_postgres(&db.url()).await?,
            Hub::start_postgres(&db.url()).await?,
        );
        let key = a.add_user("alice")?;
        let alice_on_a = Api::login(&a.url, &key).await?;
        let cocoon = Cocoon::start(
            &a.url,
            "roamer",
            Some(&alice_on_a.setup_token(60).await?),
            &["--hub", &b.url],
        )?;
        let id = online_at(&cocoon, &a.url, Duration::from_secs(10)).await?;
        let secret = cocoon.secret()?;

        a.proc.kill();
        let killed = Instant::now();
        let again = online_at(&cocoon, &b.url, Duration::from_secs(3)).await?;
        eprintln!(
            "registered on the other hub {:?} after the kill",
            killed.elapsed()
        );
        // One device, whichever hub it is on.
        assert_eq!(again, id);
        assert_eq!(cocoon.secret()?, secret);
        let alice_on_b = Api::login(&b.url, &key).await?;
        alice_on_b
            .wait_online(&id, true, Duration::from_secs(2))
            .await?;
        Ok(())
    }
    .await;
    db.drop_database().await;
    result
}
