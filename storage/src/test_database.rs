//! Databases for tests: a fresh PostgreSQL database per test, dropped after it, and an
//! SQLite file in a temporary directory, removed with it. The catalog's and the task
//! store's conformance suites and the end-to-end tests all get their databases here, so
//! they follow one rule for a missing server.
//!
//! The PostgreSQL databases are made on the server named by `ADI_TEST_POSTGRES_URL`
//! (default [`DEFAULT_POSTGRES_URL`]). When that server cannot be reached, a test fails
//! if `CI` is set (the PostgreSQL tests must run there), and is skipped with a loud line
//! on stderr otherwise. This module must never reuse a database between tests, nor drop
//! one it did not make.

use std::future::Future;
use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::FutureExt;
use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio::sync::{Semaphore, SemaphorePermit};

/// The server the PostgreSQL tests make their databases on when
/// `ADI_TEST_POSTGRES_URL` names none.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// How long a test waits for the server before it counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Caps how many PostgreSQL tests of one test binary hold databases (and pools) at once,
/// so a many-core run stays under the server's connection limit. Shared by every test's
/// runtime.
static POSTGRES_SLOTS: Semaphore = Semaphore::const_new(4);

/// An SQLite file's path in a fresh temporary directory; the file is not made, so the
/// store under test makes it (and any parents the path names).
#[derive(Debug)]
pub struct TestSqlite {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl TestSqlite {
    /// A path `relative` to a new temporary directory, such as `data/tasks.db`.
    pub fn new(relative: impl AsRef<Path>) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join(relative);
        TestSqlite { dir, path }
    }

    /// Where the database file goes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The temporary directory, removed with everything in it when this is dropped.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// What a write to a read-only SQLite database fails with: a real outage, for the tests
/// of how a store reports one.
pub async fn read_only_write_error() -> sqlx::Error {
    let file = TestSqlite::new("read-only.db");
    let mut rw = SqliteConnectOptions::new()
        .filename(file.path())
        .create_if_missing(true)
        .connect()
        .await
        .expect("create");
    sqlx::query("CREATE TABLE t (x)")
        .execute(&mut rw)
        .await
        .expect("table");
    let mut ro = SqliteConnectOptions::new()
        .filename(file.path())
        .read_only(true)
        .connect()
        .await
        .expect("open read-only");
    let e = sqlx::query("INSERT INTO t VALUES (1)")
        .execute(&mut ro)
        .await
        .expect_err("a read-only database refuses writes");
    let _ = ro.close().await;
    let _ = rw.close().await;
    e
}

/// A throwaway database on the test server, holding one of the test binary's slots.
/// Drop it with [`TestPostgres::drop_database`], or let [`with_postgres`] do it.
#[derive(Debug)]
pub struct TestPostgres {
    admin: PgConnectOptions,
    name: String,
    _slot: SemaphorePermit<'static>,
}

impl TestPostgres {
    /// Makes a fresh database for a test of `suite` (named in the line that says it was
    /// skipped), or returns `None` after saying so when the server is unreachable
    /// outside CI. Panics when it is unreachable in CI.
    pub async fn create(suite: &str) -> Option<Self> {
        let slot = POSTGRES_SLOTS
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let url =
            std::env::var("ADI_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES_URL.into());
        let admin: PgConnectOptions = url
            .parse()
            .expect("ADI_TEST_POSTGRES_URL is not a PostgreSQL URL");
        let admin = admin.disable_statement_logging();
        let server = format!("{}:{}", admin.get_host(), admin.get_port());
        let mut conn = match tokio::time::timeout(CONNECT_TIMEOUT, admin.connect()).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return unreachable(suite, &server, &e.to_string()),
            Err(_) => return unreachable(suite, &server, "connection timed out"),
        };
        let name = format!("adi_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name} on {server}: {e}"));
        let _ = conn.close().await;
        Some(TestPostgres {
            admin,
            name,
            _slot: slot,
        })
    }

    /// How to connect to this database.
    pub fn options(&self) -> PgConnectOptions {
        self.admin.clone().database(&self.name)
    }

    /// This database's URL, for a process started with `--database-url`.
    pub fn url(&self) -> String {
        self.options().to_url_lossy().to_string()
    }

    /// Drops the database, best-effort: what a test leaves behind must not fail it.
    pub async fn drop_database(self) {
        let Ok(mut conn) = self.admin.connect().await else {
            eprintln!(
                "warning: could not reconnect to drop test database {}",
                self.name
            );
            return;
        };
        let dropped = sqlx::query(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        ))
        .execute(&mut conn)
        .await;
        if let Err(e) = dropped {
            eprintln!("warning: could not drop test database {}: {e}", self.name);
        }
        let _ = conn.close().await;
    }
}

/// Runs `body` with a fresh database for a test of `suite`, then drops the database,
/// also when `body` panics (the panic goes on after the drop). Does nothing when the
/// server is unreachable outside CI.
pub async fn with_postgres<F, Fut>(suite: &str, body: F)
where
    F: FnOnce(PgConnectOptions) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(db) = TestPostgres::create(suite).await else {
        return;
    };
    let outcome = AssertUnwindSafe(body(db.options())).catch_unwind().await;
    db.drop_database().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// What to do when the PostgreSQL test server cannot be reached.
fn unreachable(suite: &str, server: &str, why: &str) -> Option<TestPostgres> {
    let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty());
    if in_ci {
        panic!(
            "PostgreSQL is unreachable at {server} ({why}) and CI is set: the PostgreSQL \
             {suite} tests must run in CI. Start a server or set ADI_TEST_POSTGRES_URL."
        );
    }
    // Straight to the process's stderr: libtest captures `eprintln!` of passing tests.
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED: postgres unreachable at {server} ({why}); PostgreSQL {suite} test \
         not run. Set ADI_TEST_POSTGRES_URL, or CI=1 to make this a failure. ***\n"
    );
    None
}
