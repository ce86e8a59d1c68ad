//! Merged views across a user's devices: fan a query out to every device that keeps
//! tasks, each with its own deadline, and merge the parts newest first. The hub stores
//! no task; it only asks and merges.
//!
//! Every answer says what each device did (`ok`, `timeout`, `offline`, `error`): a
//! partial answer is labelled, never silent. Paging uses a cursor over the merged order
//! `(created_at, device_id, task_id)` descending; each device is asked only for what
//! lies after the cursor in that order, so no task is shown twice or skipped while
//! devices keep adding tasks (new tasks sort before the cursor).
//!
//! A device may answer fewer tasks than asked and still have more (it fills a page up
//! to what fits in one frame). The merged page then ends no later than that device's
//! last task: anything older could be preceded by tasks the device has not sent yet.

use std::time::Duration;

pub use adi_protocol::client::{DeviceStatus, PartStatus};
use adi_protocol::tasks::{Position, Task, TaskFilter, TaskId, TaskPage, TaskStats};
use adi_protocol::{DeviceId, DeviceReply, DeviceRequest};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use futures_util::stream::{FuturesUnordered, Stream, StreamExt};
use serde::{Deserialize, Serialize};

use crate::catalog::DeviceRecord;
use crate::rpc::{self, RpcError};
use crate::HubState;

/// The capability a device must declare to be asked about tasks.
pub const TASKS_CAPABILITY: &str = "tasks";

/// A position in the merged, newest-first order across devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// `created_at` of the last task shown.
    #[serde(rename = "t")]
    pub created_at: i64,
    /// Its device.
    #[serde(rename = "d")]
    pub device_id: DeviceId,
    /// Its id.
    #[serde(rename = "i")]
    pub task_id: TaskId,
}

impl Cursor {
    /// The opaque string clients pass back.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Parses what `encode` produced; `None` for anything else.
    pub fn decode(s: &str) -> Option<Self> {
        let bytes = URL_SAFE_NO_PAD.decode(s.trim()).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// What `device` must list after so that its part holds exactly the tasks that
    /// follow this cursor in the merged order.
    pub fn position_for(&self, device: &DeviceId) -> Position {
        let id = match device.cmp(&self.device_id) {
            // Same instant, smaller device id: all its tasks at that instant follow.
            std::cmp::Ordering::Less => TaskId(uuid::Uuid::max()),
            // Same instant, larger device id: none of them follow.
            std::cmp::Ordering::Greater => TaskId(uuid::Uuid::nil()),
            std::cmp::Ordering::Equal => self.task_id,
        };
        Position {
            created_at: self.created_at,
            id,
        }
    }
}

/// One device's answer to a fan-out.
#[derive(Debug, Clone)]
pub struct Part<T> {
    /// What happened.
    pub status: DeviceStatus,
    /// The answer, when `status` is ok.
    pub answer: Option<T>,
}

fn part<T>(device: &DeviceRecord, result: Result<T, RpcError>) -> Part<T> {
    let (status, error, answer) = match result {
        Ok(a) => (PartStatus::Ok, None, Some(a)),
        Err(e @ RpcError::Timeout(_)) => (PartStatus::Timeout, Some(e.to_string()), None),
        Err(e @ (RpcError::Offline | RpcError::Disconnected)) => {
            (PartStatus::Offline, Some(e.to_string()), None)
        }
        Err(e) => (PartStatus::Error, Some(e.to_string()), None),
    };
    Part {
        status: DeviceStatus {
            device_id: device.id.clone(),
            name: device.name.clone(),
            status,
            error,
        },
        answer,
    }
}

/// Whether a device declares the tasks capability.
pub fn keeps_tasks(device: &DeviceRecord) -> bool {
    device
        .capabilities
        .iter()
        .any(|c| c.protocol == TASKS_CAPABILITY)
}

/// Asks every device for one page of its tasks after `cursor`; the parts come out of
/// the stream in the order devices answer, so a caller can pass each on at once.
pub fn list_parts<'a>(
    state: &'a HubState,
    devices: &'a [DeviceRecord],
    filter: &'a TaskFilter,
    cursor: Option<&'a Cursor>,
    limit: u32,
    deadline: Duration,
) -> impl Stream<Item = Part<TaskPage>> + 'a {
    devices
        .iter()
        .map(move |device| async move {
            let request = DeviceRequest::ListTasks {
                filter: filter.clone(),
                after: cursor.map(|c| c.position_for(&device.id)),
                limit,
            };
            let result = rpc::request(state, &device.id, request, deadline)
                .await
                .and_then(|reply| match reply {
                    DeviceReply::Tasks { mut page } => {
                        // The hub, not the device, vouches for where a task lives.
                        for t in &mut page.tasks {
                            t.device_id = Some(device.id.clone());
                        }
                        Ok(page)
                    }
                    other => Err(unexpected(&other)),
                });
            part(device, result)
        })
        .collect::<FuturesUnordered<_>>()
}

/// Merges device pages newest first into one page of at most `limit` tasks, and the
/// cursor for the next page when more may exist.
///
/// A device whose page has a `next` has more tasks, all after that position; so the
/// merged page stops at the newest such position (the *frontier*) across devices, or
/// a later page would start past tasks not yet seen. Each device's own tasks up to its
/// position are all in its page, so whatever lies before the frontier is complete.
pub fn merge(parts: &[Part<TaskPage>], limit: u32) -> (Vec<Task>, Option<Cursor>) {
    let frontier: Option<Cursor> = parts
        .iter()
        .filter_map(|p| {
            let next = p.answer.as_ref()?.next?;
            Some(Cursor {
                created_at: next.created_at,
                device_id: p.status.device_id.clone(),
                task_id: next.id,
            })
        })
        .max_by(|a, b| cursor_key(a).cmp(&cursor_key(b)));
    let mut all: Vec<&Task> = parts
        .iter()
        .filter_map(|p| p.answer.as_ref())
        .flat_map(|page| page.tasks.iter())
        .filter(|t| {
            frontier
                .as_ref()
                .is_none_or(|f| merged_key(t) >= (f.created_at, Some(&f.device_id), f.task_id))
        })
        .collect();
    all.sort_by(|a, b| merged_key(b).cmp(&merged_key(a)));
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let cut = all.len() > limit;
    let page: Vec<Task> = all.into_iter().take(limit).cloned().collect();
    let next = match (page.last(), frontier) {
        (Some(last), frontier) if cut || frontier.is_some() => Some(Cursor {
            created_at: last.created_at,
            device_id: last
                .device_id
                .clone()
                .unwrap_or_else(|| DeviceId::from_mac(&[0; 16])),
            task_id: last.id,
        }),
        // A device said "more" yet sent nothing: go on from where it stands.
        (None, Some(frontier)) => Some(frontier),
        _ => None,
    };
    (page, next)
}

fn merged_key(t: &Task) -> (i64, Option<&DeviceId>, TaskId) {
    (t.created_at, t.device_id.as_ref(), t.id)
}

fn cursor_key(c: &Cursor) -> (i64, &DeviceId, TaskId) {
    (c.created_at, &c.device_id, c.task_id)
}

/// Asks every device for its counts.
pub async fn stats_parts(
    state: &HubState,
    devices: &[DeviceRecord],
    deadline: Duration,
) -> Vec<Part<TaskStats>> {
    let pending: FuturesUnordered<_> = devices
        .iter()
        .map(|device| async move {
            let result = rpc::request(state, &device.id, DeviceRequest::TaskStats, deadline)
                .await
                .and_then(|reply| match reply {
                    DeviceReply::Stats { stats } => Ok(stats),
                    other => Err(unexpected(&other)),
                });
            part(device, result)
        })
        .collect();
    pending.collect().await
}

/// A reply of the wrong kind is the device's fault.
pub fn unexpected(reply: &DeviceReply) -> RpcError {
    let kind = match reply {
        DeviceReply::Task { .. } => "task",
        DeviceReply::Tasks { .. } => "tasks",
        DeviceReply::Stats { .. } => "stats",
        DeviceReply::Logs { .. } => "logs",
        DeviceReply::Capability { .. } => "capability",
        DeviceReply::CanRun { .. } => "can_run",
    };
    RpcError::Remote(adi_protocol::RemoteError {
        code: adi_protocol::ErrorCode::UpstreamError,
        message: format!("the device answered with an unexpected {kind} reply"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use adi_protocol::tasks::TaskStatus;

    fn dev(b: u8) -> DeviceId {
        DeviceId::from_mac(&[b; 16])
    }

    fn task(device: &DeviceId, at: i64, id: u128) -> Task {
        Task {
            id: TaskId(uuid::Uuid::from_u128(id)),
            title: format!("t{at}"),
            description: String::new(),
            status: TaskStatus::Pending,
            command: None,
            requirements: vec![],
            input: None,
            output: None,
            exit_code: None,
            error: None,
            created_at: at,
            updated_at: at,
            device_id: Some(device.clone()),
        }
    }

    /// Simulates a device answering ListTasks over its own tasks.
    fn device_page(tasks: &[Task], after: Option<Position>, limit: u32) -> TaskPage {
        let mut mine: Vec<Task> = tasks
            .iter()
            .filter(|t| after.is_none_or(|p| (t.created_at, t.id) < (p.created_at, p.id)))
            .cloned()
            .collect();
        mine.sort_by_key(|t| std::cmp::Reverse((t.created_at, t.id)));
        let full = mine.len() > limit as usize;
        mine.truncate(limit as usize);
        let next = if full || mine.len() == limit as usize {
            mine.last().map(|t| Position {
                created_at: t.created_at,
                id: t.id,
            })
        } else {
            None
        };
        TaskPage { tasks: mine, next }
    }

    fn ok_part(device: &DeviceId, page: TaskPage) -> Part<TaskPage> {
        Part {
            status: DeviceStatus {
                device_id: device.clone(),
                name: "d".into(),
                status: PartStatus::Ok,
                error: None,
            },
            answer: Some(page),
        }
    }

    #[test]
    fn paging_across_devices_with_equal_timestamps_visits_each_task_once() {
        let devices = [dev(1), dev(2), dev(3)];
        let mut per_device: Vec<Vec<Task>> = vec![vec![]; 3];
        let mut n = 0u128;
        for (i, d) in devices.iter().enumerate() {
            for at in 0..40 {
                // Many collisions: timestamps repeat across and within devices.
                per_device[i].push(task(d, at / 3, n));
                n += 1;
            }
        }
        let mut seen = std::collections::HashSet::new();
        let mut cursor: Option<Cursor> = None;
        let mut last_key = None;
        for _ in 0..1000 {
            let parts: Vec<_> = devices
                .iter()
                .zip(&per_device)
                .map(|(d, ts)| {
                    ok_part(
                        d,
                        device_page(ts, cursor.as_ref().map(|c| c.position_for(d)), 7),
                    )
                })
                .collect();
            let (page, next) = merge(&parts, 7);
            for t in &page {
                let key = (t.created_at, t.device_id.clone(), t.id);
                if let Some(prev) = &last_key {
                    assert!(&key < prev, "order must be strictly descending");
                }
                last_key = Some(key);
                assert!(seen.insert(t.id), "task {} shown twice", t.id);
            }
            match next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(seen.len(), 120, "every task visited");
    }

    /// A device that fills its page up to a budget: at most `cap` tasks however many
    /// were asked, saying where to go on when it stopped short.
    fn capped_page(tasks: &[Task], after: Option<Position>, limit: u32, cap: u32) -> TaskPage {
        let full = device_page(tasks, after, limit);
        if full.tasks.len() <= cap as usize {
            return full;
        }
        let mut page = full;
        page.tasks.truncate(cap as usize);
        page.next = page.tasks.last().map(|t| Position {
            created_at: t.created_at,
            id: t.id,
        });
        page
    }

    #[test]
    fn a_device_answering_a_short_page_is_not_skipped() {
        let (a, b) = (dev(1), dev(2));
        // Device a has ten tasks at even instants, b ten at odd ones: interleaved.
        let a_tasks: Vec<Task> = (0..10).map(|n| task(&a, 2 * n, n as u128)).collect();
        let b_tasks: Vec<Task> = (0..10)
            .map(|n| task(&b, 2 * n + 1, 100 + n as u128))
            .collect();
        // Asked for 6, a sends only its newest 2 (instants 18, 16) and says "more".
        let parts = vec![
            ok_part(&a, capped_page(&a_tasks, None, 6, 2)),
            ok_part(&b, device_page(&b_tasks, None, 6)),
        ];
        let (page, next) = merge(&parts, 6);
        let instants: Vec<i64> = page.iter().map(|t| t.created_at).collect();
        // Nothing older than a's last task (16): a's 14, 12, ... are not known yet.
        assert_eq!(instants, [19, 18, 17, 16]);
        let next = next.expect("more to come");
        let rest = capped_page(&a_tasks, Some(next.position_for(&a)), 6, 2);
        assert_eq!(rest.tasks.first().map(|t| t.created_at), Some(14));
    }

    #[test]
    fn paging_with_devices_that_cut_pages_short_visits_each_task_once() {
        let devices = [dev(1), dev(2), dev(3)];
        // Each device fills a page up to its own budget: 2, 5 and all that was asked.
        let caps = [2u32, 5, u32::MAX];
        let mut per_device: Vec<Vec<Task>> = vec![vec![]; 3];
        let mut n = 0u128;
        for (i, d) in devices.iter().enumerate() {
            for at in 0..40 {
                per_device[i].push(task(d, (at * (i as i64 + 1)) / 3, n));
                n += 1;
            }
        }
        let mut seen = std::collections::HashSet::new();
        let mut cursor: Option<Cursor> = None;
        let mut last_key = None;
        for _ in 0..1000 {
            let parts: Vec<_> = devices
                .iter()
                .zip(&per_device)
                .zip(caps)
                .map(|((d, ts), cap)| {
                    let after = cursor.as_ref().map(|c| c.position_for(d));
                    ok_part(d, capped_page(ts, after, 7, cap))
                })
                .collect();
            let (page, next) = merge(&parts, 7);
            assert!(
                !page.is_empty() || next.is_none(),
                "an empty page must be the last"
            );
            for t in &page {
                let key = (t.created_at, t.device_id.clone(), t.id);
                if let Some(prev) = &last_key {
                    assert!(&key < prev, "order must be strictly descending");
                }
                last_key = Some(key);
                assert!(seen.insert(t.id), "task {} shown twice", t.id);
            }
            match next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(seen.len(), 120, "every task visited");
    }

    #[test]
    fn cursor_round_trips_and_garbage_is_refused() {
        let c = Cursor {
            created_at: 42,
            device_id: dev(9),
            task_id: TaskId(uuid::Uuid::from_u128(5)),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(Cursor::decode("!!!"), None);
        assert_eq!(Cursor::decode(&URL_SAFE_NO_PAD.encode("{}")), None);
    }

    #[test]
    fn failed_parts_contribute_nothing_but_are_reported() {
        let d = dev(1);
        let parts = vec![
            ok_part(&d, device_page(&[task(&d, 5, 1)], None, 10)),
            part::<TaskPage>(
                &DeviceRecord {
                    id: dev(2),
                    name: "gone".into(),
                    services: vec![],
                    capabilities: vec![],
                    location: None,
                    hardware: None,
                    created_at: 0,
                    members: vec![],
                },
                Err(RpcError::Offline),
            ),
        ];
        let (page, next) = merge(&parts, 10);
        assert_eq!(page.len(), 1);
        assert!(next.is_none());
        assert_eq!(parts[1].status.status, PartStatus::Offline);
    }
}
