//! A device's task store. Every device owns its tasks; the hub never copies them but
//! asks the device. This crate owns how tasks are kept and queried on the device: one
//! [`TaskStore`] trait, an SQLite backend (the default, a WAL file in the cocoon's data
//! dir) and a PostgreSQL backend, held to the same behaviour by one conformance suite.
//!
//! Layout, one job each:
//! - this file: the [`TaskStore`] trait, its errors and their conversions, and [`open`],
//!   which picks a backend from a URL.
//! - `sqlite` ([`SqliteTaskStore`], on rusqlite) and `postgres` ([`PgTaskStore`], on
//!   sqlx): what differs per backend: connection, migrations, SQL text and
//!   placeholders, locking.
//! - `rows`: the one mapping between task rows and the protocol's types, for both.
//! - `rules`: validation, updates, paging, search escaping and the creation clock, for
//!   both.
//! - `conformance` (tests): every behaviour, run against both backends.
//!
//! It must never run anything: running commands is the cocoon's runner's job. Nor may it
//! acknowledge a write it did not commit: a database that cannot write now (disk full,
//! I/O, a lock held too long, read-only, unreachable) is [`StoreError::Unavailable`].

mod postgres;
mod rows;
mod rules;
mod sqlite;

use std::path::Path;
use std::sync::Arc;

use adi_protocol::tasks::{
    LogLine, LogStream, NewTask, Position, Task, TaskFilter, TaskId, TaskPage, TaskStats,
    TaskStatus,
};
use async_trait::async_trait;

pub use adi_storage::Outage;
pub use postgres::PgTaskStore;
pub use sqlite::SqliteTaskStore;

/// Largest page a listing returns, whatever was asked.
pub const MAX_PAGE: u32 = 500;
/// Largest number of log lines one read returns.
pub const MAX_LOG_PAGE: u32 = 1000;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No task with that id.
    #[error("task {0} not found")]
    NotFound(TaskId),
    /// The task is final (completed, failed, cancelled) or the change skips a state.
    #[error("task {id} cannot go from {from} to {to}")]
    InvalidTransition {
        /// The task.
        id: TaskId,
        /// Its state.
        from: TaskStatus,
        /// The state asked for.
        to: TaskStatus,
    },
    /// The input is not acceptable (empty title, bad filter).
    #[error("invalid task: {0}")]
    Invalid(String),
    /// The database cannot read or write now; nothing was stored. It may work again as
    /// soon as the cause is gone.
    #[error("the task store is unavailable: {outage} ({detail})")]
    Unavailable {
        /// What is wrong, in words a caller may be shown.
        outage: Outage,
        /// What the database said, for the log.
        detail: DatabaseError,
    },
    /// The database failed.
    #[error("task storage: {0}")]
    Storage(DatabaseError),
    /// A file or directory of the store could not be made.
    #[error("{}: {source}", path.display())]
    File {
        /// The file or directory.
        path: std::path::PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The schema could not be brought up to date.
    #[error("task store migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored value is not what this build expects.
    #[error("task store holds a corrupt value: {0}")]
    Corrupt(String),
    /// The database URL names no backend we have.
    #[error("unsupported task database URL: use sqlite:PATH or postgres://...")]
    UnsupportedUrl,
}

/// What a database driver said: each backend keeps its own driver (rusqlite for the
/// SQLite file, sqlx for PostgreSQL), and a caller logs either the same way.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    /// From sqlx: PostgreSQL, and SQLite while its migrations run.
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    /// From rusqlite: the SQLite backend.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// The store was closed, or its database thread is gone.
    #[error("the task store is closed")]
    Closed,
}

impl From<adi_storage::FileError> for StoreError {
    fn from(e: adi_storage::FileError) -> Self {
        StoreError::File {
            path: e.path,
            source: e.source,
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match Outage::of(&e) {
            Some(outage) => StoreError::Unavailable {
                outage,
                detail: e.into(),
            },
            None => StoreError::Storage(e.into()),
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        let outage = match &e {
            rusqlite::Error::SqliteFailure(failure, _) => {
                Outage::of_sqlite_code(failure.extended_code)
            }
            _ => None,
        };
        match outage {
            Some(outage) => StoreError::Unavailable {
                outage,
                detail: e.into(),
            },
            None => StoreError::Storage(e.into()),
        }
    }
}

/// Shorthand for store results.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A change to a task. `None` fields are left as they are.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskUpdate {
    /// New state; must be a legal transition (see [`legal_transition`]).
    pub status: Option<TaskStatus>,
    /// New title.
    pub title: Option<String>,
    /// New description.
    pub description: Option<String>,
    /// Output to record.
    pub output: Option<serde_json::Value>,
    /// Exit code to record.
    pub exit_code: Option<i32>,
    /// Failure or cancellation reason to record.
    pub error: Option<String>,
}

/// Whether a task may go from `from` to `to`: final states never change, and a task
/// cannot go back to pending.
pub fn legal_transition(from: TaskStatus, to: TaskStatus) -> bool {
    use TaskStatus::*;
    match (from, to) {
        (f, _) if f.is_final() => false,
        (Pending, Running | Completed | Failed | Cancelled) => true,
        (Running, Completed | Failed | Cancelled) => true,
        _ => false,
    }
}

/// Where a device keeps its tasks. Listing is newest first (`created_at` descending,
/// then id descending) with keyset pagination, so pages stay stable while tasks are
/// added.
#[async_trait]
pub trait TaskStore: Send + Sync + 'static {
    /// Stores a new `Pending` task; `Invalid` if the title is empty or over 200 chars.
    async fn create(&self, new: NewTask) -> Result<Task>;
    /// One task.
    async fn get(&self, id: TaskId) -> Result<Option<Task>>;
    /// Up to `limit` (capped at [`MAX_PAGE`]) tasks matching `filter` that come after
    /// `after` in newest-first order; `next` is set when the page is full.
    async fn list(
        &self,
        filter: &TaskFilter,
        after: Option<Position>,
        limit: u32,
    ) -> Result<TaskPage>;
    /// Applies `update` atomically and bumps `updated_at`; `NotFound` or
    /// `InvalidTransition` leave the task unchanged.
    async fn update(&self, id: TaskId, update: TaskUpdate) -> Result<Task>;
    /// Deletes a task and its logs; false if it did not exist.
    async fn delete(&self, id: TaskId) -> Result<bool>;
    /// Counts by status (every status present, 0 when none) and the total.
    async fn stats(&self) -> Result<TaskStats>;
    /// Appends one log line; returns its sequence number (1, 2, ... per task).
    async fn append_log(&self, id: TaskId, stream: LogStream, text: &str) -> Result<u64>;
    /// Up to `limit` (capped at [`MAX_LOG_PAGE`]) log lines with `seq > after_seq`.
    async fn read_logs(&self, id: TaskId, after_seq: u64, limit: u32) -> Result<Vec<LogLine>>;
    /// On start-up: every task left `Running` by a crash becomes `Failed` with the
    /// reason "interrupted: the device restarted while it ran"; returns them.
    async fn fail_interrupted(&self) -> Result<Vec<TaskId>>;
}

/// Opens the store a cocoon is configured with: `postgres://...`, `sqlite:PATH`, or
/// by default `tasks.db` in `data_dir`. Runs migrations before returning.
pub async fn open(database_url: Option<&str>, data_dir: &Path) -> Result<Arc<dyn TaskStore>> {
    match database_url {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(Arc::new(PgTaskStore::connect(url).await?))
        }
        Some(url) if url.starts_with("sqlite:") => {
            let path = url
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:");
            Ok(Arc::new(SqliteTaskStore::open(Path::new(path)).await?))
        }
        Some(_) => Err(StoreError::UnsupportedUrl),
        None => Ok(Arc::new(
            SqliteTaskStore::open(&data_dir.join("tasks.db")).await?,
        )),
    }
}

#[cfg(test)]
mod conformance;
