//! Owner-only paths: files that hold a secret or user data are 0600 and their
//! directories 0700, whatever the umask of whoever started the process.
//!
//! The hub keeps its signing key in its catalog or key file, the CLI a session token, and
//! a device its secret, its local API token and its tasks (commands, outputs, logs); each
//! is created through here, and an existing one that group or others can reach is
//! tightened with one warning naming it. Modes are set explicitly after each creation,
//! because the umask only ever removes bits and may remove the owner's own.
//!
//! This module must never loosen a mode, and never change a directory it was not named
//! (a parent such as `/tmp` belongs to someone else).

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::FileError;

/// Mode of an owner-only file.
pub const FILE_MODE: u32 = 0o600;
/// Mode of an owner-only directory.
pub const DIR_MODE: u32 = 0o700;

/// Creates `dir` owner-only (with any missing parents, also 0700), or tightens it when
/// it exists.
pub fn dir(dir: &Path) -> io::Result<()> {
    create_missing_dirs(dir)?;
    tighten(dir)
}

/// Creates the missing directories of `dir`, each 0700; existing ones are left as they
/// are.
pub fn create_missing_dirs(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut at = dir;
    loop {
        match fs::metadata(at) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a directory", at.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(at),
            Err(e) => return Err(e),
        }
        match at.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => at = parent,
            _ => break,
        }
    }
    for d in missing.into_iter().rev() {
        match DirBuilder::new().mode(DIR_MODE).create(d) {
            Ok(()) => fs::set_permissions(d, Permissions::from_mode(DIR_MODE))?,
            // Made concurrently by another process: its mode is its own business.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Takes group and other access away from `path` if it has any, with one warning
/// naming it. A missing path is fine: there is nothing to protect.
pub fn tighten(path: &Path) -> io::Result<()> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let old = meta.permissions().mode() & 0o7777;
    if old & 0o077 == 0 {
        return Ok(());
    }
    let new = old & 0o7700;
    fs::set_permissions(path, Permissions::from_mode(new))?;
    tracing::warn!(
        "tightened {}: group or others could reach it (mode {old:04o}, now {new:04o})",
        path.display()
    );
    Ok(())
}

/// Makes the missing parent directories of the SQLite database at `path` owner-only, and
/// tightens the database and the `-wal` and `-shm` files beside it. Call it before
/// SQLite opens the database: SQLite gives those files the database file's mode.
pub fn sqlite_database(path: &Path) -> Result<(), FileError> {
    let at = |path: &Path| {
        let path = path.to_owned();
        move |source| FileError { path, source }
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_missing_dirs(parent).map_err(at(parent))?;
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        let file = PathBuf::from(file);
        tighten(&file).map_err(at(&file))?;
    }
    Ok(())
}

/// Replaces `path` with `bytes` in one step: a 0600 file beside it, synced, renamed over
/// it. A reader sees the old content or the new, never half of it.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = scratch_beside(path);
    let written = write_scratch(&tmp, bytes).and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    sync_parent(path);
    Ok(())
}

/// Creates `path` holding `bytes`, 0600, unless something is there already; `Ok(false)`
/// then, and the file is left as it is. Of several processes racing to create one file,
/// exactly one succeeds, and nobody ever sees it partly written.
pub fn write_new(path: &Path, bytes: &[u8]) -> io::Result<bool> {
    let tmp = scratch_beside(path);
    let linked = write_scratch(&tmp, bytes).and_then(|()| fs::hard_link(&tmp, path));
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_parent(path);
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Creates an empty 0600 file at `path`; fails if anything is there.
pub fn create_new_file(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)?;
    file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

fn write_scratch(tmp: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = create_new_file(tmp)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// A name beside `path` that no other writer uses.
fn scratch_beside(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
    path.with_file_name(name)
}

/// Makes a rename or link in `path`'s directory durable; best effort, as not every
/// filesystem lets a directory be synced.
fn sync_parent(path: &Path) {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(d) = File::open(parent) {
            let _ = d.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).expect("metadata").permissions().mode() & 0o7777
    }

    #[test]
    fn dirs_are_created_owner_only_and_loose_ones_tightened() {
        let root = tempfile::tempdir().expect("tempdir");
        let nested = root.path().join("a/b/c");
        dir(&nested).expect("created");
        for d in ["a", "a/b", "a/b/c"] {
            assert_eq!(mode(&root.path().join(d)), DIR_MODE, "{d}");
        }
        fs::set_permissions(&nested, Permissions::from_mode(0o755)).expect("chmod");
        dir(&nested).expect("tightened");
        assert_eq!(mode(&nested), DIR_MODE);
    }

    #[test]
    fn existing_parents_are_left_alone() {
        let root = tempfile::tempdir().expect("tempdir");
        fs::set_permissions(root.path(), Permissions::from_mode(0o755)).expect("chmod");
        create_missing_dirs(&root.path().join("x")).expect("created");
        assert_eq!(mode(root.path()), 0o755);
        assert_eq!(mode(&root.path().join("x")), DIR_MODE);
    }

    #[test]
    fn tightening_keeps_the_owner_bits_and_never_loosens() {
        let root = tempfile::tempdir().expect("tempdir");
        let f = root.path().join("f");
        fs::write(&f, "x").expect("write");
        fs::set_permissions(&f, Permissions::from_mode(0o664)).expect("chmod");
        tighten(&f).expect("tightened");
        assert_eq!(mode(&f), 0o600);
        fs::set_permissions(&f, Permissions::from_mode(0o400)).expect("chmod");
        tighten(&f).expect("left");
        assert_eq!(mode(&f), 0o400);
        tighten(&root.path().join("missing")).expect("nothing to do");
    }

    #[test]
    fn an_sqlite_database_gets_owner_only_parents_and_tightened_files() {
        let root = tempfile::tempdir().expect("tempdir");
        let db = root.path().join("a/b/tasks.db");
        sqlite_database(&db).expect("parents made");
        assert_eq!(mode(&root.path().join("a")), DIR_MODE);
        assert_eq!(mode(&root.path().join("a/b")), DIR_MODE);
        assert!(!db.exists(), "SQLite makes the file");
        let files =
            ["tasks.db", "tasks.db-wal", "tasks.db-shm"].map(|f| root.path().join("a/b").join(f));
        for f in &files {
            fs::write(f, "x").expect("write");
            fs::set_permissions(f, Permissions::from_mode(0o644)).expect("chmod");
        }
        sqlite_database(&db).expect("tightened");
        for f in &files {
            assert_eq!(mode(f), FILE_MODE, "{}", f.display());
        }
    }

    #[test]
    fn writes_replace_whole_files_owner_only() {
        let root = tempfile::tempdir().expect("tempdir");
        let f = root.path().join("session.json");
        fs::write(&f, "old").expect("write");
        fs::set_permissions(&f, Permissions::from_mode(0o644)).expect("chmod");
        write(&f, b"new").expect("written");
        assert_eq!(fs::read(&f).expect("read"), b"new");
        assert_eq!(mode(&f), FILE_MODE);
        assert_eq!(fs::read_dir(root.path()).expect("list").count(), 1);
    }

    #[test]
    fn write_new_creates_once() {
        let root = tempfile::tempdir().expect("tempdir");
        let f = root.path().join("hub.key");
        assert!(write_new(&f, b"first").expect("created"));
        assert!(!write_new(&f, b"second").expect("kept"));
        assert_eq!(fs::read(&f).expect("read"), b"first");
        assert_eq!(mode(&f), FILE_MODE);
        assert_eq!(fs::read_dir(root.path()).expect("list").count(), 1);
    }
}
