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
