//! Capability routing: a caller (a user through the REST API, or a device through its
//! WebSocket) asks for `embeddings:1.0.0`, and the hub picks the device that serves it.
//!
//! This module owns the choice (who may be asked, in which order) and the one retry.
//! It reads the RAM registry only, never the catalog, and it never reaches a device the
//! caller may not use: permission is checked before a request is sent.
//!
//! Order: the preferred device, if it is online, serves the query and may be used; then
//! every other such device by score, lowest first. The score is the requests this hub
//! has in flight to the device, plus a load share in [0, 1) from its last heartbeat
//! (GPU utilisation, VRAM in use, CPU), so one queued request outweighs any load
//! difference. Devices within [`TIE`] of the best take turns.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use adi_protocol::{
    CapabilityAnswer, CapabilityQuery, DeviceId, DeviceReply, DeviceRequest, ErrorCode, LoadReport,
    RemoteError,
};
use tokio::time::Instant;
use tracing::{debug, debug_span, Instrument};

use crate::catalog::UserId;
use crate::registry::{Candidate, ConnHandle};
use crate::rpc::{self, RpcError};
use crate::HubState;

/// Scores closer than this to the best count as equal, so equal devices share the work.
pub const TIE: f64 = 0.05;

/// Who is asking; decides which devices may serve.
#[derive(Debug, Clone)]
pub enum Requester {
    /// A signed-in user: any online device they own.
    User(UserId),
    /// A device: any online device that shares one of its owners.
    Device {
        /// The asking device.
        id: DeviceId,
        /// Its owners, from the registry.
        owners: Arc<[UserId]>,
    },
}

impl Requester {
    /// Whether a device with `owners` may serve this requester.
    pub fn may_use(&self, owners: &[UserId]) -> bool {
        match self {
            Requester::User(u) => owners.contains(u),
            Requester::Device { owners: mine, .. } => owners.iter().any(|o| mine.contains(o)),
        }
    }
}

/// Why a capability request was not served. Each maps to one shared error code.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    /// No online device the caller may use serves the query.
    #[error("no online device of yours offers {0}")]
    NoCapableDevice(String),
    /// The preferred device may not be used by this caller.
    #[error("you may not use device {0}")]
    Forbidden(DeviceId),
    /// The chosen device (and the retry, if any) failed.
    #[error("{message}")]
    Failed {
        /// The shared code.
        code: ErrorCode,
        /// In words, safe to show.
        message: String,
    },
}

impl RouteError {
    /// The shared error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            RouteError::NoCapableDevice(_) => ErrorCode::NoCapableDevice,
            RouteError::Forbidden(_) => ErrorCode::Forbidden,
            RouteError::Failed { code, .. } => *code,
        }
    }

    /// As the wire's error.
    pub fn to_remote(&self) -> RemoteError {
        RemoteError {
            code: self.code(),
            message: self.to_string(),
        }
    }
}

/// Round-robin position among tied devices, shared by every request of this hub.
static TURN: AtomicUsize = AtomicUsize::new(0);

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

/// A candidate's score: lower is better.
pub fn score(c: &Candidate) -> f64 {
    f64::from(c.handle.in_flight()) + c.load_share
}

/// Orders candidates best first; the devices tied for best take turns at the front.
pub fn rank(mut candidates: Vec<Candidate>) -> Vec<Candidate> {
    let mut scored: Vec<(f64, Candidate)> = candidates.drain(..).map(|c| (score(&c), c)).collect();
    // Ties in score are broken by id, so the turn order is stable between requests.
    scored.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
    let Some(best) = scored.first().map(|s| s.0) else {
        return Vec::new();
    };
    let tied = scored.iter().take_while(|s| s.0 <= best + TIE).count();
    if tied > 1 {
        let turn = TURN.fetch_add(1, Ordering::Relaxed) % tied;
        scored[..tied].rotate_left(turn);
    }
    scored.into_iter().map(|(_, c)| c).collect()
}

/// The devices to try, in order, for `requester`.
pub fn choose(
    state: &HubState,
    requester: &Requester,
    query: &CapabilityQuery,
    prefer: Option<&DeviceId>,
) -> Result<Vec<Candidate>, RouteError> {
    let mut preferred = None;
    if let Some(p) = prefer {
        if let Some(c) = state.registry.candidate(p, query) {
            if requester.may_use(&c.owners) {
                preferred = Some(c);
            } else if matches!(requester, Requester::Device { .. }) {
                // Another owner's device: refused before anything reaches it. A user is
                // answered as if the device did not exist, so nothing leaks.
                return Err(RouteError::Forbidden(p.clone()));
            }
        }
    }
    let others = state
        .registry
        .candidates(query, |owners| requester.may_use(owners))
        .into_iter()
        .filter(|c| Some(&c.id) != preferred.as_ref().map(|p| &p.id))
        .collect();
    let mut order = rank(others);
    if let Some(p) = preferred {
        order.insert(0, p);
    }
    if order.is_empty() {
        return Err(RouteError::NoCapableDevice(query.to_string()));
    }
    Ok(order)
}

/// Counts a request as in flight to a device for as long as it lives.
struct InFlight(ConnHandle);

impl InFlight {
    fn new(c: &Candidate) -> Self {
        c.handle.in_flight_counter().fetch_add(1, Ordering::Relaxed);
        InFlight(c.handle.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight_counter().fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether a failure happened before the device could answer (or the device itself
/// failed), so an idempotent request may go to the next device.
fn worth_retrying(e: &RpcError) -> bool {
    match e {
        RpcError::Offline | RpcError::Disconnected | RpcError::Busy => true,
        RpcError::Remote(r) => matches!(
            r.code,
            ErrorCode::UpstreamError | ErrorCode::DeviceOffline | ErrorCode::Internal
        ),
        RpcError::Timeout(_) => false,
    }
}

fn failed(e: RpcError, device: &DeviceId) -> RouteError {
    let message = match &e {
        RpcError::Disconnected => {
            format!("device {device} disconnected before answering")
        }
        RpcError::Offline => format!("device {device} went offline"),
        RpcError::Timeout(d) => format!("device {device} did not answer within {d:?}"),
        RpcError::Busy => format!("device {device} is too busy to take the request"),
        RpcError::Remote(r) => r.message.clone(),
    };
    RouteError::Failed {
        code: e.code(),
        message,
    }
}

/// Serves one capability request: chooses, asks, and retries once on the next device
/// when the first failed before answering and its offer is idempotent. Ends exactly
/// once, by `deadline` at the latest.
pub async fn request(
    state: &HubState,
    requester: &Requester,
    query: &CapabilityQuery,
    payload: adi_protocol::Payload,
    prefer: Option<&DeviceId>,
    deadline: Duration,
) -> Result<CapabilityAnswer, RouteError> {
    let started = Instant::now();
    let order = choose(state, requester, query, prefer)?;
    let attempts = if order[0].offer.idempotent { 2 } else { 1 };
    let attempts = attempts.min(order.len());
    // Kept for a retry only when there can be one; otherwise moved into the request.
    let mut payload = Some(payload);
    let mut last = None;
    for (attempt, candidate) in order.iter().take(attempts).enumerate() {
        let body = if attempt + 1 < attempts {
            payload.clone()
        } else {
            payload.take()
        }
        .unwrap_or_default();
        let left = deadline.saturating_sub(started.elapsed());
        if left.is_zero() {
            break;
        }
        let span = debug_span!("capability", device_id = %candidate.id, attempt);
        let asked = async {
            let _counted = InFlight::new(candidate);
            rpc::call(
                &candidate.handle,
                DeviceRequest::Capability {
                    capability: query.clone(),
                    payload: body,
                },
                left,
            )
            .await
        }
        .instrument(span)
        .await;
        match asked {
            Ok(DeviceReply::Capability { payload }) => {
                return Ok(CapabilityAnswer {
                    from_device: candidate.id.clone(),
                    payload,
                })
            }
            Ok(_) => {
                return Err(RouteError::Failed {
                    code: ErrorCode::UpstreamError,
                    message: format!("device {} answered with something else", candidate.id),
                })
            }
            Err(e) => {
                debug!(device_id = %candidate.id, attempt, "capability request failed: {e}");
                let retry = worth_retrying(&e);
                last = Some(failed(e, &candidate.id));
                if !retry {
                    break;
                }
            }
        }
    }
    Err(last.unwrap_or_else(|| RouteError::Failed {
        code: ErrorCode::Timeout,
        message: format!("no answer within {deadline:?}"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use adi_protocol::{CapabilityOffer, GpuReport};

    fn candidate(b: u8, in_flight: u32, load: Option<LoadReport>) -> Candidate {
        let handle = ConnHandle::new(0);
        handle
            .in_flight_counter()
            .store(in_flight, Ordering::Relaxed);
        Candidate {
            id: DeviceId::from_mac(&[b; 16]),
            handle,
            offer: "embeddings:1.0.0"
                .parse::<CapabilityOffer>()
                .expect("offer"),
            load_share: load_share(load.as_ref()),
            owners: Arc::from(vec![]),
        }
    }

    fn cpu(percent: f32) -> Option<LoadReport> {
        Some(LoadReport {
            cpu_count: 4,
            cpu_percent: percent,
            ram_total_bytes: 1,
            ram_used_bytes: 0,
            gpus: vec![],
        })
    }

    fn gpu(util: u32, used: u64, total: u64) -> Option<LoadReport> {
        Some(LoadReport {
            gpus: vec![GpuReport {
                utilization_percent: util,
                memory_used_bytes: used,
                memory_total_bytes: total,
                ..Default::default()
            }],
            ..cpu(10.0).expect("load")
        })
    }

    #[test]
    fn in_flight_outweighs_load_and_load_breaks_the_rest() {
        let busy_idle = candidate(1, 1, cpu(0.0));
        let idle_loaded = candidate(2, 0, cpu(90.0));
        let idle_calm = candidate(3, 0, cpu(20.0));
        let order = rank(vec![busy_idle, idle_loaded, idle_calm]);
        let ids: Vec<u8> = order
            .iter()
            .map(|c| u8::from_str_radix(&c.id.as_str()[..2], 16).expect("hex"))
            .collect();
        assert_eq!(ids, vec![3, 2, 1]);
    }

    #[test]
    fn free_vram_and_idle_gpus_win() {
        let full = load_share(gpu(10, 90, 100).as_ref());
        let empty = load_share(gpu(10, 10, 100).as_ref());
        let hot = load_share(gpu(95, 10, 100).as_ref());
        assert!(empty < full, "{empty} < {full}");
        assert!(empty < hot, "{empty} < {hot}");
        assert!(load_share(None) > 0.0 && load_share(cpu(100.0).as_ref()) < 1.0);
    }

    #[test]
    fn tied_devices_take_turns() {
        let mut firsts = std::collections::HashMap::new();
        for _ in 0..100 {
            let order = rank(vec![
                candidate(1, 0, cpu(10.0)),
                candidate(2, 0, cpu(12.0)),
                candidate(3, 0, cpu(80.0)),
            ]);
            *firsts.entry(order[0].id.clone()).or_insert(0) += 1;
            assert_eq!(order[2].id, DeviceId::from_mac(&[3; 16]), "never tied");
        }
        // Other tests share the turn counter, so the split is even only to within one
        // turn per concurrent test.
        assert_eq!(firsts.len(), 2, "{firsts:?}");
        for n in firsts.values() {
            assert!((45..=55).contains(n), "{firsts:?}");
        }
    }
}
