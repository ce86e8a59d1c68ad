//! Answers the hub's requests about this device's own data. Each request is handled in
//! its own task, so a slow one never holds up heartbeats or other answers (a lookup or
//! a short page the task store reads at once is answered by the session itself); the
//! answer goes back on the session that asked, and is dropped if that session has
//! ended.
//!
//! Every answer travels as one control frame, and the hub closes a connection that
//! sends a frame over its limit. So pages of tasks and of log lines are filled up to
//! the link's budget (the frame limit less an envelope) in bytes, not just up to the count asked for: a page cut short says
//! where to go on (`next` for tasks, `more` for log lines), so a reader pages on
//! without skipping or repeating anything.

use std::sync::Arc;

use adi_protocol::tasks::{LogLine, Position, Task, TaskPage};
use adi_protocol::{DeviceId, DeviceReply, DeviceRequest, ErrorCode, Outcome, RemoteError};
use adi_task_store::StoreError;
use serde::Serialize;
use tracing::warn;

use crate::runner::{Runner, RunnerError};

/// Room left in a frame for what wraps a page: the response envelope, the reply's
/// tag, a page's `next` or a log reply's status.
const ENVELOPE_RESERVE: usize = 1024;

/// Most bytes the items of one page may take as JSON under the default frame limit.
/// A hub that says its own limit at registration gets pages sized for that instead
/// ([`reply_budget`]).
#[cfg(test)]
pub const REPLY_BUDGET: usize = adi_protocol::DEFAULT_MAX_FRAME_BYTES - ENVELOPE_RESERVE;

/// The page budget for a link whose frames may be at most `frame_limit` bytes.
pub(crate) fn reply_budget(frame_limit: usize) -> usize {
    frame_limit
        .saturating_sub(ENVELOPE_RESERVE)
        .max(ENVELOPE_RESERVE)
}

/// What replaces the cut-off end of a text that does not fit in a frame.
const CUT_MARK: &str = "… [cut to fit one message]";

/// Handles one request to completion.
pub(crate) async fn handle(
    runner: &Arc<Runner>,
    device: &DeviceId,
    request: DeviceRequest,
    budget: usize,
) -> Outcome {
    match answer(runner, device, request, budget).await {
        Ok(reply) => Outcome::Ok(reply),
        Err(e) => Outcome::Error(e),
    }
}

async fn answer(
    runner: &Arc<Runner>,
    device: &DeviceId,
    request: DeviceRequest,
    budget: usize,
) -> Result<DeviceReply, RemoteError> {
    let store = runner.store();
    let mark = |mut task: Task| {
        task.device_id = Some(device.clone());
        DeviceReply::Task {
            task: Box::new(task),
        }
    };
    match request {
        DeviceRequest::CreateTask { task } => {
            runner.submit(task).await.map(mark).map_err(runner_error)
        }
        DeviceRequest::GetTask { id } => match store.get(id).await.map_err(store_error)? {
            Some(task) => Ok(mark(task)),
            None => Err(not_found()),
        },
        DeviceRequest::CancelTask { id } => runner.cancel(id).await.map(mark).map_err(runner_error),
        DeviceRequest::ListTasks {
            filter,
            after,
            limit,
        } => {
            // Unlabelled: the hub labels every task of a page with the device it asked
            // (it vouches for where a task lives), so an id here would only add bytes
            // to every task of every merged view.
            let page = store
                .list(&filter, after, limit)
                .await
                .map_err(store_error)?;
            Ok(DeviceReply::Tasks {
                page: fill_tasks(page, budget),
            })
        }
        DeviceRequest::TaskStats => Ok(DeviceReply::Stats {
            stats: store.stats().await.map_err(store_error)?,
        }),
        DeviceRequest::ReadLogs {
            id,
            after_seq,
            limit,
        } => {
            // Status first: if it is final, the lines read next are all there will be.
            let status = store
                .get(id)
                .await
                .map_err(store_error)?
                .ok_or_else(not_found)?
                .status;
            let lines = store
                .read_logs(id, after_seq, limit)
                .await
                .map_err(store_error)?;
            let (lines, more) = fill_logs(lines, budget);
            Ok(DeviceReply::Logs {
                lines,
                status,
                more,
            })
        }
        DeviceRequest::CanRun { task } => {
            let verdict = runner.can_run(&task);
            let config = runner.config();
            Ok(DeviceReply::CanRun {
                can_run: verdict.is_ok(),
                reason: verdict.err(),
                exec_allowed: config.exec_allowed,
                has_gpu: config.has_gpu,
            })
        }
        // Served by the capability server before it gets here.
        DeviceRequest::Capability { .. } => Err(RemoteError {
            code: ErrorCode::BadRequest,
            message: "capability requests are not task requests".into(),
        }),
    }
}

/// Bytes `value` takes as JSON, counted as it is written, never held.
fn json_len<T: Serialize>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match serde_json::to_writer(&mut count, value) {
        Ok(()) => count.0,
        Err(_) => usize::MAX,
    }
}

/// More bytes than `task` can take as JSON, found without writing it (but its input
/// and output): every field name, id, status, number and punctuation fit in the fixed
/// part, and a string's byte takes 6 bytes at most (`\u001f`; other characters are
/// written as they are).
fn json_len_bound(task: &Task) -> usize {
    const FIXED: usize = 512;
    let text = |s: &str| s.len().saturating_mul(6).saturating_add(3);
    let list = |v: &[String]| v.iter().map(|s| text(s)).sum::<usize>() + 2;
    FIXED
        .saturating_add(text(&task.title))
        .saturating_add(text(&task.description))
        .saturating_add(task.error.as_deref().map_or(0, text))
        .saturating_add(task.command.as_deref().map_or(0, list))
        .saturating_add(list(&task.requirements))
        .saturating_add(task.device_id.as_ref().map_or(0, |d| text(d.as_str())))
        .saturating_add(task.input.as_ref().map_or(0, json_len))
        .saturating_add(task.output.as_ref().map_or(0, json_len))
}

/// Keeps the leading tasks of `page` whose JSON fits in `budget` bytes (with the
/// commas between them). A page cut short ends at its last task and says to go on
/// from there, so nothing is skipped; an uncut page keeps the store's `next`. The
/// first task is always kept, cut down by [`fit_task`] if it is too large alone, so
/// a reader always moves forward.
fn fill_tasks(page: TaskPage, budget: usize) -> TaskPage {
    // Most pages fit with room to spare: then no task is written twice.
    let bound = page
        .tasks
        .iter()
        .map(|t| json_len_bound(t).saturating_add(1))
        .fold(0usize, usize::saturating_add);
    if bound <= budget {
        return page;
    }
    let TaskPage { tasks, next } = page;
    let total = tasks.len();
    let mut kept = Vec::with_capacity(total);
    let mut used = 0usize;
    for task in tasks {
        let len = json_len(&task) + usize::from(!kept.is_empty());
        if used + len > budget {
            if kept.is_empty() {
                kept.push(fit_task(task, budget));
            }
            break;
        }
        used += len;
        kept.push(task);
    }
    if kept.len() == total {
        return TaskPage { tasks: kept, next };
    }
    let next = kept.last().map(|t| Position {
        created_at: t.created_at,
        id: t.id,
    });
    TaskPage { tasks: kept, next }
}

/// A task too large for a page on its own, made to fit: without its input and output,
/// with its description cut. Only tasks stored before the hub bounded their size can be
/// this large; the task itself still holds everything.
fn fit_task(mut task: Task, budget: usize) -> Task {
    if json_len(&task) <= budget {
        return task;
    }
    task.input = None;
    task.output = None;
    let without_description = {
        let mut bare = task.clone();
        bare.description = String::new();
        json_len(&bare)
    };
    let room = budget.saturating_sub(without_description);
    task.description = cut_to_fit(&task.description, room);
    task
}

/// Keeps the leading log lines whose JSON fits in `budget` bytes; `true` when lines
/// were left out (they follow on the next read). The first line is always kept, its
/// text cut if it is too large alone.
fn fill_logs(lines: Vec<LogLine>, budget: usize) -> (Vec<LogLine>, bool) {
    let total = lines.len();
    let mut kept: Vec<LogLine> = Vec::with_capacity(total);
    let mut used = 0usize;
    for mut line in lines {
        let len = json_len(&line) + usize::from(!kept.is_empty());
        if used + len > budget {
            if kept.is_empty() {
                let bare = json_len(&LogLine {
                    text: String::new(),
                    ..line.clone()
                });
                line.text = cut_to_fit(&line.text, budget.saturating_sub(bare));
                kept.push(line);
            }
            break;
        }
        used += len;
        kept.push(line);
    }
    let more = kept.len() < total;
    (kept, more)
}

/// `text`, cut (at a character boundary, followed by [`CUT_MARK`]) so that it takes at
/// most `room` bytes as a JSON string; unchanged if it already does.
fn cut_to_fit(text: &str, room: usize) -> String {
    if json_len(&text) <= room {
        return text.to_owned();
    }
    let room = room.saturating_sub(json_len(&CUT_MARK));
    // JSON adds two quotes and escapes some characters: count each one as it encodes.
    let mut used = 2usize;
    let mut end = 0usize;
    let mut buf = [0u8; 4];
    for (i, c) in text.char_indices() {
        let len = json_len(&&*c.encode_utf8(&mut buf)) - 2;
        if used + len > room {
            break;
        }
        used += len;
        end = i + c.len_utf8();
    }
    format!("{}{CUT_MARK}", &text[..end])
}

fn not_found() -> RemoteError {
    RemoteError {
        code: ErrorCode::NotFound,
        message: "no such task".into(),
    }
}

fn runner_error(e: RunnerError) -> RemoteError {
    match e {
        RunnerError::Refused(message) => RemoteError {
            code: ErrorCode::BadRequest,
            message,
        },
        RunnerError::AlreadyFinished(status) => RemoteError {
            code: ErrorCode::Conflict,
            message: format!("the task is already {status}"),
        },
        RunnerError::NotFound(_) => not_found(),
        e @ RunnerError::CancelUnderway => RemoteError {
            code: ErrorCode::Timeout,
            message: e.to_string(),
        },
        RunnerError::Store(e) => store_error(e),
    }
}

fn store_error(e: StoreError) -> RemoteError {
    match e {
        StoreError::NotFound(_) => not_found(),
        StoreError::Invalid(message) => RemoteError {
            code: ErrorCode::BadRequest,
            message,
        },
        StoreError::InvalidTransition { from, .. } => RemoteError {
            code: ErrorCode::Conflict,
            message: format!("the task is already {from}"),
        },
        StoreError::Unavailable { outage, detail } => {
            warn!("task store unavailable: {outage}: {detail:#}");
            RemoteError {
                code: ErrorCode::Unavailable,
                message: format!("the device's task store is unavailable: {outage}"),
            }
        }
        other => {
            warn!("task store failed: {other:#}");
            RemoteError {
                code: ErrorCode::Internal,
                message: "the device's task store failed".into(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adi_protocol::tasks::{LogStream, NewTask, TaskId, TaskStatus};
    use adi_protocol::{encode, DeviceToHub};

    use crate::runner::RunnerConfig;

    fn device() -> DeviceId {
        DeviceId::from_mac(&[0xab; 16])
    }

    /// The frame a reply travels in, as the session writes it.
    fn frame_len(outcome: &Outcome) -> usize {
        encode(&DeviceToHub::Response {
            request_id: u64::MAX,
            outcome: outcome.clone(),
        })
        .len()
    }

    fn line(seq: u64, text: String) -> LogLine {
        LogLine {
            seq,
            stream: LogStream::Stdout,
            at: i64::MAX,
            text,
        }
    }

    async fn runner(dir: &tempfile::TempDir) -> Arc<Runner> {
        let store = adi_task_store::open(None, dir.path())
            .await
            .expect("open store");
        Runner::start(store, RunnerConfig::default())
            .await
            .expect("start runner")
    }

    #[tokio::test]
    async fn task_pages_fit_one_frame_and_page_through_every_task_once() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let runner = runner(&dir).await;
        let mut created = std::collections::HashSet::new();
        for n in 0..60 {
            let task = runner
                .submit(NewTask {
                    title: format!("task {n}"),
                    description: "x".repeat(3000),
                    ..NewTask::default()
                })
                .await
                .expect("submit");
            created.insert(task.id);
        }
        let mut seen = std::collections::HashSet::new();
        let mut after = None;
        let mut pages = 0;
        loop {
            let request = DeviceRequest::ListTasks {
                filter: Default::default(),
                after,
                limit: 500,
            };
            let outcome = handle(&runner, &device(), request, REPLY_BUDGET).await;
            assert!(frame_len(&outcome) <= adi_protocol::DEFAULT_MAX_FRAME_BYTES);
            let Outcome::Ok(DeviceReply::Tasks { page }) = outcome else {
                panic!("not a page: {outcome:?}");
            };
            assert!(!page.tasks.is_empty(), "every page moves forward");
            for t in &page.tasks {
                assert!(seen.insert(t.id), "task {} twice", t.id);
                assert_eq!(t.description.len(), 3000, "nothing cut");
            }
            pages += 1;
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(seen, created);
        assert!(pages >= 3, "60 tasks of 3 KB take several frames: {pages}");
        runner.shutdown().await;
    }

    #[tokio::test]
    async fn log_pages_fit_one_frame_and_say_more_follows() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let runner = runner(&dir).await;
        let task = runner
            .submit(NewTask {
                title: "noisy".into(),
                ..NewTask::default()
            })
            .await
            .expect("submit");
        let store = runner.store();
        for n in 0..1500 {
            // Control characters take six bytes each as JSON.
            let text = format!("line {n} \u{1b}[1m{}\u{1b}[0m", "y".repeat(60));
            store
                .append_log(task.id, LogStream::Stdout, &text)
                .await
                .expect("append");
        }
        let mut after_seq = 0;
        let mut reads = 0;
        loop {
            let request = DeviceRequest::ReadLogs {
                id: task.id,
                after_seq,
                limit: 1000,
            };
            let outcome = handle(&runner, &device(), request, REPLY_BUDGET).await;
            assert!(frame_len(&outcome) <= adi_protocol::DEFAULT_MAX_FRAME_BYTES);
            let Outcome::Ok(DeviceReply::Logs { lines, more, .. }) = outcome else {
                panic!("not logs: {outcome:?}");
            };
            reads += 1;
            if lines.is_empty() {
                assert!(!more);
                break;
            }
            for l in &lines {
                assert_eq!(l.seq, after_seq + 1, "no line skipped or repeated");
                after_seq = l.seq;
            }
            assert_eq!(
                more,
                after_seq < 1500 && lines.len() < 1000,
                "at {after_seq}"
            );
        }
        assert_eq!(after_seq, 1500);
        assert!(reads > 3, "1,500 long lines take several frames");
        runner.shutdown().await;
    }

    #[test]
    fn an_uncut_page_keeps_the_stores_next() {
        let task = |n: u128| Task {
            id: TaskId(uuid::Uuid::from_u128(n)),
            title: "t".into(),
            description: String::new(),
            status: TaskStatus::Pending,
            command: None,
            requirements: vec![],
            input: None,
            output: None,
            exit_code: None,
            error: None,
            created_at: 10 - n as i64,
            updated_at: 0,
            device_id: None,
        };
        let store_next = Some(Position {
            created_at: 1,
            id: TaskId(uuid::Uuid::from_u128(9)),
        });
        let page = fill_tasks(
            TaskPage {
                tasks: vec![task(1), task(2)],
                next: store_next,
            },
            REPLY_BUDGET,
        );
        assert_eq!(page.tasks.len(), 2);
        assert_eq!(page.next, store_next);
        let last = fill_tasks(
            TaskPage {
                tasks: vec![task(1)],
                next: None,
            },
            REPLY_BUDGET,
        );
        assert_eq!(last.next, None);
        // Cut short: go on from the last task kept.
        let one = json_len(&task(1));
        let cut = fill_tasks(
            TaskPage {
                tasks: vec![task(1), task(2), task(3)],
                next: None,
            },
            one + 1,
        );
        assert_eq!(cut.tasks.len(), 1);
        assert_eq!(
            cut.next,
            Some(Position {
                created_at: 9,
                id: TaskId(uuid::Uuid::from_u128(1)),
            })
        );
    }

    #[test]
    fn the_bound_on_a_tasks_json_is_never_below_it() {
        let nasty = "\u{1}\"\\\n\u{7f}é😀\u{1f}".repeat(50);
        let task = Task {
            id: TaskId::new(),
            title: nasty.clone(),
            description: nasty.clone(),
            status: TaskStatus::Failed,
            command: Some(vec![nasty.clone(), String::new()]),
            requirements: vec![nasty.clone()],
            input: Some(serde_json::json!({ "k": nasty, "n": [1.5e300, -1, null] })),
            output: Some(serde_json::json!(["\u{0}"])),
            exit_code: Some(i32::MIN),
            error: Some("\u{0}".repeat(100)),
            created_at: i64::MIN,
            updated_at: i64::MAX,
            device_id: Some(device()),
        };
        assert!(json_len_bound(&task) >= json_len(&task));
        let page = TaskPage {
            tasks: vec![task.clone(); 3],
            next: None,
        };
        assert_eq!(fill_tasks(page.clone(), REPLY_BUDGET), page, "fits whole");
    }

    #[test]
    fn a_task_too_large_alone_is_cut_to_fit() {
        let huge = Task {
            id: TaskId::new(),
            title: "huge".into(),
            description: "é\u{1}".repeat(40_000),
            status: TaskStatus::Completed,
            command: Some(vec!["true".into()]),
            requirements: vec![],
            input: Some(serde_json::json!({"blob": "z".repeat(50_000)})),
            output: None,
            exit_code: Some(0),
            error: None,
            created_at: 5,
            updated_at: 5,
            device_id: Some(device()),
        };
        let page = fill_tasks(
            TaskPage {
                tasks: vec![huge.clone()],
                next: None,
            },
            REPLY_BUDGET,
        );
        assert_eq!(page.tasks.len(), 1);
        let kept = &page.tasks[0];
        assert!(json_len(kept) <= REPLY_BUDGET, "{}", json_len(kept));
        assert_eq!(kept.id, huge.id);
        assert!(kept.description.ends_with(CUT_MARK));
        assert!(kept.input.is_none());
        assert_eq!(page.next, None, "it was the last task");
    }

    #[test]
    fn a_line_too_large_alone_is_cut_to_fit() {
        let lines = vec![line(1, "\u{7}".repeat(20_000)), line(2, "next".into())];
        let (kept, more) = fill_logs(lines, REPLY_BUDGET);
        assert_eq!(kept.len(), 1);
        assert!(more, "line 2 follows");
        assert!(json_len(&kept[0]) <= REPLY_BUDGET);
        assert!(kept[0].text.ends_with(CUT_MARK));
        assert!(kept[0].text.starts_with('\u{7}'));
    }

    #[test]
    fn cutting_respects_characters_and_escapes() {
        assert_eq!(cut_to_fit("short", 100), "short");
        let cut = cut_to_fit(&"é".repeat(100), 60);
        assert!(json_len(&cut) <= 60, "{cut}");
        assert!(cut.starts_with('é') && cut.ends_with(CUT_MARK));
        let cut = cut_to_fit(&"\"".repeat(100), 60);
        assert!(json_len(&cut) <= 60, "{cut}");
    }

    #[tokio::test]
    async fn can_run_reports_the_verdict_and_what_it_rests_on() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = adi_task_store::open(None, dir.path())
            .await
            .expect("open store");
        let runner = Runner::start(
            store,
            RunnerConfig {
                exec_allowed: false,
                ..RunnerConfig::default()
            },
        )
        .await
        .expect("start runner");
        let ask = |command: Option<Vec<String>>| DeviceRequest::CanRun {
            task: NewTask {
                command,
                ..NewTask::default()
            },
        };
        let refused = handle(
            &runner,
            &device(),
            ask(Some(vec!["true".into()])),
            REPLY_BUDGET,
        )
        .await;
        assert_eq!(
            refused,
            Outcome::Ok(DeviceReply::CanRun {
                can_run: false,
                reason: Some("command tasks are disabled on this device (--no-exec)".into()),
                exec_allowed: false,
                has_gpu: false,
            })
        );
        let plain = handle(&runner, &device(), ask(None), REPLY_BUDGET).await;
        assert!(
            matches!(
                plain,
                Outcome::Ok(DeviceReply::CanRun {
                    can_run: true,
                    reason: None,
                    ..
                })
            ),
            "{plain:?}"
        );
        assert_eq!(
            runner.store().stats().await.expect("stats").total,
            0,
            "nothing stored"
        );
        runner.shutdown().await;
    }
}
