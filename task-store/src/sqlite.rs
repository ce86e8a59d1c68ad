//! The SQLite backend of the [`TaskStore`]: the default, one WAL file in the cocoon's
//! data directory.
//!
//! This module owns what is SQLite's alone: its durability (`synchronous=NORMAL`; the
//! pool's WAL, foreign keys so that deleting a task deletes its logs, and busy timeout
//! are the shared `adi_storage::pool`), the SQLite schema migrations under
//! `migrations/sqlite`, its SQL and its locking. Rows are read and written through
//! `rows`, and the rules they follow are in `rules`, as for PostgreSQL. Every write that
//! reads before it writes (create, update, append_log, fail_interrupted) starts with
//! `BEGIN IMMEDIATE`, so concurrent writers serialise on the write lock instead of
//! failing on a stale snapshot; in particular `created_at` is taken while holding that
//! lock, so commit order is `created_at` order and a reader paging through the list
//! never sees a task appear behind its position.

use std::path::Path;

use adi_protocol::tasks::{
    LogLine, LogStream, NewTask, Position, Task, TaskFilter, TaskId, TaskPage, TaskStats,
    TaskStatus,
};
use adi_storage::{owner_only, pool, Tx};
use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqliteSynchronous};
use sqlx::{Sqlite, SqliteConnection};

use crate::rows::{self, LogRow, NewTaskRow, StatusCount, TaskRow, TASK_COLUMNS};
use crate::rules::{self, CreationClock, INTERRUPTED};
use crate::{Result, StoreError, TaskStore, TaskUpdate, MAX_LOG_PAGE};

/// A device's tasks in one SQLite file.
#[derive(Debug)]
pub struct SqliteTaskStore {
    pool: SqlitePool,
    clock: CreationClock,
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
        let pool = pool::sqlite(
            SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(true)
                .synchronous(SqliteSynchronous::Normal),
        )
        .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        let newest = newest_created_at(&mut *pool.acquire().await?).await?;
        Ok(SqliteTaskStore {
            pool,
            clock: CreationClock::new(newest),
        })
    }

    /// Closes every connection, waiting for those in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[async_trait]
impl TaskStore for SqliteTaskStore {
    async fn create(&self, new: NewTask) -> Result<Task> {
        let row = NewTaskRow::new(new)?;
        let mut tx = Tx::begin(&self.pool, "BEGIN IMMEDIATE").await?;
        // Taken holding the write lock, so commit order is `created_at` order.
        let created_at = self.clock.next(newest_created_at(&mut tx).await?);
        sqlx::query(
            "INSERT INTO tasks (id, title, description, status, command, requirements, input, \
             output, exit_code, error, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, ?, ?)",
        )
        .bind(row.id.to_string())
        .bind(&row.title)
        .bind(row.description())
        .bind(TaskStatus::Pending.as_str())
        .bind(&row.command)
        .bind(&row.requirements)
        .bind(&row.input)
        .bind(created_at)
        .bind(created_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(row.into_task(created_at))
    }

    async fn get(&self, id: TaskId) -> Result<Option<Task>> {
        sqlx::query_as::<_, TaskRow>(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .map(Task::try_from)
            .transpose()
    }

    async fn list(
        &self,
        filter: &TaskFilter,
        after: Option<Position>,
        limit: u32,
    ) -> Result<TaskPage> {
        let limit = rules::page_limit(limit)?;
        let tasks = rows::list_query::<Sqlite>(filter, after, limit, "LIKE")
            .build_query_as::<TaskRow>()
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(Task::try_from)
            .collect::<Result<Vec<_>>>()?;
        Ok(rules::page(tasks, limit))
    }

    async fn update(&self, id: TaskId, update: TaskUpdate) -> Result<Task> {
        let mut tx = Tx::begin(&self.pool, "BEGIN IMMEDIATE").await?;
        let Some(row) =
            sqlx::query_as::<_, TaskRow>(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?"))
                .bind(id.to_string())
                .fetch_optional(&mut *tx)
                .await?
        else {
            return Err(StoreError::NotFound(id));
        };
        let task = rules::apply_update(row.try_into()?, update, rules::now_micros())?;
        let output = task.output.as_ref().map(rows::encode_json).transpose()?;
        sqlx::query(
            "UPDATE tasks SET title = ?, description = ?, status = ?, output = ?, \
             exit_code = ?, error = ?, updated_at = ? WHERE id = ?",
        )
        .bind(&task.title)
        .bind(&task.description)
        .bind(task.status.as_str())
        .bind(output)
        .bind(task.exit_code)
        .bind(&task.error)
        .bind(task.updated_at)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(task)
    }

    async fn delete(&self, id: TaskId) -> Result<bool> {
        let done = sqlx::query("DELETE FROM tasks WHERE id = ?")
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn stats(&self) -> Result<TaskStats> {
        rows::stats(
            sqlx::query_as::<_, StatusCount>(
                "SELECT status, COUNT(*) AS n FROM tasks GROUP BY status",
            )
            .fetch_all(&self.pool)
            .await?,
        )
    }

    async fn append_log(&self, id: TaskId, stream: LogStream, text: &str) -> Result<u64> {
        let mut tx = Tx::begin(&self.pool, "BEGIN IMMEDIATE").await?;
        if !task_exists(&mut tx, id).await? {
            return Err(StoreError::NotFound(id));
        }
        let seq = insert_log(&mut tx, id, stream, text, rules::now_micros()).await?;
        tx.commit().await?;
        Ok(seq)
    }

    async fn read_logs(&self, id: TaskId, after_seq: u64, limit: u32) -> Result<Vec<LogLine>> {
        let limit = limit.min(MAX_LOG_PAGE);
        let lines = sqlx::query_as::<_, LogRow>(
            "SELECT seq, stream, at, text FROM task_logs \
             WHERE task_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(id.to_string())
        .bind(rows::after_seq(after_seq))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(LogLine::try_from)
        .collect::<Result<Vec<_>>>()?;
        // An empty answer may mean an unknown task; a task whose log is read up to the
        // end is not an error.
        if lines.is_empty() {
            let mut conn = self.pool.acquire().await?;
            if !task_exists(&mut conn, id).await? {
                return Err(StoreError::NotFound(id));
            }
        }
        Ok(lines)
    }

    async fn fail_interrupted(&self) -> Result<Vec<TaskId>> {
        let mut tx = Tx::begin(&self.pool, "BEGIN IMMEDIATE").await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM tasks WHERE status = 'running' ORDER BY created_at, id",
        )
        .fetch_all(&mut *tx)
        .await?;
        let now = rules::now_micros();
        let mut failed = Vec::with_capacity(ids.len());
        for raw in &ids {
            let id = rows::parse_task_id(raw)?;
            sqlx::query(
                "UPDATE tasks SET status = 'failed', error = ?, \
                 updated_at = MAX(updated_at, created_at, ?) WHERE id = ?",
            )
            .bind(INTERRUPTED)
            .bind(now)
            .bind(raw)
            .execute(&mut *tx)
            .await?;
            insert_log(&mut tx, id, LogStream::System, INTERRUPTED, now).await?;
            failed.push(id);
        }
        tx.commit().await?;
        Ok(failed)
    }
}

/// The newest `created_at` in the file, if any task is there.
async fn newest_created_at(conn: &mut SqliteConnection) -> Result<Option<i64>> {
    Ok(sqlx::query_scalar("SELECT MAX(created_at) FROM tasks")
        .fetch_one(&mut *conn)
        .await?)
}

async fn task_exists(conn: &mut SqliteConnection, id: TaskId) -> Result<bool> {
    let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM tasks WHERE id = ?")
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    Ok(found.is_some())
}

/// Appends a line after the task's last one. Call it inside a write transaction that
/// has checked the task exists, so the sequence has no gaps and no duplicates.
async fn insert_log(
    conn: &mut SqliteConnection,
    id: TaskId,
    stream: LogStream,
    text: &str,
    at: i64,
) -> Result<u64> {
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO task_logs (task_id, seq, stream, at, text) \
         SELECT ?, COALESCE(MAX(seq), 0) + 1, ?, ?, ? FROM task_logs WHERE task_id = ? \
         RETURNING seq",
    )
    .bind(id.to_string())
    .bind(rows::stream_str(stream))
    .bind(at)
    .bind(rules::log_text(text))
    .bind(id.to_string())
    .fetch_one(&mut *conn)
    .await?;
    rows::log_seq(seq)
}
