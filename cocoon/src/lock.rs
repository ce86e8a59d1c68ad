//! One live agent per data dir. A data dir is one device's identity, task store and
//! local API; two agents on it would fight over all three, each overwriting the other's
//! files. So an agent holds an exclusive lock on `cocoon.lock` in its data dir for its
//! whole life, taken before it reads or writes anything else there, and a second agent
//! refuses at once, naming the one that runs.
//!
//! The lock is the kernel's (`flock`): it is let go when the agent exits, however it
//! exits, so a crashed agent never leaves a stale lock behind. The file itself stays;
//! it only says who holds it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use adi_storage::owner_only;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// The lock's file name in the data dir.
pub const LOCK_FILE: &str = "cocoon.lock";

/// Why the data dir could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another agent runs on this data dir.
    #[error(
        "the data dir {dir} is in use by another adi cocoon ({holder}); stop that one first, \
         or give this one its own --data-dir"
    )]
    InUse {
        /// The data dir.
        dir: PathBuf,
        /// What the running agent wrote about itself.
        holder: String,
    },
    /// The lock file could not be opened or locked.
    #[error("{path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// The data dir, held: dropping it lets another agent take the dir.
#[derive(Debug)]
pub struct DataDirLock {
    _file: Flock<File>,
}

/// Takes `data_dir` for this agent (creating the dir if needed), noting `about` (the
/// hub it serves) for whoever finds the dir taken.
pub fn acquire(data_dir: &Path, about: &str) -> Result<DataDirLock, LockError> {
    let path = data_dir.join(LOCK_FILE);
    let io = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    owner_only::dir(data_dir).map_err(io)?;
    owner_only::tighten(&path).map_err(io)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(owner_only::FILE_MODE)
        .open(&path)
        .map_err(io)?;
    let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(locked) => locked,
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(LockError::InUse {
                dir: data_dir.to_owned(),
                holder: if holder.is_empty() {
                    "it has not said which yet".into()
                } else {
                    holder.to_owned()
                },
            });
        }
        Err((_, errno)) => return Err(io(std::io::Error::from(errno))),
    };
    let note = format!(
        "pid {}, serving {about}, started at unix time {}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default()
    );
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    file.write_all(note.as_bytes()).map_err(io)?;
    Ok(DataDirLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_agent_is_refused_and_told_who_holds_the_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = acquire(dir.path(), "http://hub-a").expect("free");
        let err = acquire(dir.path(), "http://hub-b").expect_err("taken");
        let text = err.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        assert!(text.contains("http://hub-a"), "{text}");
        // Let go, and the dir can be taken again, by the next agent's account.
        drop(first);
        let _again = acquire(dir.path(), "http://hub-b").expect("free again");
        let note = std::fs::read_to_string(dir.path().join(LOCK_FILE)).expect("note");
        assert!(
            note.contains("http://hub-b") && !note.contains("hub-a"),
            "{note}"
        );
    }
}
