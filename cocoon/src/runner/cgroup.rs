//! A cgroup v2 per task: the one container a task's processes cannot leave by any of the
//! ways a process detaches (a new session or process group, a cleared environment, a
//! double fork), so that ending a task ends all of them.
//!
//! This module owns finding where cgroup v2 is mounted and which cgroup this process is
//! in, the probe made once at start, the directory `<own cgroup>/adi-tasks/` that holds
//! one cgroup per task named by its id, killing everything in one of them and removing
//! it, and finding the ones a cocoon that was killed outright left behind. It never
//! kills in, nor removes, a cgroup outside an `adi-tasks` directory, and only those of
//! its own tasks in one.
//!
//! A command joins its cgroup before it starts: the runner starts [`SHELL`] with
//! [`JOIN_SCRIPT`], which moves that shell into the cgroup and only then `exec`s the
//! task's argv, unchanged. Whatever the command forks is born in the cgroup, and the
//! kernel keeps a fork and a move into a cgroup from racing. No `unsafe` code is needed.
//! A command running as root can still move itself out deliberately: the cgroup stops
//! the usual ways of detaching, not a hostile root.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use adi_protocol::tasks::TaskId;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The directory, in the cocoon's own cgroup, that holds one cgroup per running task.
/// Its name is fixed, so a cocoon started again finds what the last one left.
pub(crate) const TASKS_DIR: &str = "adi-tasks";

/// The shell that runs [`JOIN_SCRIPT`].
pub(crate) const SHELL: &str = "/bin/sh";

/// Moves the shell itself into the cgroup whose `cgroup.procs` is `$1` (writing `0`
/// names the writer), then replaces the shell with the task's argv (`"$@"` after the
/// shift), which a shell passes on word for word. If the move fails, nothing runs.
pub(crate) const JOIN_SCRIPT: &str = r#"echo 0 > "$1" && shift && exec "$@""#;

/// `$0` of the joining shell, as `ps` shows it until the `exec`.
pub(crate) const JOIN_NAME: &str = "adi-task";

/// Longest walk of the cgroup tree when looking for what a killed cocoon left, in
/// directories: a bound on the work, far above what a host has.
const MAX_WALK: usize = 100_000;

/// How often a cgroup is looked at while it empties.
const POLL: Duration = Duration::from_millis(10);

/// Why tasks cannot have cgroups of their own here.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CgroupError {
    /// `/proc/self/cgroup` has no `0::` line: only cgroup v1 hierarchies.
    #[error("this process is in no cgroup v2 hierarchy (cgroup v1 only)")]
    NoV2,
    /// No cgroup2 mount shows the cgroup this process is in.
    #[error("no cgroup2 mount shows this process's cgroup {0}")]
    NotMounted(String),
    /// Reading or writing the cgroup file system failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// A process could not be moved into a test cgroup.
    #[error("a process could not join a cgroup: {0}")]
    Join(String),
    /// Processes were still in a cgroup after it was killed and waited for.
    #[error("{} still holds processes", .0.display())]
    Busy(PathBuf),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where this cocoon's task cgroups live, once the probe has shown that it may create
/// them and move processes into them.
#[derive(Debug)]
pub(crate) struct TaskCgroups {
    /// The cgroup2 mount point, to look for leftovers of an earlier cocoon.
    mount: PathBuf,
    /// `<mount>/<own cgroup>/adi-tasks`.
    dir: PathBuf,
    /// Whether the kernel has `cgroup.kill` (5.14 and later).
    kill_file: bool,
}

impl TaskCgroups {
    /// Finds this process's cgroup v2, creates `adi-tasks` in it, and checks that a
    /// process can be moved into a cgroup there, the way task commands will be.
    /// Blocking: it runs a shell.
    pub(crate) fn probe() -> Result<TaskCgroups, CgroupError> {
        let proc_cgroup = Path::new("/proc/self/cgroup");
        let own = std::fs::read_to_string(proc_cgroup).map_err(io_error(proc_cgroup))?;
        let own = own_cgroup(&own).ok_or(CgroupError::NoV2)?;
        let mountinfo = Path::new("/proc/self/mountinfo");
        let mounts = std::fs::read_to_string(mountinfo).map_err(io_error(mountinfo))?;
        let (mount, own_dir) =
            locate(&mounts, own).ok_or_else(|| CgroupError::NotMounted(own.to_owned()))?;
        let dir = own_dir.join(TASKS_DIR);
        std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;

        // Its own name, should several runners share this process.
        static PROBES: AtomicU64 = AtomicU64::new(0);
        let test = dir.join(format!(
            "probe-{}-{}",
            std::process::id(),
            PROBES.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&test).map_err(io_error(&test))?;
        let cgroup = TaskCgroup {
            path: test.clone(),
            kill_file: test.join("cgroup.kill").exists(),
        };
        let joined = join_test(&cgroup);
        let removed = cgroup.remove_blocking(Duration::from_secs(2));
        joined?;
        removed?;
        Ok(TaskCgroups {
            mount,
            kill_file: cgroup.kill_file,
            dir,
        })
    }

    /// The directory that holds the task cgroups.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates the cgroup of task `id`. One left from before (the same id cannot run
    /// twice at once) is emptied and used again.
    pub(crate) async fn create(&self, id: TaskId) -> Result<TaskCgroup, CgroupError> {
        let cgroup = TaskCgroup {
            path: self.dir.join(id.to_string()),
            kill_file: self.kill_file,
        };
        match std::fs::create_dir(&cgroup.path) {
            Ok(()) => Ok(cgroup),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                cgroup.end(Duration::from_secs(2)).await?;
                std::fs::create_dir(&cgroup.path).map_err(io_error(&cgroup.path))?;
                Ok(cgroup)
            }
            Err(e) => Err(io_error(&cgroup.path)(e)),
        }
    }

    /// The cgroup2 mount point.
    pub(crate) fn mount(&self) -> &Path {
        &self.mount
    }

    /// The cgroup at `path`, which [`find`] found and the caller knows is one of its
    /// tasks': from now on dropping it kills what is in it.
    pub(crate) fn adopt(&self, path: PathBuf) -> TaskCgroup {
        TaskCgroup {
            path,
            kill_file: self.kill_file,
        }
    }
}

/// Every task cgroup under the cgroup2 mount `mount`, wherever its `adi-tasks` directory
/// is, with the task its name gives: a cocoon started again may be in another cgroup
/// than the one that was killed (another login session, say), and several cocoons may
/// share a machine, so the caller keeps only its own. Blocking: walks the tree.
pub(crate) fn find(mount: &Path) -> Vec<(TaskId, PathBuf)> {
    let mut found = Vec::new();
    let mut stack = vec![mount.to_owned()];
    let mut walked = 0;
    while let Some(dir) = stack.pop() {
        walked += 1;
        if walked > MAX_WALK {
            tracing::warn!("stopped looking for task cgroups after {MAX_WALK} cgroups");
            break;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let in_tasks_dir = dir.file_name().is_some_and(|n| n == TASKS_DIR);
        for entry in entries.filter_map(Result::ok) {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let task = in_tasks_dir
                .then(|| entry.file_name().to_str()?.parse::<TaskId>().ok())
                .flatten();
            match task {
                // A task's cgroup is its own business: never looked into.
                Some(id) => found.push((id, entry.path())),
                None => stack.push(entry.path()),
            }
        }
    }
    found
}

/// Moves a shell into `cgroup` with [`JOIN_SCRIPT`], execs a second shell that reads
/// its own cgroup, and checks that it is `cgroup`.
fn join_test(cgroup: &TaskCgroup) -> Result<(), CgroupError> {
    let out = Command::new(SHELL)
        .args(["-c", JOIN_SCRIPT, JOIN_NAME])
        .arg(cgroup.procs())
        .args([
            SHELL,
            "-c",
            "while read -r line; do echo \"$line\"; done < /proc/self/cgroup",
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| CgroupError::Join(format!("{SHELL}: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let name = cgroup
        .path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let inside =
        own_cgroup(&stdout).is_some_and(|path| path.ends_with(&format!("/{TASKS_DIR}/{name}")));
    if out.status.success() && inside {
        Ok(())
    } else {
        Err(CgroupError::Join(format!(
            "{} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// One task's cgroup. Dropped without [`TaskCgroup::end`] (a run that panicked), it
/// kills what is in it and tries to remove it; what remains is found at the next start.
#[derive(Debug)]
pub(crate) struct TaskCgroup {
    path: PathBuf,
    kill_file: bool,
}

impl TaskCgroup {
    /// The file a process writes to join this cgroup.
    pub(crate) fn procs(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// SIGKILL to every process in this cgroup and the cgroups in it, at once where the
    /// kernel has `cgroup.kill`. Otherwise the cgroup is frozen first, where the kernel
    /// can, so that no process forks or exits between reading its pid and the kill;
    /// without a freezer a process may fork meanwhile, which [`TaskCgroup::end`] catches
    /// on its next round.
    pub(crate) fn kill(&self) -> Result<(), CgroupError> {
        if self.kill_file {
            let file = self.path.join("cgroup.kill");
            return match std::fs::write(&file, "1") {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_error(&file)(e)),
            };
        }
        self.kill_each()
    }

    fn kill_each(&self) -> Result<(), CgroupError> {
        // Freezing a cgroup freezes the cgroups in it too; a frozen process still dies of
        // SIGKILL.
        let _ = std::fs::write(self.path.join("cgroup.freeze"), "1");
        for pid in self.pids() {
            match kill(Pid::from_raw(pid), Signal::SIGKILL) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => return Err(io_error(&self.path)(io::Error::from_raw_os_error(e as i32))),
            }
        }
        Ok(())
    }

    /// The processes in this cgroup and the cgroups in it.
    pub(crate) fn pids(&self) -> Vec<i32> {
        self.dirs()
            .iter()
            .filter_map(|dir| std::fs::read_to_string(dir.join("cgroup.procs")).ok())
            .flat_map(|procs| {
                procs
                    .lines()
                    .filter_map(|l| l.trim().parse::<i32>().ok())
                    .collect::<Vec<_>>()
            })
            .filter(|pid| *pid > 1)
            .collect()
    }

    /// Whether no live process is left in this cgroup or below it (a zombie does not
    /// count: it holds nothing but its pid until its parent reaps it).
    fn is_empty(&self) -> bool {
        match std::fs::read_to_string(self.path.join("cgroup.events")) {
            Ok(events) => events.lines().any(|l| l.trim() == "populated 0"),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !self.path.exists() => true,
            Err(_) => self.pids().is_empty(),
        }
    }

    /// This cgroup and every cgroup in it, deepest first, so they can be removed in order.
    fn dirs(&self) -> Vec<PathBuf> {
        let mut all = Vec::new();
        let mut stack = vec![self.path.clone()];
        while let Some(dir) = stack.pop() {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                stack.extend(
                    entries
                        .filter_map(Result::ok)
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
            all.push(dir);
        }
        all.reverse();
        all
    }

    /// Kills everything in this cgroup, waits up to `within` for it to empty (killing
    /// again each round, for what forked meanwhile), then removes it.
    pub(crate) async fn end(&self, within: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + within;
        loop {
            if !self.path.exists() {
                return Ok(());
            }
            self.kill()?;
            if self.is_empty() && self.try_remove()? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::Busy(self.path.clone()));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// [`TaskCgroup::end`] for a thread that may block.
    fn remove_blocking(&self, within: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + within;
        loop {
            self.kill()?;
            if self.is_empty() && self.try_remove()? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::Busy(self.path.clone()));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Removes the cgroups, deepest first; `false` while one is still busy.
    fn try_remove(&self) -> Result<bool, CgroupError> {
        for dir in self.dirs() {
            match std::fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32) => {
                    return Ok(false)
                }
                Err(e) => return Err(io_error(&dir)(e)),
            }
        }
        Ok(true)
    }
}

impl Drop for TaskCgroup {
    fn drop(&mut self) {
        if self.path.exists() {
            let _ = self.kill();
            let _ = self.try_remove();
        }
    }
}

/// The cgroup v2 path of this process, from `/proc/self/cgroup`'s `0::` line.
fn own_cgroup(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_end_matches(" (deleted)"))
        .filter(|p| p.starts_with('/'))
}

/// The cgroup2 mount that shows the cgroup `own`, and where `own` is under it.
/// `mountinfo` is `/proc/self/mountinfo`: a mount's root (4th field) is the cgroup it
/// shows at its mount point (5th field), `/` unless only a subtree is mounted.
fn locate(mountinfo: &str, own: &str) -> Option<(PathBuf, PathBuf)> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next() != Some("cgroup2") {
            return None;
        }
        let mut fields = left.split_whitespace().skip(3);
        let root = unescape(fields.next()?);
        let point = PathBuf::from(unescape(fields.next()?));
        let below = if root == "/" {
            own
        } else {
            let rest = own.strip_prefix(root.as_str())?;
            if !(rest.is_empty() || rest.starts_with('/')) {
                return None;
            }
            rest
        };
        let own_dir = point.join(below.trim_start_matches('/'));
        Some((point, own_dir))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let code = bytes
            .get(i + 1..i + 4)
            .filter(|_| bytes[i] == b'\\')
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match code {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;

    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const UNIFIED: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:8 - cgroup2 cgroup2 rw,nsdelegate
";
    const SUBTREE: &str = "\
900 800 0:24 /system.slice/box.service /sys/fs/cgroup ro,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn the_mount_is_found_wherever_it_is() {
        assert_eq!(
            locate(HYBRID, "/"),
            Some((
                "/sys/fs/cgroup/unified".into(),
                "/sys/fs/cgroup/unified".into()
            ))
        );
        assert_eq!(
            locate(UNIFIED, "/system.slice/adi-cocoon.service"),
            Some((
                "/sys/fs/cgroup".into(),
                "/sys/fs/cgroup/system.slice/adi-cocoon.service".into()
            ))
        );
        assert_eq!(
            locate(SUBTREE, "/system.slice/box.service/inner"),
            Some(("/sys/fs/cgroup".into(), "/sys/fs/cgroup/inner".into()))
        );
        assert_eq!(locate(SUBTREE, "/system.slice/box.serviced"), None);
        assert_eq!(
            locate(
                "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n",
                "/"
            ),
            None
        );
        let spaced = "26 25 0:24 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            locate(spaced, "/a").map(|(_, own)| own),
            Some("/mnt/my cgroups/a".into())
        );
    }

    #[test]
    fn the_own_cgroup_is_the_v2_line() {
        let hybrid = "9:name=systemd:/\n4:memory:/box\n0::/user.slice/session-3.scope\n";
        assert_eq!(own_cgroup(hybrid), Some("/user.slice/session-3.scope"));
        assert_eq!(own_cgroup("0::/\n"), Some("/"));
        assert_eq!(own_cgroup("4:memory:/box\n1:cpu:/\n"), None);
    }

    /// Kills and removes a test's cgroup (and the one in it) when the test ends, passed
    /// or failed.
    struct Removed(PathBuf);

    impl Drop for Removed {
        fn drop(&mut self) {
            let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
            let start = Instant::now();
            for dir in [self.0.join("inner"), self.0.clone()] {
                while dir.exists()
                    && std::fs::remove_dir(&dir).is_err()
                    && start.elapsed() < Duration::from_secs(10)
                {
                    std::thread::sleep(POLL);
                }
            }
        }
    }

    #[tokio::test]
    async fn without_cgroup_kill_every_process_is_killed_in_nested_cgroups_too() {
        let cgroups = match TaskCgroups::probe() {
            Ok(cgroups) => cgroups,
            Err(e) if std::env::var("CI").is_ok_and(|v| !v.is_empty()) => {
                panic!("cgroup v2 is not writable here and CI is set: {e}")
            }
            Err(e) => {
                eprintln!("*** SKIPPED: cgroup v2 is not writable here: {e} ***");
                return;
            }
        };
        let path = cgroups
            .dir()
            .join(format!("test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&path).expect("create a cgroup");
        let _removed = Removed(path.clone());
        // As on a kernel before 5.14, without `cgroup.kill`.
        let cgroup = TaskCgroup {
            path: path.clone(),
            kill_file: false,
        };
        let inner = path.join("inner");
        // Two sleeps in sessions of their own, and one moved into a cgroup of its own
        // inside the task's.
        let script = format!(
            "mkdir '{inner}' && (setsid sleep 300 &) && (setsid sleep 300 &) && \
             sh -c 'echo 0 > \"$1\"/cgroup.procs && exec sleep 300' inner '{inner}' & exec sleep 300",
            inner = inner.display()
        );
        let mut command = Command::new(SHELL)
            .args(["-c", JOIN_SCRIPT, JOIN_NAME])
            .arg(cgroup.procs())
            .args([SHELL, "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let start = Instant::now();
        let pids = loop {
            let in_inner = std::fs::read_to_string(inner.join("cgroup.procs"))
                .is_ok_and(|p| !p.trim().is_empty());
            let pids = cgroup.pids();
            if in_inner && pids.len() >= 4 {
                break pids;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the command did not start its sleeps: {pids:?}"
            );
            tokio::time::sleep(POLL).await;
        };

        cgroup.end(Duration::from_secs(10)).await.expect("ended");
        assert!(!path.exists(), "the cgroup and the one in it are removed");
        assert!(command.wait().expect("wait").signal().is_some());
        for pid in pids {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .next()
                        .map(str::to_owned)
                });
            assert!(
                state.as_deref().is_none_or(|s| s == "Z" || s == "X"),
                "{pid} is still {state:?}"
            );
        }
    }
}
