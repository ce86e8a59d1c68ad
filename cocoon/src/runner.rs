//! The task runner: runs the commands of this device's tasks.
//!
//! This module owns everything between "a task with a command is stored Pending" and
//! "the task is final with its output in the log": admission ([`Runner::can_run`]),
//! scheduling (at most [`RunnerConfig::max_concurrent`] commands at once, oldest task
//! first), spawning each command in a process group of its own, streaming its stdout
//! and stderr into the task's log line by line, recording how it ended, cancelling
//! (SIGKILL to the whole process group), and recovery on start (tasks left `Running` by
//! a crash are failed and whatever their commands left running is killed, tasks left
//! `Pending` are run).
//!
//! The store is the single source of truth; the runner keeps in memory only which
//! tasks wait for a slot and which ones it is running. Cancelling must go through
//! [`Runner::cancel`]: changing a running task's status in the store directly does not
//! stop its process.
//!
//! A task's log is complete before its final status is written, so whoever sees a final
//! status can read the whole log. When a command's leader process exits, whatever it
//! left running in its process group is killed too, so a task never outlives itself and
//! its output pipes close.
//!
//! A cocoon that is killed outright (SIGKILL, a power cut) cannot kill anything, so
//! every command runs with [`TASK_ID_ENV`] set to its task's id, which its children
//! inherit. On the next start, the tasks found `Running` are failed, and every process
//! still carrying one of their ids is killed: the id, not a recorded pid, names them,
//! so a pid reused since by an unrelated process is never hit.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use adi_protocol::tasks::{LogStream, NewTask, Task, TaskFilter, TaskId, TaskStatus};
use adi_task_store::{StoreError, TaskStore, TaskUpdate, MAX_PAGE};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Longest log line, in bytes; longer lines are split so one runaway line cannot take
/// the store's or a reader's memory. Small enough that a line fits in one frame to
/// the hub even when every byte is a control character JSON spells as `\u00XX`.
pub const MAX_LINE_BYTES: usize = 8 * 1024;

/// The environment variable every task command (and so everything it starts) runs
/// with: its task's id.
pub const TASK_ID_ENV: &str = "ADI_TASK_ID";

/// Rounds of looking for leftover processes after a crash: one kill per round, and a
/// leftover that forks meanwhile is found by the next.
const LEFTOVER_ROUNDS: usize = 10;

/// How long output is still read after a command's process group is gone, in case a
/// process that left the group keeps a pipe open.
const OUTPUT_GRACE: Duration = Duration::from_secs(5);

/// The reason recorded on tasks stopped by [`Runner::shutdown`].
const STOPPED: &str = "interrupted: the cocoon stopped";
/// The reason recorded on cancelled tasks.
const CANCELLED: &str = "cancelled";

/// How this device runs task commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerConfig {
    /// Most commands running at once; more tasks wait `Pending` for a slot. At least 1.
    pub max_concurrent: usize,
    /// Whether this device runs commands at all (`--no-exec` turns it off).
    pub exec_allowed: bool,
    /// Whether tasks requiring `gpu` can run here.
    pub has_gpu: bool,
}

impl Default for RunnerConfig {
    /// Four commands at once, commands allowed, no GPU.
    fn default() -> Self {
        RunnerConfig {
            max_concurrent: 4,
            exec_allowed: true,
            has_gpu: false,
        }
    }
}

/// Why the runner refused or failed a request.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// This device will not run the task; the reason is for the user.
    #[error("refused: {0}")]
    Refused(String),
    /// The task is already final; it keeps its status.
    #[error("the task is already {0}")]
    AlreadyFinished(TaskStatus),
    /// No such task on this device.
    #[error("task {0} not found")]
    NotFound(TaskId),
    /// The task store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Runs this device's task commands. Cheap to share: it is handed out as `Arc<Runner>`.
pub struct Runner {
    store: Arc<dyn TaskStore>,
    config: RunnerConfig,
    state: Mutex<State>,
    /// One permit per command that may run at once.
    slots: Arc<Semaphore>,
    /// Tells the scheduler that the queue grew.
    wake: Notify,
    /// Stops the scheduler.
    stopping: CancellationToken,
    scheduler: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What the runner keeps in memory; the store has everything else.
#[derive(Default)]
struct State {
    /// Pending tasks with a command, oldest first: `(created_at, id)`.
    queue: BTreeSet<(i64, TaskId)>,
    /// Tasks this runner has taken from the queue and not yet finished.
    running: HashMap<TaskId, Arc<Run>>,
    /// Set by shutdown: nothing new is taken from the queue.
    stopping: bool,
}

/// Why a run was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Cancelled,
    Shutdown,
}

/// One task being run: how to stop it and how to learn that it finished.
struct Run {
    stop: CancellationToken,
    /// The first stop request wins.
    reason: Mutex<Option<StopReason>>,
    /// Becomes true once the task's final status is written (or the run gave up).
    done: watch::Sender<bool>,
}

impl Run {
    fn new() -> Self {
        Run {
            stop: CancellationToken::new(),
            reason: Mutex::new(None),
            done: watch::channel(false).0,
        }
    }

    fn request_stop(&self, reason: StopReason) {
        lock(&self.reason).get_or_insert(reason);
        self.stop.cancel();
    }

    fn stop_reason(&self) -> Option<StopReason> {
        *lock(&self.reason)
    }

    async fn finished(&self) {
        let mut done = self.done.subscribe();
        // The sender lives in `self`, so it cannot be dropped while we wait.
        let _ = done.wait_for(|finished| *finished).await;
    }
}

/// Removes a run from the runner and marks it done when the run ends, however it ends.
struct RunGuard {
    runner: Arc<Runner>,
    id: TaskId,
    run: Arc<Run>,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.runner.state().running.remove(&self.id);
        self.run.done.send_replace(true);
    }
}

/// How a started command ended.
enum Ending {
    /// It exited (or was killed) on its own.
    Exited(ExitStatus),
    /// We stopped it.
    Stopped(StopReason),
}

impl Runner {
    /// Marks interrupted tasks failed (store.fail_interrupted), then starts a scheduler
    /// that runs Pending tasks that have a command (oldest first) — including ones left
    /// Pending from before a restart. Whatever ran before a crash cannot be resumed,
    /// but what never started still can.
    pub async fn start(
        store: Arc<dyn TaskStore>,
        config: RunnerConfig,
    ) -> Result<Arc<Runner>, StoreError> {
        let interrupted = store.fail_interrupted().await?;
        for id in &interrupted {
            tracing::warn!(task_id = %id, "task was running when the device stopped; marked failed");
        }
        if !interrupted.is_empty() {
            match tokio::task::spawn_blocking(move || kill_leftovers(&interrupted)).await {
                Ok(0) => {}
                Ok(killed) => {
                    tracing::warn!(killed, "killed processes left running by interrupted tasks")
                }
                Err(e) => tracing::warn!("looking for leftover processes failed: {e}"),
            }
        }
        let queue = pending_commands(&*store).await?;
        if !queue.is_empty() {
            tracing::info!(count = queue.len(), "resuming pending tasks");
        }
        let runner = Arc::new(Runner {
            store,
            slots: Arc::new(Semaphore::new(config.max_concurrent.max(1))),
            config,
            state: Mutex::new(State {
                queue,
                ..State::default()
            }),
            wake: Notify::new(),
            stopping: CancellationToken::new(),
            scheduler: Mutex::new(None),
        });
        let scheduler = tokio::spawn(
            runner
                .clone()
                .schedule()
                .instrument(tracing::info_span!("task_scheduler")),
        );
        *lock(&runner.scheduler) = Some(scheduler);
        Ok(runner)
    }

    /// How this runner was configured: what the device tells about what it can run.
    pub fn config(&self) -> &RunnerConfig {
        &self.config
    }

    /// The store the runner works on, for the cocoon's queries (list, get, logs): the
    /// runner and the queries must see the same tasks.
    pub fn store(&self) -> &Arc<dyn TaskStore> {
        &self.store
    }

    /// Whether this device would run the task: a command needs exec allowed ("command
    /// tasks are disabled on this device (--no-exec)"); requirement "gpu" needs has_gpu
    /// ("this device has no GPU"); unknown requirements -> Err("unknown requirement X").
    /// Asked before a task is stored, so a device never accepts what it cannot do.
    pub fn can_run(&self, task: &NewTask) -> Result<(), String> {
        if let Some(command) = &task.command {
            if !self.config.exec_allowed {
                return Err("command tasks are disabled on this device (--no-exec)".into());
            }
            if command.first().is_none_or(|program| program.is_empty()) {
                return Err("the command is empty".into());
            }
        }
        for requirement in &task.requirements {
            match requirement.as_str() {
                "gpu" if self.config.has_gpu => {}
                "gpu" => return Err("this device has no GPU".into()),
                other => return Err(format!("unknown requirement {other}")),
            }
        }
        Ok(())
    }

    /// Validates with can_run (only when the task has a command; a task without a
    /// command is just stored, Pending), creates it in the store, wakes the scheduler.
    /// Returns the stored task, still Pending: it runs when a slot is free.
    pub async fn submit(&self, new: NewTask) -> Result<Task, RunnerError> {
        let has_command = new.command.is_some();
        if has_command {
            self.can_run(&new).map_err(RunnerError::Refused)?;
        }
        let task = self.store.create(new).await?;
        if has_command {
            self.state().queue.insert((task.created_at, task.id));
            self.wake.notify_one();
            tracing::info!(task_id = %task.id, "task queued");
        }
        Ok(task)
    }

    /// Pending -> Cancelled right away; Running -> kill the whole process group, then
    /// the task ends Cancelled with error "cancelled"; final ->
    /// `RunnerError::AlreadyFinished(status)`. Returns the task once it is final, so
    /// the caller knows its process is gone.
    pub async fn cancel(&self, id: TaskId) -> Result<Task, RunnerError> {
        let run = {
            let mut state = self.state();
            let run = state.running.get(&id).cloned();
            if run.is_none() {
                // Out of the queue first, so the scheduler cannot start it meanwhile.
                state.queue.retain(|(_, queued)| *queued != id);
            }
            run
        };
        if let Some(run) = run {
            run.request_stop(StopReason::Cancelled);
            run.finished().await;
            let task = self.store.get(id).await?.ok_or(RunnerError::NotFound(id))?;
            return match task.status {
                TaskStatus::Cancelled => Ok(task),
                // It ended on its own before the kill: it keeps that ending.
                status => Err(RunnerError::AlreadyFinished(status)),
            };
        }
        let task = self.store.get(id).await?.ok_or(RunnerError::NotFound(id))?;
        if task.status.is_final() {
            return Err(RunnerError::AlreadyFinished(task.status));
        }
        // The line first: whoever sees the final status has the whole log.
        self.log(id, LogStream::System, CANCELLED).await;
        let update = TaskUpdate {
            status: Some(TaskStatus::Cancelled),
            error: Some(CANCELLED.into()),
            ..TaskUpdate::default()
        };
        match self.store.update(id, update).await {
            Ok(task) => {
                tracing::info!(task_id = %id, "pending task cancelled");
                Ok(task)
            }
            Err(StoreError::NotFound(_)) => Err(RunnerError::NotFound(id)),
            Err(StoreError::InvalidTransition { from, .. }) => {
                Err(RunnerError::AlreadyFinished(from))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Stops the scheduler; kills running children (their tasks end Failed
    /// "interrupted: the cocoon stopped") — used on graceful shutdown, so no command
    /// outlives the cocoon and no task is left looking Running. Tasks still Pending stay
    /// Pending and run after the next start.
    pub async fn shutdown(&self) {
        let runs: Vec<Arc<Run>> = {
            let mut state = self.state();
            state.stopping = true;
            state.running.values().cloned().collect()
        };
        self.stopping.cancel();
        for run in &runs {
            run.request_stop(StopReason::Shutdown);
        }
        for run in &runs {
            run.finished().await;
        }
        let scheduler = lock(&self.scheduler).take();
        if let Some(scheduler) = scheduler {
            if let Err(e) = scheduler.await {
                tracing::warn!("task scheduler ended badly: {e}");
            }
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Appends a log line; a failing store is logged, never fatal to the run.
    async fn log(&self, id: TaskId, stream: LogStream, text: &str) {
        if let Err(e) = self.store.append_log(id, stream, text).await {
            tracing::warn!(task_id = %id, "could not append to the task log: {e}");
        }
    }

    /// Takes the oldest queued task, unless stopping.
    fn take_next(&self) -> Option<(TaskId, Arc<Run>)> {
        let mut state = self.state();
        if state.stopping {
            return None;
        }
        let (_, id) = state.queue.pop_first()?;
        let run = Arc::new(Run::new());
        state.running.insert(id, run.clone());
        Some((id, run))
    }

    /// The scheduler: waits for a free slot, then for a queued task, and runs it.
    async fn schedule(self: Arc<Self>) {
        loop {
            let permit = tokio::select! {
                biased;
                () = self.stopping.cancelled() => return,
                permit = self.slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let (id, run) = loop {
                if let Some(next) = self.take_next() {
                    break next;
                }
                tokio::select! {
                    biased;
                    () = self.stopping.cancelled() => return,
                    () = self.wake.notified() => {}
                }
            };
            let guard = RunGuard {
                runner: self.clone(),
                id,
                run,
            };
            tokio::spawn(
                self.clone()
                    .run(guard, permit)
                    .instrument(tracing::info_span!("task", task_id = %id)),
            );
        }
    }

    /// Runs one task from Pending to final.
    async fn run(self: Arc<Self>, guard: RunGuard, permit: OwnedSemaphorePermit) {
        let _permit = permit;
        let id = guard.id;
        let run = guard.run.clone();
        let task = match self.store.get(id).await {
            Ok(Some(task)) if task.status == TaskStatus::Pending => task,
            Ok(_) => {
                tracing::debug!("task is gone or no longer pending; skipped");
                return;
            }
            Err(e) => {
                tracing::warn!("could not read the task: {e}");
                return;
            }
        };
        let new = NewTask {
            title: task.title.clone(),
            description: String::new(),
            command: task.command.clone(),
            requirements: task.requirements.clone(),
            input: None,
        };
        // Tasks queued before a restart were admitted under the old configuration.
        let argv = match (self.can_run(&new), task.command) {
            (Ok(()), Some(argv)) => argv,
            (Err(reason), _) => {
                self.log(id, LogStream::System, &format!("not run: {reason}"))
                    .await;
                self.finish(id, TaskStatus::Failed, None, reason).await;
                return;
            }
            (Ok(()), None) => return,
        };
        match run.stop_reason() {
            // Not started yet: it stays Pending and runs after the next start.
            Some(StopReason::Shutdown) => return,
            Some(StopReason::Cancelled) => {
                self.log(id, LogStream::System, CANCELLED).await;
                self.finish(id, TaskStatus::Cancelled, None, CANCELLED.into())
                    .await;
                return;
            }
            None => {}
        }
        let running = TaskUpdate {
            status: Some(TaskStatus::Running),
            ..TaskUpdate::default()
        };
        if let Err(e) = self.store.update(id, running).await {
            // Cancelled (or deleted) between the queue and here.
            tracing::info!("task not started: {e}");
            return;
        }
        tracing::info!(command = %display_argv(&argv), "task started");
        self.log(
            id,
            LogStream::System,
            &format!("started: {}", display_argv(&argv)),
        )
        .await;
        if let Some(reason) = run.stop_reason() {
            self.finish_stopped(id, reason).await;
            return;
        }

        let mut command = Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .env(TASK_ID_ENV, id.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                let error = format!("could not start: {e}");
                tracing::warn!("{error}");
                self.log(id, LogStream::System, &error).await;
                self.finish(id, TaskStatus::Failed, None, error).await;
                return;
            }
        };
        // The child leads its own process group, whose id is its pid.
        let group = child.id().and_then(|pid| i32::try_from(pid).ok());
        let pumps = [
            child.stdout.take().map(|out| {
                tokio::spawn(pump(self.store.clone(), id, LogStream::Stdout, out).in_current_span())
            }),
            child.stderr.take().map(|err| {
                tokio::spawn(pump(self.store.clone(), id, LogStream::Stderr, err).in_current_span())
            }),
        ];

        let ending = wait_or_stop(&mut child, group, &run).await;
        // Whatever the leader left behind in its group goes with it, so the pipes close.
        kill_group(group);
        for pump in pumps.into_iter().flatten() {
            let abort = pump.abort_handle();
            match tokio::time::timeout(OUTPUT_GRACE, pump).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("output reader failed: {e}"),
                Err(_) => {
                    abort.abort();
                    self.log(
                        id,
                        LogStream::System,
                        "output still open after the command ended; stopped reading it",
                    )
                    .await;
                }
            }
        }

        match ending {
            Ok(Ending::Stopped(reason)) => self.finish_stopped(id, reason).await,
            Ok(Ending::Exited(status)) => {
                let (final_status, code, text) = describe_exit(status);
                tracing::info!("{text}");
                self.log(id, LogStream::System, &text).await;
                let error = match final_status {
                    TaskStatus::Completed => None,
                    _ => Some(text),
                };
                self.store_final(id, final_status, code, error).await;
            }
            Err(e) => {
                let error = format!("could not wait for the command: {e}");
                tracing::warn!("{error}");
                self.log(id, LogStream::System, &error).await;
                self.finish(id, TaskStatus::Failed, None, error).await;
            }
        }
        drop(guard);
    }

    /// Records a run we stopped: Cancelled, or Failed when the cocoon is stopping.
    async fn finish_stopped(&self, id: TaskId, reason: StopReason) {
        let (status, text) = match reason {
            StopReason::Cancelled => (TaskStatus::Cancelled, CANCELLED),
            StopReason::Shutdown => (TaskStatus::Failed, STOPPED),
        };
        tracing::info!("{text}");
        self.log(id, LogStream::System, text).await;
        self.store_final(id, status, None, Some(text.to_owned()))
            .await;
    }

    /// Writes a final status with an error (the log line is the caller's).
    async fn finish(&self, id: TaskId, status: TaskStatus, exit_code: Option<i32>, error: String) {
        self.store_final(id, status, exit_code, Some(error)).await;
    }

    async fn store_final(
        &self,
        id: TaskId,
        status: TaskStatus,
        exit_code: Option<i32>,
        error: Option<String>,
    ) {
        let update = TaskUpdate {
            status: Some(status),
            exit_code,
            error,
            ..TaskUpdate::default()
        };
        if let Err(e) = self.store.update(id, update).await {
            tracing::warn!("could not record the task's end ({status}): {e}");
        }
    }
}

/// Every Pending task with a command, oldest first.
async fn pending_commands(store: &dyn TaskStore) -> Result<BTreeSet<(i64, TaskId)>, StoreError> {
    let filter = TaskFilter {
        status: Some(TaskStatus::Pending),
        ..TaskFilter::default()
    };
    let mut queue = BTreeSet::new();
    let mut after = None;
    loop {
        let page = store.list(&filter, after, MAX_PAGE).await?;
        queue.extend(
            page.tasks
                .iter()
                .filter(|t| t.command.is_some())
                .map(|t| (t.created_at, t.id)),
        );
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(queue),
        }
    }
}

/// Waits for the child to exit, or kills its group when the run is asked to stop.
async fn wait_or_stop(child: &mut Child, group: Option<i32>, run: &Run) -> std::io::Result<Ending> {
    tokio::select! {
        status = child.wait() => status.map(Ending::Exited),
        () = run.stop.cancelled() => {
            kill_group(group);
            child.wait().await?;
            Ok(Ending::Stopped(run.stop_reason().unwrap_or(StopReason::Cancelled)))
        }
    }
}

/// SIGKILL to the process group `group` leads. Never signals group 0 or 1 (that would
/// be our own group, or everything).
fn kill_group(group: Option<i32>) {
    let Some(group) = group.filter(|g| *g > 1) else {
        return;
    };
    match killpg(Pid::from_raw(group), Signal::SIGKILL) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => tracing::warn!(group, "could not kill the process group: {e}"),
    }
}

/// SIGKILLs every process that runs with [`TASK_ID_ENV`] set to one of `tasks`, until
/// none is left (or [`LEFTOVER_ROUNDS`] passed); returns how many were killed. Reads
/// `/proc`, so it finds nothing where there is none; processes of other users cannot be
/// read and are left alone.
fn kill_leftovers(tasks: &[TaskId]) -> usize {
    let markers: Vec<Vec<u8>> = tasks
        .iter()
        .map(|id| format!("{TASK_ID_ENV}={id}").into_bytes())
        .collect();
    let mut killed = 0;
    for _ in 0..LEFTOVER_ROUNDS {
        let found = processes_marked(&markers);
        if found.is_empty() {
            break;
        }
        for pid in found {
            match nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL) {
                Ok(()) => {
                    tracing::info!(pid, "killed a process left by an interrupted task");
                    killed += 1;
                }
                Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => tracing::warn!(pid, "could not kill a leftover process: {e}"),
            }
        }
    }
    killed
}

/// Pids of the live processes whose environment holds one of `markers` exactly
/// (`NAME=value`). A zombie's environment reads empty, so the dead are not found again.
fn processes_marked(markers: &[Vec<u8>]) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let own = std::process::id();
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != own)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|b| *b == 0)
                    .any(|var| markers.iter().any(|m| m.as_slice() == var))
            })
        })
        .filter_map(|pid| i32::try_from(pid).ok())
        .filter(|pid| *pid > 1)
        .collect()
}

/// The final status, exit code and words for how a command ended on its own.
fn describe_exit(status: ExitStatus) -> (TaskStatus, Option<i32>, String) {
    match (status.code(), status.signal()) {
        (Some(0), _) => (
            TaskStatus::Completed,
            Some(0),
            "exited with status 0".into(),
        ),
        (Some(code), _) => (
            TaskStatus::Failed,
            Some(code),
            format!("exited with status {code}"),
        ),
        (None, Some(signal)) => (
            TaskStatus::Failed,
            None,
            format!("killed by signal {signal}"),
        ),
        (None, None) => (TaskStatus::Failed, None, format!("ended: {status}")),
    }
}

/// Reads `reader` to its end, appending each line to the task's log as it arrives.
async fn pump<R: AsyncRead + Unpin>(
    store: Arc<dyn TaskStore>,
    id: TaskId,
    stream: LogStream,
    reader: R,
) {
    let mut reader = BufReader::with_capacity(MAX_LINE_BYTES, reader);
    let mut splitter = LineSplitter::new(MAX_LINE_BYTES);
    let mut lines = Vec::new();
    loop {
        let read = match reader.fill_buf().await {
            Ok([]) => break,
            Ok(buf) => {
                splitter.push(buf, &mut lines);
                buf.len()
            }
            Err(e) => {
                tracing::warn!(?stream, "reading the command's output failed: {e}");
                break;
            }
        };
        reader.consume(read);
        for line in lines.drain(..) {
            append(&*store, id, stream, &line).await;
        }
    }
    if let Some(line) = splitter.finish() {
        append(&*store, id, stream, &line).await;
    }
}

async fn append(store: &dyn TaskStore, id: TaskId, stream: LogStream, line: &str) {
    if let Err(e) = store.append_log(id, stream, line).await {
        tracing::warn!(?stream, "could not append output to the task log: {e}");
    }
}

/// Cuts a byte stream into lines of at most `max` bytes, without their newline (nor a
/// carriage return before it), decoded lossily as UTF-8. A longer line is split, at a
/// character boundary where the cut would fall inside one.
struct LineSplitter {
    max: usize,
    line: Vec<u8>,
    /// The previous line was cut exactly at its end: a newline right after it ends that
    /// line rather than starting an empty one.
    just_split: bool,
}

impl LineSplitter {
    fn new(max: usize) -> Self {
        LineSplitter {
            max: max.max(4),
            line: Vec::new(),
            just_split: false,
        }
    }

    /// Feeds bytes; complete lines are pushed onto `out`.
    fn push(&mut self, mut data: &[u8], out: &mut Vec<String>) {
        while let Some(&first) = data.first() {
            if std::mem::take(&mut self.just_split) && first == b'\n' {
                data = &data[1..];
                continue;
            }
            let room = self.max - self.line.len();
            let window = &data[..data.len().min(room)];
            if let Some(end) = window.iter().position(|b| *b == b'\n') {
                self.line.extend_from_slice(&window[..end]);
                out.push(self.take_line(true));
                data = &data[end + 1..];
            } else {
                self.line.extend_from_slice(window);
                data = &data[window.len()..];
                if self.line.len() >= self.max {
                    let cut = utf8_cut(&self.line);
                    let rest = self.line.split_off(cut);
                    out.push(self.take_line(false));
                    self.line = rest;
                    self.just_split = self.line.is_empty();
                }
            }
        }
    }

    /// The last line, if the output did not end with a newline.
    fn finish(&mut self) -> Option<String> {
        (!self.line.is_empty()).then(|| self.take_line(true))
    }

    fn take_line(&mut self, strip_cr: bool) -> String {
        let mut line = std::mem::take(&mut self.line);
        if strip_cr && line.last() == Some(&b'\r') {
            line.pop();
        }
        String::from_utf8_lossy(&line).into_owned()
    }
}

/// Where to cut `bytes` so that a UTF-8 character begun at its end is not split: before
/// that character's first byte if it is incomplete, else at the end.
fn utf8_cut(bytes: &[u8]) -> usize {
    let len = bytes.len();
    for back in 1..=len.min(4) {
        let byte = bytes[len - back];
        if byte & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back for the lead
        }
        let needed = match byte {
            0xF0.. => 4,
            0xE0.. => 3,
            0xC0.. => 2,
            _ => 1,
        };
        return if needed > back { len - back } else { len };
    }
    len
}

/// The command as a shell would read it, for the log.
fn display_argv(argv: &[String]) -> String {
    argv.iter()
        .map(|arg| {
            let plain = !arg.is_empty()
                && arg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
            if plain {
                arg.clone()
            } else {
                format!("'{}'", arg.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Locks a mutex, taking the data even if a panicking holder poisoned it: every
/// critical section here leaves the data consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Instant;

    use adi_protocol::tasks::LogLine;
    use adi_task_store::SqliteTaskStore;

    use super::*;

    /// Generous: a loaded CI machine may be slow to start processes.
    const WAIT: Duration = Duration::from_secs(30);

    struct Fixture {
        dir: tempfile::TempDir,
        store: Arc<dyn TaskStore>,
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = SqliteTaskStore::open(&dir.path().join("tasks.db"))
            .await
            .expect("open store");
        Fixture {
            dir,
            store: Arc::new(store),
        }
    }

    fn config() -> RunnerConfig {
        RunnerConfig::default()
    }

    fn shell(title: &str, script: &str) -> NewTask {
        NewTask {
            title: title.into(),
            command: Some(vec!["sh".into(), "-c".into(), script.into()]),
            ..NewTask::default()
        }
    }

    /// Polls the store until the task satisfies `done`, or panics after [`WAIT`].
    async fn wait_for(
        store: &dyn TaskStore,
        id: TaskId,
        what: &str,
        done: impl Fn(&Task) -> bool,
    ) -> Task {
        let start = Instant::now();
        loop {
            let task = store.get(id).await.expect("get").expect("task exists");
            if done(&task) {
                return task;
            }
            assert!(
                start.elapsed() < WAIT,
                "timed out waiting for {what}; task is {task:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_final(store: &dyn TaskStore, id: TaskId) -> Task {
        wait_for(store, id, "a final status", |t| t.status.is_final()).await
    }

    async fn logs(store: &dyn TaskStore, id: TaskId) -> Vec<LogLine> {
        store.read_logs(id, 0, 1000).await.expect("read logs")
    }

    fn texts(lines: &[LogLine], stream: LogStream) -> Vec<String> {
        lines
            .iter()
            .filter(|l| l.stream == stream)
            .map(|l| l.text.clone())
            .collect()
    }

    /// Whether a process is gone (or a zombie nobody reaps, which is as dead).
    fn process_is_dead(pid: &str) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state == "Z" || state == "X"),
        }
    }

    async fn wait_for_file(path: &Path) -> String {
        let start = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(path) {
                if text.ends_with('\n') {
                    return text.trim().to_owned();
                }
            }
            assert!(start.elapsed() < WAIT, "timed out waiting for {path:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn exit_zero_completes_with_stdout_in_order() {
        let f = fixture().await;
        let runner = Runner::start(f.store.clone(), config())
            .await
            .expect("start");
        let task = runner
            .submit(shell("count", "for i in 1 2 3 4 5; do echo line $i; done"))
            .await
            .expect("submit");
        assert_eq!(task.status, TaskStatus::Pending);
        let done = wait_final(&*f.store, task.id).await;
        assert_eq!(done.status, TaskStatus::Completed);
        assert_eq!(done.exit_code, Some(0));
        assert_eq!(done.error, None);
        let lines = logs(&*f.store, task.id).await;
        assert_eq!(
            texts(&lines, LogStream::Stdout),
            ["line 1", "line 2", "line 3", "line 4", "line 5"]
        );
        let system = texts(&lines, LogStream::System);
        assert_eq!(
            system.first().map(String::as_str),
            Some("started: sh -c 'for i in 1 2 3 4 5; do echo line $i; done'")
        );
        assert_eq!(
            system.last().map(String::as_str),
            Some("exited with status 0")
        );
        assert_eq!(
            lines.last().map(|l| l.stream),
            Some(LogStream::System),
            "the end line is last"
        );
        runner.shutdown().await;
    }

    #[tokio::test]
    async fn non_zero_exit_fails_with_its_code() {
        let f = fixture().await;
        let runner = Runner::start(f.store.clone(), config())
            .await
            .expect("start");
        let task = runner
            .submit(shell("fail", "echo before; exit 3"))
            .await
            .expect("submit");
        let done = wait_final(&*f.store, task.id).await;
        assert_eq!(done.status, TaskStatus::Failed);
        assert_eq!(done.exit_code, Some(3));
        assert_eq!(done.error.as_deref(), Some("exited with status 3"));
        let lines = logs(&*f.store, task.id).await;
        assert_eq!(texts(&lines, LogStream::Stdout), ["before"]);
        assert_eq!(
            lines.last().map(|l| l.text.as_str()),
            Some("exited with status 3")
        );
        runner.shutdown().await;
    }

    #[tokio::test]
    async fn stderr_is_captured_as_stderr() {
        let f = fixture().await;
        let runner = Runner::start(f.store.clone(), config())
            .await
            .expect("start");
        let task = runner
            .submit(shell("both", "echo out; echo err1 >&2; echo err2 >&2"))
            .await
            .expect("submit");
        let done = wait_final(&*f.store, task.id).await;
        assert_eq!(done.status, TaskStatus::Completed);
        let lines = logs(&*f.store, task.id).await;
        assert_eq!(texts(&lines, LogStream::Stdout), ["out"]);
        assert_eq!(texts(&lines, LogStream::Stderr), ["err1", "err2"]);
        runner.shutdown().await;
    }

    #[tokio::test]
    async fn long_and_non_utf8_lines_are_split_and_decoded() {
        let f = fixture().await;
        let runner = Runner::start(f.store.clone(), config())
            .await
            .expect("start");
        let long = 2 * MAX_LINE_BYTES + 1000;
        let script = format!("head -c {long} /dev/zero | tr '\\000' a; echo; printf '\\377ok\\r\\n'; printf 'no newline'");
        let task = runner.submit(shell("long", &script)).await.expect("submit");
        let done = wait_final(&*f.store, task.id).await;
        assert_eq!(done.status, TaskStatus::Completed, "{done:?}");
        let out = texts(&logs(&*f.store, task.id).await, LogStream::Stdout);
        assert_eq!(
            out.len(),
            5,
            "{:?}",
            out.iter().map(String::len).collect::<Vec<_>>()
        );
        assert_eq!(out[0], "a".repeat(MAX_LINE_BYTES));
        assert_eq!(out[1], "a".repeat(MAX_LINE_BYTES));
        assert_eq!(out[2], "a".repeat(1000));
        assert_eq!(out[3], "\u{FFFD}ok");
        assert_eq!(out[4], "no newline");
        runner.shutdown().await;
    }

    #[tokio::test]
    async fn missing_program_fails_could_not_start() {
        let f = fixture().await;
        let runner = Runner::start(f.store.clone(), config())
            .await
            .expect("start");
        let task = runner
            .submit(NewTask {
                title: "ghost".into(),
                command: Some(vec!["/nonexistent/adi-no-such-program".into()]),
                ..NewTask::default()
            })
            .await
            .expect("submit");
        let done = wait_final(&*f.store, task.id).await;
        assert_eq!(done.status, TaskStatus::Failed);
        assert_eq!(done.exit_code, None);
        let error = done.error.expect("an error");
        assert!(error.starts_with("could not start: "), "{error}");
        let system = texts(&logs(&*f.store, task.id).await, LogStream::System);
        assert!(
            system.iter().any(|l| l.starts_with("could not start: ")),
            "{system:?}"
        );
        runner.shutdown().await;
    }

    #[tokio::test]
    async fn cancel_running_kills_the_whole_process_group() {
        let f = fixture().await;
        let runner = Runner::start(f.store.clone(), config())
            .await
            .expect("start");
        let pidfile = f.dir.path().join("pidfile");
        let script = format!("sleep 600 & echo $! > '{}'; wait", pidfile.display());
        let task = runner
            .submit(shell("sleeper", &script))
            .await
            .expect("submit");
        wait_for(&*f.store, task.id, "running", |t| {
            t.status == TaskStatus::Running
        })
        .await;
        let grandchild = wait_for_file(&pidfile).await;
        assert!(
            !process_is_dead(&grandchild),
            "the sleep runs before the cancel"
        );

        let cancelled = runner.cancel(task.id).await.expect("cancel");
        assert_eq!(cancelled.status, TaskStatus::Cancelled);
        assert_eq!(cancelled.error.as_deref(), Some("cancelled"));
        assert_eq!(
            f.store.get(task.id).await.expect("get").expect("task"),
            cancelled
        );
        let start = Instant::now();
        while !process_is_dead(&grandchild) {
            assert!(
                start.elapsed() < WAIT,
                "the grandchild {grandchild} survived the cancel"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let lines = logs(&*f.store, task.id).await;
        assert_eq!(lines.last().map(|l| l.text.as_str()), Some("cancelled"));

        let err = runner.cancel(task.id).await.expect_err("already final");
        assert!(
            matches!(err, RunnerError::AlreadyFinished(TaskStatus::Cancelled)),
            "{err:?}"
        );
        runner.shutdown().await;
    }

    #[tokio::test]
    async fn cancel_pending_and_unknown() {
        let f = fixture().await;
        let runner = Runner::start(
            f.store.clone(),
            RunnerConfig {
                max_concurrent: 1,
                ..config()
            },
        )
        .await
        .expect("start");
        let go = f.dir.path().join("go");
        let blocker = runner
            .submit(shell(
                "blocker",
                &format!("while [ ! -f '{}' ]; do sleep 0.05; done", go.display()),
            ))
            .await
            .expect("submit");
        wait_for(&*f.store, blocker.id, "running", |t| {
            t.status == TaskStatus::Running
        })
        .await;
        let queued = runner
            .submit(shell("queued", "echo never"))
            .await
            .expect("submit");
        let cancelled = runner.cancel(queued.id).await.expect("cancel pending");
        assert_eq!(cancelled.status, TaskStatus::Cancelled);
        assert_eq!(cancelled.error.as_deref(), Some("cancelled"));

        let plain = runner
            .submit(NewTask {
                title: "no command".into(),
                ..NewTask::default()
            })
            .await
            .expect("submit");
        assert_eq!(
            runner.cancel(plain.id).await.expect("cancel").status,
            TaskStatus::Cancelled
        );

        let err = runner.cancel(TaskId::new()).await.expect_err("unknown");
        assert!(matches!(err, RunnerError::NotFound(_)), "{err:?}");

        std::fs::write(&go, "").expect("release the blocker");
        assert_eq!(
            wait_final(&*f.store, blocker.id).await.status,
            TaskStatus::Completed
        );
        // The cancelled task never ran.
        let lines = logs(&*f.store, queued.id).await;
        assert!(texts(&lines, LogStream::Stdout).is_empty(), "{lines:?}");
        assert_eq!(
            f.store
                .get(queued.id)
                .await
                .expect("get")
                .expect("task")
                .status,
            TaskStatus::Cancelled
        );
        runner.shutdown().await;
    }

    #[tokio::test]
    async fn concurrency_limit_keeps_the_second_task_pending() {
        let f = fixture().await;
        let runner = Runner::start(
            f.store.clone(),
            RunnerConfig {
                max_concurrent: 1,
                ..config()
            },
        )
        .await
        .expect("start");
        let go = f.dir.path().join("go");
        let first = runner
            .submit(shell(
                "first",
                &format!("while [ ! -f '{}' ]; do sleep 0.05; done", go.display()),
            ))
            .await
            .expect("submit");
        wait_for(&*f.store, first.id, "running", |t| {
            t.status == TaskStatus::Running
        })
        .await;
        let second = runner
            .submit(shell("second", "echo second"))
            .await
            .expect("submit");
        // A negative check needs a window: for a while, the second task must not start.
        for _ in 0..25 {
            let now = f.store.get(second.id).await.expect("get").expect("task");
            assert_eq!(now.status, TaskStatus::Pending, "the only slot is taken");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::fs::write(&go, "").expect("release the first task");
        let first_done = wait_final(&*f.store, first.id).await;
        let second_done = wait_final(&*f.store, second.id).await;
        assert_eq!(first_done.status, TaskStatus::Completed);
        assert_eq!(second_done.status, TaskStatus::Completed);
        let started = logs(&*f.store, second.id).await;
        let started = started
            .iter()
            .find(|l| l.text.starts_with("started: "))
            .expect("started line");
        assert!(
            started.at >= first_done.updated_at,
            "the second task started only after the first one ended"
        );
        runner.shutdown().await;
    }

    #[tokio::test]
    async fn no_exec_refuses_commands_but_stores_plain_tasks() {
        let f = fixture().await;
        let runner = Runner::start(
            f.store.clone(),
            RunnerConfig {
                exec_allowed: false,
                ..config()
            },
        )
        .await
        .expect("start");
        let err = runner
            .submit(shell("refused", "echo hi"))
            .await
            .expect_err("refused");
        match err {
            RunnerError::Refused(reason) => {
                assert_eq!(
                    reason,
                    "command tasks are disabled on this device (--no-exec)"
                );
            }
            other => panic!("expected Refused, got {other:?}"),
        }
        let plain = runner
            .submit(NewTask {
                title: "write the docs".into(),
                ..NewTask::default()
            })
            .await
            .expect("a task without a command is accepted");
        assert_eq!(plain.status, TaskStatus::Pending);
        let stats = f.store.stats().await.expect("stats");
        assert_eq!(stats.total, 1, "the refused task was not stored");
        runner.shutdown().await;
        assert_eq!(
            f.store
                .get(plain.id)
                .await
                .expect("get")
                .expect("task")
                .status,
            TaskStatus::Pending
        );
    }

    #[tokio::test]
    async fn requirements_are_checked() {
        let f = fixture().await;
        let runner = Runner::start(f.store.clone(), config())
            .await
            .expect("start");
        let mut gpu = shell("train", "echo training");
        gpu.requirements = vec!["gpu".into()];
        let err = runner.submit(gpu.clone()).await.expect_err("no GPU here");
        assert!(
            matches!(&err, RunnerError::Refused(r) if r == "this device has no GPU"),
            "{err:?}"
        );
        let mut odd = shell("odd", "true");
        odd.requirements = vec!["quantum".into()];
        assert_eq!(
            runner.can_run(&odd),
            Err("unknown requirement quantum".into())
        );
        let empty = NewTask {
            title: "empty".into(),
            command: Some(Vec::new()),
            ..NewTask::default()
        };
        assert!(
            runner.can_run(&empty).is_err(),
            "an empty command cannot run"
        );
        runner.shutdown().await;

        let gpu_runner = Runner::start(
            f.store.clone(),
            RunnerConfig {
                has_gpu: true,
                ..config()
            },
        )
        .await
        .expect("start");
        assert_eq!(gpu_runner.can_run(&gpu), Ok(()));
        let task = gpu_runner
            .submit(gpu)
            .await
            .expect("a GPU device accepts it");
        assert_eq!(
            wait_final(&*f.store, task.id).await.status,
            TaskStatus::Completed
        );
        gpu_runner.shutdown().await;
    }

    /// A task as a crashed cocoon leaves it: stored as running, with no process of ours.
    async fn left_running(store: &dyn TaskStore, command: &str) -> Task {
        let task = store
            .create(shell("was running", command))
            .await
            .expect("create");
        store
            .update(
                task.id,
                TaskUpdate {
                    status: Some(TaskStatus::Running),
                    ..TaskUpdate::default()
                },
            )
            .await
            .expect("set running")
    }

    #[tokio::test]
    async fn restart_kills_what_interrupted_tasks_left_running_and_nothing_else() {
        let f = fixture().await;
        let interrupted = left_running(&*f.store, "sleep 600").await;
        // What a crashed cocoon leaves: its task's command, still running, and an
        // unrelated process that happens to carry another task's id.
        let spawn = |task: String| {
            std::process::Command::new("sleep")
                .arg("600")
                .env(TASK_ID_ENV, task)
                .spawn()
                .expect("spawn sleep")
        };
        let mut leftover = spawn(interrupted.id.to_string());
        let mut bystander = spawn(TaskId::new().to_string());

        let runner = Runner::start(f.store.clone(), config())
            .await
            .expect("start");
        let start = Instant::now();
        while leftover.try_wait().expect("try_wait").is_none() {
            assert!(
                start.elapsed() < WAIT,
                "the leftover of the interrupted task survived the restart"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            bystander.try_wait().expect("try_wait").is_none(),
            "a process of another task was killed"
        );
        assert_eq!(
            f.store
                .get(interrupted.id)
                .await
                .expect("get")
                .expect("task")
                .status,
            TaskStatus::Failed
        );
        let _ = bystander.kill();
        let _ = bystander.wait();
        runner.shutdown().await;
    }

    #[tokio::test]
    async fn commands_run_with_their_task_id_in_the_environment() {
        let f = fixture().await;
        let runner = Runner::start(f.store.clone(), config())
            .await
            .expect("start");
        let task = runner
            .submit(shell("whoami", &format!("echo ${TASK_ID_ENV}")))
            .await
            .expect("submit");
        wait_final(&*f.store, task.id).await;
        assert_eq!(
            texts(&logs(&*f.store, task.id).await, LogStream::Stdout),
            [task.id.to_string()]
        );
        runner.shutdown().await;
    }

    #[tokio::test]
    async fn restart_fails_interrupted_and_runs_left_pending() {
        let f = fixture().await;
        let interrupted = left_running(&*f.store, "sleep 30").await;
        let left_pending = f
            .store
            .create(shell("never started", "echo resumed"))
            .await
            .expect("create");

        let runner = Runner::start(f.store.clone(), config())
            .await
            .expect("start");
        let failed = f
            .store
            .get(interrupted.id)
            .await
            .expect("get")
            .expect("task");
        assert_eq!(
            failed.status,
            TaskStatus::Failed,
            "failed before start returns"
        );
        assert!(
            failed
                .error
                .as_deref()
                .is_some_and(|e| e.contains("interrupted")),
            "{failed:?}"
        );
        let resumed = wait_final(&*f.store, left_pending.id).await;
        assert_eq!(resumed.status, TaskStatus::Completed);
        assert_eq!(
            texts(&logs(&*f.store, left_pending.id).await, LogStream::Stdout),
            ["resumed"]
        );
        runner.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_interrupts_running_tasks() {
        let f = fixture().await;
        let runner = Runner::start(f.store.clone(), config())
            .await
            .expect("start");
        let task = runner
            .submit(shell("long", "echo begun; sleep 30"))
            .await
            .expect("submit");
        wait_for(&*f.store, task.id, "output", |t| {
            t.status == TaskStatus::Running
        })
        .await;
        runner.shutdown().await;
        let done = f.store.get(task.id).await.expect("get").expect("task");
        assert_eq!(
            done.status,
            TaskStatus::Failed,
            "final when shutdown returns"
        );
        assert_eq!(
            done.error.as_deref(),
            Some("interrupted: the cocoon stopped")
        );
        // After shutdown nothing new starts; a submitted task waits for the next start.
        let later = runner
            .submit(shell("later", "echo later"))
            .await
            .expect("submit");
        assert_eq!(later.status, TaskStatus::Pending);
    }

    #[test]
    fn splitter_cuts_lines() {
        let mut s = LineSplitter::new(8);
        let mut out = Vec::new();
        s.push(b"ab\ncd", &mut out);
        s.push(b"e\r\n\n12345678\n123456789", &mut out);
        assert_eq!(out, ["ab", "cde", "", "12345678", "12345678"]);
        assert_eq!(s.finish(), Some("9".to_owned()));
        // A multi-byte character is not split at the cut.
        let mut s = LineSplitter::new(8);
        let mut out = Vec::new();
        s.push("1234567é\n".as_bytes(), &mut out);
        assert_eq!(out, ["1234567", "é"]);
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn argv_is_displayed_shell_style() {
        let argv = ["sh", "-c", "echo 'hi'", ""].map(String::from);
        assert_eq!(display_argv(&argv), r#"sh -c 'echo '\''hi'\''' ''"#);
    }
}
