//! How the stores connect through sqlx, so the hub's catalog and a device's task store
//! wait, share and lock alike: one shape of SQLite pool (WAL, foreign keys, a busy
//! timeout, a few connections around SQLite's one writer) for the catalog, one shape of
//! PostgreSQL pool (a bounded share of the server's connections, a bounded wait for a
//! free one) for both, and the busy timeout the task store's own SQLite connections
//! (rusqlite's, on threads of their own) wait with too.
//!
//! This module must never run a store's migrations, nor choose its durability (the
//! catalog syncs every commit, the task store lets WAL batch them): the callers do.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

/// How long an SQLite statement waits for another connection's write lock before it
/// fails as busy.
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// SQLite has one writer at a time; a few connections are enough for concurrent reads.
const SQLITE_MAX_CONNECTIONS: u32 = 4;
/// Connections per PostgreSQL store: other stores and hubs share the server's limit.
const POSTGRES_MAX_CONNECTIONS: u32 = 10;
/// How long an operation waits for a free PostgreSQL connection before failing.
const POSTGRES_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// A pool on the SQLite database `options` names (with its `synchronous` level and
/// whether to create it), in WAL mode so reads go on while one connection writes, with
/// foreign keys enforced and [`SQLITE_BUSY_TIMEOUT`] on every connection.
pub async fn sqlite(options: SqliteConnectOptions) -> Result<SqlitePool, sqlx::Error> {
    let options = options
        .journal_mode(SqliteJournalMode::Wal)
        .foreign_keys(true)
        .busy_timeout(SQLITE_BUSY_TIMEOUT);
    SqlitePoolOptions::new()
        .max_connections(SQLITE_MAX_CONNECTIONS)
        .acquire_timeout(SQLITE_BUSY_TIMEOUT * 2)
        .connect_with(options)
        .await
}

/// A pool on the PostgreSQL database `options` names.
pub async fn postgres(options: PgConnectOptions) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(POSTGRES_MAX_CONNECTIONS)
        .acquire_timeout(POSTGRES_ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await
}
