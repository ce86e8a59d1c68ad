//! The wire, spoken by hand: malformed, oversized and out-of-order frames, short
//! secrets, foreign versions, a second connection with the same secret, and a device
//! that goes silent. Every case ends in an error reply or a close with a reason, and
//! never disturbs other connections.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::harness::{Api, Hub, HEARTBEAT};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub fn secret() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..40)
        .map(|_| char::from(rng.gen_range(b'a'..=b'z')))
        .collect()
}

pub async fn connect(hub: &Hub) -> Result<Ws> {
    let url = format!("{}/ws/cocoon", hub.url.replacen("http", "ws", 1));
    Ok(tokio_tungstenite::connect_async(url).await?.0)
}

/// A client WebSocket (`/ws/client`) signed in with `jwt`.
pub async fn client(hub: &Hub, jwt: &str) -> Result<Ws> {
    let url = format!("{}/ws/client", hub.url.replacen("http", "ws", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    ws.send(Message::text(
        json!({"type": "auth", "token": jwt}).to_string(),
    ))
    .await?;
    let answer = next(&mut ws).await?;
    anyhow::ensure!(answer["type"] == "authenticated", "not signed in: {answer}");
    Ok(ws)
}

/// The next text frame as JSON, or the close frame as `{"close": code, "reason": ..}`.
pub async fn next(ws: &mut Ws) -> Result<Value> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .map_err(|_| anyhow!("no frame within 10 s"))?;
        match msg {
            None => bail!("connection ended without a close frame"),
            Some(Err(e)) => bail!("connection failed: {e}"),
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(&t)?),
            Some(Ok(Message::Close(f))) => {
                return Ok(match f {
                    Some(f) => json!({"close": u16::from(f.code), "reason": f.reason.to_string()}),
                    None => json!({"close": null}),
                })
            }
            Some(Ok(_)) => {}
        }
    }
}

async fn register(ws: &mut Ws, secret: &str, token: Option<&str>) -> Result<Value> {
    let mut frame = json!({"type": "register", "versions": [1], "secret": secret, "name": "raw"});
    if let Some(t) = token {
        frame["setup_token"] = json!(t);
    }
    ws.send(Message::text(frame.to_string())).await?;
    next(ws).await
}

async fn enrolled(hub: &Hub, api: &Api) -> Result<(Ws, String, String)> {
    let s = secret();
    let mut ws = connect(hub).await?;
    let reply = register(&mut ws, &s, Some(&api.setup_token(60).await?)).await?;
    assert_eq!(reply["type"], "registered", "{reply}");
    let id = reply["device_id"].as_str().unwrap_or_default().to_owned();
    Ok((ws, s, id))
}

#[tokio::test]
async fn malformed_frames_get_errors_and_the_connection_survives() -> Result<()> {
    let hub = Hub::start().await?;
    let api = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let (mut ws, _, id) = enrolled(&hub, &api).await?;
    assert_eq!(
        {
            let r = next_after(&mut ws, Message::text("{not json")).await?;
            r["code"].clone()
        },
        "bad_request"
    );
    for bad in [
        Message::text(r#"{"type":"teleport"}"#),
        Message::text(r#"{"type":"heartbeat","seq":"NaN"}"#),
        Message::text("null"),
        Message::binary(vec![0xff, 0xfe, 0x00, 0x01]),
        Message::text(r#"{"type":"register","versions":[1],"secret":"x","name":"again"}"#),
    ] {
        let reply = next_after(&mut ws, bad).await?;
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["code"], "bad_request", "{reply}");
    }
    // Still registered and heartbeating.
    ws.send(Message::text(r#"{"type":"heartbeat","seq":1}"#))
        .await?;
    let (_, view) = api.cocoon(&id).await?;
    assert_eq!(view["online"], true);
    Ok(())
}

async fn next_after(ws: &mut Ws, msg: Message) -> Result<Value> {
    ws.send(msg).await?;
    next(ws).await
}

#[tokio::test]
async fn oversized_frame_closes_only_that_connection() -> Result<()> {
    let hub = Hub::start().await?;
    let api = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let (mut big, _, big_id) = enrolled(&hub, &api).await?;
    let (mut other, _, other_id) = enrolled(&hub, &api).await?;
    let huge = format!(
        r#"{{"type":"heartbeat","pad":"{}"}}"#,
        "x".repeat(200 * 1024)
    );
    let _ = big.send(Message::text(huge)).await;
    let reply = next(&mut big).await?;
    assert_eq!(reply["close"], u16::from(CloseCode::Size), "{reply}");
    assert!(
        reply["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("limit"),
        "{reply}"
    );
    api.wait_online(&big_id, false, Duration::from_secs(5))
        .await?;
    // The neighbour is untouched.
    other
        .send(Message::text(r#"{"type":"heartbeat","seq":1}"#))
        .await?;
    let (_, view) = api.cocoon(&other_id).await?;
    assert_eq!(view["online"], true);
    let reply = next_after(&mut other, Message::text("{}")).await?;
    assert_eq!(reply["type"], "error");
    Ok(())
}

#[tokio::test]
async fn registration_refusals_close_with_a_reason() -> Result<()> {
    let hub = Hub::start().await?;
    let api = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let token = api.setup_token(60).await?;

    // First frame must be a registration.
    let mut ws = connect(&hub).await?;
    let reply = next_after(&mut ws, Message::text(r#"{"type":"heartbeat"}"#)).await?;
    assert_eq!(reply["code"], "bad_request");
    assert_eq!(next(&mut ws).await?["close"], u16::from(CloseCode::Policy));

    // Garbage first frame.
    let mut ws = connect(&hub).await?;
    let reply = next_after(&mut ws, Message::text("\u{0}garbage")).await?;
    assert_eq!(reply["code"], "bad_request");

    // Short secret.
    let mut ws = connect(&hub).await?;
    let reply = register(&mut ws, "too-short", Some(&token)).await?;
    assert_eq!(reply["code"], "bad_request");
    assert!(
        reply["message"]
            .as_str()
            .unwrap_or_default()
            .contains("at least 32"),
        "{reply}"
    );
    let close = next(&mut ws).await?;
    assert_eq!(close["reason"], "bad_request", "{close}");

    // No common version.
    let mut ws = connect(&hub).await?;
    let frame =
        json!({"type":"register","versions":[99],"secret":secret(),"name":"x","setup_token":token});
    let reply = next_after(&mut ws, Message::text(frame.to_string())).await?;
    assert_eq!(reply["code"], "unsupported_version");

    // None of these consumed the token or created a device.
    assert!(api.cocoons().await?.is_empty());
    let (_ws, _, _) = {
        let s = secret();
        let mut ws = connect(&hub).await?;
        let reply = register(&mut ws, &s, Some(&token)).await?;
        assert_eq!(reply["type"], "registered", "token still usable: {reply}");
        (ws, s, ())
    };
    Ok(())
}

#[tokio::test]
async fn second_connection_replaces_the_first_and_the_late_close_is_harmless() -> Result<()> {
    let hub = Hub::start().await?;
    let api = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let (mut first, secret, id) = enrolled(&hub, &api).await?;

    let mut second = connect(&hub).await?;
    let reply = register(&mut second, &secret, None).await?;
    assert_eq!(reply["type"], "registered");
    assert_eq!(reply["device_id"], id.as_str(), "same secret, same device");
    let closed = next(&mut first).await?;
    assert!(
        closed["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("replaced"),
        "{closed}"
    );
    drop(first);

    // The old connection is gone; the device stays online on the new one.
    for seq in 0..4 {
        second
            .send(Message::text(
                json!({"type":"heartbeat","seq":seq}).to_string(),
            ))
            .await?;
        tokio::time::sleep(HEARTBEAT / 2).await;
        let (_, view) = api.cocoon(&id).await?;
        assert_eq!(
            view["online"], true,
            "late close of the old connection must not evict"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_silent_device_goes_offline_and_is_disconnected() -> Result<()> {
    let hub = Hub::start().await?;
    let api = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let (mut ws, _, id) = enrolled(&hub, &api).await?;
    // No heartbeats, no close: the socket stays open but says nothing.
    api.wait_online(&id, false, HEARTBEAT * 4).await?;
    let close = next(&mut ws).await?;
    assert!(
        close["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("heartbeat"),
        "{close}"
    );
    Ok(())
}

/// The head of the next whole-body binary frame, as JSON.
async fn next_whole_head(ws: &mut Ws) -> Result<Value> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .map_err(|_| anyhow!("no frame within 10 s"))?;
        match msg {
            Some(Ok(Message::Binary(b))) if b.len() >= 9 && b[0] == 5 => {
                let n = u32::from_be_bytes([b[5], b[6], b[7], b[8]]) as usize;
                return Ok(serde_json::from_slice(&b[9..9 + n])?);
            }
            Some(Ok(_)) => {}
            other => bail!("no whole-body frame: {other:?}"),
        }
    }
}

/// A hand-driven device with one registered service, answering proxied requests with
/// whole-body frames: a good one reaches the client as sent, a malformed head is a 502,
/// a frame whose head length lies is refused as a bad frame, and the device stays.
#[tokio::test]
async fn whole_body_answers_pass_and_malformed_ones_fail_alone() -> Result<()> {
    let hub = Hub::start().await?;
    let api = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let s = secret();
    let mut ws = connect(&hub).await?;
    let frame = json!({"type": "register", "versions": [1], "secret": s, "name": "raw",
        "setup_token": api.setup_token(60).await?,
        "services": [{"name": "web", "port": 9}]});
    ws.send(Message::text(frame.to_string())).await?;
    let reply = next(&mut ws).await?;
    let id = reply["device_id"].as_str().unwrap_or_default().to_owned();
    ws.send(Message::text(r#"{"type":"heartbeat","seq":1}"#))
        .await?;
    let whole = |stream: u32, head: &[u8], body: &[u8]| {
        let mut f = vec![5u8];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(&(head.len() as u32).to_be_bytes());
        f.extend_from_slice(head);
        f.extend_from_slice(body);
        Message::binary(f)
    };
    let url = format!("{}/proxy/{id}/web/hello?x=1", api.base);
    for case in ["good", "bad head"] {
        let get = api.http.get(&url).bearer_auth(&api.jwt).send();
        let device = async {
            let req = next_whole_head(&mut ws).await?;
            assert_eq!(req["target"], "/hello?x=1");
            assert_eq!(req["empty_body"], true, "a GET says it has no body");
            assert_eq!(req["method"], "GET");
            let stream = req["stream_id"].as_u64().unwrap_or_default() as u32;
            let head = if case == "good" {
                br#"{"status":203,"headers":[["content-type","text/plain"],["x-from","raw"]]}"#
                    .to_vec()
            } else {
                b"{not a head".to_vec()
            };
            ws.send(whole(stream, &head, b"\x00binary\xffbody")).await?;
            anyhow::Ok(())
        };
        let (resp, sent) = tokio::join!(get, device);
        sent?;
        let resp = resp?;
        if case == "good" {
            assert_eq!(resp.status().as_u16(), 203);
            assert_eq!(resp.headers()["x-from"], "raw");
            assert_eq!(&resp.bytes().await?[..], b"\x00binary\xffbody");
        } else {
            assert_eq!(
                resp.status().as_u16(),
                502,
                "a malformed head is the device's fault"
            );
            let body: Value = resp.json().await?;
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("malformed"),
                "{body}"
            );
        }
    }
    // A head length past the frame's end is a bad frame, answered on the link.
    let lying = {
        let mut f = vec![5u8, 0, 0, 0, 1];
        f.extend_from_slice(&1000u32.to_be_bytes());
        f.extend_from_slice(b"short");
        Message::binary(f)
    };
    let reply = next_after(&mut ws, lying).await?;
    assert_eq!(reply["code"], "bad_request", "{reply}");
    let (_, view) = api.cocoon(&id).await?;
    assert_eq!(view["online"], true, "the device stays connected");
    Ok(())
}

/// A device enrolled with `extra` fields in its registration (capabilities, say).
async fn enrolled_with(hub: &Hub, api: &Api, extra: Value) -> Result<(Ws, String)> {
    let mut ws = connect(hub).await?;
    let mut frame = json!({
        "type": "register", "versions": [1], "secret": secret(), "name": "raw",
        "setup_token": api.setup_token(60).await?,
    });
    if let (Some(f), Some(e)) = (frame.as_object_mut(), extra.as_object()) {
        f.extend(e.clone());
    }
    ws.send(Message::text(frame.to_string())).await?;
    let reply = next(&mut ws).await?;
    assert_eq!(reply["type"], "registered", "{reply}");
    let id = reply["device_id"].as_str().unwrap_or_default().to_owned();
    Ok((ws, id))
}

fn ask_frame(request_id: u64, prefer: &str, deadline_ms: u64, payload: Value) -> Message {
    Message::text(
        json!({
            "type": "capability_request", "request_id": request_id,
            "capability": {"protocol": "hold", "version": "1.0.0"},
            "payload": payload, "prefer_device": prefer, "deadline_ms": deadline_ms,
        })
        .to_string(),
    )
}

/// The next capability request the hub sends this serving device: its id and payload.
async fn held(ws: &mut Ws) -> Result<(u64, Value)> {
    loop {
        let frame = next(ws).await?;
        if frame["type"] == "request" && frame["op"] == "capability" {
            let id = frame["request_id"].as_u64().unwrap_or_default();
            return Ok((id, frame["payload"].clone()));
        }
    }
}

fn answer_frame(request_id: u64, payload: Value) -> Message {
    Message::text(
        json!({
            "type": "response", "request_id": request_id,
            "ok": {"kind": "capability", "payload": payload},
        })
        .to_string(),
    )
}

/// The cocoon-to-cocoon path, spoken by hand: whatever the serving device does (sits on
/// a request, answers too late, vanishes), each request the asking device makes ends
/// exactly once, by its deadline, and a late answer is never taken for another request.
#[tokio::test]
async fn a_device_request_ends_exactly_once_by_its_deadline() -> Result<()> {
    let hub = Hub::start().await?;
    let api = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let offer =
        json!({"capabilities": [{"protocol": "hold", "version": "1.0.0", "idempotent": true}]});
    let (mut asker, _) = enrolled_with(&hub, &api, json!({})).await?;
    let (mut s1, s1_id) = enrolled_with(&hub, &api, offer.clone()).await?;
    let (mut s2, s2_id) = enrolled_with(&hub, &api, offer).await?;

    // S1 sits on the request: the asker hears `timeout` at the deadline.
    asker
        .send(ask_frame(1, &s1_id, 300, json!({"n": 1})))
        .await?;
    let (first, payload) = held(&mut s1).await?;
    assert_eq!(payload, json!({"n": 1}));
    let reply = next(&mut asker).await?;
    assert_eq!(
        (&reply["type"], reply["request_id"].as_u64()),
        (&json!("capability_response"), Some(1)),
        "{reply}"
    );
    assert_eq!(reply["error"]["code"], "timeout", "{reply}");

    // The id, used again; S1's late answer to the first request arrives before its
    // answer to the second, and only the second reaches the asker.
    asker
        .send(ask_frame(1, &s1_id, 10_000, json!({"n": 2})))
        .await?;
    let (second, _) = held(&mut s1).await?;
    s1.send(answer_frame(first, json!({"late": true}))).await?;
    s1.send(answer_frame(second, json!({"n": 2}))).await?;
    let reply = next(&mut asker).await?;
    assert_eq!(reply["request_id"], 1, "{reply}");
    assert_eq!(reply["ok"]["payload"], json!({"n": 2}), "{reply}");
    assert_eq!(reply["ok"]["from_device"], json!(s1_id), "{reply}");

    // An id still open is refused, and the open request goes on.
    asker
        .send(ask_frame(7, &s1_id, 10_000, json!({"n": 7})))
        .await?;
    held(&mut s1).await?;
    asker
        .send(ask_frame(7, &s1_id, 10_000, json!({"n": 8})))
        .await?;
    let reply = next(&mut asker).await?;
    assert_eq!(reply["request_id"], 7, "{reply}");
    assert_eq!(reply["error"]["code"], "bad_request", "{reply}");

    // S1 vanishes holding it: the offer is idempotent, so S2 gets it and answers.
    drop(s1);
    let (on_s2, payload) = held(&mut s2).await?;
    assert_eq!(
        payload,
        json!({"n": 7}),
        "the first request, not the refused one"
    );
    s2.send(answer_frame(on_s2, json!({"by": "s2"}))).await?;
    let reply = next(&mut asker).await?;
    assert_eq!(reply["request_id"], 7, "{reply}");
    assert_eq!(reply["ok"]["from_device"], json!(s2_id), "{reply}");
    assert_eq!(reply["ok"]["payload"], json!({"by": "s2"}), "{reply}");

    // A user's request that S2 sits on ends with 504 at its deadline.
    let (status, body) = api
        .post(
            "/api/capabilities/hold/request",
            json!({"payload": {}, "prefer_device": s2_id, "timeout_ms": 300}),
        )
        .await?;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["code"], "timeout", "{body}");
    held(&mut s2).await?;
    Ok(())
}

/// A text frame whose payload is not UTF-8, which no conforming client sends.
fn invalid_utf8_text() -> Message {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    Message::Frame(Frame::message(
        vec![b'{', 0xff, 0xfe, b'}'],
        OpCode::Data(Data::Text),
        true,
    ))
}

fn huge_text() -> Message {
    Message::text(format!(
        r#"{{"type":"auth","pad":"{}"}}"#,
        "x".repeat(300 * 1024)
    ))
}

/// Sends `frame` and returns the close code the hub answers with.
async fn close_code_after(mut ws: Ws, frame: Message) -> Result<u16> {
    let _ = ws.send(frame).await;
    loop {
        let reply = next(&mut ws).await?;
        if let Some(code) = reply.get("close") {
            return code
                .as_u64()
                .and_then(|c| u16::try_from(c).ok())
                .ok_or_else(|| anyhow!("a close without a code: {reply}"));
        }
    }
}

#[tokio::test]
async fn every_socket_closes_with_a_code_for_an_oversized_or_broken_frame() -> Result<()> {
    let hub = Hub::start().await?;
    let api = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let size = u16::from(CloseCode::Size);
    let invalid = u16::from(CloseCode::Invalid);
    let client_url = format!("{}/ws/client", hub.url.replacen("http", "ws", 1));
    let unsigned_client = || async {
        Ok::<_, anyhow::Error>(
            tokio_tungstenite::connect_async(client_url.clone())
                .await?
                .0,
        )
    };

    // A device socket before it registers.
    assert_eq!(
        close_code_after(connect(&hub).await?, huge_text()).await?,
        size
    );
    assert_eq!(
        close_code_after(connect(&hub).await?, invalid_utf8_text()).await?,
        invalid
    );
    // ...and after.
    let (ws, _, _) = enrolled(&hub, &api).await?;
    assert_eq!(close_code_after(ws, invalid_utf8_text()).await?, invalid);

    // A client socket before it signs in, and after.
    assert_eq!(
        close_code_after(unsigned_client().await?, huge_text()).await?,
        size
    );
    assert_eq!(
        close_code_after(unsigned_client().await?, invalid_utf8_text()).await?,
        invalid
    );
    assert_eq!(
        close_code_after(client(&hub, &api.jwt).await?, huge_text()).await?,
        size
    );
    assert_eq!(
        close_code_after(client(&hub, &api.jwt).await?, invalid_utf8_text()).await?,
        invalid
    );
    // A broken frame ends its own socket only: the device stays online.
    let (mut device, _, id) = enrolled(&hub, &api).await?;
    let _ = close_code_after(client(&hub, &api.jwt).await?, huge_text()).await?;
    device
        .send(Message::text(r#"{"type":"heartbeat","seq":1}"#))
        .await?;
    let (_, view) = api.cocoon(&id).await?;
    assert_eq!(view["online"], true);
    Ok(())
}

#[tokio::test]
async fn a_client_socket_closes_when_its_session_ends() -> Result<()> {
    let hub = Hub::start().await?;
    let api = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    // A session the hub would have issued, ending two seconds from now.
    let claims: Value = {
        let mut parts = api.jwt.split('.');
        let body = parts.nth(1).ok_or_else(|| anyhow!("not a JWT"))?;
        use base64::Engine as _;
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(body)?)?
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let mut short = claims.clone();
    short["exp"] = json!(now + 2);
    let jwt = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &short,
        &jsonwebtoken::EncodingKey::from_secret(&hub.jwt_key().await?),
    )?;
    let mut ws = client(&hub, &jwt).await?;
    let reply = loop {
        let reply = tokio::time::timeout(Duration::from_secs(15), next(&mut ws)).await??;
        if reply.get("close").is_some() {
            break reply;
        }
    };
    assert_eq!(reply["close"], u16::from(CloseCode::Policy), "{reply}");
    assert_eq!(reply["reason"], "session expired", "{reply}");
    Ok(())
}
