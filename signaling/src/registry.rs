//! The live registry: which devices are connected right now, through which connection,
//! and when each last sent a heartbeat. RAM only (`DashMap`), rebuilt from heartbeats
//! after a restart; it must never write to the catalog.
//!
//! A device that reconnects replaces its old entry; the old connection is stopped and,
//! because removal compares connection ids, its late exit cannot evict the new one.
//!
//! One sweeper task ([`Registry::run_sweeper`]) watches every connection instead of a
//! timer in each: it stops connections silent for [`SILENT_INTERVALS`] heartbeat
//! intervals, forgets owner and capability lists nobody uses any more, and stops every
//! connection when the hub shuts down.
//!
//! Devices share their owner and capability lists: most devices of a fleet have the
//! same owners and serve the same capabilities, so each distinct list is kept once
//! ([`Lists`]) and every entry holds an `Arc` to it.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use adi_protocol::{CapabilityOffer, CapabilityQuery, DeviceId, LoadReport, ServiceHealth};
use dashmap::DashMap;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::catalog::UserId;
pub use crate::link::{ConnHandle, Stop};

/// Identifies one WebSocket connection, so a stale one can be told from its successor.
pub type ConnId = u64;

/// Heartbeat intervals of silence after which the hub drops a connection.
pub const SILENT_INTERVALS: u32 = 3;

/// One connected device.
#[derive(Debug)]
pub struct LiveDevice {
    /// Which connection this entry belongs to.
    pub conn_id: ConnId,
    /// Handle to the connection's actor.
    pub handle: ConnHandle,
    /// When the last heartbeat (or the registration) arrived.
    pub last_heartbeat: Instant,
    /// Service health from the latest heartbeat that carried any.
    pub health: Vec<ServiceHealth>,
    /// Load from the latest heartbeat that carried it (boxed: most of the registry's
    /// entries are idle devices, and the entry should stay small).
    pub load: Option<Box<LoadReport>>,
    /// Who may use the device, copied from the catalog at registration and on every
    /// claim, so routing never reads the catalog. Shared with devices of the same owners.
    pub owners: Arc<[UserId]>,
    /// What the device serves now; shared with devices that serve the same.
    pub capabilities: Arc<[CapabilityOffer]>,
}

/// An online device that can serve a query, as routing sees it at one instant.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The device.
    pub id: DeviceId,
    /// Its connection, which also counts the capability requests in flight to it.
    pub handle: ConnHandle,
    /// Its offer that matches the query (the newest, if it has several).
    pub offer: CapabilityOffer,
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

/// Distinct lists, each kept once and shared by every device that has it. A list no
/// device holds any more is forgotten at the next [`prune`](Lists::prune).
struct Lists<T> {
    known: Mutex<HashSet<Arc<[T]>>>,
}

impl<T: Hash + Eq + Clone> Lists<T> {
    fn new() -> Self {
        Lists {
            known: Mutex::new(HashSet::new()),
        }
    }

    /// The shared copy of `items`.
    fn get(&self, items: &[T]) -> Arc<[T]> {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(list) = known.get(items) {
            return list.clone();
        }
        let list: Arc<[T]> = Arc::from(items);
        known.insert(list.clone());
        list
    }

    /// Forgets the lists only this set still holds.
    fn prune(&self) {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        known.retain(|list| Arc::strong_count(list) > 1);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// All live connections of this hub.
pub struct Registry {
    devices: DashMap<DeviceId, LiveDevice>,
    next_conn: AtomicU64,
    heartbeat_interval: Duration,
    /// Zero of [`now_ms`](Registry::now_ms).
    epoch: Instant,
    owner_lists: Lists<UserId>,
    capability_lists: Lists<CapabilityOffer>,
}

impl Registry {
    /// An empty registry for devices heartbeating every `heartbeat_interval`.
    pub fn new(heartbeat_interval: Duration) -> Self {
        Registry {
            devices: DashMap::new(),
            next_conn: AtomicU64::new(1),
            heartbeat_interval,
            epoch: Instant::now(),
            owner_lists: Lists::new(),
            capability_lists: Lists::new(),
        }
    }

    /// Milliseconds since this registry was made: the clock of
    /// [`ConnHandle::heard`], which needs a number it can store atomically.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// How long a connection may stay silent before the hub drops it.
    pub fn silence_limit(&self) -> Duration {
        self.heartbeat_interval * SILENT_INTERVALS
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

    /// Records a newly registered connection, owned by `owners` and serving
    /// `capabilities`; stops the one it replaces, if any.
    pub fn insert(
        &self,
        id: DeviceId,
        conn_id: ConnId,
        handle: ConnHandle,
        owners: &[UserId],
        capabilities: &[CapabilityOffer],
    ) {
        let live = LiveDevice {
            conn_id,
            handle,
            last_heartbeat: Instant::now(),
            health: Vec::new(),
            load: None,
            owners: self.owner_lists.get(owners),
            capabilities: self.capability_lists.get(capabilities),
        };
        if let Some(old) = self.devices.insert(id, live) {
            old.handle.stop(Stop::Replaced);
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
        capabilities: &[CapabilityOffer],
    ) -> bool {
        let list = self.capability_lists.get(capabilities);
        match self.devices.get_mut(id) {
            Some(mut live) if live.conn_id == conn_id => {
                live.capabilities = list;
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
                live.owners = self.owner_lists.get(&owners);
            }
        }
    }

    /// The owners of a connected device.
    pub fn owners(&self, id: &DeviceId) -> Option<Arc<[UserId]>> {
        self.devices.get(id).map(|live| live.owners.clone())
    }

    /// Capability requests in flight to a connected device.
    pub fn in_flight(&self, id: &DeviceId) -> Option<u32> {
        self.devices.get(id).map(|live| live.handle.in_flight())
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

    /// Stops every connection, for shutdown.
    pub fn stop_all(&self) {
        for live in self.devices.iter() {
            live.handle.stop(Stop::Shutdown);
        }
    }

    /// Stops every connection silent for longer than [`silence_limit`]
    /// (Registry::silence_limit) and forgets the lists no device holds; returns how
    /// many connections it stopped.
    pub fn sweep(&self) -> usize {
        let now = self.now_ms();
        let limit = u64::try_from(self.silence_limit().as_millis()).unwrap_or(u64::MAX);
        let mut stopped = 0;
        for live in self.devices.iter() {
            if now.saturating_sub(live.handle.last_heard_ms()) > limit
                && live.handle.stopped().is_none()
            {
                live.handle.stop(Stop::Silent);
                stopped += 1;
            }
        }
        self.owner_lists.prune();
        self.capability_lists.prune();
        stopped
    }

    /// Sweeps every half heartbeat interval, so a silent connection is dropped between
    /// [`SILENT_INTERVALS`] and that plus a half interval after the device last spoke;
    /// when `shutdown` is cancelled, stops every connection and returns.
    pub async fn run_sweeper(&self, shutdown: &CancellationToken) {
        let mut tick = tokio::time::interval(self.heartbeat_interval / 2);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.stop_all();
                    return;
                }
                _ = tick.tick() => {
                    let stopped = self.sweep();
                    if stopped > 0 {
                        tracing::info!(stopped, "dropping connections silent for {SILENT_INTERVALS} heartbeat intervals");
                    }
                }
            }
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

    fn handle(reg: &Registry) -> ConnHandle {
        ConnHandle::new(reg.now_ms())
    }

    fn id(b: u8) -> DeviceId {
        DeviceId::from_mac(&[b; 16])
    }

    fn user(b: u8) -> UserId {
        UserId(uuid::Uuid::from_bytes([b; 16]))
    }

    #[test]
    fn replacement_stops_the_old_connection_and_its_late_removal_is_ignored() {
        let reg = Registry::new(Duration::from_secs(5));
        let h1 = handle(&reg);
        let h2 = handle(&reg);
        let c1 = reg.next_conn_id();
        let c2 = reg.next_conn_id();
        reg.insert(id(1), c1, h1.clone(), &[], &[]);
        reg.insert(id(1), c2, h2.clone(), &[], &[]);
        assert_eq!(h1.stopped(), Some(Stop::Replaced));
        assert_eq!(h2.stopped(), None);
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
        let c = reg.next_conn_id();
        reg.insert(id(2), c, handle(&reg), &[], &[]);
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

    #[tokio::test(start_paused = true)]
    async fn the_sweeper_stops_silent_connections_within_three_and_a_half_intervals() {
        let reg = Arc::new(Registry::new(Duration::from_secs(2)));
        let silent = handle(&reg);
        let talking = handle(&reg);
        reg.insert(id(3), reg.next_conn_id(), silent.clone(), &[], &[]);
        reg.insert(id(4), reg.next_conn_id(), talking.clone(), &[], &[]);
        let shutdown = CancellationToken::new();
        let sweeper = tokio::spawn({
            let reg = reg.clone();
            let shutdown = shutdown.clone();
            async move { reg.run_sweeper(&shutdown).await }
        });
        // Step through 3.5 intervals (7 s) in 100 ms steps; the talking device is
        // heard from every second.
        let mut stopped_at = None;
        for step in 1..=70u64 {
            tokio::time::advance(Duration::from_millis(100)).await;
            tokio::task::yield_now().await;
            if step % 10 == 0 {
                talking.heard(reg.now_ms());
            }
            if stopped_at.is_none() && silent.stopped().is_some() {
                stopped_at = Some(step * 100);
            }
        }
        let at = stopped_at.expect("the silent connection was stopped");
        assert!((6_000..=7_000).contains(&at), "stopped after {at} ms");
        assert_eq!(silent.stopped(), Some(Stop::Silent));
        assert_eq!(talking.stopped(), None, "a connection that talks stays");
        shutdown.cancel();
        sweeper.await.expect("sweeper");
        assert_eq!(
            talking.stopped(),
            Some(Stop::Shutdown),
            "shutdown stops every connection"
        );
    }

    #[test]
    fn devices_share_equal_lists_and_unused_ones_are_forgotten() {
        let reg = Registry::new(Duration::from_secs(5));
        let tasks: CapabilityOffer = "tasks:1.0.0".parse().expect("offer");
        for b in 0..3 {
            let c = reg.next_conn_id();
            reg.insert(
                id(b),
                c,
                handle(&reg),
                &[user(1)],
                std::slice::from_ref(&tasks),
            );
        }
        assert!(
            Arc::ptr_eq(
                &reg.owners(&id(0)).expect("online"),
                &reg.owners(&id(2)).expect("online")
            ),
            "one owner list for all three"
        );
        assert!(
            Arc::ptr_eq(
                &reg.capabilities(&id(0)).expect("online"),
                &reg.capabilities(&id(1)).expect("online")
            ),
            "one capability list for all three"
        );

        reg.add_owner(&id(0), user(2));
        assert_eq!(&*reg.owners(&id(0)).expect("online"), &[user(1), user(2)]);
        assert_eq!(&*reg.owners(&id(1)).expect("online"), &[user(1)]);
        assert!(reg.set_capabilities(&id(1), reg_conn(&reg, &id(1)), &[]));
        assert!(reg.capabilities(&id(1)).expect("online").is_empty());

        for b in 0..3 {
            assert!(reg.remove(&id(b), reg_conn(&reg, &id(b))));
        }
        reg.sweep();
        assert_eq!(reg.owner_lists.len(), 0);
        assert_eq!(reg.capability_lists.len(), 0);
    }

    fn reg_conn(reg: &Registry, device: &DeviceId) -> ConnId {
        reg.devices.get(device).expect("online").conn_id
    }
}
