//! The PostgreSQL backend of the [`TaskStore`]: for devices that keep their tasks in a
//! PostgreSQL database instead of the default SQLite file.
//!
//! This module owns what is PostgreSQL's alone: the schema migrations under
//! `migrations/postgres` (sqlx serialises concurrent migrators with an advisory lock),
//! its SQL and its locking; the pool is the shared `adi_storage::pool`. Rows are read and
//! written through `rows`, and the rules they follow are in `rules`, as for SQLite.
//! Read-modify-write operations lock what they read: `update` and `append_log` take the
//! task row with `SELECT ... FOR UPDATE`, so concurrent appends to one task queue up and number their
//! lines without gaps or duplicates. Creates serialise on a transaction-scoped advisory
//! lock and take `created_at` while holding it (one microsecond past the newest task in
//! the database at least), so commit order is `created_at` order even when several
//! stores share the database, and a reader paging through the list never sees a task
//! appear behind its position.
//!
//! Ids are stored as text with the `C` collation: under a locale collation PostgreSQL
//! would ignore the hyphens and the text order would no longer be the UUID order.

use adi_protocol::tasks::{
    LogLine, LogStream, NewTask, Position, Task, TaskFilter, TaskId, TaskPage, TaskStats,
    TaskStatus,
};
use adi_storage::pool;
use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool};

use crate::rows::{self, Bind, Dialect, LogRow, NewTaskRow, StatusCount, TaskRow, TASK_COLUMNS};
use crate::rules::{self, CreationClock, INTERRUPTED};
use crate::{Result, StoreError, TaskStore, TaskUpdate, MAX_LOG_PAGE};

/// The transaction-scoped advisory lock creates take (any fixed number; it only has to
/// be the same for every store on the database).
const CREATE_LOCK: i64 = 0x0061_6469_7461_736b; // "aditask"
/// PostgreSQL's listing SQL: `ILIKE` for case-insensitive search, `$n` placeholders.
const POSTGRES: Dialect = Dialect {
    like: "ILIKE",
    numbered: true,
};

/// A device's tasks in a PostgreSQL database.
#[derive(Debug)]
pub struct PgTaskStore {
    pool: PgPool,
    clock: CreationClock,
}

impl PgTaskStore {
    /// Connects to the database at `url` (`postgres://...`) and brings its schema up
    /// to date.
    pub async fn connect(url: &str) -> Result<Self> {
        let options: PgConnectOptions = url.parse()?;
        Self::connect_with(options).await
    }

    /// Connects with explicit options and brings the schema up to date.
    pub async fn connect_with(options: PgConnectOptions) -> Result<Self> {
        let pool = pool::postgres(options).await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        let newest = newest_created_at(&mut *pool.acquire().await?).await?;
        Ok(PgTaskStore {
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
impl TaskStore for PgTaskStore {
    async fn create(&self, new: NewTask) -> Result<Task> {
        let row = NewTaskRow::new(new)?;
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(CREATE_LOCK)
            .execute(&mut *tx)
            .await?;
        // Taken holding the create lock, so commit order is `created_at` order.
        let created_at = self.clock.next(newest_created_at(&mut tx).await?);
        sqlx::query(
            "INSERT INTO tasks (id, title, description, status, command, requirements, input, \
             output, exit_code, error, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, NULL, NULL, $8, $8)",
        )
        .bind(row.id.to_string())
        .bind(&row.title)
        .bind(row.description())
        .bind(TaskStatus::Pending.as_str())
        .bind(&row.command)
        .bind(&row.requirements)
        .bind(&row.input)
        .bind(created_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(row.into_task(created_at))
    }

    async fn get(&self, id: TaskId) -> Result<Option<Task>> {
        sqlx::query_as::<_, TaskRow>(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1"))
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
        let list = rows::list_query(filter, after, limit, POSTGRES);
        let mut query = sqlx::query_as::<_, TaskRow>(&list.sql);
        for value in list.binds {
            query = match value {
                Bind::Text(s) => query.bind(s),
                Bind::Int(i) => query.bind(i),
            };
        }
        let tasks = query
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(Task::try_from)
            .collect::<Result<Vec<_>>>()?;
        Ok(rules::page(tasks, limit))
    }

    async fn update(&self, id: TaskId, update: TaskUpdate) -> Result<Task> {
        let mut tx = self.pool.begin().await?;
        let Some(row) = sqlx::query_as::<_, TaskRow>(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1 FOR UPDATE"
        ))
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Err(StoreError::NotFound(id));
        };
        let task = rules::apply_update(row.try_into()?, update, rules::now_micros())?;
        let output = task.output.as_ref().map(rows::encode_json).transpose()?;
        sqlx::query(
            "UPDATE tasks SET title = $1, description = $2, status = $3, output = $4, \
             exit_code = $5, error = $6, updated_at = $7 WHERE id = $8",
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
        let done = sqlx::query("DELETE FROM tasks WHERE id = $1")
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
        let mut tx = self.pool.begin().await?;
        // The row lock queues concurrent appenders; each then reads the committed
        // maximum (read committed takes a fresh snapshot per statement).
        if !lock_task(&mut tx, id).await? {
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
             WHERE task_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
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
            let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM tasks WHERE id = $1")
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await?;
            if found.is_none() {
                return Err(StoreError::NotFound(id));
            }
        }
        Ok(lines)
    }

    async fn fail_interrupted(&self) -> Result<Vec<TaskId>> {
        let mut tx = self.pool.begin().await?;
        // Locked rows that another store fails meanwhile are re-checked after the wait
        // and dropped, so each task is failed (and logged) once.
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM tasks WHERE status = 'running' ORDER BY created_at, id FOR UPDATE",
        )
        .fetch_all(&mut *tx)
        .await?;
        let now = rules::now_micros();
        let mut failed = Vec::with_capacity(ids.len());
        for raw in &ids {
            let id = rows::parse_task_id(raw)?;
            sqlx::query(
                "UPDATE tasks SET status = 'failed', error = $1, \
                 updated_at = GREATEST(updated_at, created_at, $2) WHERE id = $3",
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

/// The newest `created_at` in the database, if any task is there.
async fn newest_created_at(conn: &mut PgConnection) -> Result<Option<i64>> {
    Ok(sqlx::query_scalar("SELECT MAX(created_at) FROM tasks")
        .fetch_one(&mut *conn)
        .await?)
}

/// Locks the task's row for the rest of the transaction; false if there is none.
async fn lock_task(conn: &mut PgConnection, id: TaskId) -> Result<bool> {
    let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE")
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    Ok(found.is_some())
}

/// Appends a line after the task's last one. Call it inside a transaction holding the
/// task's row lock, so the sequence has no gaps and no duplicates.
async fn insert_log(
    conn: &mut PgConnection,
    id: TaskId,
    stream: LogStream,
    text: &str,
    at: i64,
) -> Result<u64> {
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO task_logs (task_id, seq, stream, at, text) \
         SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, $3, $4 FROM task_logs WHERE task_id = $1 \
         RETURNING seq",
    )
    .bind(id.to_string())
    .bind(rows::stream_str(stream))
    .bind(at)
    .bind(rules::log_text(text).as_ref())
    .fetch_one(&mut *conn)
    .await?;
    rows::log_seq(seq)
}
