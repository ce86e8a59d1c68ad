//! The task runner: runs the commands of this device's tasks.
//!
//! This module owns everything between "a task with a command is stored Pending" and
//! "the task is final with its output in the log": admission ([`Runner::can_run`]),
//! scheduling (at most [`RunnerConfig::max_concurrent`] commands at once, oldest task
//! first), spawning each command where all it starts can be found again, streaming its
//! stdout and stderr into the task's log line by line, recording how it ended,
//! cancelling, and recovery on start (tasks left `Running` by a crash are failed and
//! whatever their commands left running is killed, tasks left `Pending` are run).
//!
//! The store is the single source of truth; the runner keeps in memory only which
//! tasks wait for a slot and which ones it is running. Cancelling must go through
//! [`Runner::cancel`]: changing a running task's status in the store directly does not
//! stop its process.
//!
//! A task's log is complete before its final status is written, so whoever sees a final
//! status can read the whole log.
//!
//! A task ends whole. When it is cancelled, when the cocoon stops, and when its command
//! exits on its own, everything the command started is killed, however it detached (a
//! new session or process group, a cleared environment, a double fork), so a task never
//! outlives itself and its output pipes close. Whether tasks can have a cgroup v2 each is
//! decided once, at start: where they can, a command joins its own cgroup before it runs
//! and ending the task kills that cgroup and removes it ([`cgroup`]). Where they cannot
//! (no delegation, cgroup v1 only), the cocoon becomes a child subreaper and traces a
//! task's processes through `/proc` by process group, session, parent, environment and
//! output pipes ([`processes`], which says what that cannot find).
//!
//! A cocoon that is killed outright (SIGKILL, a power cut) cannot kill anything, so
//! every command runs with [`TASK_ID_ENV`] set to its task's id, which its children
//! inherit, and its cgroup is named by that id. On the next start, the tasks found
//! `Running` are failed, their cgroups are killed and removed wherever they are, and every
//! process still carrying one of their ids is killed: the id, not a recorded pid, names
//! them, so a pid reused since by an unrelated process is never hit.

mod cgroup;
mod processes;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
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

use self::cgroup::{TaskCgroup, TaskCgroups};
use self::processes::Trace;

/// Longest log line, in bytes; longer lines are split so one runaway line cannot take
/// the store's or a reader's memory. Small enough that a line fits in one frame to
/// the hub even when every byte is a control character JSON spells as `\u00XX`.
pub const MAX_LINE_BYTES: usize = 8 * 1024;

/// The environment variable every task command (and so everything it starts) runs
/// with: its task's id.
pub const TASK_ID_ENV: &str = "ADI_TASK_ID";

/// How long the processes of a task are waited for once killed. A process stuck in the
/// kernel may take longer to die; nothing waits on it past this.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// How long output is still read after a command's processes are gone, in case one that
/// could not be found keeps a pipe open.
const OUTPUT_GRACE: Duration = Duration::from_secs(3);

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
    /// Whether each task gets a cgroup v2 of its own where the machine allows it. Off,
    /// tasks are traced through `/proc` as where cgroups are not writable.
    pub task_cgroups: bool,
    /// How long [`Runner::cancel`] waits for a running task to end before it answers
    /// that the cancel is under way: less than the hub waits for a device's answer.
    pub cancel_wait: Duration,
}

impl Default for RunnerConfig {
    /// Four commands at once, commands allowed, no GPU, a cgroup per task where
    /// possible, cancels answered within 8 s.
    fn default() -> Self {
        RunnerConfig {
            max_concurrent: 4,
            exec_allowed: true,
            has_gpu: false,
            task_cgroups: true,
            cancel_wait: Duration::from_secs(8),
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
    /// The task was told to stop but is not final yet (its store is slow, or a process
    /// is slow to die); it ends cancelled.
    #[error("the cancel is under way; the task is not final yet")]
    CancelUnderway,
    /// The task store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Runs this device's task commands. Cheap to share: it is handed out as `Arc<Runner>`.
pub struct Runner {
    store: Arc<dyn TaskStore>,
    config: RunnerConfig,
    /// Where task cgroups go; `None` where the probe at start failed or they are off.
    cgroups: Option<TaskCgroups>,
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
            .field("cgroups", &self.cgroups)
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
        let cgroups = probe_cgroups(&config).await;
        let killed = end_leftovers(&*store, cgroups.as_ref(), &interrupted).await;
        if killed > 0 {
            tracing::warn!(killed, "killed processes left running by interrupted tasks");
        }
        let queue = pending_commands(&*store).await?;
        if !queue.is_empty() {
            tracing::info!(count = queue.len(), "resuming pending tasks");
        }
        let runner = Arc::new(Runner {
            store,
            cgroups,
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

    /// Pending -> Cancelled right away; Running -> kill every process of the task, then
    /// the task ends Cancelled with error "cancelled"; final ->
    /// `RunnerError::AlreadyFinished(status)`. Returns the task once it is final, so
    /// the caller knows its processes are gone; if that takes longer than
    /// [`RunnerConfig::cancel_wait`], answers `RunnerError::CancelUnderway` instead, and
    /// the task still ends cancelled.
    pub async fn cancel(&self, id: TaskId) -> Result<Task, RunnerError> {
        let deadline = tokio::time::Instant::now() + self.config.cancel_wait;
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
            let ended = async {
                run.finished().await;
                self.store.get(id).await
            };
            let task = tokio::time::timeout_at(deadline, ended)
                .await
                .map_err(|_| RunnerError::CancelUnderway)??
                .ok_or(RunnerError::NotFound(id))?;
            return match task.status {
                TaskStatus::Cancelled => Ok(task),
                // It ended on its own before the kill: it keeps that ending.
                status => Err(RunnerError::AlreadyFinished(status)),
            };
        }
        // Its own task, so a cancel that answers late still happens whole.
        let cancelling = tokio::spawn(cancel_pending(self.store.clone(), id).in_current_span());
        match tokio::time::timeout_at(deadline, cancelling).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                // The runtime is stopping.
                Err(_) => Err(RunnerError::CancelUnderway),
            },
            Err(_) => Err(RunnerError::CancelUnderway),
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
            if tokio::time::timeout(self.config.cancel_wait, run.finished())
                .await
                .is_err()
            {
                tracing::warn!(
                    "a task did not finish stopping in time; it is failed at next start"
                );
            }
        }
        if self.cgroups.is_none() {
            // Orphans of the commands, adopted as a subreaper: whatever nothing else named.
            let ended =
                tokio::task::spawn_blocking(|| processes::end(&Trace::adopted(), KILL_WAIT))
                    .await
                    .unwrap_or(0);
            if ended > 0 {
                tracing::info!(
                    killed = ended,
                    "killed processes the tasks' commands had detached"
                );
            }
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
        log(&*self.store, id, stream, text).await;
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

        let Some((mut child, tracking)) = self.spawn(id, &argv).await else {
            return;
        };
        // The child leads its own process group, whose id is its pid.
        let group = child.id().and_then(|pid| i32::try_from(pid).ok());
        let pumps: Vec<JoinHandle<()>> = [
            child.stdout.take().map(|out| {
                tokio::spawn(pump(self.store.clone(), id, LogStream::Stdout, out).in_current_span())
            }),
            child.stderr.take().map(|err| {
                tokio::spawn(pump(self.store.clone(), id, LogStream::Stderr, err).in_current_span())
            }),
        ]
        .into_iter()
        .flatten()
        .collect();

        let ending = wait_or_stop(&mut child, &tracking, group, &run).await;
        if let Some(pid) = group {
            processes::forget_leader(pid);
        }
        // Whatever the command left behind goes with it, so the pipes close.
        tracking.end(group).await;
        let aborts: Vec<_> = pumps.iter().map(JoinHandle::abort_handle).collect();
        match tokio::time::timeout(OUTPUT_GRACE, futures_util::future::join_all(pumps)).await {
            Ok(results) => {
                for e in results.into_iter().filter_map(Result::err) {
                    tracing::warn!("output reader failed: {e}");
                }
            }
            Err(_) => {
                aborts.iter().for_each(tokio::task::AbortHandle::abort);
                self.log(
                    id,
                    LogStream::System,
                    "output still open after the command ended; stopped reading it",
                )
                .await;
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

    /// Starts a task's command: in the task's cgroup, which it joins before it runs,
    /// where tasks have cgroups, else traced. A command that cannot start fails its task
    /// (logged here) and gives `None`.
    async fn spawn(&self, id: TaskId, argv: &[String]) -> Option<(Child, Tracking)> {
        let placed = match &self.cgroups {
            None => Ok(None),
            Some(cgroups) => match find_program(&argv[0]) {
                Err(e) => Err(e),
                Ok(()) => cgroups
                    .create(id)
                    .await
                    .map(Some)
                    .map_err(|e| format!("{e:#}")),
            },
        };
        let cgroup = match placed {
            Ok(cgroup) => cgroup,
            Err(e) => {
                self.fail_start(id, &e).await;
                return None;
            }
        };
        let mut command = match &cgroup {
            Some(cgroup) => {
                let mut command = Command::new(cgroup::SHELL);
                command
                    .args(["-c", cgroup::JOIN_SCRIPT, cgroup::JOIN_NAME])
                    .arg(cgroup.procs())
                    .args(argv);
                command
            }
            None => {
                let mut command = Command::new(&argv[0]);
                command.args(&argv[1..]);
                command
            }
        };
        command
            .env(TASK_ID_ENV, id.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        let child = match processes::spawn_leader(&mut command) {
            Ok(child) => child,
            Err(e) => {
                self.fail_start(id, &e.to_string()).await;
                return None;
            }
        };
        let tracking = match cgroup {
            Some(cgroup) => Tracking::Cgroup(cgroup),
            None => {
                let leader = child.id().and_then(|pid| i32::try_from(pid).ok());
                let pipes: Vec<_> = [
                    child.stdout.as_ref().map(AsRawFd::as_raw_fd),
                    child.stderr.as_ref().map(AsRawFd::as_raw_fd),
                ]
                .into_iter()
                .flatten()
                .collect();
                Tracking::Traced(Trace::running(id, leader, &pipes))
            }
        };
        Some((child, tracking))
    }

    /// Fails a task whose command could not start, saying why; this ends the task.
    async fn fail_start(&self, id: TaskId, why: &str) {
        let error = format!("could not start: {why}");
        tracing::warn!("{error}");
        self.log(id, LogStream::System, &error).await;
        self.finish(id, TaskStatus::Failed, None, error).await;
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

/// Decides, once, whether tasks get cgroups here, and says so.
async fn probe_cgroups(config: &RunnerConfig) -> Option<TaskCgroups> {
    let probed = if config.task_cgroups {
        tokio::task::spawn_blocking(TaskCgroups::probe)
            .await
            .unwrap_or_else(|e| Err(cgroup::CgroupError::Join(format!("the probe failed: {e}"))))
            .map_err(|e| format!("{e:#}"))
    } else {
        Err("turned off".to_owned())
    };
    match probed {
        Ok(cgroups) => {
            tracing::info!("tasks run in cgroup v2 under {}", cgroups.dir().display());
            Some(cgroups)
        }
        Err(reason) => {
            let subreaper = if processes::become_subreaper() {
                ", and this process adopts their orphans"
            } else {
                ""
            };
            tracing::warn!(
                "cgroup v2 not writable here ({reason}): tasks are tracked by process group, \
                 session and environment{subreaper}"
            );
            None
        }
    }
}

/// Kills what a cocoon that stopped without ending its tasks left: the cgroups of the
/// `interrupted` tasks wherever they are, and of any of this store's tasks in this
/// cocoon's own task directory (one that could not be removed when its task ended),
/// and every process still carrying an interrupted task's id. Returns how many
/// processes it killed.
async fn end_leftovers(
    store: &dyn TaskStore,
    cgroups: Option<&TaskCgroups>,
    interrupted: &[TaskId],
) -> usize {
    let mut killed = 0;
    if let Some(cgroups) = cgroups {
        let ids: HashSet<TaskId> = interrupted.iter().copied().collect();
        let found = {
            let mount = cgroups.mount().to_owned();
            tokio::task::spawn_blocking(move || cgroup::find(&mount))
                .await
                .unwrap_or_default()
        };
        for (id, path) in found {
            let ours = ids.contains(&id)
                || (path.parent() == Some(cgroups.dir())
                    && matches!(store.get(id).await, Ok(Some(_))));
            if !ours {
                continue;
            }
            let cgroup = cgroups.adopt(path);
            killed += cgroup.pids().len();
            match cgroup.end(KILL_WAIT).await {
                Ok(()) => tracing::info!(task_id = %id, "removed the cgroup its task left"),
                Err(e) => {
                    tracing::warn!(task_id = %id, "could not end the cgroup its task left: {e:#}")
                }
            }
        }
    }
    if !interrupted.is_empty() {
        let trace = Trace::left_by(interrupted);
        killed += tokio::task::spawn_blocking(move || processes::end(&trace, KILL_WAIT))
            .await
            .unwrap_or(0);
    }
    killed
}

/// Cancels a task that is not running: Pending -> Cancelled, "cancelled" in its log.
async fn cancel_pending(store: Arc<dyn TaskStore>, id: TaskId) -> Result<Task, RunnerError> {
    let task = store.get(id).await?.ok_or(RunnerError::NotFound(id))?;
    if task.status.is_final() {
        return Err(RunnerError::AlreadyFinished(task.status));
    }
    // The line first: whoever sees the final status has the whole log.
    log(&*store, id, LogStream::System, CANCELLED).await;
    let update = TaskUpdate {
        status: Some(TaskStatus::Cancelled),
        error: Some(CANCELLED.into()),
        ..TaskUpdate::default()
    };
    match store.update(id, update).await {
        Ok(task) => {
            tracing::info!(task_id = %id, "pending task cancelled");
            Ok(task)
        }
        Err(StoreError::NotFound(_)) => Err(RunnerError::NotFound(id)),
        Err(StoreError::InvalidTransition { from, .. }) => Err(RunnerError::AlreadyFinished(from)),
        Err(e) => Err(e.into()),
    }
}

/// Appends a log line; a failing store is logged, never fatal to the run.
async fn log(store: &dyn TaskStore, id: TaskId, stream: LogStream, text: &str) {
    if let Err(e) = store.append_log(id, stream, text).await {
        tracing::warn!(task_id = %id, "could not append to the task log: {e}");
    }
}

/// Checks that `program` would start, as `exec` finds it (through `PATH` unless it
/// has a slash): in a cgroup a command is started by a shell, whose failure to find it
/// would only show as exit status 127.
fn find_program(program: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let runnable = |path: &Path| {
        std::fs::metadata(path).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        return match runnable(Path::new(program)) {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!("{program} is not an executable file")),
            Err(e) => Err(format!("{program}: {e}")),
        };
    }
    // A shell's own default where PATH is unset.
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    if std::env::split_paths(&path).any(|dir| runnable(&dir.join(program)).unwrap_or(false)) {
        Ok(())
    } else {
        Err(format!("{program}: not found in PATH"))
    }
}

/// How the processes of a running task are found and ended.
enum Tracking {
    /// All of them are in the task's cgroup.
    Cgroup(TaskCgroup),
    /// They are traced through `/proc`.
    Traced(Trace),
}

impl Tracking {
    /// Kills every process of the task now (the command is not reaped yet).
    async fn kill(&self, group: Option<i32>) {
        match self {
            Tracking::Cgroup(cgroup) => {
                kill_group(group);
                if let Err(e) = cgroup.kill() {
                    tracing::warn!("could not kill the task's cgroup: {e:#}");
                }
            }
            Tracking::Traced(trace) => {
                // Not the group first: its members' children would lose their parents,
                // and with them what ties them to the task. The trace stops the group
                // with the rest before killing anything.
                let trace = trace.clone();
                let _ =
                    tokio::task::spawn_blocking(move || processes::end(&trace, KILL_WAIT)).await;
                kill_group(group);
            }
        }
    }

    /// Once the command is reaped: kills whatever it left, waits (at most [`KILL_WAIT`])
    /// for it to die, and removes the task's cgroup.
    async fn end(self, group: Option<i32>) {
        match self {
            // Not the command's process group: the command is reaped, and its pid (the
            // group's id, once the group is empty) may already name another process.
            Tracking::Cgroup(cgroup) => {
                if let Err(e) = cgroup.end(KILL_WAIT).await {
                    tracing::warn!(
                        "the task's cgroup is left in place, ended at next start: {e:#}"
                    );
                }
            }
            Tracking::Traced(mut trace) => {
                trace.leader_reaped();
                let _ =
                    tokio::task::spawn_blocking(move || processes::end(&trace, KILL_WAIT)).await;
                kill_group(group);
            }
        }
    }
}

/// Waits for the child to exit, or kills all the task's processes when the run is
/// asked to stop.
async fn wait_or_stop(
    child: &mut Child,
    tracking: &Tracking,
    group: Option<i32>,
    run: &Run,
) -> std::io::Result<Ending> {
    tokio::select! {
        status = child.wait() => status.map(Ending::Exited),
        () = run.stop.cancelled() => {
            tracking.kill(group).await;
            match tokio::time::timeout(KILL_WAIT, child.wait()).await {
                Ok(status) => {
                    status?;
                }
                Err(_) => tracing::warn!("the command has not died yet; not waiting any longer"),
            }
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
    use std::path::{Path, PathBuf};
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

    /// Where cgroup v2 is mounted and this process's own cgroup, read from the kernel
    /// independently of the runner's code, joined into the directory the runner puts its
    /// task cgroups in. `None` after saying SKIPPED where that directory cannot be
    /// written; a failure instead when `CI` is set, where it must be writable.
    fn task_cgroups_dir() -> Option<PathBuf> {
        let found = (|| -> Result<PathBuf, String> {
            let mounts =
                std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
            let mount = mounts
                .lines()
                .find_map(|line| {
                    let (left, right) = line.split_once(" - ")?;
                    (right.split_whitespace().next() == Some("cgroup2"))
                        .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
                })
                .ok_or("no cgroup2 mount")?;
            let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
            let own = own
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .ok_or("no cgroup v2 line in /proc/self/cgroup")?;
            let dir = mount.join(own.trim_start_matches('/')).join("adi-tasks");
            let probe = dir.join(format!("test-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&probe).map_err(|e| format!("{}: {e}", probe.display()))?;
            std::fs::remove_dir(&probe).map_err(|e| format!("{}: {e}", probe.display()))?;
            Ok(dir)
        })();
        match found {
            Ok(dir) => Some(dir),
            Err(e) if std::env::var("CI").is_ok_and(|v| !v.is_empty()) => {
                panic!("cgroup v2 is not writable here and CI is set: {e}")
            }
            Err(e) => {
                eprintln!("*** SKIPPED: cgroup v2 is not writable here: {e} ***");
                None
            }
        }
    }

    /// What a test may leave behind if it fails: task cgroups, killed and removed, and the
    /// `sleep 300`s its commands started, killed (checked by their command line, so a
    /// reused pid is never hit).
    #[derive(Default)]
    struct Cleanup {
        cgroups: Vec<PathBuf>,
        pids: Vec<String>,
    }

    impl Drop for Cleanup {
        fn drop(&mut self) {
            for pid in &self.pids {
                let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c == b"sleep\x00300\x00");
                if let (true, Ok(pid)) = (ours, pid.parse()) {
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            for cgroup in &self.cgroups {
                if !cgroup.exists() {
                    continue;
                }
                let _ = std::fs::write(cgroup.join("cgroup.kill"), "1");
                let start = Instant::now();
                while std::fs::remove_dir(cgroup).is_err() && start.elapsed() < WAIT {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// A shell script that starts two `sleep 300`s meant to outlive it: one detached
    /// every way at once (a new session and so a new process group, a cleared
    /// environment, a double fork, no descriptor of the task's), one under `nohup`. It
    /// writes their pids into `dir` (`detached`, `nohup`), then runs `then`.
    fn detacher(dir: &Path, then: &str) -> String {
        format!(
            "(setsid env -i PATH=\"$PATH\" sh -c 'sleep 300 </dev/null >/dev/null 2>&1 & echo $! > {d}/detached' &); \
             nohup sleep 300 </dev/null >/dev/null 2>&1 & echo $! > {d}/nohup; \
             while [ ! -s {d}/detached ] || [ ! -s {d}/nohup ]; do sleep 0.05; done; {then}",
            d = dir.display()
        )
    }

    /// Waits until every pid in `pids` is dead, or panics naming the survivors.
    async fn wait_dead(pids: &[String], what: &str) {
        let start = Instant::now();
        loop {
            let alive: Vec<&String> = pids.iter().filter(|p| !process_is_dead(p)).collect();
            if alive.is_empty() {
                return;
            }
            assert!(start.elapsed() < WAIT, "{alive:?} survived {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The pids of the two sleeps [`detacher`] started, alive, recorded for cleanup.
    async fn detached_pids(dir: &Path, cleanup: &mut Cleanup) -> Vec<String> {
        let mut pids = Vec::new();
        for name in ["detached", "nohup"] {
            let pid = wait_for_file(&dir.join(name)).await;
            cleanup.pids.push(pid.clone());
            assert!(!process_is_dead(&pid), "the {name} sleep runs");
            pids.push(pid);
        }
        pids
    }

    #[tokio::test]
    async fn cancel_ends_every_descendant_however_it_detached() {
        let Some(cgroups) = task_cgroups_dir() else {
            return;
        };
        let f = fixture().await;
        let mut cleanup = Cleanup::default();
        let runner = Runner::start(f.store.clone(), config())
            .await
            .expect("start");
        let task = runner
            .submit(shell("detacher", &detacher(f.dir.path(), "exec sleep 300")))
            .await
            .expect("submit");
        cleanup.cgroups.push(cgroups.join(task.id.to_string()));
        let pids = detached_pids(f.dir.path(), &mut cleanup).await;

        let cancelled = runner.cancel(task.id).await.expect("cancel");
        assert_eq!(cancelled.status, TaskStatus::Cancelled);
        wait_dead(&pids, "the cancel").await;
        assert!(
            !cgroups.join(task.id.to_string()).exists(),
            "the task's cgroup is removed"
        );
        runner.shutdown().await;
    }

    #[tokio::test]
    async fn a_task_that_exits_leaves_nothing_running() {
        let Some(cgroups) = task_cgroups_dir() else {
            return;
        };
        let f = fixture().await;
        let mut cleanup = Cleanup::default();
        let runner = Runner::start(f.store.clone(), config())
            .await
            .expect("start");
        // It exits once the test has seen both sleeps running: when it does, they go too.
        let go = f.dir.path().join("go");
        let exit = format!(
            "while [ ! -e {} ]; do sleep 0.05; done; exit 0",
            go.display()
        );
        let task = runner
            .submit(shell("daemoniser", &detacher(f.dir.path(), &exit)))
            .await
            .expect("submit");
        cleanup.cgroups.push(cgroups.join(task.id.to_string()));
        let pids = detached_pids(f.dir.path(), &mut cleanup).await;
        std::fs::write(&go, b"").expect("let the task exit");
        let done = wait_final(&*f.store, task.id).await;
        assert_eq!(done.status, TaskStatus::Completed, "{done:?}");
        wait_dead(&pids, "the end of their task").await;
        assert!(
            !cgroups.join(task.id.to_string()).exists(),
            "the task's cgroup is removed"
        );
        runner.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_ends_every_descendant_however_it_detached() {
        let Some(cgroups) = task_cgroups_dir() else {
            return;
        };
        let f = fixture().await;
        let mut cleanup = Cleanup::default();
        let runner = Runner::start(f.store.clone(), config())
            .await
            .expect("start");
        let task = runner
            .submit(shell("detacher", &detacher(f.dir.path(), "exec sleep 300")))
            .await
            .expect("submit");
        cleanup.cgroups.push(cgroups.join(task.id.to_string()));
        let pids = detached_pids(f.dir.path(), &mut cleanup).await;

        runner.shutdown().await;
        let done = f.store.get(task.id).await.expect("get").expect("task");
        assert_eq!(done.status, TaskStatus::Failed, "{done:?}");
        wait_dead(&pids, "the shutdown").await;
        assert!(
            !cgroups.join(task.id.to_string()).exists(),
            "the task's cgroup is removed"
        );
    }

    #[tokio::test]
    async fn commands_run_in_a_cgroup_of_their_own() {
        let Some(cgroups) = task_cgroups_dir() else {
            return;
        };
        let f = fixture().await;
        let mut cleanup = Cleanup::default();
        let runner = Runner::start(f.store.clone(), config())
            .await
            .expect("start");
        let task = runner
            .submit(shell("where", "cat /proc/self/cgroup"))
            .await
            .expect("submit");
        cleanup.cgroups.push(cgroups.join(task.id.to_string()));
        let done = wait_final(&*f.store, task.id).await;
        assert_eq!(done.status, TaskStatus::Completed, "{done:?}");
        let out = texts(&logs(&*f.store, task.id).await, LogStream::Stdout);
        let v2 = out.iter().find_map(|l| l.strip_prefix("0::"));
        assert!(
            v2.is_some_and(|path| path.ends_with(&format!("/adi-tasks/{}", task.id))),
            "{out:?}"
        );
        runner.shutdown().await;
    }

    #[tokio::test]
    async fn restart_ends_every_leftover_of_an_interrupted_task() {
        let Some(cgroups) = task_cgroups_dir() else {
            return;
        };
        let f = fixture().await;
        let mut cleanup = Cleanup::default();
        let script = detacher(f.dir.path(), "exec sleep 300");
        let interrupted = left_running(&*f.store, &script).await;
        // What a cocoon killed mid-task leaves: the task's cgroup, with its command and
        // everything that command started still running in it.
        let cgroup = cgroups.join(interrupted.id.to_string());
        cleanup.cgroups.push(cgroup.clone());
        std::fs::create_dir_all(&cgroup).expect("create the task's cgroup");
        use std::os::unix::process::CommandExt as _;
        let mut leader = std::process::Command::new("/bin/sh")
            .args(["-c", r#"echo 0 > "$1" && shift && exec "$@""#, "adi-task"])
            .arg(cgroup.join("cgroup.procs"))
            .args(["sh", "-c", &script])
            .env(TASK_ID_ENV, interrupted.id.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn the command");
        let pids = detached_pids(f.dir.path(), &mut cleanup).await;

        let runner = Runner::start(f.store.clone(), config())
            .await
            .expect("start");
        wait_dead(&pids, "the restart").await;
        let start = Instant::now();
        while leader.try_wait().expect("try_wait").is_none() {
            assert!(start.elapsed() < WAIT, "the command survived the restart");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!cgroup.exists(), "the task's cgroup is removed");
        let failed = f
            .store
            .get(interrupted.id)
            .await
            .expect("get")
            .expect("task");
        assert_eq!(failed.status, TaskStatus::Failed);
        runner.shutdown().await;
    }

    /// Set in a process a test runs alone in.
    const ALONE: &str = "ADI_TEST_ALONE";

    /// Runs the test `name` alone in a process of its own, for a test that changes what
    /// its whole process is (a child subreaper, which adopts other tests' orphans):
    /// `true` in that process, where the test goes on; `false` in the calling one, once
    /// it passed there.
    fn alone(name: &str) -> bool {
        if std::env::var_os(ALONE).is_some() {
            return true;
        }
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", name, "--nocapture", "--test-threads", "1"])
            .env(ALONE, "1")
            .output()
            .expect("run the test alone");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success() && stdout.contains(&format!("test {name} ... ok")),
            "{stdout}\n{stderr}"
        );
        false
    }

    #[tokio::test]
    async fn without_cgroups_cancel_ends_what_names_the_task_and_shutdown_what_was_adopted() {
        if !alone("runner::tests::without_cgroups_cancel_ends_what_names_the_task_and_shutdown_what_was_adopted") {
            return;
        }
        let f = fixture().await;
        let mut cleanup = Cleanup::default();
        let runner = Runner::start(
            f.store.clone(),
            RunnerConfig {
                task_cgroups: false,
                ..config()
            },
        )
        .await
        .expect("start");
        let script = format!(
            // Each sleeps in a session and process group of its own, after a double fork
            // (or below a parent that waits), with one thing left that names the task:
            // its environment,
            "(setsid sh -c 'sleep 300 </dev/null >/dev/null 2>&1 & echo $! > {d}/env' &); \
             (setsid env -i PATH=\"$PATH\" sh -c 'sleep 300 </dev/null 2>/dev/null & echo $! > {d}/pipe' &); \
             setsid env -i PATH=\"$PATH\" sh -c 'sleep 300 & echo $! > {d}/chain; wait' </dev/null >/dev/null 2>&1 & \
             (setsid env -i PATH=\"$PATH\" sh -c 'sleep 300 </dev/null >/dev/null 2>&1 & echo $! > {d}/detached' &); \
             while [ ! -s {d}/env ] || [ ! -s {d}/pipe ] || [ ! -s {d}/chain ] || [ ! -s {d}/detached ]; do sleep 0.05; done; \
             exec sleep 300",
            d = f.dir.path().display()
        );
        // ...the task's stdout, its parent chain while its parent lives, nothing at all.
        let task = runner
            .submit(shell("detacher", &script))
            .await
            .expect("submit");
        let mut named = Vec::new();
        for name in ["env", "pipe", "chain"] {
            let pid = wait_for_file(&f.dir.path().join(name)).await;
            cleanup.pids.push(pid.clone());
            assert!(!process_is_dead(&pid), "the {name} sleep runs");
            named.push(pid);
        }
        let detached = wait_for_file(&f.dir.path().join("detached")).await;
        cleanup.pids.push(detached.clone());

        let cancelled = runner.cancel(task.id).await.expect("cancel");
        assert_eq!(cancelled.status, TaskStatus::Cancelled);
        wait_dead(&named, "the cancel").await;
        // Nothing named the last one, but the cocoon adopted it: it ends when the cocoon stops.
        runner.shutdown().await;
        wait_dead(&[detached], "the shutdown").await;
    }

    /// A SQLite store whose writes can be made to hang, as a store that stopped answering.
    struct StallingStore {
        inner: SqliteTaskStore,
        stalled: watch::Sender<bool>,
    }

    impl StallingStore {
        async fn unstalled(&self) {
            let mut stalled = self.stalled.subscribe();
            let _ = stalled.wait_for(|s| !*s).await;
        }
    }

    #[async_trait::async_trait]
    impl TaskStore for StallingStore {
        async fn create(&self, new: NewTask) -> adi_task_store::Result<Task> {
            self.inner.create(new).await
        }
        async fn get(&self, id: TaskId) -> adi_task_store::Result<Option<Task>> {
            self.inner.get(id).await
        }
        async fn list(
            &self,
            filter: &TaskFilter,
            after: Option<adi_protocol::tasks::Position>,
            limit: u32,
        ) -> adi_task_store::Result<adi_protocol::tasks::TaskPage> {
            self.inner.list(filter, after, limit).await
        }
        async fn update(&self, id: TaskId, update: TaskUpdate) -> adi_task_store::Result<Task> {
            self.unstalled().await;
            self.inner.update(id, update).await
        }
        async fn delete(&self, id: TaskId) -> adi_task_store::Result<bool> {
            self.inner.delete(id).await
        }
        async fn stats(&self) -> adi_task_store::Result<adi_protocol::tasks::TaskStats> {
            self.inner.stats().await
        }
        async fn append_log(
            &self,
            id: TaskId,
            stream: LogStream,
            text: &str,
        ) -> adi_task_store::Result<u64> {
            self.unstalled().await;
            self.inner.append_log(id, stream, text).await
        }
        async fn read_logs(
            &self,
            id: TaskId,
            after_seq: u64,
            limit: u32,
        ) -> adi_task_store::Result<Vec<LogLine>> {
            self.inner.read_logs(id, after_seq, limit).await
        }
        async fn fail_interrupted(&self) -> adi_task_store::Result<Vec<TaskId>> {
            self.inner.fail_interrupted().await
        }
    }

    #[tokio::test]
    async fn cancel_answers_in_time_while_the_store_hangs_and_the_cancel_still_happens() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = Arc::new(StallingStore {
            inner: SqliteTaskStore::open(&dir.path().join("tasks.db"))
                .await
                .expect("open store"),
            stalled: watch::channel(false).0,
        });
        let mut cleanup = Cleanup::default();
        let runner = Runner::start(
            store.clone(),
            RunnerConfig {
                max_concurrent: 1,
                cancel_wait: Duration::from_millis(300),
                ..config()
            },
        )
        .await
        .expect("start");
        let pidfile = dir.path().join("pid");
        let running = runner
            .submit(shell(
                "sleeper",
                &format!("echo $$ > '{}'; exec sleep 300", pidfile.display()),
            ))
            .await
            .expect("submit");
        if let Some(cgroups) = &runner.cgroups {
            cleanup
                .cgroups
                .push(cgroups.dir().join(running.id.to_string()));
        }
        let pending = runner
            .submit(shell("queued", "echo never"))
            .await
            .expect("submit");
        wait_for(&*store, running.id, "running", |t| {
            t.status == TaskStatus::Running
        })
        .await;
        let pid = wait_for_file(&pidfile).await;
        cleanup.pids.push(pid.clone());

        store.stalled.send_replace(true);
        for id in [running.id, pending.id] {
            let answer = tokio::time::timeout(WAIT, runner.cancel(id))
                .await
                .expect("the cancel answers although the store hangs");
            assert!(
                matches!(answer, Err(RunnerError::CancelUnderway)),
                "{answer:?}"
            );
        }
        wait_dead(&[pid], "a cancel whose store hangs").await;
        store.stalled.send_replace(false);
        for id in [running.id, pending.id] {
            let done = wait_final(&*store, id).await;
            assert_eq!(done.status, TaskStatus::Cancelled, "{done:?}");
        }
        runner.shutdown().await;
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
