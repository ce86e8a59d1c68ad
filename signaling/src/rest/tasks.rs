//! REST routes for tasks: per-device operations forwarded to the device that owns the
//! task, and the merged views across all of a caller's devices. Members only (reading
//! needs the `devices:read` scope, creating and cancelling `tasks:write`); a device the
//! caller is not a member of is the same 404 as one that does not exist.
//!
//! A task travels to its device and back in single frames, so a task is refused here
//! (413) when its fields are larger than one frame can carry, before it is sent: an
//! oversized frame would cost the device its connection.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use adi_protocol::tasks::{NewTask, Position, Task, TaskId, TaskStats, TaskStatus};
use adi_protocol::{encode, DeviceReply, DeviceRequest, ErrorCode, HubToDevice, Scope};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use futures_util::stream::{self, Stream, StreamExt};
use serde::{Deserialize, Serialize};

use crate::aggregate::{self, Cursor, DeviceStatus};
use adi_protocol::views::{AggregateTasks, CanRun};

use super::error::ApiError;
use super::extract::{Caller, Json};
use super::listing::{task_devices, ListParams};
use crate::access;
use crate::audit;
use crate::catalog::DeviceRecord;
use crate::rpc::{self, RpcError};
use crate::HubState;

type AppState = Arc<HubState>;

/// How long a single-device operation may take.
const DEVICE_DEADLINE: Duration = Duration::from_secs(10);
/// How often a log follower asks the device for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(250);
/// Most bytes a task's description may take, as JSON.
pub const MAX_DESCRIPTION_BYTES: usize = 16 * 1024;
/// Most bytes a task's command (program and arguments) may take, as JSON.
pub const MAX_COMMAND_BYTES: usize = 8 * 1024;
/// Most bytes a task's input may take, as JSON.
pub const MAX_INPUT_BYTES: usize = 16 * 1024;
/// Most bytes a task's requirements may take, as JSON.
pub const MAX_REQUIREMENTS_BYTES: usize = 1024;
/// Room a device's answer about a task needs beyond what the request carried: id,
/// status, times, device id, the response envelope.
const TASK_REPLY_EXTRA: usize = 1024;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/api/cocoons/{id}/tasks",
            post(create_task).get(list_device_tasks),
        )
        .route("/api/cocoons/{id}/tasks/can-run", post(can_run))
        .route("/api/cocoons/{id}/tasks/{task}", get(get_task))
        .route("/api/cocoons/{id}/tasks/{task}/cancel", post(cancel_task))
        .route("/api/cocoons/{id}/tasks/{task}/logs", get(task_logs))
        .route("/api/aggregate/tasks", get(aggregate_tasks))
        .route("/api/aggregate/stats", get(aggregate_stats))
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::BadRequest, msg)
}

fn too_large(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::PayloadTooLarge, msg)
}

fn json_len<T: Serialize>(value: &T) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX, |v| v.len())
}

/// Refuses a task whose fields are too large for the frames that carry it to its
/// device and back (`max_frame_bytes` is this hub's limit): each field has its own
/// bound, and the whole request must leave room for the device's answer.
fn check_task_size(task: &NewTask, max_frame_bytes: usize) -> Result<(), ApiError> {
    let fields = [
        (
            "description",
            json_len(&task.description),
            MAX_DESCRIPTION_BYTES,
        ),
        ("command", json_len(&task.command), MAX_COMMAND_BYTES),
        ("input", json_len(&task.input), MAX_INPUT_BYTES),
        (
            "requirements",
            json_len(&task.requirements),
            MAX_REQUIREMENTS_BYTES,
        ),
    ];
    for (name, len, max) in fields {
        if len > max {
            return Err(too_large(format!(
                "the task's {name} is too large: {len} bytes as JSON, at most {max} allowed"
            )));
        }
    }
    let request = HubToDevice::Request {
        request_id: u64::MAX,
        deadline_ms: u64::MAX,
        request: DeviceRequest::CreateTask { task: task.clone() },
    };
    let len = encode(&request).len() + TASK_REPLY_EXTRA;
    if len > max_frame_bytes {
        return Err(too_large(format!(
            "the task is too large: it needs {len} bytes on the way to its device, \
             and this hub's frames hold at most {max_frame_bytes}"
        )));
    }
    Ok(())
}

fn parse_task_id(raw: &str) -> Result<TaskId, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::new(ErrorCode::NotFound, "no such task"))
}

async fn ask(
    state: &HubState,
    device: &DeviceRecord,
    request: DeviceRequest,
) -> Result<DeviceReply, ApiError> {
    Ok(rpc::request(state, &device.id, request, DEVICE_DEADLINE).await?)
}

fn expect_task(device: &DeviceRecord, reply: DeviceReply) -> Result<Task, ApiError> {
    match reply {
        DeviceReply::Task { mut task } => {
            task.device_id = Some(device.id.clone());
            Ok(*task)
        }
        other => Err(aggregate::unexpected(&other).into()),
    }
}

async fn create_task(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(new): Json<NewTask>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    let device = access::device(&state, &caller, &id, Scope::TasksWrite).await?;
    let title = new.title.trim();
    if title.is_empty() || title.chars().count() > 200 {
        return Err(bad("title must be 1 to 200 characters"));
    }
    if new
        .command
        .as_ref()
        .is_some_and(|c| c.is_empty() || c[0].is_empty())
    {
        return Err(bad("command must name a program"));
    }
    check_task_size(&new, state.config.max_frame_bytes)?;
    let reply = ask(&state, &device, DeviceRequest::CreateTask { task: new }).await?;
    let task = expect_task(&device, reply)?;
    audit::record(
        &state,
        audit::by(&caller, audit::Kind::TaskCreated)
            .on(&device.id)
            .detail(format!("task {}", task.id)),
    )
    .await;
    Ok((StatusCode::CREATED, Json(task)))
}

/// What `POST /api/cocoons/{id}/tasks/can-run` asks about: the parts of a task that
/// decide whether a device runs it (the rest of a create body is accepted and ignored).
#[derive(Deserialize)]
struct RunCheck {
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    requirements: Vec<String>,
}

/// Asks the device whether it would run a task, without creating it.
async fn can_run(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(check): Json<RunCheck>,
) -> Result<Json<CanRun>, ApiError> {
    let device = access::device(&state, &caller, &id, Scope::DevicesRead).await?;
    let task = NewTask {
        command: check.command,
        requirements: check.requirements,
        ..NewTask::default()
    };
    check_task_size(&task, state.config.max_frame_bytes)?;
    match ask(&state, &device, DeviceRequest::CanRun { task }).await? {
        DeviceReply::CanRun {
            can_run,
            reason,
            exec_allowed,
            has_gpu,
        } => Ok(Json(CanRun {
            device_id: device.id,
            can_run,
            reason,
            exec_allowed,
            has_gpu,
        })),
        other => Err(aggregate::unexpected(&other).into()),
    }
}

async fn get_task(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, task)): Path<(String, String)>,
) -> Result<Json<Task>, ApiError> {
    let device = access::device(&state, &caller, &id, Scope::DevicesRead).await?;
    let task = parse_task_id(&task)?;
    let reply = ask(&state, &device, DeviceRequest::GetTask { id: task }).await?;
    Ok(Json(expect_task(&device, reply)?))
}

async fn cancel_task(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, task)): Path<(String, String)>,
) -> Result<Json<Task>, ApiError> {
    let device = access::device(&state, &caller, &id, Scope::TasksWrite).await?;
    let task = parse_task_id(&task)?;
    let reply = ask(&state, &device, DeviceRequest::CancelTask { id: task }).await?;
    let task = expect_task(&device, reply)?;
    audit::record(
        &state,
        audit::by(&caller, audit::Kind::TaskCancelled)
            .on(&device.id)
            .detail(format!("task {}", task.id)),
    )
    .await;
    Ok(Json(task))
}

#[derive(Serialize)]
struct DeviceTaskPage {
    tasks: Vec<Task>,
    next_cursor: Option<String>,
}

async fn list_device_tasks(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(params): Query<ListParams>,
) -> Result<Json<DeviceTaskPage>, ApiError> {
    let device = access::device(&state, &caller, &id, Scope::DevicesRead).await?;
    let filter = params.filter()?;
    let limit = params.limit()?;
    let after = params
        .cursor
        .as_deref()
        .map(|c| {
            URL_SAFE_NO_PAD
                .decode(c.trim())
                .ok()
                .and_then(|b| serde_json::from_slice::<Position>(&b).ok())
                .ok_or_else(|| bad("cursor is not one this hub handed out"))
        })
        .transpose()?;
    let reply = ask(
        &state,
        &device,
        DeviceRequest::ListTasks {
            filter,
            after,
            limit,
        },
    )
    .await?;
    let DeviceReply::Tasks { mut page } = reply else {
        return Err(aggregate::unexpected(&reply).into());
    };
    for t in &mut page.tasks {
        t.device_id = Some(device.id.clone());
    }
    Ok(Json(DeviceTaskPage {
        tasks: page.tasks,
        next_cursor: page
            .next
            .map(|p| URL_SAFE_NO_PAD.encode(serde_json::to_vec(&p).unwrap_or_default())),
    }))
}

async fn aggregate_tasks(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<ListParams>,
) -> Result<Json<AggregateTasks>, ApiError> {
    let filter = params.filter()?;
    let limit = params.limit()?;
    let deadline = params.deadline()?;
    let cursor = params
        .cursor
        .as_deref()
        .map(|c| Cursor::decode(c).ok_or_else(|| bad("cursor is not one this hub handed out")))
        .transpose()?;
    let (online, mut statuses) = task_devices(&state, &caller).await?;
    let parts: Vec<_> =
        aggregate::list_parts(&state, &online, &filter, cursor.as_ref(), limit, deadline)
            .collect()
            .await;
    let (tasks, next) = aggregate::merge(&parts, limit);
    statuses.extend(parts.into_iter().map(|p| p.status));
    statuses.sort_by(|a, b| a.name.cmp(&b.name).then(a.device_id.cmp(&b.device_id)));
    Ok(Json(AggregateTasks {
        tasks,
        devices: statuses,
        next_cursor: next.map(|c| c.encode()),
    }))
}

#[derive(Serialize)]
struct DeviceStats {
    #[serde(flatten)]
    status: DeviceStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    stats: Option<TaskStats>,
}

#[derive(Serialize)]
struct AggregateStats {
    total: TaskStats,
    devices: Vec<DeviceStats>,
}

async fn aggregate_stats(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<ListParams>,
) -> Result<Json<AggregateStats>, ApiError> {
    let deadline = params.deadline()?;
    let (online, offline) = task_devices(&state, &caller).await?;
    let parts = aggregate::stats_parts(&state, &online, deadline).await;
    let mut total = TaskStats::default();
    for s in TaskStatus::ALL {
        total.by_status.insert(s, 0);
    }
    let mut devices: Vec<DeviceStats> = offline
        .into_iter()
        .map(|status| DeviceStats {
            status,
            stats: None,
        })
        .collect();
    for p in parts {
        if let Some(stats) = &p.answer {
            for (status, n) in &stats.by_status {
                *total.by_status.entry(*status).or_insert(0) += n;
            }
            total.total += stats.total;
        }
        devices.push(DeviceStats {
            status: p.status,
            stats: p.answer,
        });
    }
    devices.sort_by(|a, b| a.status.name.cmp(&b.status.name));
    Ok(Json(AggregateStats { total, devices }))
}

#[derive(Deserialize, Default)]
struct LogParams {
    after: Option<u64>,
    limit: Option<u32>,
    follow: Option<bool>,
}

#[derive(Serialize)]
struct LogPage {
    lines: Vec<adi_protocol::tasks::LogLine>,
    status: TaskStatus,
    /// Pass as `after` to read on.
    next_after: u64,
    /// Whether the log is complete (the task is final and every line was read).
    complete: bool,
}

async fn read_logs(
    state: &HubState,
    device: &DeviceRecord,
    task: TaskId,
    after: u64,
    limit: u32,
) -> Result<LogBatch, RpcError> {
    let request = DeviceRequest::ReadLogs {
        id: task,
        after_seq: after,
        limit,
    };
    match rpc::request(state, &device.id, request, DEVICE_DEADLINE).await? {
        DeviceReply::Logs {
            lines,
            status,
            more,
        } => Ok(LogBatch {
            lines,
            status,
            more,
        }),
        other => Err(aggregate::unexpected(&other)),
    }
}

/// One read of a task's log from its device.
struct LogBatch {
    lines: Vec<adi_protocol::tasks::LogLine>,
    status: TaskStatus,
    /// The device cut the page short: more lines follow at once.
    more: bool,
}

async fn task_logs(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, task)): Path<(String, String)>,
    Query(params): Query<LogParams>,
) -> Result<Response, ApiError> {
    let device = access::device(&state, &caller, &id, Scope::DevicesRead).await?;
    let task = parse_task_id(&task)?;
    let after = params.after.unwrap_or(0);
    let limit = params.limit.unwrap_or(500).clamp(1, 1000);
    // Ask once up front so an unknown task or an offline device is a plain error.
    let batch = read_logs(&state, &device, task, after, limit).await?;
    if !params.follow.unwrap_or(false) {
        let LogBatch {
            lines,
            status,
            more,
        } = batch;
        let next_after = lines.last().map_or(after, |l| l.seq);
        // A page cut short to fit one frame is not the end, even of a finished task.
        let complete = status.is_final() && !more && (lines.len() as u32) < limit;
        return Ok(Json(LogPage {
            lines,
            status,
            next_after,
            complete,
        })
        .into_response());
    }
    let stream = follow(state, device, task, batch, after);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Where a log follower stands.
struct Follow {
    state: AppState,
    device: DeviceRecord,
    task: TaskId,
    after: u64,
    first: Option<LogBatch>,
    done: bool,
}

/// Streams log lines as server-sent events until the task is final and fully read:
/// `log` events carry lines, one `end` event carries the final status, an `error`
/// event says why the stream stopped early. Lines are read from the device a page at
/// a time, so a huge log never sits whole in the hub.
fn follow(
    state: AppState,
    device: DeviceRecord,
    task: TaskId,
    first: LogBatch,
    after: u64,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let start = Follow {
        state,
        device,
        task,
        after,
        first: Some(first),
        done: false,
    };
    stream::unfold(start, |mut f| async move {
        if f.done {
            return None;
        }
        loop {
            let batch = match f.first.take() {
                Some(b) => Ok(b),
                None => read_logs(&f.state, &f.device, f.task, f.after, 500).await,
            };
            match batch {
                Err(e) => {
                    f.done = true;
                    let body = serde_json::json!({"code": e.code(), "message": e.to_string()});
                    return Some((
                        vec![Event::default().event("error").data(body.to_string())],
                        f,
                    ));
                }
                Ok(LogBatch { lines, status, .. }) if lines.is_empty() => {
                    if status.is_final() {
                        f.done = true;
                        let body = serde_json::json!({ "status": status });
                        return Some((
                            vec![Event::default().event("end").data(body.to_string())],
                            f,
                        ));
                    }
                    tokio::time::sleep(FOLLOW_POLL).await;
                }
                Ok(LogBatch { lines, .. }) => {
                    f.after = lines.last().map_or(f.after, |l| l.seq);
                    let events = lines
                        .iter()
                        .map(|l| {
                            Event::default()
                                .event("log")
                                .id(l.seq.to_string())
                                .data(serde_json::to_string(l).unwrap_or_default())
                        })
                        .collect();
                    return Some((events, f));
                }
            }
        }
    })
    .flat_map(|events| stream::iter(events.into_iter().map(Ok)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use adi_protocol::DEFAULT_MAX_FRAME_BYTES;

    fn task() -> NewTask {
        NewTask {
            title: "t".into(),
            ..NewTask::default()
        }
    }

    fn refusal(task: &NewTask, max: usize) -> String {
        let e = check_task_size(task, max).expect_err("refused");
        assert_eq!(e.code(), ErrorCode::PayloadTooLarge);
        e.message().to_owned()
    }

    #[test]
    fn each_large_field_is_refused_by_name() {
        let mut t = task();
        t.description = "d".repeat(100 * 1024);
        assert!(refusal(&t, DEFAULT_MAX_FRAME_BYTES).contains("description"));
        let mut t = task();
        t.command = Some(vec!["echo".into(), "c".repeat(MAX_COMMAND_BYTES)]);
        assert!(refusal(&t, DEFAULT_MAX_FRAME_BYTES).contains("command"));
        let mut t = task();
        t.input = Some(serde_json::json!({ "blob": "i".repeat(MAX_INPUT_BYTES) }));
        assert!(refusal(&t, DEFAULT_MAX_FRAME_BYTES).contains("input"));
        let mut t = task();
        t.requirements = vec!["gpu".repeat(400)];
        assert!(refusal(&t, DEFAULT_MAX_FRAME_BYTES).contains("requirements"));
    }

    #[test]
    fn escapes_count_as_they_travel() {
        // 4 KiB of control characters take 24 KiB as JSON (\u0001 each).
        let mut t = task();
        t.description = "\u{1}".repeat(4 * 1024);
        assert!(refusal(&t, DEFAULT_MAX_FRAME_BYTES).contains("description"));
    }

    #[test]
    fn the_largest_task_allowed_fits_in_a_default_frame_both_ways() {
        let t = NewTask {
            title: "\u{1}".repeat(200),
            description: "d".repeat(MAX_DESCRIPTION_BYTES - 2),
            command: Some(vec!["c".repeat(MAX_COMMAND_BYTES - 4)]),
            requirements: vec!["r".repeat(MAX_REQUIREMENTS_BYTES - 4)],
            input: Some(serde_json::Value::String("i".repeat(MAX_INPUT_BYTES - 2))),
        };
        check_task_size(&t, DEFAULT_MAX_FRAME_BYTES).expect("fits");
        // The device's answer: the same task with everything the store adds.
        let now = i64::MAX;
        let stored = Task {
            id: TaskId::new(),
            title: t.title.clone(),
            description: t.description.clone(),
            status: TaskStatus::Cancelled,
            command: t.command.clone(),
            requirements: t.requirements.clone(),
            input: t.input.clone(),
            output: None,
            exit_code: Some(i32::MIN),
            error: Some("interrupted: the device restarted while it ran".into()),
            created_at: now,
            updated_at: now,
            device_id: Some(adi_protocol::DeviceId::from_mac(&[0xff; 16])),
        };
        let answer = adi_protocol::DeviceToHub::Response {
            request_id: u64::MAX,
            outcome: adi_protocol::Outcome::Ok(DeviceReply::Task {
                task: Box::new(stored),
            }),
        };
        assert!(encode(&answer).len() <= DEFAULT_MAX_FRAME_BYTES);
    }

    #[test]
    fn a_hub_with_small_frames_refuses_what_they_cannot_carry() {
        let mut t = task();
        t.description = "d".repeat(8 * 1024);
        check_task_size(&t, DEFAULT_MAX_FRAME_BYTES).expect("fits the default");
        assert!(refusal(&t, 4096).contains("4096"));
    }
}
