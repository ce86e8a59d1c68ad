//! Capability routing: a caller (a user through the REST API, or a device through its
//! WebSocket) asks for `embeddings:1.0.0`, and the hub picks the device that serves it.
//!
//! This module owns the choice (who may be asked, in which order) and the one retry.
//! A request in flight is a [`Routed`] in the serving device's table of pending
//! requests; whatever happens to it there (answered, failed, dropped with the
//! connection) ends it exactly once, towards whoever asked or on to the next device.
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
    CapabilityAnswer, CapabilityOutcome, CapabilityQuery, DeviceId, DeviceReply, DeviceRequest,
    ErrorCode, RemoteError,
};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::debug;

pub use crate::access::Requester;
use crate::link::command::{Call, Command, Ended, Ending, ReplyTo, Routed, RpcError};
use crate::registry::{Candidate, ConnHandle, Via};
use crate::rpc;
use crate::HubState;

/// Scores closer than this to the best count as equal, so equal devices share the work.
pub const TIE: f64 = 0.05;

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

/// A candidate's score: lower is better.
pub fn score(c: &Candidate) -> f64 {
    f64::from(c.via.in_flight()) + c.load_share
}

/// Orders candidates best first; the devices tied for best take turns at the front,
/// the turn kept by `turn` (one counter per hub, shared by all its requests).
pub fn rank(mut candidates: Vec<Candidate>, turn: &AtomicUsize) -> Vec<Candidate> {
    let mut scored: Vec<(f64, Candidate)> = candidates.drain(..).map(|c| (score(&c), c)).collect();
    // Ties in score are broken by id, so the turn order is stable between requests.
    scored.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
    let Some(best) = scored.first().map(|s| s.0) else {
        return Vec::new();
    };
    let tied = scored.iter().take_while(|s| s.0 <= best + TIE).count();
    if tied > 1 {
        let turn = turn.fetch_add(1, Ordering::Relaxed) % tied;
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
        let found = state.registry.candidate(p, query).or_else(|| {
            state
                .cluster
                .as_ref()
                .and_then(|cluster| cluster.candidate(p, query))
        });
        if let Some(c) = found {
            if requester.may_use(&c.id, &c.members) {
                preferred = Some(c);
            } else if matches!(requester, Requester::Device { .. }) {
                // Another owner's device: refused before anything reaches it. A user is
                // answered as if the device did not exist, so nothing leaks.
                return Err(RouteError::Forbidden(p.clone()));
            }
        }
    }
    let mut others: Vec<Candidate> = state
        .registry
        .candidates(query, |id, members| requester.may_use(id, members))
        .into_iter()
        .filter(|c| Some(&c.id) != preferred.as_ref().map(|p| &p.id))
        .collect();
    if let Some(cluster) = &state.cluster {
        others.extend(
            cluster
                .candidates(query, |id, members| requester.may_use(id, members))
                .into_iter()
                .filter(|c| {
                    Some(&c.id) != preferred.as_ref().map(|p| &p.id)
                        && state.registry.connected_at(&c.id).is_none()
                }),
        );
    }
    let mut order = rank(others, &state.routing_turn);
    if let Some(p) = preferred {
        order.insert(0, p);
    }
    if order.is_empty() {
        return Err(RouteError::NoCapableDevice(query.to_string()));
    }
    Ok(order)
}

/// Counts a request as in flight to a device for as long as it lives.
struct InFlight(Via);

impl InFlight {
    fn new(c: &Candidate) -> Self {
        c.via.in_flight_counter().fetch_add(1, Ordering::Relaxed);
        InFlight(c.via.clone())
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
            ErrorCode::UpstreamError
                | ErrorCode::DeviceOffline
                | ErrorCode::Internal
                | ErrorCode::Unavailable
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

/// Serves one capability request for a caller in this hub (the REST API): chooses,
/// sends, and waits for the one ending, by `deadline` at the latest.
pub async fn request(
    state: &Arc<HubState>,
    requester: &Requester,
    query: &CapabilityQuery,
    payload: adi_protocol::Payload,
    prefer: Option<&DeviceId>,
    deadline: Duration,
) -> Result<CapabilityAnswer, RouteError> {
    let order = choose(state, requester, query, prefer)?;
    let (tx, rx) = oneshot::channel();
    dispatch(
        state,
        &order,
        requester,
        query.clone(),
        payload,
        Instant::now() + deadline,
        Destination::Waiter(tx),
    );
    match tokio::time::timeout(deadline, rx).await {
        Ok(Ok(ending)) => ending,
        // A route always ends, if only by being dropped; this is a hub shutting down.
        Ok(Err(_)) => Err(RouteError::Failed {
            code: ErrorCode::DeviceOffline,
            message: "the hub stopped before the device answered".into(),
        }),
        Err(_) => Err(timed_out(deadline)),
    }
}

/// The ending of a request whose deadline passed with no answer.
pub fn timed_out(deadline: Duration) -> RouteError {
    RouteError::Failed {
        code: ErrorCode::Timeout,
        message: format!("no answer within {deadline:?}"),
    }
}

/// Sends a capability request to the first device of `order` (from [`choose`]); its
/// one ending goes to `to`. Nothing waits here: the serving device's connection hands
/// the answer straight to `to`, and a failure before the device answered sends an
/// idempotent request on to the next best device once. The deadline is not kept here
/// but by whoever waits at `to`, which may stop waiting at any time.
pub(crate) fn dispatch(
    state: &Arc<HubState>,
    order: &[Candidate],
    requester: &Requester,
    query: CapabilityQuery,
    payload: adi_protocol::Payload,
    deadline: Instant,
    to: Destination,
) {
    let Some(first) = order.first() else {
        to.deliver(Err(RouteError::NoCapableDevice(query.to_string())));
        return;
    };
    // The payload is copied for a second attempt only when there can be one.
    let retry = (first.offer.idempotent && order.len() > 1).then(|| Retry {
        state: state.clone(),
        requester: requester.clone(),
        query: query.clone(),
        payload: payload.clone(),
    });
    send(state, first, query, payload, deadline, to, retry);
}

/// Where a routed request's one ending goes.
#[derive(Debug)]
pub(crate) enum Destination {
    /// A device's own request: the ending is queued on its connection, which writes it
    /// unless the request has already timed out there.
    Device {
        /// The asking device's connection.
        link: ConnHandle,
        /// The device's id for the request.
        request_id: u64,
        /// The connection's own number for it.
        ask: u64,
    },
    /// A caller in this hub.
    Waiter(oneshot::Sender<Result<CapabilityAnswer, RouteError>>),
}

impl Destination {
    fn deliver(self, ending: Result<CapabilityAnswer, RouteError>) {
        match self {
            Destination::Device {
                link,
                request_id,
                ask,
            } => {
                let outcome = match ending {
                    Ok(answer) => CapabilityOutcome::Ok(answer),
                    Err(e) => {
                        debug!(request_id, code = %e.code(), "capability request not served: {e}");
                        CapabilityOutcome::Error(e.to_remote())
                    }
                };
                // Endings are never refused for room; this fails only when the asking
                // device is gone, and then nobody is left to tell.
                let _ = link.try_send(Command::Ended(Box::new(Ended {
                    request_id,
                    ask,
                    outcome,
                })));
            }
            Destination::Waiter(tx) => {
                let _ = tx.send(ending);
            }
        }
    }

    fn is_gone(&self) -> bool {
        match self {
            Destination::Device { link, .. } => link.is_closed(),
            Destination::Waiter(tx) => tx.is_closed(),
        }
    }
}

/// What a second attempt needs.
struct Retry {
    state: Arc<HubState>,
    requester: Requester,
    query: CapabilityQuery,
    payload: adi_protocol::Payload,
}

/// One attempt of a routed request at one device: where its ending goes, the device's
/// in-flight count it holds, and what a second attempt would need.
struct Route {
    to: Destination,
    device: DeviceId,
    counted: InFlight,
    deadline: Instant,
    retry: Option<Retry>,
}

impl Ending for Route {
    fn end(self: Box<Self>, answer: Result<DeviceReply, RpcError>) {
        let Route {
            to,
            device,
            counted,
            deadline,
            retry,
        } = *self;
        // No longer in flight to this device, before the next one is chosen.
        drop(counted);
        let ending = match answer {
            Ok(DeviceReply::Capability { payload }) => Ok(CapabilityAnswer {
                from_device: device,
                payload,
            }),
            Ok(_) => Err(RouteError::Failed {
                code: ErrorCode::UpstreamError,
                message: format!("device {device} answered with something else"),
            }),
            Err(e) => {
                debug!(device_id = %device, "capability request failed: {e}");
                if to.is_gone() {
                    return;
                }
                let next = retry
                    .filter(|_| worth_retrying(&e) && Instant::now() < deadline)
                    .and_then(|r| Some((r.next_device(&device)?, r)));
                if let Some((next, r)) = next {
                    send(&r.state, &next, r.query, r.payload, deadline, to, None);
                    return;
                }
                Err(failed(e, &device))
            }
        };
        to.deliver(ending);
    }

    fn is_abandoned(&self) -> bool {
        self.to.is_gone()
    }
}

impl Retry {
    /// The best device now, other than the one that failed.
    fn next_device(&self, failed: &DeviceId) -> Option<Candidate> {
        choose(&self.state, &self.requester, &self.query, None)
            .ok()?
            .into_iter()
            .find(|c| &c.id != failed)
    }
}

/// Hands one attempt to `candidate`'s connection; a refusal ends it at once.
fn send(
    state: &Arc<HubState>,
    candidate: &Candidate,
    query: CapabilityQuery,
    payload: adi_protocol::Payload,
    deadline: Instant,
    to: Destination,
    retry: Option<Retry>,
) {
    let left = deadline.saturating_duration_since(Instant::now());
    let routed = Routed::new(Box::new(Route {
        to,
        device: candidate.id.clone(),
        counted: InFlight::new(candidate),
        deadline,
        retry,
    }));
    let call = Call {
        request: DeviceRequest::Capability {
            capability: query,
            payload,
        },
        deadline: left,
        reply: ReplyTo::Routed(routed),
    };
    match &candidate.via {
        Via::Local(handle) => {
            if let Err((why, Command::Request(call))) =
                handle.try_send_or_return(Command::Request(Box::new(call)))
            {
                call.reply.end(Err(rpc::refused(why)));
            }
        }
        Via::Remote { hub, .. } => {
            let Some(cluster) = state.cluster.clone() else {
                call.reply.end(Err(RpcError::Offline));
                return;
            };
            let (hub, device) = (*hub, candidate.id.clone());
            // The hub it is on asks it; the ending comes back here as the one answer.
            tokio::spawn(async move {
                let answer = cluster
                    .request(hub, &device, call.request, call.deadline)
                    .await;
                call.reply.end(answer);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::load_share;
    use adi_protocol::{CapabilityOffer, GpuReport, LoadReport};

    fn candidate(b: u8, in_flight: u32, load: Option<LoadReport>) -> Candidate {
        let handle = ConnHandle::new(0);
        handle
            .in_flight_counter()
            .store(in_flight, Ordering::Relaxed);
        Candidate {
            id: DeviceId::from_mac(&[b; 16]),
            via: Via::Local(handle),
            offer: "embeddings:1.0.0"
                .parse::<CapabilityOffer>()
                .expect("offer"),
            load_share: load_share(load.as_ref()),
            members: Arc::from(vec![]),
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
        let order = rank(
            vec![busy_idle, idle_loaded, idle_calm],
            &AtomicUsize::new(0),
        );
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
        let turn = AtomicUsize::new(0);
        let mut firsts = std::collections::HashMap::new();
        for _ in 0..100 {
            let order = rank(
                vec![
                    candidate(1, 0, cpu(10.0)),
                    candidate(2, 0, cpu(12.0)),
                    candidate(3, 0, cpu(80.0)),
                ],
                &turn,
            );
            *firsts.entry(order[0].id.clone()).or_insert(0) += 1;
            assert_eq!(order[2].id, DeviceId::from_mac(&[3; 16]), "never tied");
        }
        // The two tied devices lead exactly every other time.
        assert_eq!(firsts.len(), 2, "{firsts:?}");
        assert!(firsts.values().all(|n| *n == 50), "{firsts:?}");
    }
}
