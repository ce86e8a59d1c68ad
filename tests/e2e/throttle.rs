//! Limits on guessing, from several real loopback source addresses (127.0.0.1, .2, .3):
//! a source that keeps failing on one API key is told to wait (`429` with
//! `Retry-After`) while the key's owner, elsewhere, signs in; a source that fails too
//! often is told to wait on every route that checks a secret (sign-in, share claims,
//! enrolment), and other sources are not; successes are never held back.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::Result;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Api, Hub};

/// A client whose connections come from `127.0.0.N`.
fn from(n: u8) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)))
        .no_proxy()
        .build()?)
}

/// Signs in with `key` from `client`: the status, `Retry-After` and body.
async fn sign_in(
    client: &reqwest::Client,
    hub: &Hub,
    key: &str,
) -> Result<(u16, Option<u64>, Value)> {
    let resp = client
        .post(format!("{}/api/auth/token", hub.url))
        .json(&json!({ "api_key": key }))
        .send()
        .await?;
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    Ok((status, retry, resp.json().await.unwrap_or(Value::Null)))
}

/// `key` with its secret part replaced: same key id, wrong secret.
fn wrong_secret(key: &str, n: usize) -> String {
    let keep = key.len() - 43;
    format!("{}{n:0>43}", &key[..keep])
}

#[tokio::test]
async fn a_failing_source_waits_and_the_owner_elsewhere_signs_in() -> Result<()> {
    let hub = Hub::start().await?;
    let alice_key = hub.add_user("alice")?;
    let attacker = from(2)?;
    let owner = from(1)?;

    // Ten failures spend the key's budget; the eleventh fails too and locks the key
    // for the attacker's address.
    for n in 0..11 {
        let (status, retry, body) = sign_in(&attacker, &hub, &wrong_secret(&alice_key, n)).await?;
        assert_eq!((status, retry), (401, None), "attempt {n}: {body}");
    }
    let (status, retry, body) = sign_in(&attacker, &hub, &alice_key).await?;
    assert_eq!(
        status, 429,
        "even the right key, from the failing source: {body}"
    );
    assert_eq!(body["error"]["code"], "too_many_requests");
    let wait = retry.unwrap_or_default();
    assert!((1..=60).contains(&wait), "Retry-After {retry:?}");

    // Alice, from her own address, is not locked out by someone else's failures.
    let (status, _, body) = sign_in(&owner, &hub, &alice_key).await?;
    assert_eq!(status, 200, "{body}");
    Ok(())
}

#[tokio::test]
async fn a_source_that_fails_too_often_waits_on_sign_in_claims_and_enrolment() -> Result<()> {
    let hub = Hub::start().await?;
    let alice_key = hub.add_user("alice")?;
    let alice = Api::login(&hub.url, &alice_key).await?;
    let flood = from(3)?;

    // Successes cost nothing: a hundred sign-ins from one address all pass.
    for _ in 0..100 {
        let (status, _, body) = sign_in(&flood, &hub, &alice_key).await?;
        assert_eq!(status, 200, "{body}");
    }

    // Malformed keys name no account: only the source's budget (60 failures a minute)
    // counts.
    let mut throttled_at = None;
    let failing_since = std::time::Instant::now();
    for n in 0..70 {
        let (status, retry, _) = sign_in(&flood, &hub, &format!("adi_key_nonsense{n}")).await?;
        if status == 429 {
            assert!(retry.is_some_and(|s| (1..=60).contains(&s)), "{retry:?}");
            throttled_at = Some(n);
            break;
        }
        assert_eq!(status, 401);
    }
    // The budget refills at one a second: a slow machine gets one more per second the
    // failures took.
    let refilled = failing_since.elapsed().as_secs();
    assert!(
        throttled_at.is_some_and(|n| (61..=61 + refilled).contains(&n)),
        "the 61st failure in a minute is the last answered; the next attempt waits \
         (throttled at {throttled_at:?} after {refilled} s)"
    );

    // The same source is told to wait on share claims (with a session of its own)...
    let resp = flood
        .post(format!("{}/api/tokens/claim", hub.url))
        .bearer_auth(&alice.jwt)
        .json(&json!({"token": "adi_share_0000000000000000_x"}))
        .send()
        .await?;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));

    // ...and on enrolment: a registration with a setup token is refused, retryably.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind("127.0.0.3:0".parse()?)?;
    let stream = socket
        .connect(format!("127.0.0.1:{}", hub.port).parse()?)
        .await?;
    let url = format!("ws://127.0.0.1:{}/ws/cocoon", hub.port);
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await?;
    let token = alice.setup_token(60).await?;
    ws.send(Message::text(
        json!({"type": "register", "versions": [1], "secret": crate::wire::secret(),
               "name": "flooder", "setup_token": token})
        .to_string(),
    ))
    .await?;
    let mut ws = ws;
    let reply = {
        use futures_util::StreamExt;
        let msg = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await?;
        match msg {
            Some(Ok(Message::Text(t))) => serde_json::from_str::<Value>(&t)?,
            other => anyhow::bail!("no refusal: {other:?}"),
        }
    };
    assert_eq!(reply["code"], "too_many_requests", "{reply}");

    // Another source is not held back, and the setup token was not spent.
    let (status, _, _) = sign_in(&from(4)?, &hub, "adi_key_nonsense").await?;
    assert_eq!(status, 401);
    let mut ws = crate::wire::connect(&hub).await?;
    ws.send(Message::text(
        json!({"type": "register", "versions": [1], "secret": crate::wire::secret(),
               "name": "fine", "setup_token": token})
        .to_string(),
    ))
    .await?;
    let reply = crate::wire::next(&mut ws).await?;
    assert_eq!(reply["type"], "registered", "{reply}");
    Ok(())
}
