//! Several hubs as one: hubs that share a PostgreSQL catalog join through NATS.
//!
//! The catalog already holds everything durable (users, devices, members, tokens), and
//! its change feed carries revocations and membership changes to every hub. What NATS
//! carries is what lives in RAM: which hub each device is connected to, its services,
//! capabilities and load, and which hubs are alive.
//! - Each hub publishes a [`Beat`](adi_protocol::cluster::Beat) once a second and, every
//!   [`presence::TICK`], one [`Presence`](adi_protocol::cluster::Presence) message with what changed among its
//!   devices since the last (connected, gone, described differently, load changed
//!   noticeably). An idle fleet costs one beat per hub per second; heartbeats never
//!   become NATS messages one for one.
//! - Every hub keeps the other hubs' devices in RAM ([`Remote`]), indexed by name and
//!   by protocol like the registry, so listing, access checks and routing never read
//!   the catalog or ask NATS per request.
//! - A request for a device on another hub goes straight to that hub over HTTP (found
//!   through its beat): a proxied request is forwarded whole, with its bodies streamed
//!   under TCP's flow control; a device request (a capability, a task route, a part of
//!   a merged view) is one internal call ([`peer`]).
//! - A device seen on two hubs is kept by the newer connection everywhere: the hub
//!   with the older one closes it when it hears of the newer.
//! - A hub silent for [`PEER_SILENCE`] is taken for dead: its devices are forgotten
//!   (they reconnect to another hub within seconds), and requests through it fail at
//!   once, since its connections are gone.

pub mod peer;
mod presence;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use adi_protocol::capability::best_offer;
use adi_protocol::{
    CapabilityOffer, CapabilityQuery, DeviceId, DeviceReply, DeviceRequest, LoadReport,
    ServiceHealth, ServiceInfo,
};
use dashmap::DashMap;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::time::Instant;

use crate::catalog::UserId;
use crate::link::command::RpcError;
use crate::registry::{load_share, Access, Candidate, Presence, Via};

/// A hub unheard for this long is taken for dead.
pub const PEER_SILENCE: Duration = Duration::from_secs(3);
/// How often a hub says it is alive.
pub const BEAT: Duration = Duration::from_secs(1);
/// Header carrying the cluster's shared hub key on requests between hubs.
pub const HUB_KEY_HEADER: &str = "x-adi-hub-key";
/// Header with the address a forwarded request came from, trusted only with the key.
pub const CLIENT_ADDR_HEADER: &str = "x-adi-client-addr";

/// A hub's id: random per process, so a restarted hub is a new peer.
pub type HubId = uuid::Uuid;

/// Why the cluster could not be joined.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// NATS could not be reached.
    #[error("cannot connect to NATS at {url}: {message}")]
    Nats {
        /// The URL given.
        url: String,
        /// What the client said.
        message: String,
    },
    /// A subscription failed.
    #[error("subscribing on NATS: {0}")]
    Subscribe(String),
    /// The CA file for other hubs could not be used.
    #[error("the CA for other hubs: {0}")]
    Ca(String),
}

/// Another hub, as its last beat described it.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Its base URL.
    pub url: Arc<str>,
    /// Devices connected to it.
    pub devices: u32,
    /// Requests it serves now.
    pub in_flight: u32,
    /// When it started, Unix seconds.
    pub started_at: i64,
    /// It is stopping.
    pub draining: bool,
    /// When its last beat arrived.
    pub last_seen: Instant,
    /// The sequence number of its last presence message applied here.
    seq: u64,
    /// Whether its whole list has been asked for and not yet received.
    resyncing: bool,
    /// When it was last asked for it.
    resync_asked_at: Option<Instant>,
}

/// A device connected to another hub.
#[derive(Debug, Clone)]
pub struct Remote {
    /// The hub it is connected to.
    pub hub: HubId,
    /// When that connection registered, Unix ms.
    pub since: i64,
    /// Its name.
    pub name: Arc<str>,
    /// Who may use it.
    pub members: Arc<[UserId]>,
    /// Whom it acts for.
    pub owners: Arc<[UserId]>,
    /// What it serves.
    pub capabilities: Arc<[CapabilityOffer]>,
    /// Its services.
    pub services: Arc<[ServiceInfo]>,
    /// Their health.
    pub health: Vec<ServiceHealth>,
    /// Heard from recently by its hub.
    pub online: bool,
    /// Stopping.
    pub draining: bool,
    /// Its load.
    pub load: Option<Box<LoadReport>>,
    /// Capability requests this hub has in flight to it.
    pub in_flight: Arc<AtomicU32>,
}

/// One hub of a cluster: what it knows of the others and how it reaches them.
pub struct Cluster {
    /// This hub.
    pub id: HubId,
    /// This hub's base URL.
    pub url: String,
    started_at: i64,
    /// Subjects start with this: one cluster per catalog, so clusters sharing a NATS
    /// server never hear each other.
    prefix: String,
    nats: async_nats::Client,
    /// The hub-to-hub key, derived from the catalog's keys: hubs that share the
    /// catalog share it, and nobody else has it.
    key: String,
    /// The key NATS messages are signed with, apart from `key`, which travels in HTTP
    /// headers: someone who reads one hop's traffic still cannot sign.
    signing: String,
    peers: DashMap<HubId, Peer>,
    remote: DashMap<DeviceId, Remote>,
    by_name: DashMap<Arc<str>, Vec<DeviceId>>,
    by_protocol: DashMap<String, Vec<DeviceId>>,
    client: peer::Client,
    /// Someone asked for this hub's whole list: the next presence message resets.
    resync_asked: AtomicBool,
    /// Sequence number of the last presence message sent.
    seq: AtomicU64,
    /// This hub is stopping.
    draining: AtomicBool,
    /// Requests this hub serves now, for its beat.
    in_flight: AtomicU32,
}

/// A per-catalog value derived from one of its keys.
fn derive(key: &[u8], label: &str) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(label.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

impl Cluster {
    /// Connects to NATS as hub `url`, with keys derived from the catalog's `secret`.
    pub async fn join(
        nats_url: &str,
        url: String,
        secret: &[u8],
        ca: Option<&std::path::Path>,
    ) -> Result<Arc<Self>, ClusterError> {
        let nats = async_nats::ConnectOptions::new()
            .name("adi hub")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(nats_url)
            .await
            .map_err(|e| ClusterError::Nats {
                url: nats_url.to_owned(),
                message: e.to_string(),
            })?;
        let client = peer::Client::new(ca).map_err(ClusterError::Ca)?;
        let cluster_id = derive(secret, "adi cluster id v1");
        Ok(Arc::new(Cluster {
            id: uuid::Uuid::new_v4(),
            url,
            started_at: crate::auth::unix_now_i64(),
            prefix: format!("adi.{}", &cluster_id[..16]),
            nats,
            key: derive(secret, "adi hub-to-hub key v1"),
            signing: derive(secret, "adi cluster signing key v1"),
            peers: DashMap::new(),
            remote: DashMap::new(),
            by_name: DashMap::new(),
            by_protocol: DashMap::new(),
            client,
            resync_asked: AtomicBool::new(true),
            seq: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            in_flight: AtomicU32::new(0),
        }))
    }

    /// Starts publishing this hub's presence and following the others', until `stop`.
    pub fn start(
        self: &Arc<Self>,
        state: std::sync::Weak<crate::HubState>,
        stop: tokio_util::sync::CancellationToken,
    ) -> Result<(), ClusterError> {
        presence::start(self.clone(), state, stop)
    }

    /// Whether `value` is this cluster's hub key (compared in constant time).
    pub fn is_hub_key(&self, value: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        value.len() == self.key.len() && bool::from(value.ct_eq(self.key.as_bytes()))
    }

    /// The signature of a message on `subject` under the hub key.
    pub fn sign(&self, subject: &str, payload: &[u8]) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.signing.as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(subject.as_bytes());
        mac.update(&[0]);
        mac.update(payload);
        hex::encode(mac.finalize().into_bytes())
    }

    /// Whether `mac` is the signature of a message on `subject` (in constant time).
    pub fn verify(&self, subject: &str, payload: &[u8], mac: &str) -> bool {
        use subtle::ConstantTimeEq;
        let good = self.sign(subject, payload);
        mac.len() == good.len() && bool::from(mac.as_bytes().ct_eq(good.as_bytes()))
    }

    /// The hub key, for requests to other hubs.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Marks the hub as stopping: its beat says so, and other hubs send it nothing new.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Counts a request this hub serves, for its beat, for as long as the guard lives.
    pub fn serving(self: &Arc<Self>) -> Serving {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Serving(self.clone())
    }

    /// The base URL of hub `id`, if it is alive and not stopping.
    pub fn peer_url(&self, id: HubId) -> Option<Arc<str>> {
        self.peers
            .get(&id)
            .filter(|p| p.last_seen.elapsed() <= PEER_SILENCE)
            .map(|p| p.url.clone())
    }

    /// The other hubs alive now, by id.
    pub fn peers(&self) -> Vec<(HubId, Peer)> {
        self.peers
            .iter()
            .filter(|p| p.last_seen.elapsed() <= PEER_SILENCE)
            .map(|p| (*p.key(), p.value().clone()))
            .collect()
    }

    /// The base URLs of the other hubs alive and not stopping, for devices to fail over to.
    pub fn peer_urls(&self) -> Vec<String> {
        let mut urls: Vec<String> = self
            .peers()
            .into_iter()
            .filter(|(_, p)| !p.draining)
            .map(|(_, p)| p.url.to_string())
            .collect();
        urls.sort();
        urls
    }

    /// When this hub started, Unix seconds.
    pub fn started_at(&self) -> i64 {
        self.started_at
    }

    /// Whether this hub is stopping.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Requests this hub serves now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// `f` of the device, if it is connected to another hub alive now; reads it in
    /// place (no copy), holding its entry only for `f`.
    fn with_device<T>(&self, id: &DeviceId, f: impl FnOnce(&Remote) -> T) -> Option<T> {
        let remote = self.remote.get(id)?;
        let alive = self
            .peers
            .get(&remote.hub)
            .is_some_and(|p| p.last_seen.elapsed() <= PEER_SILENCE);
        alive.then(|| f(&remote))
    }

    /// Calls `f` with every device connected to another hub alive now; holds one entry
    /// at a time, so `f` must not touch the cluster's maps.
    pub fn each(&self, mut f: impl FnMut(&DeviceId, &Remote)) {
        let alive: Vec<HubId> = self.peers().into_iter().map(|(id, _)| id).collect();
        for r in self.remote.iter() {
            if alive.contains(&r.hub) {
                f(r.key(), r.value());
            }
        }
    }

    /// Members, services and presence of a device connected to another hub, with the
    /// hub, as the proxy needs them.
    pub fn access(&self, id: &DeviceId) -> Option<(Access, HubId)> {
        self.with_device(id, |r| {
            (
                Access {
                    members: r.members.clone(),
                    services: r.services.clone(),
                    online: r.online,
                    draining: r.draining,
                },
                r.hub,
            )
        })
    }

    /// Presence of a device connected to another hub.
    pub fn presence(&self, id: &DeviceId) -> Option<Presence> {
        self.with_device(id, |r| Presence {
            online: r.online,
            last_heartbeat_age: None,
            draining: r.draining,
        })
    }

    /// The device's load as its hub last reported it.
    pub fn load(&self, id: &DeviceId) -> Option<LoadReport> {
        self.with_device(id, |r| r.load.as_deref().cloned())
            .flatten()
    }

    /// Its services' health as its hub last reported it.
    pub fn health(&self, id: &DeviceId) -> Vec<ServiceHealth> {
        self.with_device(id, |r| r.health.clone())
            .unwrap_or_default()
    }

    /// Capability requests this hub has in flight to the device.
    pub fn in_flight_to(&self, id: &DeviceId) -> Option<u32> {
        self.with_device(id, |r| r.in_flight.load(Ordering::Relaxed))
    }

    /// The devices of other hubs called `name` that pass `may_use`.
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
                self.with_device(id, |r| &*r.name == name && may_use(id, &r.members))
                    .unwrap_or(false)
            })
            .collect()
    }

    /// Every online device of other hubs that serves `query` and passes `may_use`.
    pub fn candidates(
        &self,
        query: &CapabilityQuery,
        may_use: impl Fn(&DeviceId, &[UserId]) -> bool,
    ) -> Vec<Candidate> {
        let Some(ids) = self.by_protocol.get(&query.protocol).map(|ids| ids.clone()) else {
            return Vec::new();
        };
        ids.iter()
            .filter_map(|id| self.candidate(id, query))
            .filter(|c| may_use(&c.id, &c.members))
            .collect()
    }

    /// The candidate view of one online device of another hub, if it serves `query`.
    pub fn candidate(&self, id: &DeviceId, query: &CapabilityQuery) -> Option<Candidate> {
        self.with_device(id, |r| {
            if !r.online || r.draining {
                return None;
            }
            let offer = best_offer(r.capabilities.iter(), query)?.clone();
            Some(Candidate {
                id: id.clone(),
                via: Via::Remote {
                    hub: r.hub,
                    in_flight: r.in_flight.clone(),
                },
                offer,
                load_share: load_share(r.load.as_deref()),
                members: r.members.clone(),
            })
        })
        .flatten()
    }

    /// Asks device `device`, connected to hub `hub`, through that hub.
    pub async fn request(
        &self,
        hub: HubId,
        device: &DeviceId,
        request: DeviceRequest,
        deadline: Duration,
    ) -> Result<DeviceReply, RpcError> {
        let url = self.peer_url(hub).ok_or(RpcError::Offline)?;
        self.client
            .rpc(&url, &self.key, device, request, deadline)
            .await
    }

    /// Asks a device connected to another hub, wherever it is now.
    pub async fn request_device(
        &self,
        device: &DeviceId,
        request: DeviceRequest,
        deadline: Duration,
    ) -> Result<DeviceReply, RpcError> {
        let hub = self
            .with_device(device, |r| r.hub)
            .ok_or(RpcError::Offline)?;
        self.request(hub, device, request, deadline).await
    }

    /// The HTTP client for other hubs.
    pub fn client(&self) -> &peer::Client {
        &self.client
    }

    /// Devices known on other hubs alive now, leaving out those `here` says are
    /// connected to this hub: a device that moved here from a hub that died is still
    /// listed as that hub's until the hub is forgotten, and must count once.
    pub fn remote_count(&self, here: impl Fn(&DeviceId) -> bool) -> usize {
        let alive: Vec<HubId> = self.peers().into_iter().map(|(id, _)| id).collect();
        self.remote
            .iter()
            .filter(|r| alive.contains(&r.hub) && !here(r.key()))
            .count()
    }

    fn put(&self, id: DeviceId, remote: Remote) {
        let old = self.remote.insert(id.clone(), remote.clone());
        if let Some(old) = &old {
            self.unindex(&id, old);
        }
        let mut ids = self.by_name.entry(remote.name.clone()).or_default();
        if !ids.contains(&id) {
            ids.push(id.clone());
        }
        drop(ids);
        for offer in remote.capabilities.iter() {
            let mut ids = self.by_protocol.entry(offer.protocol.clone()).or_default();
            if !ids.contains(&id) {
                ids.push(id.clone());
            }
        }
    }

    fn forget(&self, id: &DeviceId) {
        if let Some((_, old)) = self.remote.remove(id) {
            self.unindex(id, &old);
        }
    }

    /// Drops `id` from the indexes of `old`, except what its current entry still has.
    fn unindex(&self, id: &DeviceId, old: &Remote) {
        let now = self.remote.get(id).map(|r| r.clone());
        if now.as_ref().is_none_or(|r| r.name != old.name) {
            if let Some(mut ids) = self.by_name.get_mut(&old.name) {
                ids.retain(|d| d != id);
            }
            self.by_name.remove_if(&old.name, |_, ids| ids.is_empty());
        }
        for offer in old.capabilities.iter() {
            let kept = now
                .as_ref()
                .is_some_and(|r| r.capabilities.iter().any(|o| o.protocol == offer.protocol));
            if kept {
                continue;
            }
            if let Some(mut ids) = self.by_protocol.get_mut(&offer.protocol) {
                ids.retain(|d| d != id);
            }
            self.by_protocol
                .remove_if(&offer.protocol, |_, ids| ids.is_empty());
        }
    }

    /// Forgets every device of hub `hub`.
    fn forget_hub(&self, hub: HubId) {
        let gone: Vec<DeviceId> = self
            .remote
            .iter()
            .filter(|r| r.hub == hub)
            .map(|r| r.key().clone())
            .collect();
        for id in gone {
            if self.remote.get(&id).is_some_and(|r| r.hub == hub) {
                self.forget(&id);
            }
        }
    }
}

/// Whether a request carries this cluster's hub key: sent on by another of its hubs.
pub fn sent_by_hub(cluster: Option<&Cluster>, headers: &axum::http::HeaderMap) -> bool {
    match (cluster, headers.get(HUB_KEY_HEADER)) {
        (Some(c), Some(v)) => c.is_hub_key(v.as_bytes()),
        _ => false,
    }
}

/// The client's address another hub says a request came from.
pub fn client_addr(headers: &axum::http::HeaderMap) -> Option<std::net::SocketAddr> {
    headers.get(CLIENT_ADDR_HEADER)?.to_str().ok()?.parse().ok()
}

/// A request being served, counted in the hub's beat while it lives.
pub struct Serving(Arc<Cluster>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
