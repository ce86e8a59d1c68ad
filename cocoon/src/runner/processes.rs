//! A task's processes where it has no cgroup: found in `/proc` by what still ties them
//! to the task, stopped, then killed.
//!
//! This module owns reading `/proc`, tracing a task's processes, ending them, and the
//! cocoon's part as a child subreaper (reaping the orphans it adopts, ending them when it
//! stops). It never signals pid 1, the cocoon itself, or a process that nothing ties
//! to a task.
//!
//! What ties a process to a task, followed until nothing new turns up:
//! - it is the task's command, or in the command's process group;
//! - its environment holds the task's [`super::TASK_ID_ENV`];
//! - it holds the task's stdout or stderr pipe;
//! - its parent is one of the task's processes (the chain holds while every process
//!   between it and the command lives);
//! - it is in a session or process group that one of the task's processes leads, or
//!   (while the cocoon runs the task) any session other than the cocoon's own that one
//!   of the task's processes is in: such a session was made by a task process, so
//!   everything in it descends from the task.
//!
//! Each process found is stopped (SIGSTOP, which cannot be caught) before the next look,
//! so none forks away meanwhile, and all are killed once a look finds nothing new.
//!
//! What this cannot find: a process that, before it is looked for, has left the task's
//! process group and session (`setsid`), cleared its environment, closed or redirected
//! the task's pipes, and whose parents in the task have all exited (a double fork).
//! Nothing in `/proc` names its task any more. The cocoon, a child subreaper here,
//! adopts such a process instead of init, and ends it when the cocoon stops gracefully;
//! a cocoon killed outright leaves it running.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use adi_protocol::tasks::TaskId;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use super::{lock, TASK_ID_ENV};

/// Most looks for new processes before killing what was found.
const MAX_ROUNDS: usize = 50;

/// How long a stopped process may take to show as stopped, and a killed one as dead.
const SETTLE: Duration = Duration::from_millis(200);

/// How often a settling process is looked at.
const POLL: Duration = Duration::from_millis(5);

/// Pids of the task commands the runner started and has not yet reaped. A subreaper
/// must not reap them itself: their `Child` handles do. Held while a command is
/// spawned, so none exits unregistered.
static LEADERS: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// Set once this process is a child subreaper.
static SUBREAPER: AtomicBool = AtomicBool::new(false);

/// Makes this process a child subreaper, so that a task's orphans are reparented to it
/// rather than to init: they stay among its descendants, it reaps them, and it ends them
/// when it stops. Returns whether it is one.
pub(crate) fn become_subreaper() -> bool {
    match nix::sys::prctl::set_child_subreaper(true) {
        Ok(()) => {
            SUBREAPER.store(true, Ordering::SeqCst);
            true
        }
        Err(e) => {
            tracing::warn!("could not become a child subreaper: {e}");
            false
        }
    }
}

/// Spawns a task's command and registers it as a leader until [`forget_leader`].
pub(crate) fn spawn_leader(command: &mut Command) -> std::io::Result<Child> {
    let mut leaders = lock(&LEADERS);
    let child = command.spawn()?;
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        leaders.insert(pid);
    }
    Ok(child)
}

/// The command `pid` was reaped by its `Child` (or will be, by tokio, if it was dropped).
pub(crate) fn forget_leader(pid: i32) {
    lock(&LEADERS).remove(&pid);
}

/// One line of `/proc/PID/stat`, the parts that tie processes together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    pid: i32,
    ppid: i32,
    pgid: i32,
    sid: i32,
    /// `Z` (or `X`): exited, not yet reaped.
    dead: bool,
    /// `T` or `t`: stopped.
    stopped: bool,
}

fn parse_stat(text: &str) -> Option<Stat> {
    let (head, rest) = text.rsplit_once(')')?;
    let pid = head.split_whitespace().next()?.parse().ok()?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    let mut number = || fields.next()?.parse::<i32>().ok();
    Some(Stat {
        pid,
        ppid: number()?,
        pgid: number()?,
        sid: number()?,
        dead: matches!(state, "Z" | "X"),
        stopped: matches!(state, "T" | "t"),
    })
}

fn stat(pid: i32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Every process now, by pid.
fn table() -> HashMap<i32, Stat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(stat)
        .map(|s| (s.pid, s))
        .collect()
}

/// This process's own pid, process group and session.
#[derive(Debug, Clone, Copy)]
struct Own {
    pid: i32,
    pgid: i32,
    sid: i32,
}

fn own() -> Own {
    let pid = nix::unistd::getpid();
    Own {
        pid: pid.as_raw(),
        pgid: nix::unistd::getpgrp().as_raw(),
        sid: nix::unistd::getsid(None).map_or(pid.as_raw(), Pid::as_raw),
    }
}

/// What ties processes to one task (or, after a restart, to several).
#[derive(Debug, Clone, Default)]
pub(crate) struct Trace {
    /// The task's command, while it is not yet reaped (so its pid is not reused).
    leader: Option<i32>,
    /// The command's process group, its pid: a group's id is not reused while the group
    /// has members.
    group: Option<i32>,
    /// `ADI_TASK_ID=<id>` for each task.
    markers: Vec<Vec<u8>>,
    /// The task's output pipes, as `/proc/PID/fd` shows them (`pipe:[inode]`).
    pipes: Vec<String>,
    /// Follow the sessions task processes are in, bar the cocoon's own: only while the
    /// cocoon runs the task (after a restart the session the command started in is
    /// unknown and may hold anything).
    follow_sessions: bool,
    /// The processes the cocoon adopted as a subreaper are the task's (on shutdown).
    adopted: bool,
}

impl Trace {
    /// A task being run: its command `leader`, which leads its own process group, and
    /// its output pipes (descriptors in this process).
    pub(crate) fn running(id: TaskId, leader: Option<i32>, pipes: &[std::os::fd::RawFd]) -> Trace {
        Trace {
            leader,
            group: leader,
            markers: vec![marker(id)],
            pipes: pipes
                .iter()
                .filter_map(|fd| std::fs::read_link(format!("/proc/self/fd/{fd}")).ok())
                .filter_map(|link| link.to_str().map(str::to_owned))
                .filter(|link| link.starts_with("pipe:"))
                .collect(),
            follow_sessions: true,
            adopted: false,
        }
    }

    /// Tasks a cocoon killed outright had running: only their ids still name them.
    pub(crate) fn left_by(ids: &[TaskId]) -> Trace {
        Trace {
            markers: ids.iter().map(|id| marker(*id)).collect(),
            ..Trace::default()
        }
    }

    /// Everything this cocoon adopted as a subreaper: orphans of its tasks' commands.
    pub(crate) fn adopted() -> Trace {
        Trace {
            adopted: true,
            follow_sessions: true,
            ..Trace::default()
        }
    }

    /// The command was reaped: its pid may be reused, so it no longer names anything.
    /// Its group id stays: it cannot be reused while the group has members.
    pub(crate) fn leader_reaped(&mut self) {
        self.leader = None;
    }

    /// Whether anything could be traced at all.
    fn is_empty(&self) -> bool {
        self.leader.is_none()
            && self.group.is_none()
            && self.markers.is_empty()
            && self.pipes.is_empty()
            && !self.adopted
    }

    /// The processes of `table` this trace reaches, dead ones included (a dead session
    /// leader still ties its session together).
    fn reach(&self, table: &HashMap<i32, Stat>, own: Own) -> BTreeSet<i32> {
        let candidate = |s: &&Stat| s.pid > 1 && s.pid != own.pid;
        let leaders = if self.adopted {
            lock(&LEADERS).clone()
        } else {
            BTreeSet::new()
        };
        let mut found: BTreeSet<i32> = table
            .values()
            .filter(candidate)
            .filter(|s| {
                Some(s.pid) == self.leader
                    || (self.group.is_some() && Some(s.pgid) == self.group)
                    || (self.adopted
                        && s.ppid == own.pid
                        && s.pgid != own.pgid
                        && !leaders.contains(&s.pid)
                        && !in_task_cgroup(s.pid))
                    || (!s.dead && !self.markers.is_empty() && self.has_marker(s.pid))
                    || (!s.dead && !self.pipes.is_empty() && self.holds_pipe(s.pid))
            })
            .map(|s| s.pid)
            .collect();
        loop {
            let mut sessions = HashSet::new();
            let mut groups: HashSet<i32> = self.group.into_iter().collect();
            for s in found.iter().filter_map(|pid| table.get(pid)) {
                sessions.insert(s.pid);
                groups.insert(s.pid);
                if self.follow_sessions && s.sid != own.sid {
                    sessions.insert(s.sid);
                    groups.insert(s.pgid);
                }
            }
            let more: Vec<i32> = table
                .values()
                .filter(candidate)
                .filter(|s| !found.contains(&s.pid))
                .filter(|s| {
                    found.contains(&s.ppid) || sessions.contains(&s.sid) || groups.contains(&s.pgid)
                })
                .map(|s| s.pid)
                .collect();
            if more.is_empty() {
                return found;
            }
            found.extend(more);
        }
    }

    fn has_marker(&self, pid: i32) -> bool {
        std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
            env.split(|b| *b == 0)
                .any(|var| self.markers.iter().any(|m| m.as_slice() == var))
        })
    }

    fn holds_pipe(&self, pid: i32) -> bool {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return false;
        };
        fds.filter_map(Result::ok)
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .any(|link| {
                link.to_str()
                    .is_some_and(|l| self.pipes.iter().any(|p| p == l))
            })
    }
}

fn marker(id: TaskId) -> Vec<u8> {
    format!("{TASK_ID_ENV}={id}").into_bytes()
}

/// Whether `pid` runs in a task cgroup, whose runner ends it (another runner in this
/// process may use cgroups).
fn in_task_cgroup(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| {
        c.lines()
            .filter_map(|l| l.strip_prefix("0::"))
            .any(|p| p.contains(&format!("/{}/", super::cgroup::TASKS_DIR)))
    })
}

/// Stops every process `trace` reaches, looking again until nothing new turns up (or
/// `within` passes), then kills them all, reaps the ones this process adopted, and
/// returns how many it killed. Blocking: it reads `/proc` and waits for signals to land.
pub(crate) fn end(trace: &Trace, within: Duration) -> usize {
    if trace.is_empty() {
        return 0;
    }
    let deadline = Instant::now() + within;
    let own = own();
    let mut stopped = BTreeSet::new();
    for _ in 0..MAX_ROUNDS {
        let table = table();
        let new: Vec<i32> = trace
            .reach(&table, own)
            .into_iter()
            .filter(|pid| table.get(pid).is_some_and(|s| !s.dead))
            .filter(|pid| !stopped.contains(pid))
            .collect();
        if new.is_empty() {
            break;
        }
        for pid in &new {
            signal(*pid, Signal::SIGSTOP);
            stopped.insert(*pid);
        }
        // A process signalled but not yet stopped could still fork after the next look.
        settle(&new, deadline, |s| s.stopped || s.dead);
        if Instant::now() >= deadline {
            break;
        }
    }
    let mut killed = 0;
    for pid in &stopped {
        if signal(*pid, Signal::SIGKILL) {
            killed += 1;
        }
    }
    let stopped: Vec<i32> = stopped.into_iter().collect();
    settle(&stopped, Instant::now() + SETTLE, |s| s.dead);
    reap_adopted();
    killed
}

/// Waits until each of `pids` is gone or `done`, for at most [`SETTLE`] and never past
/// `deadline`.
fn settle(pids: &[i32], deadline: Instant, done: impl Fn(&Stat) -> bool) {
    let until = deadline.min(Instant::now() + SETTLE);
    while Instant::now() < until {
        if pids.iter().all(|pid| stat(*pid).is_none_or(|s| done(&s))) {
            return;
        }
        std::thread::sleep(POLL);
    }
}

/// Sends `signal` to `pid`; whether it was delivered.
fn signal(pid: i32, signal: Signal) -> bool {
    match kill(Pid::from_raw(pid), signal) {
        Ok(()) => true,
        Err(nix::errno::Errno::ESRCH) => false,
        Err(e) => {
            tracing::warn!(pid, "could not send {signal}: {e}");
            false
        }
    }
}

/// Reaps the orphans this process adopted as a subreaper that have exited. Only those:
/// the children it started itself are reaped by whoever waits for them, and are told
/// apart as registered leaders (a task's command) or members of its own process group
/// (a plugin's command).
fn reap_adopted() {
    if !SUBREAPER.load(Ordering::SeqCst) {
        return;
    }
    let own = own();
    // Held while reaping, so no command is spawned, exits and gets reaped here unseen.
    let leaders = lock(&LEADERS);
    for s in table().values() {
        if s.dead && s.ppid == own.pid && s.pgid != own.pgid && !leaders.contains(&s.pid) {
            let _ = waitpid(Pid::from_raw(s.pid), Some(WaitPidFlag::WNOHANG));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_are_read_past_odd_names() {
        let line = "4242 (a (weird) name) S 1 4240 4240 0 -1 4194560 0 0 0 0";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                pid: 4242,
                ppid: 1,
                pgid: 4240,
                sid: 4240,
                dead: false,
                stopped: false,
            })
        );
        let zombie = parse_stat("7 (sh) Z 3 7 2 0").expect("parsed");
        assert!(zombie.dead && !zombie.stopped);
        assert!(parse_stat("7 (sh) T 3 7 2 0").is_some_and(|s| s.stopped));
        assert_eq!(parse_stat("garbage"), None);
    }

    fn proc(pid: i32, ppid: i32, pgid: i32, sid: i32) -> (i32, Stat) {
        (
            pid,
            Stat {
                pid,
                ppid,
                pgid,
                sid,
                dead: false,
                stopped: false,
            },
        )
    }

    #[test]
    fn a_trace_follows_children_groups_and_sessions_but_never_the_cocoons() {
        let own = Own {
            pid: 100,
            pgid: 90,
            sid: 80,
        };
        let table: HashMap<i32, Stat> = [
            proc(90, 80, 90, 80),     // the shell that started the cocoon
            proc(100, 90, 90, 80),    // the cocoon
            proc(101, 100, 90, 80),   // a plugin command: the cocoon's group
            proc(200, 100, 200, 80),  // the task's command, its own group
            proc(201, 200, 200, 80),  // its child
            proc(202, 201, 202, 202), // a grandchild that called setsid
            proc(203, 100, 202, 202), // adopted: its parent exited; in 202's session
            proc(204, 100, 204, 204), // adopted, its own session: nothing names it
            proc(205, 90, 205, 80),   // another job of the shell that started the cocoon
        ]
        .into_iter()
        .collect();
        let trace = Trace {
            leader: Some(200),
            group: Some(200),
            follow_sessions: true,
            ..Trace::default()
        };
        assert_eq!(
            trace.reach(&table, own),
            BTreeSet::from([200, 201, 202, 203])
        );

        // After a restart the command's session is unknown: only sessions led by a
        // process found are followed.
        let restart = Trace {
            group: Some(200),
            ..Trace::default()
        };
        let mut lost_leader = table.clone();
        lost_leader.remove(&202);
        assert_eq!(restart.reach(&lost_leader, own), BTreeSet::from([200, 201]));
    }
}
