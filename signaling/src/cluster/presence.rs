//! This hub's devices, published as changes; the other hubs' devices and beats,
//! followed. One task each: the publisher diffs the registry every [`TICK`] against
//! what it last said, so nothing on a device's hot path (registration, heartbeats)
//! touches NATS; the follower is the only writer of the cluster's maps.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use adi_protocol::{DeviceId, LoadReport};
use futures_util::StreamExt;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::{Cluster, ClusterError, HubId, Peer, Remote, BEAT, PEER_SILENCE};
use crate::registry::{ConnId, LiveDevice, Stop};
use crate::HubState;
use adi_protocol::cluster::{self as wire, Beat, Presence};

/// How often changes among this hub's devices are published.
pub const TICK: Duration = Duration::from_millis(200);
/// Devices, gone devices and loads per presence message, before the size check.
const CHUNK: usize = 256;
/// The NATS header carrying a message's signature.
const MAC_HEADER: &str = "Adi-Mac";
/// How long a hub waits for a whole list it asked for before asking again.
const RESYNC_RETRY: Duration = Duration::from_secs(2);

impl Cluster {
    fn subject(&self, what: &str) -> String {
        format!("{}.{what}", self.prefix)
    }
}

/// Subscribes, then spawns the publisher and the follower.
pub(super) fn start(
    cluster: Arc<Cluster>,
    state: Weak<HubState>,
    stop: CancellationToken,
) -> Result<(), ClusterError> {
    tokio::spawn(async move {
        let subscribed = async {
            let news = cluster
                .nats
                .subscribe(cluster.subject("*"))
                .await
                .map_err(|e| ClusterError::Subscribe(e.to_string()))?;
            let asks = cluster
                .nats
                .subscribe(cluster.subject(&format!("resync.{}", cluster.id)))
                .await
                .map_err(|e| ClusterError::Subscribe(e.to_string()))?;
            Ok::<_, ClusterError>((news, asks))
        };
        let (news, asks) = match subscribed.await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cluster: {e}; this hub runs without the others");
                return;
            }
        };
        tokio::spawn(follow(
            cluster.clone(),
            state.clone(),
            news,
            asks,
            stop.clone(),
        ));
        publish(cluster, state, stop).await;
    });
    Ok(())
}

/// What was last said of one device.
struct Said {
    conn_id: ConnId,
    description: u64,
    load: u64,
    /// The tick that last saw it connected.
    tick: u64,
}

async fn publish(cluster: Arc<Cluster>, state: Weak<HubState>, stop: CancellationToken) {
    let mut said: HashMap<DeviceId, Said> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_beat = Instant::now() - BEAT;
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let Some(state) = state.upgrade() else { break };
        n += 1;
        let messages = changes(&cluster, &state, &mut said, n);
        for message in messages {
            send(&cluster, "presence", &message).await;
        }
        if last_beat.elapsed() >= BEAT {
            last_beat = Instant::now();
            send(&cluster, "beat", &beat(&cluster, &state, false)).await;
        }
    }
    if let Some(state) = state.upgrade() {
        send(&cluster, "beat", &beat(&cluster, &state, true)).await;
    }
    let _ = cluster.nats.flush().await;
}

fn beat(cluster: &Cluster, state: &HubState, leaving: bool) -> Beat {
    Beat {
        hub: cluster.id,
        url: cluster.url.clone(),
        devices: u32::try_from(state.registry.len()).unwrap_or(u32::MAX),
        in_flight: cluster.in_flight(),
        started_at: cluster.started_at,
        draining: cluster.is_draining(),
        leaving,
        seq: cluster.seq.load(Ordering::Relaxed),
    }
}

async fn send<T: serde::Serialize>(cluster: &Cluster, what: &str, message: &T) {
    let Ok(bytes) = serde_json::to_vec(message) else {
        return;
    };
    publish_signed(cluster, cluster.subject(what), bytes).await;
}

/// Publishes `payload` on `subject`, signed with the hub key: whoever else can publish
/// on the NATS server cannot pass for a hub (and point users' requests at itself).
async fn publish_signed(cluster: &Cluster, subject: String, payload: Vec<u8>) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(MAC_HEADER, cluster.sign(&subject, &payload).as_str());
    if let Err(e) = cluster
        .nats
        .publish_with_headers(subject.clone(), headers, payload.into())
        .await
    {
        tracing::warn!("cluster: publishing on {subject} failed: {e}");
    }
}

/// Whether a message carries a valid signature of the hub key.
fn signed(cluster: &Cluster, m: &async_nats::Message) -> bool {
    let mac = m
        .headers
        .as_ref()
        .and_then(|h| h.get(MAC_HEADER))
        .map(|v| v.as_str().to_owned());
    let ok = mac.is_some_and(|mac| cluster.verify(m.subject.as_str(), &m.payload, &mac));
    if !ok {
        tracing::warn!(subject = %m.subject, "cluster: dropped a message not signed with the hub key");
    }
    ok
}

/// The presence messages that bring the other hubs up to date, numbered.
fn changes(
    cluster: &Cluster,
    state: &HubState,
    said: &mut HashMap<DeviceId, Said>,
    n: u64,
) -> Vec<Presence> {
    let reset = cluster.resync_asked.swap(false, Ordering::Relaxed);
    let window = state.registry.online_window();
    let mut up = Vec::new();
    let mut load = Vec::new();
    state.registry.each(|id, live| {
        let online = live.last_heartbeat.elapsed() <= window;
        let description = describe(live, online);
        let load_print = load_print(live.load.as_deref());
        match said.get_mut(id) {
            Some(s) if !reset && s.conn_id == live.conn_id && s.description == description => {
                s.tick = n;
                if s.load != load_print {
                    s.load = load_print;
                    if let Some(l) = &live.load {
                        load.push(wire::Load {
                            id: id.clone(),
                            load: (**l).clone(),
                        });
                    }
                }
            }
            _ => {
                said.insert(
                    id.clone(),
                    Said {
                        conn_id: live.conn_id,
                        description,
                        load: load_print,
                        tick: n,
                    },
                );
                up.push(device(id, live, online));
            }
        }
    });
    let down: Vec<DeviceId> = said
        .iter()
        .filter(|(_, s)| s.tick != n)
        .map(|(id, _)| id.clone())
        .collect();
    for id in &down {
        said.remove(id);
    }
    if !reset && up.is_empty() && down.is_empty() && load.is_empty() {
        return Vec::new();
    }
    let mut messages = Vec::new();
    let mut up = up.into_iter().peekable();
    let mut down = down.into_iter().peekable();
    let mut load = load.into_iter().peekable();
    let mut first = true;
    while first || up.peek().is_some() || down.peek().is_some() || load.peek().is_some() {
        let mut m = Presence {
            hub: cluster.id,
            seq: 0,
            reset: reset && first,
            up: up.by_ref().take(CHUNK).collect(),
            down: Vec::new(),
            load: Vec::new(),
        };
        let room = CHUNK.saturating_sub(m.up.len());
        m.down = down.by_ref().take(room).collect();
        let room = room.saturating_sub(m.down.len());
        m.load = load.by_ref().take(room).collect();
        first = false;
        messages.extend(fit(m));
    }
    for m in &mut messages {
        m.seq = cluster.seq.fetch_add(1, Ordering::Relaxed) + 1;
    }
    messages
}

/// Splits a message that would not fit in one NATS message.
fn fit(m: Presence) -> Vec<Presence> {
    let size = serde_json::to_vec(&m)
        .map(|b| b.len())
        .unwrap_or(usize::MAX);
    let items = m.up.len() + m.down.len() + m.load.len();
    if size <= wire::MAX_MESSAGE_BYTES || items <= 1 {
        if size > wire::MAX_MESSAGE_BYTES {
            tracing::warn!("cluster: a device's description is too large to share ({size} bytes)");
            return Vec::new();
        }
        return vec![m];
    }
    let mut second = Presence {
        hub: m.hub,
        seq: 0,
        reset: false,
        up: Vec::new(),
        down: Vec::new(),
        load: Vec::new(),
    };
    let mut first = m;
    if first.up.len() > 1 {
        second.up = first.up.split_off(first.up.len() / 2);
    } else if !first.up.is_empty() && (!first.down.is_empty() || !first.load.is_empty()) {
        second.down = std::mem::take(&mut first.down);
        second.load = std::mem::take(&mut first.load);
    } else if first.down.len() > 1 {
        second.down = first.down.split_off(first.down.len() / 2);
        second.load = std::mem::take(&mut first.load);
    } else {
        second.load = first.load.split_off(first.load.len() / 2);
    }
    let mut out = fit(first);
    out.extend(fit(second));
    out
}

fn device(id: &DeviceId, live: &LiveDevice, online: bool) -> wire::Device {
    wire::Device {
        id: id.clone(),
        since: live.connected_at,
        name: live.name.to_string(),
        members: live.members.to_vec(),
        owners: live.owners.to_vec(),
        capabilities: live.capabilities.to_vec(),
        services: live.services.to_vec(),
        health: live.health.clone(),
        online,
        draining: live.draining,
        load: live.load.as_deref().cloned(),
        agent: live.agent.instance,
    }
}

/// A digest of everything but the load: when it changes, the device is described again.
fn describe(live: &LiveDevice, online: bool) -> u64 {
    let mut h = DefaultHasher::new();
    live.name.hash(&mut h);
    live.members.hash(&mut h);
    live.owners.hash(&mut h);
    live.capabilities.hash(&mut h);
    live.services.hash(&mut h);
    for s in &live.health {
        s.name.hash(&mut h);
        std::mem::discriminant(&s.status).hash(&mut h);
        s.detail.hash(&mut h);
    }
    online.hash(&mut h);
    live.draining.hash(&mut h);
    h.finish()
}

/// A digest of the load, coarse enough that noise is not news: CPU in steps of 5 %,
/// RAM and VRAM in steps of 1 %, GPU utilisation in steps of 5 %.
fn load_print(load: Option<&LoadReport>) -> u64 {
    let Some(l) = load else { return 0 };
    let share = |used: u64, total: u64| used.saturating_mul(100) / total.max(1);
    let mut h = DefaultHasher::new();
    // A percentage in 0..=100, in steps of 5.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let cpu = (l.cpu_percent.clamp(0.0, 100.0) / 5.0) as u32;
    cpu.hash(&mut h);
    share(l.ram_used_bytes, l.ram_total_bytes).hash(&mut h);
    for g in &l.gpus {
        (g.utilization_percent / 5).hash(&mut h);
        share(g.memory_used_bytes, g.memory_total_bytes).hash(&mut h);
    }
    h.finish()
}

async fn follow(
    cluster: Arc<Cluster>,
    state: Weak<HubState>,
    mut news: async_nats::Subscriber,
    mut asks: async_nats::Subscriber,
    stop: CancellationToken,
) {
    let mut sweep = tokio::time::interval(Duration::from_millis(500));
    sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            Some(m) = asks.next() => {
                if signed(&cluster, &m) {
                    cluster.resync_asked.store(true, Ordering::Relaxed);
                }
            }
            m = news.next() => {
                let Some(m) = m else { return };
                let Some(state) = state.upgrade() else { return };
                if !signed(&cluster, &m) {
                    continue;
                }
                let what = m.subject.as_str().rsplit('.').next().unwrap_or_default();
                match what {
                    "beat" => match serde_json::from_slice::<Beat>(&m.payload) {
                        Ok(b) => on_beat(&cluster, b).await,
                        Err(e) => tracing::warn!("cluster: undecodable beat: {e}"),
                    },
                    "presence" => match serde_json::from_slice::<Presence>(&m.payload) {
                        Ok(p) => on_presence(&cluster, &state, p).await,
                        Err(e) => tracing::warn!("cluster: undecodable presence: {e}"),
                    },
                    _ => {}
                }
            }
            _ = sweep.tick() => sweep_peers(&cluster).await,
        }
    }
}

async fn ask_resync(cluster: &Cluster, hub: HubId) {
    publish_signed(
        cluster,
        cluster.subject(&format!("resync.{hub}")),
        Vec::new(),
    )
    .await;
}

async fn on_beat(cluster: &Cluster, b: Beat) {
    if b.hub == cluster.id {
        return;
    }
    if b.leaving {
        tracing::info!(hub = %b.hub, url = b.url, "cluster: a hub left");
        cluster.peers.remove(&b.hub);
        cluster.forget_hub(b.hub);
        return;
    }
    let ask = {
        let mut peer = cluster.peers.entry(b.hub).or_insert_with(|| {
            tracing::info!(hub = %b.hub, url = b.url, "cluster: a hub joined");
            Peer {
                url: Arc::from(b.url.as_str()),
                devices: 0,
                in_flight: 0,
                started_at: b.started_at,
                draining: false,
                last_seen: Instant::now(),
                seq: 0,
                resyncing: false,
                resync_asked_at: None,
            }
        });
        if *peer.url != *b.url {
            peer.url = Arc::from(b.url.as_str());
        }
        peer.devices = b.devices;
        peer.in_flight = b.in_flight;
        peer.draining = b.draining;
        peer.last_seen = Instant::now();
        let behind = b.seq != peer.seq && !peer.resyncing;
        if behind {
            peer.resyncing = true;
            peer.resync_asked_at = Some(Instant::now());
        }
        behind
    };
    if ask {
        ask_resync(cluster, b.hub).await;
    }
}

async fn on_presence(cluster: &Cluster, state: &HubState, p: Presence) {
    if p.hub == cluster.id {
        return;
    }
    let ask = {
        let Some(mut peer) = cluster.peers.get_mut(&p.hub) else {
            // Its beat comes within a second, and asks for the whole list.
            return;
        };
        let gap = !p.reset && p.seq != peer.seq + 1 && !peer.resyncing;
        if p.reset {
            peer.resyncing = false;
        } else if gap {
            peer.resyncing = true;
            peer.resync_asked_at = Some(Instant::now());
        }
        peer.seq = p.seq;
        gap
    };
    if p.reset {
        cluster.forget_hub(p.hub);
    }
    for d in p.up {
        take_up(cluster, state, p.hub, d);
    }
    for id in p.down {
        if cluster.remote.get(&id).is_some_and(|r| r.hub == p.hub) {
            cluster.forget(&id);
        }
    }
    for l in p.load {
        if let Some(mut r) = cluster.remote.get_mut(&l.id) {
            if r.hub == p.hub {
                // Guard order as the registry's: a device's entry, then its history
                // ring. Only noticeable changes arrive here, so a remote device's chart
                // is coarser than a local one's.
                state
                    .registry
                    .history()
                    .record(&l.id, &l.load, crate::history::now_ms());
                r.load = Some(Box::new(l.load));
            }
        }
    }
    if ask {
        ask_resync(cluster, p.hub).await;
    }
}

/// A device connected to hub `hub`: kept, unless a newer connection of it is known.
/// A newer one closes an older one held here.
fn take_up(cluster: &Cluster, state: &HubState, hub: HubId, d: wire::Device) {
    if let Some(local) = state.registry.connected_at(&d.id) {
        if (local, cluster.id) > (d.since, hub) {
            // Ours is newer: that hub closes its own when it hears of ours.
            return;
        }
        let ours = state.registry.agent(&d.id).and_then(|a| a.instance);
        match (ours, d.agent) {
            (Some(a), Some(b)) if a != b => {
                // Another agent process holds the device's secret (a copied data dir):
                // the older one is told to stop for good, as on one hub.
                tracing::warn!(device_id = %d.id, %hub, "cluster: a second agent with this device's secret connected to another hub; stopping the older one here");
                state.registry.stop(&d.id, Stop::Displaced(None));
            }
            _ => {
                tracing::info!(device_id = %d.id, %hub, "cluster: the device connected to another hub since; closing its older connection here");
                state.registry.stop(&d.id, Stop::Replaced);
            }
        }
    }
    let in_flight = match cluster.remote.get(&d.id) {
        Some(r) if r.hub != hub && (r.since, r.hub) > (d.since, hub) => return,
        Some(r) if r.hub == hub => r.in_flight.clone(),
        _ => Arc::new(AtomicU32::new(0)),
    };
    if let Some(load) = &d.load {
        state
            .registry
            .history()
            .record(&d.id, load, crate::history::now_ms());
    }
    cluster.put(
        d.id,
        Remote {
            hub,
            since: d.since,
            name: Arc::from(d.name.as_str()),
            members: Arc::from(d.members),
            owners: Arc::from(d.owners),
            capabilities: Arc::from(d.capabilities),
            services: Arc::from(d.services),
            health: d.health,
            online: d.online,
            draining: d.draining,
            load: d.load.map(Box::new),
            in_flight,
        },
    );
}

async fn sweep_peers(cluster: &Cluster) {
    let dead: Vec<(HubId, Arc<str>)> = cluster
        .peers
        .iter()
        .filter(|p| p.last_seen.elapsed() > PEER_SILENCE)
        .map(|p| (*p.key(), p.url.clone()))
        .collect();
    for (hub, url) in dead {
        tracing::warn!(%hub, url = %url, "cluster: a hub went silent; forgetting its devices");
        cluster.peers.remove(&hub);
        cluster.forget_hub(hub);
    }
    let stale: Vec<HubId> = cluster
        .peers
        .iter()
        .filter(|p| p.resyncing && p.last_seen.elapsed() < PEER_SILENCE)
        .map(|p| *p.key())
        .collect();
    // Asked, and the whole list has not come: ask again (a message may have been lost).
    for hub in stale {
        if let Some(mut p) = cluster.peers.get_mut(&hub) {
            if p.resync_asked_at
                .is_some_and(|t| t.elapsed() < RESYNC_RETRY)
            {
                continue;
            }
            p.resync_asked_at = Some(Instant::now());
        }
        ask_resync(cluster, hub).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adi_protocol::GpuReport;

    fn device(n: u8, services: usize) -> wire::Device {
        wire::Device {
            id: DeviceId::from_mac(&[n; 16]),
            since: 1,
            name: format!("device-{n}"),
            members: Vec::new(),
            owners: Vec::new(),
            capabilities: Vec::new(),
            services: (0..services)
                .map(|i| adi_protocol::ServiceInfo {
                    name: format!("service-{i:04}-{}", "x".repeat(200)),
                    port: 1000,
                    health_path: None,
                    kind: adi_protocol::ServiceKind::Http,
                    models: Vec::new(),
                })
                .collect(),
            health: Vec::new(),
            online: true,
            draining: false,
            load: None,
            agent: None,
        }
    }

    #[test]
    fn a_message_too_large_for_nats_is_split_and_nothing_is_lost() {
        // 40 devices of ~40 KiB each: about 1.6 MiB in all.
        let m = Presence {
            hub: uuid::Uuid::nil(),
            seq: 0,
            reset: true,
            up: (0..40).map(|n| device(n, 180)).collect(),
            down: vec![DeviceId::from_mac(&[200; 16])],
            load: Vec::new(),
        };
        let parts = fit(m);
        assert!(parts.len() >= 4, "{} parts", parts.len());
        for p in &parts {
            let size = serde_json::to_vec(p).expect("encodes").len();
            assert!(size <= wire::MAX_MESSAGE_BYTES, "{size} bytes");
        }
        assert_eq!(parts.iter().map(|p| p.up.len()).sum::<usize>(), 40);
        assert_eq!(parts.iter().map(|p| p.down.len()).sum::<usize>(), 1);
        // Only the first part resets what the other hubs knew.
        assert!(parts[0].reset && parts[1..].iter().all(|p| !p.reset));
        // One device alone too large to share is dropped, not sent broken.
        let huge = Presence {
            up: vec![device(1, 3000)],
            down: Vec::new(),
            ..parts[0].clone()
        };
        assert!(fit(huge).is_empty());
    }

    #[test]
    fn load_noise_is_not_news_but_a_real_change_is() {
        let load = |cpu: f32, vram: u64, util: u32| LoadReport {
            cpu_count: 8,
            cpu_percent: cpu,
            ram_total_bytes: 1000,
            ram_used_bytes: 500,
            gpus: vec![GpuReport {
                utilization_percent: util,
                memory_used_bytes: vram,
                memory_total_bytes: 1000,
                ..Default::default()
            }],
        };
        let base = load_print(Some(&load(11.0, 500, 40)));
        assert_eq!(base, load_print(Some(&load(12.0, 501, 41))), "noise");
        assert_ne!(base, load_print(Some(&load(30.0, 500, 40))), "CPU");
        assert_ne!(base, load_print(Some(&load(11.0, 600, 40))), "VRAM");
        assert_ne!(base, load_print(Some(&load(11.0, 500, 90))), "GPU busy");
        assert_ne!(base, load_print(None));
    }
}
