//! The REST edge refuses every bad bearer: missing, malformed, wrongly signed,
//! `alg: none`, expired — with 401 and no data.

use anyhow::Result;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::harness::{cli, foreign_server, Api, Cocoon, Hub};

#[tokio::test]
async fn bad_bearers_get_401_and_no_data() -> Result<()> {
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let c = Cocoon::start(&hub.url, "laptop", Some(&alice.setup_token(60).await?), &[])?;
    let id = c.device_id().await?;
    let key = hub.jwt_key().await?;
    let now = adi_signaling::auth::unix_now();
    let (_, me) = alice.cocoon(&id).await?;
    let sub = me["owners"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    let sign = |claims: serde_json::Value, alg: Algorithm, key: &[u8]| {
        encode(&Header::new(alg), &claims, &EncodingKey::from_secret(key)).expect("encodes")
    };
    let valid_claims =
        json!({"sub": sub, "name": "alice", "iat": now, "exp": now + 600, "iss": "adi-hub"});
    // Sanity: a token we sign with the hub's key the same way is accepted...
    let good = sign(valid_claims.clone(), Algorithm::HS256, &key);
    let ok = Api {
        jwt: good,
        ..alice.clone()
    };
    assert_eq!(ok.get("/api/cocoons").await?.0, 200);

    // ...and every deviation is refused.
    let payload = URL_SAFE_NO_PAD.encode(valid_claims.to_string());
    let cases = vec![
        (
            "expired",
            sign(
                json!({"sub": sub, "name": "alice", "iat": now - 7200, "exp": now - 3600, "iss": "adi-hub"}),
                Algorithm::HS256,
                &key,
            ),
        ),
        (
            "wrong key",
            sign(
                valid_claims.clone(),
                Algorithm::HS256,
                b"not-the-hub-key-not-the-hub-key!",
            ),
        ),
        (
            "other algorithm",
            sign(valid_claims.clone(), Algorithm::HS512, &key),
        ),
        (
            "alg none",
            format!(
                "{}.{payload}.",
                URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#)
            ),
        ),
        (
            "foreign issuer",
            sign(
                json!({"sub": sub, "name": "alice", "iat": now, "exp": now + 600, "iss": "evil"}),
                Algorithm::HS256,
                &key,
            ),
        ),
        ("garbage", "not.a.jwt".to_owned()),
        ("empty", String::new()),
    ];
    for (what, jwt) in cases {
        let api = Api {
            jwt,
            ..alice.clone()
        };
        for path in ["/api/cocoons".to_owned(), format!("/api/cocoons/{id}")] {
            let (status, body) = api.get(&path).await?;
            assert_eq!(status, 401, "{what} on {path}: {body}");
            assert_eq!(body["error"]["code"], "unauthorized", "{what}: {body}");
            assert!(!body.to_string().contains(&id), "{what} leaked the device");
        }
    }
    let expired = sign(
        json!({"sub": sub, "name": "alice", "iat": now - 7200, "exp": now - 3600, "iss": "adi-hub"}),
        Algorithm::HS256,
        &key,
    );
    let (_, body) = Api {
        jwt: expired,
        ..alice.clone()
    }
    .get("/api/cocoons")
    .await?;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("expired"),
        "{body}"
    );

    // No header at all, and a non-bearer scheme.
    let http = reqwest::Client::new();
    let resp = http.get(format!("{}/api/cocoons", hub.url)).send().await?;
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let resp = http
        .get(format!("{}/api/cocoons", hub.url))
        .header("authorization", "Basic YWxpY2U6cGFzcw==")
        .send()
        .await?;
    assert_eq!(resp.status(), 401);

    // Bad API keys at the exchange.
    for key in [
        "",
        "adi_key_nope",
        "adi_key_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ] {
        let resp = http
            .post(format!("{}/api/auth/token", hub.url))
            .json(&json!({"api_key": key}))
            .send()
            .await?;
        assert_eq!(resp.status(), 401, "{key}");
    }
    let resp = http
        .post(format!("{}/api/auth/token", hub.url))
        .header("content-type", "application/json")
        .body("{broken")
        .send()
        .await?;
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await?;
    assert_eq!(body["error"]["code"], "bad_request");
    Ok(())
}

#[tokio::test]
async fn health_and_readiness_answer() -> Result<()> {
    let hub = Hub::start().await?;
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("{}/healthz", hub.url))
            .send()
            .await?
            .text()
            .await?,
        "ok"
    );
    assert_eq!(
        http.get(format!("{}/readyz", hub.url))
            .send()
            .await?
            .status(),
        200
    );
    let resp = http.get(format!("{}/api/nope", hub.url)).send().await?;
    assert_eq!(resp.status(), 404);
    Ok(())
}

#[tokio::test]
async fn adi_token_prints_a_bearer_the_api_takes() -> Result<()> {
    let hub = Hub::start().await?;
    let key = hub.add_user("alice")?;
    let cfg = tempfile::tempdir()?;
    let (code, _, err) = cli(
        cfg.path(),
        &["login", "--hub", &hub.url, "--api-key", &key],
        &[],
    )?;
    assert_eq!(code, 0, "{err}");
    let http = reqwest::Client::new();
    // From the stored session, and from ADI_HUB + ADI_API_KEY without one.
    let empty = tempfile::tempdir()?;
    for (dir, env) in [
        (cfg.path(), vec![]),
        (
            empty.path(),
            vec![("ADI_HUB", hub.url.as_str()), ("ADI_API_KEY", key.as_str())],
        ),
    ] {
        let (code, out, err) = cli(dir, &["token"], &env)?;
        assert_eq!(code, 0, "{err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "only the token: {out:?}");
        let resp = http
            .get(format!("{}/api/cocoons", hub.url))
            .bearer_auth(lines[0])
            .send()
            .await?;
        assert_eq!(resp.status(), 200, "{env:?}");
    }
    // Without a session it says how to get one.
    let (code, out, err) = cli(empty.path(), &["token", "--hub", &hub.url], &[])?;
    assert_ne!(code, 0);
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("adi login"), "{err}");
    Ok(())
}

#[tokio::test]
async fn the_key_exchange_says_how_to_send_the_key() -> Result<()> {
    let hub = Hub::start().await?;
    let key = hub.add_user("alice")?;
    let http = reqwest::Client::new();
    let wanted = r#"send Content-Type: application/json with {"api_key": "..."}"#;
    for route in ["/api/auth/token", "/api/auth/session"] {
        let url = format!("{}{route}", hub.url);
        for (what, request) in [
            // curl -d without -H, and a form post.
            (
                "no content type",
                http.post(&url).body(format!(r#"{{"api_key":"{key}"}}"#)),
            ),
            ("a form", http.post(&url).form(&[("api_key", key.as_str())])),
            ("no api_key", http.post(&url).json(&json!({"key": key}))),
            (
                "not JSON",
                http.post(&url)
                    .header("content-type", "application/json")
                    .body("{broken"),
            ),
        ] {
            let resp = request.send().await?;
            assert_eq!(resp.status(), 400, "{route}, {what}");
            let body: serde_json::Value = resp.json().await?;
            assert_eq!(
                body["error"]["code"], "bad_request",
                "{route}, {what}: {body}"
            );
            let message = body["error"]["message"].as_str().unwrap_or_default();
            assert!(message.contains(wanted), "{route}, {what}: {body}");
            assert!(!message.contains(&key), "the key is not echoed: {body}");
        }
    }
    Ok(())
}

// Several threads: the foreign server answers while the CLI runs and the test waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_to_a_server_that_is_not_an_adi_hub_says_so() -> Result<()> {
    let cfg = tempfile::tempdir()?;
    for status in [501, 404, 200] {
        let url = format!("http://127.0.0.1:{}", foreign_server(status).await?);
        let (code, _, err) = cli(
            cfg.path(),
            &["login", "--hub", &url, "--api-key", "adi_key_x_y"],
            &[],
        )?;
        assert_ne!(code, 0, "{status}");
        assert!(
            err.contains(&format!("{url} is not an adi hub"))
                && err.contains(&status.to_string())
                && err.contains("some other server"),
            "{status}: {err}"
        );
        assert!(!err.contains("adi_key_x_y"), "{err}");
    }
    Ok(())
}

#[tokio::test]
async fn logout_revokes_that_session_everywhere_and_across_a_restart() -> Result<()> {
    let data = tempfile::tempdir()?;
    let mut hub = Hub::start_in(data.path()).await?;
    let key = hub.add_user("alice")?;
    let cfg = tempfile::tempdir()?;
    let (code, _, err) = cli(
        cfg.path(),
        &["login", "--hub", &hub.url, "--api-key", &key],
        &[],
    )?;
    assert_eq!(code, 0, "{err}");
    let (code, jwt, err) = cli(cfg.path(), &["token"], &[])?;
    assert_eq!(code, 0, "{err}");
    let jwt = jwt.trim().to_owned();
    let other = Api::login(&hub.url, &key).await?;
    let http = reqwest::Client::new();
    let status = |url: String, jwt: String| {
        let http = http.clone();
        async move {
            let resp = http
                .get(format!("{url}/api/cocoons"))
                .bearer_auth(jwt)
                .send()
                .await?;
            let status = resp.status().as_u16();
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            anyhow::Ok((status, body))
        }
    };
    assert_eq!(status(hub.url.clone(), jwt.clone()).await?.0, 200);
    let mut open_socket = crate::wire::client(&hub, &jwt).await?;

    let (code, out, err) = cli(cfg.path(), &["logout"], &[])?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("revoked"), "{out}");
    assert!(
        !cfg.path().join("session.json").exists(),
        "the session is forgotten"
    );

    // The old token is refused on the REST API, the proxy and the client socket.
    let (code, body) = status(hub.url.clone(), jwt.clone()).await?;
    assert_eq!(code, 401);
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("signed out")),
        "{body}"
    );
    let proxied = http
        .get(format!("{}/proxy/anything/web/", hub.url))
        .bearer_auth(&jwt)
        .send()
        .await?;
    assert_eq!(proxied.status(), 401);
    assert!(crate::wire::client(&hub, &jwt).await.is_err());
    // A client socket opened before is closed, saying why.
    let closed = crate::wire::next(&mut open_socket).await?;
    assert_eq!(closed["close"], 1008, "{closed}");
    assert_eq!(closed["reason"], "session signed out", "{closed}");
    // Another session of the same user is not touched.
    assert_eq!(other.get("/api/cocoons").await?.0, 200);
    // Logging out again with nothing stored says so.
    let (code, out, _) = cli(cfg.path(), &["logout"], &[])?;
    assert_eq!(code, 0);
    assert!(out.contains("not logged in"), "{out}");

    // The revocation outlives the hub process.
    hub.proc.terminate().await?;
    let hub = Hub::start_in(data.path()).await?;
    assert_eq!(status(hub.url.clone(), jwt.clone()).await?.0, 401);
    assert_eq!(status(hub.url.clone(), other.jwt.clone()).await?.0, 200);
    Ok(())
}
