//! The live registry: which devices are connected right now, through which connection,
//! and when each last sent a heartbeat. RAM only (`DashMap`), rebuilt from heartbeats
//! after a restart; it must never write to the catalog.
//!
//! A device that reconnects replaces its old entry; the old connection is cancelled and,
//! because removal compares connection ids, its late exit cannot evict the new one.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use adi_protocol::{
    CapabilityOffer, CapabilityQuery, DeviceId, LoadReport, ServiceHealth, ServiceInfo,
};
use dashmap::DashMap;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::catalog::UserId;
use crate::rpc::Command;

/// Identifies one WebSocket connection, so a stale one can be told from its successor.
pub type ConnId = u64;

/// A cheap handle to a connection's actor.
#[derive(Clone, Debug)]
pub struct ConnHandle {
    /// Requests for the device. Bounded: a full queue means the device is not keeping
    /// up, and callers get `Busy` rather than growing the hub's memory.
    pub outbound: mpsc::Sender<Command>,
    /// Ends the connection's actor.
    pub cancel: CancellationToken,
}

/// One connected device.
#[derive(Debug)]
pub struct LiveDevice {
    /// Which connection this entry belongs to.
    pub conn_id: ConnId,
    /// Handle to the connection's actor.
    pub handle: ConnHandle,
    /// When the last heartbeat (or the registration) arrived.
    pub last_heartbeat: Instant,
    /// When this connection registered.
    pub connected_at: Instant,
    /// Service health from the latest heartbeat that carried any.
    pub health: Vec<ServiceHealth>,
    /// Load from the latest heartbeat that carried it (boxed: most of the registry's
    /// entries are idle devices, and the entry should stay small).
    pub load: Option<Box<LoadReport>>,
    /// Who may use the device, copied from the catalog at registration and on every
    /// claim, so routing never reads the catalog.
    pub owners: Arc<[UserId]>,
    /// What the device serves now.
    pub capabilities: Arc<[CapabilityOffer]>,
    /// Its loopback services, so the proxy checks a request without the catalog.
    pub services: Arc<[ServiceInfo]>,
    /// Capability requests this hub has sent the device and not yet seen answered.
    pub in_flight: Arc<AtomicU32>,
}

/// What routing needs of a device, fixed at registration and changed by messages.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Users who own the device.
    pub owners: Arc<[UserId]>,
    /// What it serves.
    pub capabilities: Arc<[CapabilityOffer]>,
    /// Its loopback services.
    pub services: Arc<[ServiceInfo]>,
}

/// What the proxy needs of a connected device, read from RAM.
#[derive(Debug, Clone)]
pub struct Access {
    /// Who owns it.
    pub owners: Arc<[UserId]>,
    /// Its services.
    pub services: Arc<[ServiceInfo]>,
    /// Whether it is online by heartbeat age.
    pub online: bool,
}

/// An online device that can serve a query, as routing sees it at one instant.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The device.
    pub id: DeviceId,
    /// Its connection.
    pub handle: ConnHandle,
    /// Its offer that matches the query (the newest, if it has several).
    pub offer: CapabilityOffer,
    /// Capability requests in flight to it.
    pub in_flight: Arc<AtomicU32>,
    /// Its load share in [0, 1) from its last report ([`crate::routing::load_share`]).
    pub load_share: f64,
    /// Its owners.
    pub owners: Arc<[UserId]>,
}

/// What the registry says of a device at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Presence {
    /// Connected and heard from within the online window.
    pub online: bool,
    /// Age of the last heartbeat, if the device is connected.
    pub last_heartbeat_age: Option<Duration>,
}

/// All live connections of this hub.
pub struct Registry {
    devices: DashMap<DeviceId, LiveDevice>,
    /// Devices by the protocols they offer, so routing looks only at devices that can
    /// serve. A superset at worst: every id found here is checked against `devices`.
    by_protocol: DashMap<String, Vec<DeviceId>>,
    next_conn: AtomicU64,
    heartbeat_interval: Duration,
}

impl Registry {
    /// An empty registry for devices heartbeating every `heartbeat_interval`.
    pub fn new(heartbeat_interval: Duration) -> Self {
        Registry {
            devices: DashMap::new(),
            by_protocol: DashMap::new(),
            next_conn: AtomicU64::new(1),
            heartbeat_interval,
        }
    }

    /// A fresh connection id.
    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// How long a device may stay silent and still count as online: one missed
    /// heartbeat is jitter, two mean it is gone.
    pub fn online_window(&self) -> Duration {
        self.heartbeat_interval * 2
    }

    /// Records a newly registered connection; cancels the one it replaces, if any.
    pub fn insert(&self, id: DeviceId, conn_id: ConnId, handle: ConnHandle, routing: Routing) {
        let now = Instant::now();
        self.index(&id, &routing.capabilities);
        let old = self.devices.insert(
            id.clone(),
            LiveDevice {
                conn_id,
                handle,
                last_heartbeat: now,
                connected_at: now,
                health: Vec::new(),
                load: None,
                owners: routing.owners,
                capabilities: routing.capabilities,
                services: routing.services,
                in_flight: Arc::new(AtomicU32::new(0)),
            },
        );
        if let Some(old) = old {
            old.handle.cancel.cancel();
            self.unindex_gone(&id, &old.capabilities);
        }
    }

    fn index(&self, id: &DeviceId, offers: &[CapabilityOffer]) {
        for offer in offers {
            let mut ids = self.by_protocol.entry(offer.protocol.clone()).or_default();
            if !ids.contains(id) {
                ids.push(id.clone());
            }
        }
    }

    /// Drops `id` from the index of each protocol in `offers` that its current entry (if
    /// any) no longer offers.
    fn unindex_gone(&self, id: &DeviceId, offers: &[CapabilityOffer]) {
        for offer in offers {
            let still = self.devices.get(id).is_some_and(|live| {
                live.capabilities
                    .iter()
                    .any(|o| o.protocol == offer.protocol)
            });
            if still {
                continue;
            }
            if let Some(mut ids) = self.by_protocol.get_mut(&offer.protocol) {
                ids.retain(|d| d != id);
            }
            self.by_protocol
                .remove_if(&offer.protocol, |_, ids| ids.is_empty());
            // A new connection of the device may have registered meanwhile: put its
            // protocols back, so the index never misses a live device.
            if let Some(live) = self.devices.get(id).map(|l| l.capabilities.clone()) {
                self.index(id, &live);
            }
        }
    }

    /// Notes a heartbeat from `conn_id` with the service health (kept only when it
    /// changed) and load it carried; false if that connection is no longer current.
    pub fn heartbeat(
        &self,
        id: &DeviceId,
        conn_id: ConnId,
        health: Vec<ServiceHealth>,
        load: Option<LoadReport>,
    ) -> bool {
        match self.devices.get_mut(id) {
            Some(mut live) if live.conn_id == conn_id => {
                live.last_heartbeat = Instant::now();
                if !health.is_empty() && live.health != health {
                    live.health = health;
                }
                if let Some(load) = load {
                    live.load = Some(Box::new(load));
                }
                true
            }
            _ => false,
        }
    }

    /// Replaces what the device serves, if `conn_id` is still its connection.
    pub fn set_capabilities(
        &self,
        id: &DeviceId,
        conn_id: ConnId,
        capabilities: Arc<[CapabilityOffer]>,
    ) -> bool {
        self.index(id, &capabilities);
        let old = match self.devices.get_mut(id) {
            Some(mut live) if live.conn_id == conn_id => {
                std::mem::replace(&mut live.capabilities, capabilities)
            }
            _ => return false,
        };
        self.unindex_gone(id, &old);
        true
    }

    /// Replaces the device's services, if `conn_id` is still its connection.
    pub fn set_services(&self, id: &DeviceId, conn_id: ConnId, services: Arc<[ServiceInfo]>) {
        if let Some(mut live) = self.devices.get_mut(id) {
            if live.conn_id == conn_id {
                live.services = services;
            }
        }
    }

    /// Owners, services and presence of a connected device; `None` when it is not.
    pub fn access(&self, id: &DeviceId) -> Option<Access> {
        self.devices.get(id).map(|live| Access {
            owners: live.owners.clone(),
            services: live.services.clone(),
            online: live.last_heartbeat.elapsed() <= self.online_window(),
        })
    }

    /// Adds a co-owner to a connected device, so a claim takes effect without a
    /// reconnect.
    pub fn add_owner(&self, id: &DeviceId, user: UserId) {
        if let Some(mut live) = self.devices.get_mut(id) {
            if !live.owners.contains(&user) {
                let mut owners = live.owners.to_vec();
                owners.push(user);
                live.owners = owners.into();
            }
        }
    }

    /// The owners of a connected device.
    pub fn owners(&self, id: &DeviceId) -> Option<Arc<[UserId]>> {
        self.devices.get(id).map(|live| live.owners.clone())
    }

    /// Capability requests in flight to a connected device.
    pub fn in_flight(&self, id: &DeviceId) -> Option<u32> {
        self.devices
            .get(id)
            .map(|live| live.in_flight.load(Ordering::Relaxed))
    }

    /// What a connected device serves now.
    pub fn capabilities(&self, id: &DeviceId) -> Option<Arc<[CapabilityOffer]>> {
        self.devices.get(id).map(|live| live.capabilities.clone())
    }

    /// Every online device with an offer that serves `query` and whose owners pass
    /// `may_use`. Reads RAM only, and only devices that offer the protocol; each entry
    /// is cloned out, so no guard outlives the call.
    pub fn candidates(
        &self,
        query: &CapabilityQuery,
        may_use: impl Fn(&[UserId]) -> bool,
    ) -> Vec<Candidate> {
        let ids = match self.by_protocol.get(&query.protocol) {
            Some(ids) => ids.clone(),
            None => return Vec::new(),
        };
        let now = Instant::now();
        ids.iter()
            .filter_map(|id| {
                let e = self.devices.get(id)?;
                self.candidate_of(id, &e, query, now)
                    .filter(|c| may_use(&c.owners))
            })
            .collect()
    }

    /// The candidate view of one online device, whatever its owners, if it serves `query`.
    pub fn candidate(&self, id: &DeviceId, query: &CapabilityQuery) -> Option<Candidate> {
        let e = self.devices.get(id)?;
        self.candidate_of(id, &e, query, Instant::now())
    }

    fn candidate_of(
        &self,
        id: &DeviceId,
        e: &LiveDevice,
        query: &CapabilityQuery,
        now: Instant,
    ) -> Option<Candidate> {
        if now.saturating_duration_since(e.last_heartbeat) > self.online_window() {
            return None;
        }
        let offer = best_offer(&e.capabilities, query)?;
        Some(Candidate {
            id: id.clone(),
            handle: e.handle.clone(),
            offer,
            in_flight: e.in_flight.clone(),
            load_share: crate::routing::load_share(e.load.as_deref()),
            owners: e.owners.clone(),
        })
    }

    /// The device's load as last reported, if it is connected and reported any.
    pub fn load(&self, id: &DeviceId) -> Option<LoadReport> {
        self.devices
            .get(id)
            .and_then(|live| live.load.as_deref().cloned())
    }

    /// The device's service health as last reported; empty when offline or unknown.
    pub fn service_health(&self, id: &DeviceId) -> Vec<ServiceHealth> {
        self.devices
            .get(id)
            .map(|live| live.health.clone())
            .unwrap_or_default()
    }

    /// Removes the entry only if it still belongs to `conn_id`.
    pub fn remove(&self, id: &DeviceId, conn_id: ConnId) -> bool {
        match self
            .devices
            .remove_if(id, |_, live| live.conn_id == conn_id)
        {
            Some((_, gone)) => {
                self.unindex_gone(id, &gone.capabilities);
                true
            }
            None => false,
        }
    }

    /// The device's presence now.
    pub fn presence(&self, id: &DeviceId) -> Presence {
        match self.devices.get(id) {
            Some(live) => {
                let age = live.last_heartbeat.elapsed();
                Presence {
                    online: age <= self.online_window(),
                    last_heartbeat_age: Some(age),
                }
            }
            None => Presence {
                online: false,
                last_heartbeat_age: None,
            },
        }
    }

    /// A handle to the device's current connection, cloned out so no guard is held.
    pub fn handle(&self, id: &DeviceId) -> Option<ConnHandle> {
        self.devices.get(id).map(|live| live.handle.clone())
    }

    /// Number of connected devices.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether no device is connected.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Cancels every connection, for shutdown.
    pub fn cancel_all(&self) {
        for live in self.devices.iter() {
            live.handle.cancel.cancel();
        }
    }
}

/// The newest of `offers` that serves `query`.
fn best_offer(offers: &[CapabilityOffer], query: &CapabilityQuery) -> Option<CapabilityOffer> {
    offers
        .iter()
        .filter(|o| o.serves(query))
        .max_by(|a, b| a.version.cmp(&b.version))
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle() -> (ConnHandle, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(1);
        (
            ConnHandle {
                outbound: tx,
                cancel: CancellationToken::new(),
            },
            rx,
        )
    }

    fn id(b: u8) -> DeviceId {
        DeviceId::from_mac(&[b; 16])
    }

    fn routing() -> Routing {
        Routing {
            owners: Arc::from(vec![]),
            capabilities: Arc::from(vec![]),
            services: Arc::from(vec![]),
        }
    }

    #[test]
    fn replacement_cancels_the_old_connection_and_its_late_removal_is_ignored() {
        let reg = Registry::new(Duration::from_secs(5));
        let (h1, _r1) = handle();
        let (h2, _r2) = handle();
        let c1 = reg.next_conn_id();
        let c2 = reg.next_conn_id();
        reg.insert(id(1), c1, h1.clone(), routing());
        reg.insert(id(1), c2, h2.clone(), routing());
        assert!(h1.cancel.is_cancelled());
        assert!(!h2.cancel.is_cancelled());
        assert!(!reg.remove(&id(1), c1), "stale connection must not evict");
        assert!(reg.presence(&id(1)).online);
        assert!(
            !reg.heartbeat(&id(1), c1, vec![], None),
            "stale heartbeat is refused"
        );
        assert!(reg.heartbeat(&id(1), c2, vec![], None));
        assert!(reg.remove(&id(1), c2));
        assert!(!reg.presence(&id(1)).online);
    }

    fn offering(protocols: &[&str]) -> Routing {
        Routing {
            owners: Arc::from(vec![]),
            services: Arc::from(vec![]),
            capabilities: protocols
                .iter()
                .map(|p| CapabilityOffer::new(p, "1.0.0").expect("offer"))
                .collect::<Vec<_>>()
                .into(),
        }
    }

    fn found(reg: &Registry, protocol: &str) -> Vec<DeviceId> {
        let q = CapabilityQuery::new(protocol, None).expect("query");
        reg.candidates(&q, |_| true)
            .into_iter()
            .map(|c| c.id)
            .collect()
    }

    #[test]
    fn routing_sees_exactly_the_live_offers() {
        let reg = Registry::new(Duration::from_secs(5));
        let (h1, _r1) = handle();
        let (h2, _r2) = handle();
        let (c1, c2) = (reg.next_conn_id(), reg.next_conn_id());
        reg.insert(id(1), c1, h1, offering(&["embeddings", "llm.chat"]));
        reg.insert(
            id(2),
            reg.next_conn_id(),
            handle().0,
            offering(&["embeddings"]),
        );
        let mut both = found(&reg, "embeddings");
        both.sort();
        assert_eq!(both, vec![id(1), id(2)]);
        assert_eq!(found(&reg, "llm.chat"), vec![id(1)]);
        assert!(found(&reg, "tasks").is_empty());

        // The device reconnects offering less; the old connection's late removal must
        // not take the new one out of the index.
        reg.insert(id(1), c2, h2, offering(&["embeddings"]));
        assert!(found(&reg, "llm.chat").is_empty());
        assert!(!reg.remove(&id(1), c1));
        assert!(found(&reg, "embeddings").contains(&id(1)));

        // Offers change while connected.
        assert!(reg.set_capabilities(&id(1), c2, offering(&["llm.chat"]).capabilities));
        assert_eq!(found(&reg, "llm.chat"), vec![id(1)]);
        assert_eq!(found(&reg, "embeddings"), vec![id(2)]);
        assert!(
            !reg.set_capabilities(&id(1), c1, offering(&[]).capabilities),
            "stale conn"
        );

        assert!(reg.remove(&id(1), c2));
        assert!(found(&reg, "llm.chat").is_empty());
        assert_eq!(found(&reg, "embeddings"), vec![id(2)]);
    }

    #[tokio::test(start_paused = true)]
    async fn presence_follows_heartbeat_age() {
        let reg = Registry::new(Duration::from_secs(5));
        let (h, _r) = handle();
        let c = reg.next_conn_id();
        reg.insert(id(2), c, h, routing());
        assert!(reg.presence(&id(2)).online);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(
            reg.presence(&id(2)).online,
            "one missed heartbeat is tolerated"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        let p = reg.presence(&id(2));
        assert!(!p.online, "silent for over two intervals");
        assert!(p.last_heartbeat_age.expect("connected") >= Duration::from_secs(11));
        assert!(reg.heartbeat(&id(2), c, vec![], None));
        assert!(reg.presence(&id(2)).online);
    }
}
