//! The live registry: which devices are connected right now, through which connection,
//! and when each last sent a heartbeat. RAM only (`DashMap`), rebuilt from heartbeats
//! after a restart; it must never write to the catalog.
//!
//! A device that reconnects replaces its old entry; the old connection is cancelled and,
//! because removal compares connection ids, its late exit cannot evict the new one.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use adi_protocol::{CapabilityOffer, CapabilityQuery, DeviceId, LoadReport, ServiceHealth};
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
    /// Its last load report.
    pub load: Option<LoadReport>,
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
    next_conn: AtomicU64,
    heartbeat_interval: Duration,
}

impl Registry {
    /// An empty registry for devices heartbeating every `heartbeat_interval`.
    pub fn new(heartbeat_interval: Duration) -> Self {
        Registry {
            devices: DashMap::new(),
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
        let old = self.devices.insert(
            id,
            LiveDevice {
                conn_id,
                handle,
                last_heartbeat: now,
                connected_at: now,
                health: Vec::new(),
                load: None,
                owners: routing.owners,
                capabilities: routing.capabilities,
                in_flight: Arc::new(AtomicU32::new(0)),
            },
        );
        if let Some(old) = old {
            old.handle.cancel.cancel();
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
        match self.devices.get_mut(id) {
            Some(mut live) if live.conn_id == conn_id => {
                live.capabilities = capabilities;
                true
            }
            _ => false,
        }
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
    /// `may_use`. Reads RAM only; each entry is cloned out, so no guard outlives the call.
    pub fn candidates(
        &self,
        query: &CapabilityQuery,
        may_use: impl Fn(&[UserId]) -> bool,
    ) -> Vec<Candidate> {
        let window = self.online_window();
        self.devices
            .iter()
            .filter(|e| e.last_heartbeat.elapsed() <= window)
            .filter_map(|e| {
                let offer = best_offer(&e.capabilities, query)?;
                if !may_use(&e.owners) {
                    return None;
                }
                Some(Candidate {
                    id: e.key().clone(),
                    handle: e.handle.clone(),
                    offer,
                    in_flight: e.in_flight.clone(),
                    load: e.load.as_deref().cloned(),
                    owners: e.owners.clone(),
                })
            })
            .collect()
    }

    /// The candidate view of one online device, whatever its owners, if it serves `query`.
    pub fn candidate(&self, id: &DeviceId, query: &CapabilityQuery) -> Option<Candidate> {
        let e = self.devices.get(id)?;
        if e.last_heartbeat.elapsed() > self.online_window() {
            return None;
        }
        let offer = best_offer(&e.capabilities, query)?;
        Some(Candidate {
            id: id.clone(),
            handle: e.handle.clone(),
            offer,
            in_flight: e.in_flight.clone(),
            load: e.load.as_deref().cloned(),
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
        self.devices
            .remove_if(id, |_, live| live.conn_id == conn_id)
            .is_some()
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
