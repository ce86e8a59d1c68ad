//! The SQLite backend of the [`TaskStore`]: the default, one WAL file in the cocoon's
//! data directory, read and written through rusqlite.
//!
//! This module owns what is SQLite's alone: its connections and the threads that own
//! them, its durability (`synchronous=NORMAL`, WAL, foreign keys so that deleting a task
//! deletes its logs, a busy timeout), the SQLite schema migrations under
//! `migrations/sqlite`, its SQL and its locking. Rows are read and written through
//! `rows`, and the rules they follow are in `rules`, as for PostgreSQL.
//!
//! Threads: SQLite calls block, so almost none runs on the async runtime. Each store has
//! one writer thread and [`READERS`] reader threads, each owning one connection whose
//! prepared statements it caches; a call sends a job to the writer's queue or to the
//! readers' shared queue and awaits the answer. The one exception is a *short read*:
//! a lookup by id, or a listing page of at most [`INLINE_ROWS`] tasks that an index
//! serves (no text search). Those take about as long as waking a thread and being woken
//! by it (tens of microseconds), so they run on the caller's own thread, on one of
//! [`INLINE`] connections kept for them, when one is free. Those connections never wait
//! for a lock (no busy timeout): a short read that finds the file locked, or finds them
//! all in use, goes to the reader threads instead. One writer per store means its writes
//! queue in memory instead of contending for SQLite's lock; every write that reads
//! before it writes (create, update, append_log, fail_interrupted) still starts with
//! `BEGIN IMMEDIATE`, so a second process or store on the same file serialises on the
//! write lock instead of failing on a stale snapshot; in particular `created_at` is
//! taken while holding that lock, so commit order is `created_at` order and a reader
//! paging through the list never sees a task appear behind its position.
//!
//! Migrations: sqlx's migrator runs them, on one connection opened for that and closed
//! before the threads start, so the `_sqlx_migrations` table that files written by the
//! earlier sqlx-based backend carry is read and continued exactly as before (versions,
//! checksums, a failed migration refusing to start).
//!
//! It must never leave a connection inside a transaction between jobs: a job whose
//! transaction SQLite could not roll back gets its connection rolled back or replaced
//! before the next job runs.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;

use adi_protocol::tasks::{
    LogLine, LogStream, NewTask, Position, Task, TaskFilter, TaskId, TaskPage, TaskStats,
    TaskStatus,
};
use adi_storage::pool::SQLITE_BUSY_TIMEOUT;
use adi_storage::{owner_only, Outage};
use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection as _};

use crate::rows::{self, Dialect, LogRow, NewTaskRow, StatusCount, TaskRow, TASK_COLUMNS};
use crate::rules::{self, CreationClock, INTERRUPTED};
use crate::{DatabaseError, Result, StoreError, TaskStore, TaskUpdate, MAX_LOG_PAGE};

/// Reader threads per store: reads go on while one of them waits on the disk, and a
/// listing never waits behind a write.
const READERS: usize = 2;
/// Connections for short reads on the caller's thread: one per runtime worker of a
/// small device, so concurrent short reads rarely fall back to the threads.
const INLINE: usize = 2;
/// The largest listing page read on the caller's thread.
const INLINE_ROWS: u32 = 100;
/// Prepared statements each connection keeps: every fixed statement, plus the listing's
/// variants (one per combination of filters).
const STATEMENT_CACHE: usize = 64;
/// SQLite's listing SQL: its `LIKE` ignores ASCII case, `?` placeholders.
const SQLITE: Dialect = Dialect {
    like: "LIKE",
    numbered: false,
};

/// One task by id.
static SELECT_TASK: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?"));

/// Work for the thread that owns a connection.
type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// Which threads a job goes to.
#[derive(Debug, Clone, Copy)]
enum Side {
    Read,
    Write,
}

/// The queues of the store's threads; dropping them ends the threads once their
/// queued jobs are done.
struct Queues {
    reads: flume::Sender<Job>,
    writes: flume::Sender<Job>,
}

/// A device's tasks in one SQLite file.
pub struct SqliteTaskStore {
    queues: RwLock<Option<Queues>>,
    /// Connections for short reads on the caller's thread; `None` once closed.
    inline: [Mutex<Option<Connection>>; INLINE],
    threads: Mutex<Vec<JoinHandle<()>>>,
    clock: Arc<CreationClock>,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteTaskStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteTaskStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteTaskStore {
    /// Opens (creating it and its missing parent directories if needed) the task file at
    /// `path` and brings its schema up to date. The file and SQLite's `-wal` and `-shm`
    /// beside it are owner-only: it is created 0600 before SQLite opens it, as SQLite
    /// gives those files the database file's mode, and loose ones are tightened.
    pub async fn open(path: &Path) -> Result<Self> {
        owner_only::sqlite_database(path)?;
        match owner_only::create_new_file(path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(StoreError::File {
                    path: path.to_owned(),
                    source,
                })
            }
        }
        migrate(path).await?;

        let writer = connect(path)?;
        let newest = newest_created_at(&writer)?;
        let readers = (0..READERS)
            .map(|_| connect(path))
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut inline: [Mutex<Option<Connection>>; INLINE] =
            std::array::from_fn(|_| Mutex::new(None));
        for slot in &mut inline {
            *slot.get_mut().unwrap_or_else(PoisonError::into_inner) = Some(connect_inline(path)?);
        }

        let (writes, write_jobs) = flume::unbounded();
        let (reads, read_jobs) = flume::unbounded();
        let mut threads = Vec::with_capacity(READERS + 1);
        threads.push(spawn("adi-tasks-write", path, writer, write_jobs)?);
        for reader in readers {
            threads.push(spawn("adi-tasks-read", path, reader, read_jobs.clone())?);
        }
        Ok(SqliteTaskStore {
            queues: RwLock::new(Some(Queues { reads, writes })),
            inline,
            threads: Mutex::new(threads),
            clock: Arc::new(CreationClock::new(newest)),
            path: path.to_owned(),
        })
    }

    /// Closes every connection once the jobs already queued are done, and waits for it;
    /// later calls fail as unavailable.
    pub async fn close(&self) {
        let queues = self.queues.write().ok().and_then(|mut q| q.take());
        drop(queues);
        for conn in &self.inline {
            // Waits for a short read in progress, which ends soon.
            if let Ok(mut conn) = conn.lock() {
                conn.take();
            }
        }
        let threads = match self.threads.lock() {
            Ok(mut threads) => std::mem::take(&mut *threads),
            Err(_) => return,
        };
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }

    /// Runs `job` on a connection of `side` and hands back what it returns.
    async fn call<R, F>(&self, side: Side, job: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R> + Send + 'static,
    {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let _ = answer.send(job(conn));
        });
        {
            let queues = self.queues.read().map_err(|_| closed())?;
            let queues = queues.as_ref().ok_or_else(closed)?;
            let queue = match side {
                Side::Read => &queues.reads,
                Side::Write => &queues.writes,
            };
            queue.send(job).map_err(|_| closed())?;
        }
        answered.await.map_err(|_| closed())?
    }

    /// A short read: on the caller's thread when one of the inline connections is free
    /// and the file is not locked, else on a reader thread.
    async fn short_read<R, F>(&self, job: F) -> Result<R>
    where
        R: Send + 'static,
        F: Fn(&mut Connection) -> Result<R> + Send + 'static,
    {
        for conn in &self.inline {
            let Ok(mut held) = conn.try_lock() else {
                continue;
            };
            let Some(conn) = held.as_mut() else {
                return Err(closed());
            };
            match job(conn) {
                Err(StoreError::Unavailable {
                    outage: Outage::Busy,
                    ..
                }) => break,
                done => return done,
            }
        }
        self.call(Side::Read, job).await
    }
}

/// What a call gets once the store is closed or its thread is gone.
fn closed() -> StoreError {
    StoreError::Unavailable {
        outage: Outage::Unreachable,
        detail: DatabaseError::Closed,
    }
}

/// Brings the file's schema up to date with sqlx's migrator, as the sqlx-based backend
/// did, so both read and write `_sqlx_migrations` alike. WAL is set here: it is
/// persistent, so every later connection finds it.
async fn migrate(path: &Path) -> Result<()> {
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(SQLITE_BUSY_TIMEOUT)
        .connect()
        .await?;
    let migrated = sqlx::migrate!("./migrations/sqlite").run(&mut conn).await;
    let closed = conn.close().await;
    migrated?;
    Ok(closed?)
}

/// One connection of a store's threads, set up as every one must be.
fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(SQLITE_BUSY_TIMEOUT)?;
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// A connection for short reads on the caller's thread: it never sleeps waiting for a
/// lock, so a runtime thread is never held by one.
fn connect_inline(path: &Path) -> rusqlite::Result<Connection> {
    let conn = connect(path)?;
    conn.busy_timeout(std::time::Duration::ZERO)?;
    Ok(conn)
}

/// Starts a thread that runs the jobs of `queue` on `conn` until the queue is dropped.
fn spawn(
    name: &str,
    path: &Path,
    conn: Connection,
    queue: flume::Receiver<Job>,
) -> Result<JoinHandle<()>> {
    let path = path.to_owned();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn({
            let path = path.clone();
            move || serve(&path, conn, &queue)
        })
        .map_err(|source| StoreError::File { path, source })
}

fn serve(path: &Path, mut conn: Connection, queue: &flume::Receiver<Job>) {
    while let Ok(job) = queue.recv() {
        // A panicking job answers nobody (its caller sees the store as unavailable)
        // but must not end the thread every later job needs.
        if std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut conn))).is_err() {
            tracing::error!(path = %path.display(), "a task store job panicked");
        }
        if !conn.is_autocommit() {
            // SQLite kept a transaction the job could not roll back (I/O error, a full
            // disk): end it here, or start over on a fresh connection.
            if let Err(e) = conn.execute_batch("ROLLBACK") {
                tracing::warn!(path = %path.display(), "rolling back a failed write: {e:#}");
                match connect(path) {
                    Ok(fresh) => conn = fresh,
                    Err(e) => {
                        tracing::warn!(path = %path.display(), "reopening the task store: {e:#}")
                    }
                }
            }
        }
    }
}

#[async_trait]
impl TaskStore for SqliteTaskStore {
    async fn create(&self, new: NewTask) -> Result<Task> {
        let row = NewTaskRow::new(new)?;
        let clock = Arc::clone(&self.clock);
        self.call(Side::Write, move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            // Taken holding the write lock, so commit order is `created_at` order.
            let created_at = clock.next(newest_created_at(&tx)?);
            tx.prepare_cached(
                "INSERT INTO tasks (id, title, description, status, command, requirements, \
                 input, output, exit_code, error, created_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL, NULL, NULL, ?8, ?8)",
            )?
            .execute(rusqlite::params![
                row.id.to_string(),
                row.title,
                row.description(),
                TaskStatus::Pending.as_str(),
                row.command,
                row.requirements,
                row.input,
                created_at,
            ])?;
            tx.commit()?;
            Ok(row.into_task(created_at))
        })
        .await
    }

    async fn get(&self, id: TaskId) -> Result<Option<Task>> {
        self.short_read(move |conn| select_task(conn, id)?.map(Task::try_from).transpose())
            .await
    }

    async fn list(
        &self,
        filter: &TaskFilter,
        after: Option<Position>,
        limit: u32,
    ) -> Result<TaskPage> {
        let limit = rules::page_limit(limit)?;
        let query = rows::list_query(filter, after, limit, SQLITE);
        let read = move |conn: &mut Connection| {
            let mut statement = conn.prepare_cached(&query.sql)?;
            let found = statement.query_map(
                rusqlite::params_from_iter(&query.binds),
                TaskRow::from_sqlite,
            )?;
            let mut tasks = Vec::with_capacity(usize::try_from(limit).unwrap_or_default());
            for row in found {
                tasks.push(Task::try_from(row?)?);
            }
            Ok(rules::page(tasks, limit))
        };
        let searched = filter.text.as_deref().is_some_and(|t| !t.is_empty());
        if limit <= INLINE_ROWS && !searched {
            self.short_read(read).await
        } else {
            self.call(Side::Read, read).await
        }
    }

    async fn update(&self, id: TaskId, update: TaskUpdate) -> Result<Task> {
        self.call(Side::Write, move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some(row) = select_task(&tx, id)? else {
                return Err(StoreError::NotFound(id));
            };
            let task = rules::apply_update(row.try_into()?, update, rules::now_micros())?;
            let output = task.output.as_ref().map(rows::encode_json).transpose()?;
            tx.prepare_cached(
                "UPDATE tasks SET title = ?, description = ?, status = ?, output = ?, \
                 exit_code = ?, error = ?, updated_at = ? WHERE id = ?",
            )?
            .execute(rusqlite::params![
                task.title,
                task.description,
                task.status.as_str(),
                output,
                task.exit_code,
                task.error,
                task.updated_at,
                id.to_string(),
            ])?;
            tx.commit()?;
            Ok(task)
        })
        .await
    }

    async fn delete(&self, id: TaskId) -> Result<bool> {
        self.call(Side::Write, move |conn| {
            let deleted = conn
                .prepare_cached("DELETE FROM tasks WHERE id = ?")?
                .execute([id.to_string()])?;
            Ok(deleted > 0)
        })
        .await
    }

    async fn stats(&self) -> Result<TaskStats> {
        self.call(Side::Read, |conn| {
            let mut statement =
                conn.prepare_cached("SELECT status, COUNT(*) AS n FROM tasks GROUP BY status")?;
            let counts = statement
                .query_map([], StatusCount::from_sqlite)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows::stats(counts)
        })
        .await
    }

    async fn append_log(&self, id: TaskId, stream: LogStream, text: &str) -> Result<u64> {
        let text = text.to_owned();
        self.call(Side::Write, move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if !task_exists(&tx, id)? {
                return Err(StoreError::NotFound(id));
            }
            let seq = insert_log(&tx, id, stream, &text, rules::now_micros())?;
            tx.commit()?;
            Ok(seq)
        })
        .await
    }

    async fn read_logs(&self, id: TaskId, after_seq: u64, limit: u32) -> Result<Vec<LogLine>> {
        let limit = limit.min(MAX_LOG_PAGE);
        self.call(Side::Read, move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT seq, stream, at, text FROM task_logs \
                 WHERE task_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            )?;
            let lines = statement
                .query_map(
                    rusqlite::params![id.to_string(), rows::after_seq(after_seq), limit],
                    LogRow::from_sqlite,
                )?
                .map(|row| LogLine::try_from(row?))
                .collect::<Result<Vec<_>>>()?;
            // An empty answer may mean an unknown task; a task whose log is read up to
            // the end is not an error.
            if lines.is_empty() && !task_exists(conn, id)? {
                return Err(StoreError::NotFound(id));
            }
            Ok(lines)
        })
        .await
    }

    async fn fail_interrupted(&self) -> Result<Vec<TaskId>> {
        self.call(Side::Write, |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let ids = tx
                .prepare_cached(
                    "SELECT id FROM tasks WHERE status = 'running' ORDER BY created_at, id",
                )?
                .query_map([], |row| row.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let now = rules::now_micros();
            let mut failed = Vec::with_capacity(ids.len());
            for raw in &ids {
                let id = rows::parse_task_id(raw)?;
                tx.prepare_cached(
                    "UPDATE tasks SET status = 'failed', error = ?, \
                     updated_at = MAX(updated_at, created_at, ?) WHERE id = ?",
                )?
                .execute(rusqlite::params![INTERRUPTED, now, raw])?;
                insert_log(&tx, id, LogStream::System, INTERRUPTED, now)?;
                failed.push(id);
            }
            tx.commit()?;
            Ok(failed)
        })
        .await
    }
}

/// The task's row, if there is one.
fn select_task(conn: &Connection, id: TaskId) -> Result<Option<TaskRow>> {
    Ok(conn
        .prepare_cached(&SELECT_TASK)?
        .query_row([id.to_string()], TaskRow::from_sqlite)
        .optional()?)
}

/// The newest `created_at` in the file, if any task is there.
fn newest_created_at(conn: &Connection) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached("SELECT MAX(created_at) FROM tasks")?
        .query_row([], |row| row.get(0))?)
}

fn task_exists(conn: &Connection, id: TaskId) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM tasks WHERE id = ?")?
        .exists([id.to_string()])?)
}

/// Appends a line after the task's last one. Call it inside a write transaction that
/// has checked the task exists, so the sequence has no gaps and no duplicates.
fn insert_log(
    conn: &Connection,
    id: TaskId,
    stream: LogStream,
    text: &str,
    at: i64,
) -> Result<u64> {
    let seq: i64 = conn
        .prepare_cached(
            "INSERT INTO task_logs (task_id, seq, stream, at, text) \
             SELECT ?1, COALESCE(MAX(seq), 0) + 1, ?2, ?3, ?4 FROM task_logs \
             WHERE task_id = ?1 RETURNING seq",
        )?
        .query_row(
            rusqlite::params![
                id.to_string(),
                rows::stream_str(stream),
                at,
                rules::log_text(text)
            ],
            |row| row.get(0),
        )?;
    rows::log_seq(seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A busy answer, as SQLite gives a connection that finds the file locked.
    fn busy() -> StoreError {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            Some("database is locked".into()),
        )
        .into()
    }

    /// A short read runs on the caller's thread; one that finds the file locked there
    /// is read again on a reader thread, which waits for the lock, and its answer is
    /// the reader's, never the busy error.
    #[tokio::test]
    async fn a_short_read_that_finds_the_file_locked_is_read_again_by_a_reader() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = SqliteTaskStore::open(&dir.path().join("tasks.db"))
            .await
            .expect("open");
        let here = std::thread::current().id();
        let ran_on = |_: &mut Connection| Ok(std::thread::current().id());
        assert_eq!(store.short_read(ran_on).await.expect("read"), here);

        let locked_here = move |_: &mut Connection| {
            let on = std::thread::current();
            if on.id() == here {
                Err(busy())
            } else {
                Ok(on.name().map(str::to_owned))
            }
        };
        assert_eq!(
            store.short_read(locked_here).await.expect("read again"),
            Some("adi-tasks-read".to_owned())
        );

        // Another error is the answer: reading it again would not change it.
        let failed = |_: &mut Connection| -> Result<()> { Err(StoreError::Invalid("no".into())) };
        assert!(matches!(
            store.short_read(failed).await,
            Err(StoreError::Invalid(_))
        ));
        store.close().await;
        assert!(matches!(
            store.short_read(ran_on).await,
            Err(StoreError::Unavailable { .. })
        ));
    }
}
