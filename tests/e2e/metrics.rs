//! `GET /metrics`: Prometheus' text format, counting what a real hub did (devices,
//! proxied responses, capability calls, client sockets), served on loopback or with the
//! metrics token, and to nobody else.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;

use crate::harness::{cli, wait_for, Api, Cocoon, Hub};

const TOKEN: &str = "metrics-token-for-the-tests";

/// The value of one series (name with its labels, as the text format writes it).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

async fn scrape(http: &reqwest::Client, hub: &Hub) -> Result<String> {
    let resp = http.get(format!("{}/metrics", hub.url)).send().await?;
    anyhow::ensure!(resp.status() == 200, "metrics: {}", resp.status());
    Ok(resp.text().await?)
}

#[tokio::test]
async fn metrics_count_what_the_hub_did() -> Result<()> {
    let app = axum::Router::new().route("/ok", axum::routing::get(|| async { "fine" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let hub = Hub::start_with(&["--metrics-token", TOKEN]).await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let cocoon = Cocoon::start(
        &hub.url,
        "box",
        Some(&alice.setup_token(60).await?),
        &["--service", &format!("web:{port}")],
    )?;
    let device = cocoon.device_id().await?;
    let http = reqwest::Client::new();

    let before = scrape(&http, &hub).await?;
    assert_eq!(
        value(&before, "adi_hub_devices_connected"),
        Some(1.0),
        "{before}"
    );
    assert_eq!(
        value(&before, "adi_hub_devices_online"),
        Some(1.0),
        "{before}"
    );
    assert_eq!(
        value(&before, "adi_hub_devices_stopping"),
        Some(0.0),
        "{before}"
    );
    assert!(before.contains("adi_hub_build_info{version=\""), "{before}");
    assert!(
        value(&before, "process_resident_memory_bytes").is_some_and(|b| b > 1e6),
        "{before}"
    );

    for _ in 0..3 {
        let r = http
            .get(format!("{}/proxy/{device}/web/ok", hub.url))
            .bearer_auth(&alice.jwt)
            .send()
            .await?;
        assert_eq!(r.status(), 200);
    }
    let r = http
        .get(format!("{}/proxy/{device}/nope/ok", hub.url))
        .bearer_auth(&alice.jwt)
        .send()
        .await?;
    assert_eq!(r.status(), 404);
    let (status, body) = alice
        .post(
            "/api/capabilities/tasks/request",
            json!({"payload": {"title": "counted"}}),
        )
        .await?;
    assert_eq!(status, 200, "{body}");
    let (status, body) = alice
        .post(
            "/api/capabilities/nothing.here/request",
            json!({"payload": {}}),
        )
        .await?;
    assert_eq!(status, 503, "{body}");

    let client = crate::wire::client(&hub, &alice.jwt).await?;

    let after = scrape(&http, &hub).await?;
    let counted =
        |series: &str| value(&after, series).unwrap_or(0.0) - value(&before, series).unwrap_or(0.0);
    assert_eq!(
        counted("adi_hub_proxy_responses_total{class=\"2xx\"}"),
        3.0,
        "{after}"
    );
    assert_eq!(
        counted("adi_hub_proxy_responses_total{class=\"4xx\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        counted("adi_hub_capability_requests_total{outcome=\"ok\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        counted("adi_hub_capability_requests_total{outcome=\"no_capable_device\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        value(&after, "adi_hub_client_sockets"),
        Some(1.0),
        "{after}"
    );
    drop(client);
    wait_for(
        "the client socket uncounted",
        Duration::from_secs(10),
        || async {
            Ok(
                (value(&scrape(&http, &hub).await?, "adi_hub_client_sockets") == Some(0.0))
                    .then_some(()),
            )
        },
    )
    .await?;

    // The device goes: the gauges follow.
    drop(cocoon);
    wait_for("the device uncounted", Duration::from_secs(10), || async {
        Ok(
            (value(&scrape(&http, &hub).await?, "adi_hub_devices_connected") == Some(0.0))
                .then_some(()),
        )
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn metrics_are_for_loopback_or_the_token_holder() -> Result<()> {
    let http = reqwest::Client::new();
    let with_token = Hub::start_with(&["--metrics-token", TOKEN]).await?;
    let url = format!("{}/metrics", with_token.url);
    // Through a proxy on the hub's host (it says whom it forwards for), loopback is not
    // enough: the token is.
    for (header, value) in [
        ("x-forwarded-for", "203.0.113.9"),
        ("forwarded", "for=203.0.113.9"),
        ("x-real-ip", "203.0.113.9"),
    ] {
        let r = http.get(&url).header(header, value).send().await?;
        assert_eq!(r.status(), 401, "{header}");
        let r = http
            .get(&url)
            .header(header, value)
            .bearer_auth(format!("{TOKEN}x"))
            .send()
            .await?;
        assert_eq!(r.status(), 401, "{header} with a wrong token");
        let r = http
            .get(&url)
            .header(header, value)
            .bearer_auth(TOKEN)
            .send()
            .await?;
        assert_eq!(r.status(), 200, "{header} with the token");
        assert!(r.text().await?.contains("adi_hub_devices_connected"));
    }

    let without = Hub::start().await?;
    let r = http
        .get(format!("{}/metrics", without.url))
        .header("x-forwarded-for", "203.0.113.9")
        .bearer_auth(TOKEN)
        .send()
        .await?;
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = r.json().await?;
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("--metrics-token")),
        "{body}"
    );
    let r = http.get(format!("{}/metrics", without.url)).send().await?;
    assert_eq!(r.status(), 200, "loopback reads them without a token");

    // A token too short to be a secret is refused at start.
    let dir = tempfile::tempdir()?;
    let data = dir.path().to_string_lossy().into_owned();
    let (code, _, err) = cli(
        dir.path(),
        &[
            "signaling",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
            "--metrics-token",
            "short",
        ],
        &[],
    )
    .context("running the hub")?;
    assert_ne!(code, 0);
    assert!(err.contains("at least 16 characters"), "{err}");
    Ok(())
}
