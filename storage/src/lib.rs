//! What the hub's catalog and a device's task store share: both keep durable data in
//! SQLite or PostgreSQL, in files that must stay owner-only, and both must tell "the
//! database cannot serve now" from "this failed".
//!
//! Layout, one job each:
//! - this file: [`FileError`], the crate's one error of its own (the others are sqlx's
//!   and the OS's, which each store maps into its own error).
//! - [`owner_only`]: files and directories that hold secrets or user data are created
//!   0600/0700 and loose ones tightened, whatever the umask.
//! - [`outage`]: which database errors are outages ([`Outage`]), read from SQLite's
//!   result codes, PostgreSQL's SQLSTATE and sqlx's error variants.
//! - [`pool`]: how the stores connect through sqlx, to SQLite (the catalog) and to
//!   PostgreSQL (both), and the busy timeout every SQLite connection of either store
//!   waits with (the task store's SQLite connections are rusqlite's, its own).
//! - [`sqlite_tx`]: the catalog's SQLite transaction guard ([`Tx`]) that never returns a
//!   connection whose transaction did not commit to its pool.
//! - `test_database` (feature `test-support`): a fresh PostgreSQL database per test and
//!   an SQLite file in a temporary directory, for the stores' conformance suites and the
//!   end-to-end tests.
//! - `conformance` (feature `test-support`): the harness both conformance suites run on,
//!   one test per suite function and backend.
//!
//! This crate must never know a store's schema, rows or rules (those belong to the
//! catalog and the task store), never run a store's migrations or statements (only the
//! test helpers make and drop databases), and never read a database's message text to
//! decide anything.

#[cfg(feature = "test-support")]
pub mod conformance;
pub mod outage;
pub mod owner_only;
pub mod pool;
pub mod sqlite_tx;
#[cfg(any(test, feature = "test-support"))]
pub mod test_database;

pub use outage::Outage;
pub use sqlite_tx::Tx;

use std::path::PathBuf;

/// A file or directory of a store that could not be made or made owner-only, named so
/// that the message says which.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct FileError {
    /// The file or directory.
    pub path: PathBuf,
    /// What the OS said.
    pub source: std::io::Error,
}
