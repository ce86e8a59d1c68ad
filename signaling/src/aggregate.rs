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

use std::collections::BinaryHeap;
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
///
/// Each device's page comes newest first, so the pages are merged as sorted runs: the
/// newest head among the devices is taken `limit` times, never sorting every task the
/// devices sent, and only the tasks shown are copied (each once). A page that is not in
/// order (a faulty device) is put in order first, so it still merges right.
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
    let runs: Vec<Run<'_>> = parts
        .iter()
        .filter_map(|p| Some(Run::new(&p.status.device_id, &p.answer.as_ref()?.tasks)))
        .collect();
    let shown = |key: &MergedKey<'_>| {
        frontier
            .as_ref()
            .is_none_or(|f| *key >= (f.created_at, &f.device_id, f.task_id))
    };
    let mut heads: BinaryHeap<(MergedKey<'_>, usize)> = runs
        .iter()
        .enumerate()
        .filter_map(|(r, run)| Some((run.key(0)?, r)))
        .filter(|(key, _)| shown(key))
        .collect();
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut page: Vec<Task> = Vec::with_capacity(limit.min(heads.len() * 8));
    let mut taken = vec![0usize; runs.len()];
    while page.len() < limit {
        let Some((_, r)) = heads.pop() else { break };
        let run = &runs[r];
        page.extend(run.task(taken[r]));
        taken[r] += 1;
        if let Some(key) = run.key(taken[r]).filter(|k| shown(k)) {
            heads.push((key, r));
        }
    }
    let cut = !heads.is_empty();
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

/// A task's place in the merged order: newest first, then by device, then by id.
type MergedKey<'a> = (i64, &'a DeviceId, TaskId);

/// One device's page as a run in merged order, newest first.
struct Run<'a> {
    device: &'a DeviceId,
    tasks: &'a [Task],
    /// The order to read `tasks` in, when the device did not send them in order.
    order: Option<Vec<usize>>,
}

impl<'a> Run<'a> {
    fn new(device: &'a DeviceId, tasks: &'a [Task]) -> Self {
        let sorted = tasks
            .windows(2)
            .all(|w| (w[0].created_at, w[0].id) > (w[1].created_at, w[1].id));
        let order = (!sorted).then(|| {
            let mut order: Vec<usize> = (0..tasks.len()).collect();
            order.sort_by(|&a, &b| {
                let (a, b) = (&tasks[a], &tasks[b]);
                (b.created_at, b.id).cmp(&(a.created_at, a.id))
            });
            order
        });
        Run {
            device,
            tasks,
            order,
        }
    }

    fn at(&self, i: usize) -> Option<&'a Task> {
        let i = match &self.order {
            Some(order) => *order.get(i)?,
            None => i,
        };
        self.tasks.get(i)
    }

    fn key(&self, i: usize) -> Option<MergedKey<'a>> {
        self.at(i).map(|t| (t.created_at, self.device, t.id))
    }

    /// The `i`th task, copied, labelled with the device the hub asked.
    fn task(&self, i: usize) -> Option<Task> {
        let mut task = self.at(i)?.clone();
        task.device_id = Some(self.device.clone());
        Some(task)
    }
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
    fn a_page_sent_out_of_order_still_merges_newest_first() {
        let (a, b) = (dev(1), dev(2));
        let a_tasks: Vec<Task> = (0..10).map(|n| task(&a, 2 * n, n as u128)).collect();
        let b_tasks: Vec<Task> = (0..10)
            .map(|n| task(&b, 2 * n + 1, 100 + n as u128))
            .collect();
        let mut shuffled = device_page(&a_tasks, None, 20);
        shuffled.tasks.reverse();
        shuffled.tasks.swap(2, 7);
        let parts = vec![
            ok_part(&a, shuffled),
            ok_part(&b, device_page(&b_tasks, None, 20)),
        ];
        let (page, next) = merge(&parts, 8);
        let instants: Vec<i64> = page.iter().map(|t| t.created_at).collect();
        assert_eq!(instants, [19, 18, 17, 16, 15, 14, 13, 12]);
        assert_eq!(next.map(|c| c.created_at), Some(12));
        assert!(page
            .iter()
            .all(|t| t.device_id.as_ref() == Some(if t.created_at % 2 == 0 { &a } else { &b })));
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
