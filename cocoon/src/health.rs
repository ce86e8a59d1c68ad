//! Probes this device's services so owners see which are up before they open one.
//! A service with a health path is up when that path answers 2xx or 3xx; one without is
//! up when its port accepts a connection. Results live in a `watch` channel that every
//! heartbeat reads; probing never touches the hub's catalog. The services probed are
//! the device's live list, which plugin manifests can change while it runs.

use std::sync::Arc;
use std::time::Duration;

use adi_protocol::{HealthStatus, ServiceHealth, ServiceInfo};
use futures_util::future::join_all;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Starts probing every `every` the services `services` holds then; the channel holds
/// the latest results, all `Unknown` until the first round ends.
pub(crate) fn spawn(
    services: watch::Receiver<Arc<[ServiceInfo]>>,
    client: reqwest::Client,
    every: Duration,
    cancel: CancellationToken,
) -> watch::Receiver<Vec<ServiceHealth>> {
    let initial = services
        .borrow()
        .iter()
        .map(|s| ServiceHealth {
            name: s.name.clone(),
            status: HealthStatus::Unknown,
            detail: None,
        })
        .collect();
    let (tx, rx) = watch::channel(initial);
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticker.tick() => {}
            }
            // Cloned out, so the channel is not held across the probes.
            let now = services.borrow().clone();
            let round = join_all(now.iter().map(|s| probe(&client, s))).await;
            tx.send_if_modified(|current| {
                if *current == round {
                    false
                } else {
                    *current = round;
                    true
                }
            });
        }
    });
    rx
}

async fn probe(client: &reqwest::Client, service: &ServiceInfo) -> ServiceHealth {
    let (status, detail) = match &service.health_path {
        Some(path) => {
            let url = format!(
                "http://127.0.0.1:{}{}",
                service.port,
                adi_protocol::http::normalize_target(path)
            );
            match client.get(url).timeout(PROBE_TIMEOUT).send().await {
                Ok(r) if r.status().as_u16() < 400 => (HealthStatus::Up, None),
                Ok(r) => (
                    HealthStatus::Down,
                    Some(format!("health check answered {}", r.status())),
                ),
                Err(e) if e.is_timeout() => {
                    (HealthStatus::Down, Some("health check timed out".into()))
                }
                Err(_) => (
                    HealthStatus::Down,
                    Some(format!("nothing listens on 127.0.0.1:{}", service.port)),
                ),
            }
        }
        None => {
            let connect = tokio::net::TcpStream::connect(("127.0.0.1", service.port));
            match tokio::time::timeout(PROBE_TIMEOUT, connect).await {
                Ok(Ok(_)) => (HealthStatus::Up, None),
                Ok(Err(e)) => (
                    HealthStatus::Down,
                    Some(format!("127.0.0.1:{}: {e}", service.port)),
                ),
                Err(_) => (HealthStatus::Down, Some("connect timed out".into())),
            }
        }
    };
    ServiceHealth {
        name: service.name.clone(),
        status,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probes_tell_listening_healthy_and_dead_services_apart() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let up_port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = [0u8; 1024];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]);
                    let status = if req.starts_with("GET /ok") {
                        "200 OK"
                    } else {
                        "503 Service Unavailable"
                    };
                    let _ = s
                        .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes())
                        .await;
                });
            }
        });
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let dead_port = dead.local_addr().expect("addr").port();
        drop(dead);
        let client = crate::proxy::client();
        let svc = |name: &str, port, path: Option<&str>| ServiceInfo {
            name: name.into(),
            port,
            health_path: path.map(str::to_owned),
            kind: adi_protocol::ServiceKind::Http,
            models: Vec::new(),
        };
        let ok = probe(&client, &svc("ok", up_port, Some("/ok"))).await;
        assert_eq!(ok.status, HealthStatus::Up);
        let sick = probe(&client, &svc("sick", up_port, Some("/sick"))).await;
        assert_eq!(sick.status, HealthStatus::Down);
        assert!(sick.detail.unwrap_or_default().contains("503"));
        let tcp = probe(&client, &svc("tcp", up_port, None)).await;
        assert_eq!(tcp.status, HealthStatus::Up);
        let gone = probe(&client, &svc("gone", dead_port, None)).await;
        assert_eq!(gone.status, HealthStatus::Down);
    }
}
