//! The SQLite backend of the [`TaskStore`]: the default, one WAL file in the cocoon's
//! data directory.
//!
//! This module owns the SQLite connection settings (WAL, `synchronous=NORMAL`, foreign
//! keys so that deleting a task deletes its logs, busy timeout), the SQLite schema
//! migrations under `migrations/sqlite`, and the mapping between rows and the protocol's
//! task types. Every write that reads before it writes (create, update, append_log,
//! fail_interrupted) starts with `BEGIN IMMEDIATE`, so concurrent writers serialise on
//! the write lock instead of failing on a stale snapshot; in particular `created_at` is
//! taken while holding that lock, so commit order is `created_at` order and a reader
//! paging through the list never sees a task appear behind its position.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use adi_protocol::tasks::{
    LogLine, LogStream, NewTask, Position, Task, TaskFilter, TaskId, TaskPage, TaskStats,
    TaskStatus,
};
use adi_storage::{owner_only, Tx};
use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};

use crate::{legal_transition, Result, StoreError, TaskStore, TaskUpdate, MAX_LOG_PAGE, MAX_PAGE};

/// How long a statement waits for another connection's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// SQLite has one writer at a time; a few connections are enough for concurrent reads.
const MAX_CONNECTIONS: u32 = 4;
/// Longest title, in characters.
const MAX_TITLE_CHARS: usize = 200;
/// The reason recorded on tasks that were running when the device went down.
const INTERRUPTED: &str = "interrupted: the device restarted while it ran";

const TASK_COLUMNS: &str = "id, title, description, status, command, requirements, input, \
                            output, exit_code, error, created_at, updated_at";

/// A device's tasks in one SQLite file.
#[derive(Debug)]
pub struct SqliteTaskStore {
    pool: SqlitePool,
    /// The `created_at` of the last task this store created, so the next one is later
    /// even when the clock stands still or steps back.
    last_created_at: AtomicI64,
}

impl SqliteTaskStore {
    /// Opens (creating it and its missing parent directories if needed) the task file at
    /// `path` and brings its schema up to date. The file and SQLite's `-wal` and `-shm`
    /// beside it are owner-only: it is created 0600 before SQLite opens it, as SQLite
    /// gives those files the database file's mode, and loose ones are tightened.
    pub async fn open(path: &Path) -> Result<Self> {
        let file_error = |at: &Path| {
            let path = at.to_owned();
            move |source| StoreError::File { path, source }
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            owner_only::create_missing_dirs(parent).map_err(file_error(parent))?;
        }
        for suffix in ["", "-wal", "-shm"] {
            let mut file = path.as_os_str().to_owned();
            file.push(suffix);
            let file = PathBuf::from(file);
            owner_only::tighten(&file).map_err(file_error(&file))?;
        }
        match owner_only::create_new_file(path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(file_error(path)(e)),
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(BUSY_TIMEOUT * 2)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        let last: Option<i64> = sqlx::query_scalar("SELECT MAX(created_at) FROM tasks")
            .fetch_one(&pool)
            .await?;
        Ok(SqliteTaskStore {
            pool,
            last_created_at: AtomicI64::new(last.unwrap_or(i64::MIN)),
        })
    }

    /// Closes every connection, waiting for those in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// The next `created_at`: now, or one microsecond after the last task created (by
    /// this store, or found in the file), whichever is later. Call it holding the write
    /// lock, so that commit order matches `created_at` order.
    async fn next_created_at(&self, conn: &mut SqliteConnection) -> Result<i64> {
        let in_file: Option<i64> = sqlx::query_scalar("SELECT MAX(created_at) FROM tasks")
            .fetch_one(&mut *conn)
            .await?;
        let floor = in_file.unwrap_or(i64::MIN).saturating_add(1);
        let now = now_micros().max(floor);
        let mut chosen = now;
        // The closure always returns `Some`, so this cannot fail.
        let _ = self
            .last_created_at
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
                chosen = now.max(last.saturating_add(1));
                Some(chosen)
            });
        Ok(chosen)
    }
}

#[async_trait]
impl TaskStore for SqliteTaskStore {
    async fn create(&self, new: NewTask) -> Result<Task> {
        let title = validate_title(&new.title)?;
        validate_text("description", &new.description)?;
        let command = new.command.as_ref().map(encode_json).transpose()?;
        let requirements = encode_json(&new.requirements)?;
        let input = new.input.as_ref().map(encode_json).transpose()?;
        let id = TaskId::new();
        let mut tx = Tx::begin(&self.pool, "BEGIN IMMEDIATE").await?;
        let created_at = self.next_created_at(&mut tx).await?;
        sqlx::query(
            "INSERT INTO tasks (id, title, description, status, command, requirements, input, \
             output, exit_code, error, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, ?, ?)",
        )
        .bind(id.to_string())
        .bind(&title)
        .bind(&new.description)
        .bind(TaskStatus::Pending.as_str())
        .bind(command)
        .bind(requirements)
        .bind(input)
        .bind(created_at)
        .bind(created_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Task {
            id,
            title,
            description: new.description,
            status: TaskStatus::Pending,
            command: new.command,
            requirements: new.requirements,
            input: new.input,
            output: None,
            exit_code: None,
            error: None,
            created_at,
            updated_at: created_at,
            device_id: None,
        })
    }

    async fn get(&self, id: TaskId) -> Result<Option<Task>> {
        sqlx::query(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .map(|row| task_from_row(&row))
            .transpose()
    }

    async fn list(
        &self,
        filter: &TaskFilter,
        after: Option<Position>,
        limit: u32,
    ) -> Result<TaskPage> {
        if limit == 0 {
            return Err(StoreError::Invalid("limit must be at least 1".into()));
        }
        let limit = limit.min(MAX_PAGE);
        let mut query =
            QueryBuilder::<Sqlite>::new(format!("SELECT {TASK_COLUMNS} FROM tasks WHERE 1 = 1"));
        if let Some(status) = filter.status {
            query.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(text) = filter.text.as_deref().filter(|t| !t.is_empty()) {
            // SQLite's LIKE ignores case (for ASCII letters) by default.
            let pattern = format!("%{}%", escape_like(text));
            query
                .push(" AND (title LIKE ")
                .push_bind(pattern.clone())
                .push(" ESCAPE '\\' OR description LIKE ")
                .push_bind(pattern)
                .push(" ESCAPE '\\')");
        }
        if let Some(from) = filter.created_from {
            query.push(" AND created_at >= ").push_bind(from);
        }
        if let Some(to) = filter.created_to {
            query.push(" AND created_at < ").push_bind(to);
        }
        if let Some(pos) = after {
            // A row-value comparison, so the index serves it as a range.
            query
                .push(" AND (created_at, id) < (")
                .push_bind(pos.created_at)
                .push(", ")
                .push_bind(pos.id.to_string())
                .push(")");
        }
        query
            .push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind(i64::from(limit));
        let tasks = query
            .build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(task_from_row)
            .collect::<Result<Vec<_>>>()?;
        Ok(page(tasks, limit))
    }

    async fn update(&self, id: TaskId, update: TaskUpdate) -> Result<Task> {
        let mut tx = Tx::begin(&self.pool, "BEGIN IMMEDIATE").await?;
        let Some(row) = sqlx::query(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?"))
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Err(StoreError::NotFound(id));
        };
        let task = apply_update(task_from_row(&row)?, update, now_micros())?;
        let output = task.output.as_ref().map(encode_json).transpose()?;
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
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM tasks GROUP BY status")
            .fetch_all(&self.pool)
            .await?;
        let mut stats = TaskStats {
            by_status: TaskStatus::ALL.into_iter().map(|s| (s, 0)).collect(),
            total: 0,
        };
        for row in &rows {
            let status = parse_status(&row.try_get::<String, _>("status")?)?;
            let n = u64::try_from(row.try_get::<i64, _>("n")?)
                .map_err(|_| StoreError::Corrupt("negative count".into()))?;
            stats.by_status.insert(status, n);
            stats.total += n;
        }
        Ok(stats)
    }

    async fn append_log(&self, id: TaskId, stream: LogStream, text: &str) -> Result<u64> {
        let mut tx = Tx::begin(&self.pool, "BEGIN IMMEDIATE").await?;
        if !task_exists(&mut tx, id).await? {
            return Err(StoreError::NotFound(id));
        }
        let seq = insert_log(&mut tx, id, stream, text, now_micros()).await?;
        tx.commit().await?;
        Ok(seq)
    }

    async fn read_logs(&self, id: TaskId, after_seq: u64, limit: u32) -> Result<Vec<LogLine>> {
        let limit = limit.min(MAX_LOG_PAGE);
        let lines = sqlx::query(
            "SELECT seq, stream, at, text FROM task_logs \
             WHERE task_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(id.to_string())
        .bind(i64::try_from(after_seq).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(log_from_row)
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
        let now = now_micros();
        let mut failed = Vec::with_capacity(ids.len());
        for raw in &ids {
            let id = parse_task_id(raw)?;
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
    .bind(stream_str(stream))
    .bind(at)
    .bind(log_text(text))
    .bind(id.to_string())
    .fetch_one(&mut *conn)
    .await?;
    u64::try_from(seq).map_err(|_| StoreError::Corrupt(format!("log sequence {seq}")))
}

fn task_from_row(row: &SqliteRow) -> Result<Task> {
    let command: Option<String> = row.try_get("command")?;
    let requirements: String = row.try_get("requirements")?;
    let input: Option<String> = row.try_get("input")?;
    let output: Option<String> = row.try_get("output")?;
    Ok(Task {
        id: parse_task_id(&row.try_get::<String, _>("id")?)?,
        title: row.try_get("title")?,
        description: row.try_get("description")?,
        status: parse_status(&row.try_get::<String, _>("status")?)?,
        command: command
            .map(|c| decode_json(&c, "task command"))
            .transpose()?,
        requirements: decode_json(&requirements, "task requirements")?,
        input: input.map(|i| decode_json(&i, "task input")).transpose()?,
        output: output.map(|o| decode_json(&o, "task output")).transpose()?,
        exit_code: row.try_get("exit_code")?,
        error: row.try_get("error")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        device_id: None,
    })
}

fn log_from_row(row: &SqliteRow) -> Result<LogLine> {
    let seq: i64 = row.try_get("seq")?;
    Ok(LogLine {
        seq: u64::try_from(seq).map_err(|_| StoreError::Corrupt(format!("log sequence {seq}")))?,
        stream: parse_stream(&row.try_get::<String, _>("stream")?)?,
        at: row.try_get("at")?,
        text: row.try_get("text")?,
    })
}

// ---------------------------------------------------------------------------------------
// Rules shared in spirit with the PostgreSQL backend (kept per backend, as the catalog
// does; the conformance suite holds both to the same behaviour).
// ---------------------------------------------------------------------------------------

/// The title to store (trimmed), or why it is refused.
fn validate_title(title: &str) -> Result<String> {
    let title = title.trim();
    if title.is_empty() {
        return Err(StoreError::Invalid("the title is empty".into()));
    }
    let chars = title.chars().count();
    if chars > MAX_TITLE_CHARS {
        return Err(StoreError::Invalid(format!(
            "the title has {chars} characters; at most {MAX_TITLE_CHARS} are allowed"
        )));
    }
    validate_text("title", title)?;
    Ok(title.to_owned())
}

/// PostgreSQL text cannot hold NUL; both backends refuse it so they behave alike.
fn validate_text(what: &str, text: &str) -> Result<()> {
    if text.contains('\0') {
        return Err(StoreError::Invalid(format!(
            "the {what} contains a NUL character"
        )));
    }
    Ok(())
}

/// Log text as stored: NUL (which PostgreSQL text cannot hold) becomes U+FFFD, on both
/// backends, so a command printing NUL bytes cannot make logging fail.
fn log_text(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// `task` with `update` applied at `now`, or why the update is refused. A final task
/// refuses every update; asking for the current status changes nothing.
fn apply_update(mut task: Task, update: TaskUpdate, now: i64) -> Result<Task> {
    let refuse = |to: TaskStatus| StoreError::InvalidTransition {
        id: task.id,
        from: task.status,
        to,
    };
    if task.status.is_final() {
        return Err(refuse(update.status.unwrap_or(task.status)));
    }
    if let Some(to) = update.status {
        if to != task.status && !legal_transition(task.status, to) {
            return Err(refuse(to));
        }
    }
    let title = update.title.as_deref().map(validate_title).transpose()?;
    if let Some(description) = &update.description {
        validate_text("description", description)?;
    }
    if let Some(to) = update.status {
        task.status = to;
    }
    if let Some(title) = title {
        task.title = title;
    }
    if let Some(description) = update.description {
        task.description = description;
    }
    if let Some(output) = update.output {
        task.output = Some(output);
    }
    if let Some(exit_code) = update.exit_code {
        task.exit_code = Some(exit_code);
    }
    if let Some(error) = update.error {
        task.error = Some(error);
    }
    task.updated_at = now.max(task.updated_at).max(task.created_at);
    Ok(task)
}

/// A page of `tasks` asked for with `limit`: `next` only when the page came back full.
fn page(tasks: Vec<Task>, limit: u32) -> TaskPage {
    let full = u32::try_from(tasks.len()).is_ok_and(|n| n >= limit);
    let next = tasks.last().filter(|_| full).map(|t| Position {
        created_at: t.created_at,
        id: t.id,
    });
    TaskPage { tasks, next }
}

/// Makes `%`, `_` and `\` in user text match literally under `ESCAPE '\'`.
fn escape_like(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn stream_str(stream: LogStream) -> &'static str {
    match stream {
        LogStream::Stdout => "stdout",
        LogStream::Stderr => "stderr",
        LogStream::System => "system",
    }
}

fn parse_stream(s: &str) -> Result<LogStream> {
    match s {
        "stdout" => Ok(LogStream::Stdout),
        "stderr" => Ok(LogStream::Stderr),
        "system" => Ok(LogStream::System),
        _ => Err(StoreError::Corrupt(format!("log stream {s:?}"))),
    }
}

fn parse_status(s: &str) -> Result<TaskStatus> {
    s.parse()
        .map_err(|_| StoreError::Corrupt(format!("task status {s:?}")))
}

fn parse_task_id(s: &str) -> Result<TaskId> {
    s.parse()
        .map_err(|_| StoreError::Corrupt(format!("task id {s:?}")))
}

fn encode_json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(format!("encoding JSON: {e}")))
}

fn decode_json<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// Microseconds since the Unix epoch.
fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}
