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
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use adi_protocol::capability::best_offer;
use adi_protocol::{
    CapabilityOffer, CapabilityQuery, DeviceId, LoadReport, ServiceHealth, ServiceInfo,
};
use dashmap::DashMap;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::catalog::{Member, UserId};
use crate::history::LoadHistory;
pub use crate::link::{ConnHandle, Stop};
use adi_protocol::Role;

/// Identifies one WebSocket connection, so a stale one can be told from its successor.
pub type ConnId = u64;

/// Heartbeat intervals of silence after which the hub drops a connection.
pub const SILENT_INTERVALS: u32 = 3;

/// How long an agent displaced by a second agent with the same secret is refused if
/// it comes back (an agent of an older build that does not stop by itself).
const DISPLACED_REFUSED_FOR: Duration = Duration::from_secs(600);

/// One connected device.
#[derive(Debug)]
pub struct LiveDevice {
    /// Which connection this entry belongs to.
    pub conn_id: ConnId,
    /// The name it registered with, so a proxied request may name the device instead
    /// of giving its id, without reading the catalog.
    pub name: Arc<str>,
    /// Handle to the connection's actor.
    pub handle: ConnHandle,
    /// When the last heartbeat (or the registration) arrived.
    pub last_heartbeat: Instant,
    /// Service health from the latest heartbeat that carried any.
    pub health: Vec<ServiceHealth>,
    /// Load from the latest heartbeat that carried it (boxed: most of the registry's
    /// entries are idle devices, and the entry should stay small).
    pub load: Option<Box<LoadReport>>,
    /// Who may use the device (every member, owner or user), copied from the catalog
    /// at registration and on every change of its members, so routing never reads the
    /// catalog. Shared with devices of the same members.
    pub members: Arc<[UserId]>,
    /// Its members with the owner role: whom the device acts for when it asks for
    /// another device's capability. Shared like `members`.
    pub owners: Arc<[UserId]>,
    /// What the device serves now; shared with devices that serve the same.
    pub capabilities: Arc<[CapabilityOffer]>,
    /// Its loopback services, so the proxy checks a request without the catalog;
    /// shared with devices that declare the same.
    pub services: Arc<[ServiceInfo]>,
    /// The device said it is stopping: it finishes what it serves, but nothing new is
    /// routed or proxied to it.
    pub draining: bool,
    /// Which agent process holds the connection, and from where.
    pub agent: Agent,
    /// When it registered, in Unix milliseconds: of two connections of one device on
    /// different hubs, the newer wins.
    pub connected_at: i64,
}

/// The agent process behind a connection: its own random id (from its registration;
/// `None` from agents that predate it) and the address it connected from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Agent {
    /// A digest of the id the agent made for itself at start.
    pub instance: Option<u64>,
    /// Where its connection came from.
    pub peer: Option<SocketAddr>,
}

/// Two live agents presented one device's secret: the newer connection took the
/// device's place and the older agent was told to stop. Kept for its owners to see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict {
    /// Unix seconds.
    pub at: i64,
    /// Where the displaced agent connected from.
    pub displaced: Option<SocketAddr>,
    /// Where the agent that holds the device now connected from.
    pub by: Option<SocketAddr>,
    /// The displaced agent's instance, refused if it comes back.
    displaced_instance: u64,
    /// Until when that instance is refused.
    refused_until: Instant,
}

/// Who may use a device, and whom it acts for: its members and, of those, its owners.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// Every member.
    pub members: Vec<UserId>,
    /// The members with the owner role.
    pub owners: Vec<UserId>,
}

impl Grants {
    /// The grants of a device with these members.
    pub fn of(members: &[Member]) -> Self {
        Grants {
            members: members.iter().map(|m| m.id).collect(),
            owners: members
                .iter()
                .filter(|m| m.role == Role::Owner)
                .map(|m| m.id)
                .collect(),
        }
    }

    /// A device whose members are all owners.
    pub fn owned_by(owners: &[UserId]) -> Self {
        Grants {
            members: owners.to_vec(),
            owners: owners.to_vec(),
        }
    }
}

/// What the proxy needs of a connected device, read from RAM.
#[derive(Debug, Clone)]
pub struct Access {
    /// Who may use it.
    pub members: Arc<[UserId]>,
    /// Its services.
    pub services: Arc<[ServiceInfo]>,
    /// Whether it is online by heartbeat age.
    pub online: bool,
    /// Whether it is stopping and takes no new request.
    pub draining: bool,
}

/// An online device that can serve a query, as routing sees it at one instant.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The device.
    pub id: DeviceId,
    /// How to reach it, which also counts the capability requests in flight to it.
    pub via: Via,
    /// Its offer that matches the query (the newest, if it has several).
    pub offer: CapabilityOffer,
    /// Its load share in [0, 1) from its last report ([`load_share`]).
    pub load_share: f64,
    /// Who may use it.
    pub members: Arc<[UserId]>,
}

/// How a candidate is reached: through its connection to this hub, or through the hub
/// it is connected to.
#[derive(Debug, Clone)]
pub enum Via {
    /// Connected here.
    Local(ConnHandle),
    /// Connected to another hub of the cluster.
    Remote {
        /// That hub.
        hub: uuid::Uuid,
        /// Capability requests this hub has in flight to the device through it.
        in_flight: Arc<std::sync::atomic::AtomicU32>,
    },
}

impl Via {
    /// The counter of capability requests in flight to the device from this hub.
    pub fn in_flight_counter(&self) -> &std::sync::atomic::AtomicU32 {
        match self {
            Via::Local(handle) => handle.in_flight_counter(),
            Via::Remote { in_flight, .. } => in_flight,
        }
    }

    /// Capability requests in flight to the device from this hub.
    pub fn in_flight(&self) -> u32 {
        self.in_flight_counter().load(Ordering::Relaxed)
    }
}

/// What the registry says of a device at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Presence {
    /// Connected and heard from within the online window.
    pub online: bool,
    /// Age of the last heartbeat, if the device is connected.
    pub last_heartbeat_age: Option<Duration>,
    /// Connected and stopping: it finishes what it serves and takes nothing new.
    pub draining: bool,
}

/// How many devices are connected, and in which state, at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// With an open connection.
    pub connected: usize,
    /// Connected and heard from within the online window.
    pub online: usize,
    /// Connected and stopping.
    pub draining: usize,
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

/// A device's load share in [0, 1): GPU utilisation, VRAM in use and CPU when it has
/// GPUs; CPU alone when it has none; a middling 0.5 before its first report.
pub fn load_share(load: Option<&LoadReport>) -> f64 {
    let Some(load) = load else {
        return 0.5;
    };
    let cpu = f64::from(load.cpu_percent.clamp(0.0, 100.0)) / 100.0;
    let share = if load.gpus.is_empty() {
        cpu
    } else {
        let n = load.gpus.len() as f64;
        let util = load
            .gpus
            .iter()
            .map(|g| f64::from(g.utilization_percent.min(100)))
            .sum::<f64>()
            / n
            / 100.0;
        let total: u64 = load.gpus.iter().map(|g| g.memory_total_bytes).sum();
        let used: u64 = load.gpus.iter().map(|g| g.memory_used_bytes).sum();
        let vram = if total == 0 {
            1.0
        } else {
            (used as f64 / total as f64).min(1.0)
        };
        0.4 * util + 0.3 * vram + 0.3 * cpu
    };
    share.clamp(0.0, 0.999)
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
    service_lists: Lists<ServiceInfo>,
    /// Devices by the protocols they offer, so routing looks only at devices that can
    /// serve. A superset at worst: every id found here is checked against `devices`.
    by_protocol: DashMap<String, Vec<DeviceId>>,
    /// Devices by name, for proxied requests that name a device. A superset at worst,
    /// like `by_protocol`: every id found here is checked against its entry's name.
    by_name: DashMap<Arc<str>, Vec<DeviceId>>,
    /// The last time two agents held one device's secret at once, by device.
    conflicts: DashMap<DeviceId, Conflict>,
    /// Each device's load over the last hour, from its heartbeats.
    history: LoadHistory,
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
            service_lists: Lists::new(),
            by_protocol: DashMap::new(),
            by_name: DashMap::new(),
            conflicts: DashMap::new(),
            history: LoadHistory::new(heartbeat_interval),
        }
    }

    /// Each device's load over the last hour.
    pub fn history(&self) -> &LoadHistory {
        &self.history
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
    /// `capabilities`; stops the one it replaces, if any. When that one is a different
    /// agent process that was still heartbeating, two agents hold the device's secret
    /// (a copied data dir): the older one is told it was displaced, which stops it for
    /// good, and the conflict is kept for the owners to see. Otherwise (the same agent
    /// back on a new connection, or an agent restarted while its old socket lingered)
    /// the old connection is simply replaced. Returns the conflict when another agent
    /// was displaced.
    #[allow(clippy::too_many_arguments)]
    pub fn insert(
        &self,
        id: DeviceId,
        name: &str,
        conn_id: ConnId,
        handle: ConnHandle,
        grants: &Grants,
        capabilities: &[CapabilityOffer],
        services: &[ServiceInfo],
        agent: Agent,
    ) -> Option<Conflict> {
        let name: Arc<str> = Arc::from(name);
        let live = LiveDevice {
            conn_id,
            name: name.clone(),
            handle,
            last_heartbeat: Instant::now(),
            health: Vec::new(),
            load: None,
            members: self.owner_lists.get(&grants.members),
            owners: self.owner_lists.get(&grants.owners),
            capabilities: self.capability_lists.get(capabilities),
            services: self.service_lists.get(services),
            draining: false,
            agent,
            connected_at: crate::auth::unix_now_ms(),
        };
        self.index(&id, capabilities);
        self.index_name(&id, name);
        let mut displaced = None;
        if let Some(old) = self.devices.insert(id.clone(), live) {
            let second_agent = match (old.agent.instance, agent.instance) {
                (Some(a), Some(b)) => {
                    a != b && old.last_heartbeat.elapsed() <= self.online_window()
                }
                _ => false,
            };
            match (second_agent, old.agent.instance) {
                (true, Some(displaced_instance)) => {
                    old.handle.stop(Stop::Displaced(agent.peer));
                    let conflict = Conflict {
                        at: crate::auth::unix_now_i64(),
                        displaced: old.agent.peer,
                        by: agent.peer,
                        displaced_instance,
                        refused_until: Instant::now() + DISPLACED_REFUSED_FOR,
                    };
                    self.conflicts.insert(id.clone(), conflict);
                    displaced = Some(conflict);
                }
                _ => old.handle.stop(Stop::Replaced),
            }
            self.unindex_gone(&id, &old.capabilities);
            self.unindex_name(&id, &old.name);
        }
        displaced
    }

    /// The conflict that displaced this agent, if `instance` is an agent this hub told
    /// to stop not long ago: it is refused rather than let take the device back.
    pub fn displaced(&self, id: &DeviceId, instance: Option<u64>) -> Option<Conflict> {
        let instance = instance?;
        let conflict = *self.conflicts.get(id)?;
        (conflict.displaced_instance == instance && Instant::now() < conflict.refused_until)
            .then_some(conflict)
    }

    /// The last time two agents held this device's secret at once, if ever (since the
    /// hub started).
    pub fn conflict(&self, id: &DeviceId) -> Option<Conflict> {
        self.conflicts.get(id).map(|c| *c)
    }

    fn index(&self, id: &DeviceId, offers: &[CapabilityOffer]) {
        for offer in offers {
            let mut ids = self.by_protocol.entry(offer.protocol.clone()).or_default();
            if !ids.contains(id) {
                ids.push(id.clone());
            }
        }
    }

    fn index_name(&self, id: &DeviceId, name: Arc<str>) {
        let mut ids = self.by_name.entry(name).or_default();
        if !ids.contains(id) {
            ids.push(id.clone());
        }
    }

    /// Drops `id` from the index of `name` unless its current entry (if any) still
    /// bears that name.
    fn unindex_name(&self, id: &DeviceId, name: &str) {
        if self.devices.get(id).is_some_and(|live| &*live.name == name) {
            return;
        }
        if let Some(mut ids) = self.by_name.get_mut(name) {
            ids.retain(|d| d != id);
        }
        self.by_name.remove_if(name, |_, ids| ids.is_empty());
        // A new connection of the device may have registered meanwhile under this
        // name: put it back, so the index never misses a live device.
        let live = self.devices.get(id).map(|l| l.name.clone());
        if let Some(live) = live {
            self.index_name(id, live);
        }
    }

    /// The connected devices called `name` whose owners pass `may_use`. Reads RAM only;
    /// no guard outlives the call.
    pub fn named(
        &self,
        name: &str,
        may_use: impl Fn(&DeviceId, &[UserId]) -> bool,
    ) -> Vec<DeviceId> {
        let Some(ids) = self.by_name.get(name).map(|ids| ids.clone()) else {
            return Vec::new();
        };
        ids.into_iter()
            .filter(|id| {
                self.devices
                    .get(id)
                    .is_some_and(|live| &*live.name == name && may_use(id, &live.members))
            })
            .collect()
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
            // (The entry's guard is dropped before the index is touched.)
            let live = self.devices.get(id).map(|l| l.capabilities.clone());
            if let Some(live) = live {
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
                    // Guard order: a device's entry, then its history ring; the
                    // history never reaches back into `devices`.
                    self.history.record(id, &load, crate::history::now_ms());
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
        self.index(id, capabilities);
        let old = match self.devices.get_mut(id) {
            Some(mut live) if live.conn_id == conn_id => {
                std::mem::replace(&mut live.capabilities, list)
            }
            _ => return false,
        };
        self.unindex_gone(id, &old);
        true
    }

    /// Notes that the device is stopping, if `conn_id` is still its connection: routing
    /// passes it over from now on.
    pub fn set_draining(&self, id: &DeviceId, conn_id: ConnId) {
        if let Some(mut live) = self.devices.get_mut(id) {
            if live.conn_id == conn_id {
                live.draining = true;
            }
        }
    }

    /// Replaces the device's services, if `conn_id` is still its connection.
    pub fn set_services(&self, id: &DeviceId, conn_id: ConnId, services: &[ServiceInfo]) {
        let list = self.service_lists.get(services);
        if let Some(mut live) = self.devices.get_mut(id) {
            if live.conn_id == conn_id {
                live.services = list;
            }
        }
    }

    /// Members, services and presence of a connected device; `None` when it is not.
    pub fn access(&self, id: &DeviceId) -> Option<Access> {
        self.devices.get(id).map(|live| Access {
            members: live.members.clone(),
            services: live.services.clone(),
            online: live.last_heartbeat.elapsed() <= self.online_window(),
            draining: live.draining,
        })
    }

    /// Replaces a connected device's members with what the catalog holds now, so a
    /// claim or a removal takes effect at once, without a reconnect.
    pub fn set_grants(&self, id: &DeviceId, grants: &Grants) {
        if let Some(mut live) = self.devices.get_mut(id) {
            live.members = self.owner_lists.get(&grants.members);
            live.owners = self.owner_lists.get(&grants.owners);
        }
    }

    /// Stops a connected device's connection for `why`, whichever connection it is;
    /// returns whether one was connected.
    pub fn stop(&self, id: &DeviceId, why: Stop) -> bool {
        self.devices
            .get(id)
            .map(|live| live.handle.stop(why))
            .is_some()
    }

    /// The owners of a connected device: whom it acts for.
    pub fn owners(&self, id: &DeviceId) -> Option<Arc<[UserId]>> {
        self.devices.get(id).map(|live| live.owners.clone())
    }

    /// Capability requests in flight to a connected device.
    pub fn in_flight(&self, id: &DeviceId) -> Option<u32> {
        self.devices.get(id).map(|live| live.handle.in_flight())
    }

    /// Raw TCP streams open to a connected device through this hub.
    pub fn tcp_streams(&self, id: &DeviceId) -> Option<u32> {
        self.devices.get(id).map(|live| live.handle.tcp_streams())
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
        may_use: impl Fn(&DeviceId, &[UserId]) -> bool,
    ) -> Vec<Candidate> {
        let Some(ids) = self.by_protocol.get(&query.protocol) else {
            return Vec::new();
        };
        let now = Instant::now();
        // The index's guard is held while entries are read: nothing takes an index
        // guard while holding an entry's, so the two maps cannot deadlock.
        ids.iter()
            .filter_map(|id| {
                let e = self.devices.get(id)?;
                self.candidate_of(id, &e, query, now)
                    .filter(|c| may_use(id, &c.members))
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
        if e.draining || now.saturating_duration_since(e.last_heartbeat) > self.online_window() {
            return None;
        }
        let offer = best_offer(e.capabilities.iter(), query)?.clone();
        Some(Candidate {
            id: id.clone(),
            via: Via::Local(e.handle.clone()),
            offer,
            load_share: load_share(e.load.as_deref()),
            members: e.members.clone(),
        })
    }

    /// The agent process behind the device's connection, if it is connected.
    pub fn agent(&self, id: &DeviceId) -> Option<Agent> {
        self.devices.get(id).map(|live| live.agent)
    }

    /// When the device's current connection registered (Unix ms), if it is connected.
    pub fn connected_at(&self, id: &DeviceId) -> Option<i64> {
        self.devices.get(id).map(|live| live.connected_at)
    }

    /// Calls `f` with every connected device; holds one entry's guard at a time, so
    /// `f` must not touch the registry.
    pub fn each(&self, mut f: impl FnMut(&DeviceId, &LiveDevice)) {
        for live in self.devices.iter() {
            f(live.key(), live.value());
        }
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
                self.unindex_name(id, &gone.name);
                true
            }
            None => false,
        }
    }

    /// The devices connected now, by state: one pass over the registry, for the metrics.
    pub fn counts(&self) -> Counts {
        let window = self.online_window();
        let mut counts = Counts::default();
        for live in self.devices.iter() {
            counts.connected += 1;
            counts.online += usize::from(live.last_heartbeat.elapsed() <= window);
            counts.draining += usize::from(live.draining);
        }
        counts
    }

    /// The device's presence now.
    pub fn presence(&self, id: &DeviceId) -> Presence {
        match self.devices.get(id) {
            Some(live) => {
                let age = live.last_heartbeat.elapsed();
                Presence {
                    online: age <= self.online_window(),
                    last_heartbeat_age: Some(age),
                    draining: live.draining,
                }
            }
            None => Presence {
                online: false,
                last_heartbeat_age: None,
                draining: false,
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
        self.service_lists.prune();
        self.history.prune(crate::history::now_ms());
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
        reg.insert(
            id(1),
            "d",
            c1,
            h1.clone(),
            &Grants::default(),
            &[],
            &[],
            Agent::default(),
        );
        reg.insert(
            id(1),
            "d",
            c2,
            h2.clone(),
            &Grants::default(),
            &[],
            &[],
            Agent::default(),
        );
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

    #[test]
    fn a_current_connection_s_load_goes_to_the_history_and_a_stale_one_s_does_not() {
        let reg = Registry::new(Duration::from_secs(5));
        let (c1, c2) = (reg.next_conn_id(), reg.next_conn_id());
        for c in [c1, c2] {
            reg.insert(
                id(1),
                "d",
                c,
                handle(&reg),
                &Grants::default(),
                &[],
                &[],
                Agent::default(),
            );
        }
        let load = |cpu: f32| LoadReport {
            cpu_count: 4,
            cpu_percent: cpu,
            ram_total_bytes: 1 << 30,
            ram_used_bytes: 1 << 29,
            gpus: Vec::new(),
        };
        assert!(!reg.heartbeat(&id(1), c1, vec![], Some(load(90.0))));
        assert!(
            reg.history().is_empty(),
            "a replaced connection's load is dropped"
        );
        assert!(reg.heartbeat(&id(1), c2, vec![], Some(load(40.0))));
        let seen = reg
            .history()
            .view(&id(1), crate::history::now_ms())
            .expect("a point");
        assert_eq!(seen.cpu_percent, [40.0]);
    }

    #[tokio::test(start_paused = true)]
    async fn presence_follows_heartbeat_age() {
        let reg = Registry::new(Duration::from_secs(5));
        let c = reg.next_conn_id();
        reg.insert(
            id(2),
            "d",
            c,
            handle(&reg),
            &Grants::default(),
            &[],
            &[],
            Agent::default(),
        );
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
        reg.insert(
            id(3),
            "d",
            reg.next_conn_id(),
            silent.clone(),
            &Grants::default(),
            &[],
            &[],
            Agent::default(),
        );
        reg.insert(
            id(4),
            "d",
            reg.next_conn_id(),
            talking.clone(),
            &Grants::default(),
            &[],
            &[],
            Agent::default(),
        );
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

    fn offers(protocols: &[&str]) -> Vec<CapabilityOffer> {
        protocols
            .iter()
            .map(|p| CapabilityOffer::new(p, "1.0.0").expect("offer"))
            .collect()
    }

    /// Connects device `n` on `conn`, offering `protocols`, with no owners or services.
    fn offering(reg: &Registry, n: u8, conn: ConnId, protocols: &[&str]) {
        reg.insert(
            id(n),
            "d",
            conn,
            handle(reg),
            &Grants::default(),
            &offers(protocols),
            &[],
            Agent::default(),
        );
    }

    fn found(reg: &Registry, protocol: &str) -> Vec<DeviceId> {
        let q = CapabilityQuery::new(protocol, None).expect("query");
        let mut ids: Vec<DeviceId> = reg
            .candidates(&q, |_, _| true)
            .into_iter()
            .map(|c| c.id)
            .collect();
        ids.sort();
        ids
    }

    #[test]
    fn a_stopping_device_is_passed_over_until_it_reconnects() {
        let reg = Registry::new(Duration::from_secs(5));
        let old = reg.next_conn_id();
        offering(&reg, 1, old, &["embeddings"]);
        offering(&reg, 2, reg.next_conn_id(), &["embeddings"]);
        reg.set_draining(&id(1), old);
        assert_eq!(found(&reg, "embeddings"), vec![id(2)]);
        let q = CapabilityQuery::new("embeddings", None).expect("query");
        assert!(
            reg.candidate(&id(1), &q).is_none(),
            "not even when preferred"
        );
        assert!(reg.access(&id(1)).is_some_and(|a| a.draining));
        // Its next connection is a fresh start; a late word from the old one changes nothing.
        offering(&reg, 1, reg.next_conn_id(), &["embeddings"]);
        reg.set_draining(&id(1), old);
        assert_eq!(found(&reg, "embeddings"), vec![id(1), id(2)]);
        assert!(reg.access(&id(1)).is_some_and(|a| !a.draining));
    }

    #[test]
    fn routing_sees_exactly_the_live_offers() {
        let reg = Registry::new(Duration::from_secs(5));
        let (c1, c2) = (reg.next_conn_id(), reg.next_conn_id());
        offering(&reg, 1, c1, &["embeddings", "llm.chat"]);
        offering(&reg, 2, reg.next_conn_id(), &["embeddings"]);
        assert_eq!(found(&reg, "embeddings"), vec![id(1), id(2)]);
        assert_eq!(found(&reg, "llm.chat"), vec![id(1)]);
        assert!(found(&reg, "tasks").is_empty());

        // The device reconnects offering less; the old connection's late removal must
        // not take the new one out of the index.
        reg.insert(
            id(1),
            "d",
            c2,
            handle(&reg),
            &Grants::default(),
            &offers(&["embeddings"]),
            &[],
            Agent::default(),
        );
        assert!(found(&reg, "llm.chat").is_empty());
        assert!(!reg.remove(&id(1), c1));
        assert_eq!(found(&reg, "embeddings"), vec![id(1), id(2)]);

        // Offers change while connected; a stale connection cannot change them.
        assert!(reg.set_capabilities(&id(1), c2, &offers(&["llm.chat"])));
        assert_eq!(found(&reg, "llm.chat"), vec![id(1)]);
        assert_eq!(found(&reg, "embeddings"), vec![id(2)]);
        assert!(!reg.set_capabilities(&id(1), c1, &[]));

        assert!(reg.remove(&id(1), c2));
        assert!(found(&reg, "llm.chat").is_empty());
        assert_eq!(found(&reg, "embeddings"), vec![id(2)]);
    }

    #[test]
    fn devices_are_found_by_name_among_their_owners_only_under_their_current_name() {
        let reg = Registry::new(Duration::from_secs(5));
        let named = |n: u8, name: &str, conn: ConnId, owner: u8| {
            reg.insert(
                id(n),
                name,
                conn,
                handle(&reg),
                &Grants::owned_by(&[user(owner)]),
                &[],
                &[],
                Agent::default(),
            );
        };
        let mine = |_: &DeviceId, owners: &[UserId]| owners.contains(&user(1));
        let (c1, c2) = (reg.next_conn_id(), reg.next_conn_id());
        named(1, "gpu-box", c1, 1);
        named(2, "gpu-box", reg.next_conn_id(), 2);
        assert_eq!(
            reg.named("gpu-box", mine),
            vec![id(1)],
            "not bob's namesake"
        );
        assert!(reg.named("laptop", mine).is_empty());

        // Renamed on reconnect: found under the new name only, and the old
        // connection's late removal does not take it out.
        named(1, "big-box", c2, 1);
        assert!(reg.named("gpu-box", mine).is_empty());
        assert!(!reg.remove(&id(1), c1));
        assert_eq!(reg.named("big-box", mine), vec![id(1)]);

        named(3, "big-box", reg.next_conn_id(), 1);
        let mut both = reg.named("big-box", mine);
        both.sort();
        assert_eq!(both, vec![id(1), id(3)]);
        assert!(reg.remove(&id(1), c2));
        assert_eq!(reg.named("big-box", mine), vec![id(3)]);
    }

    #[test]
    fn devices_share_equal_lists_and_unused_ones_are_forgotten() {
        let reg = Registry::new(Duration::from_secs(5));
        let tasks: CapabilityOffer = "tasks:1.0.0".parse().expect("offer");
        for b in 0..3 {
            let c = reg.next_conn_id();
            reg.insert(
                id(b),
                "d",
                c,
                handle(&reg),
                &Grants::owned_by(&[user(1)]),
                std::slice::from_ref(&tasks),
                &[],
                Agent::default(),
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

        reg.set_grants(
            &id(0),
            &Grants {
                members: vec![user(1), user(2)],
                owners: vec![user(1)],
            },
        );
        let members = |n| reg.access(&id(n)).expect("online").members;
        assert_eq!(&*members(0), &[user(1), user(2)]);
        assert_eq!(&*reg.owners(&id(0)).expect("online"), &[user(1)]);
        assert!(
            Arc::ptr_eq(&reg.owners(&id(0)).expect("online"), &members(1)),
            "the owners of one device and the members of another: one list"
        );
        assert_eq!(&*members(1), &[user(1)]);
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
