//! Task rows: the one mapping between the protocol's task types and the columns both
//! backends keep them in (ids as lowercase hyphenated text, JSON in text columns, times
//! as microsecond integers). Every row either backend reads is decoded here, through
//! `sqlx::FromRow` types whose fields decode on SQLite and PostgreSQL alike, and every
//! value either writes is encoded here; the listing query is built here once, with its
//! placeholders left to each backend's query builder.
//!
//! This module must never run a statement: the backends own their connections, their
//! transactions and their locking.

use adi_protocol::tasks::{
    LogLine, LogStream, NewTask, Position, Task, TaskFilter, TaskId, TaskStats, TaskStatus,
};
use sqlx::{Database, Encode, QueryBuilder, Type};

use crate::rules::{escape_like, validate_text, validate_title};
use crate::{Result, StoreError};

/// The columns a [`TaskRow`] is read from, in the schema's order.
pub(crate) const TASK_COLUMNS: &str = "id, title, description, status, command, requirements, \
                                       input, output, exit_code, error, created_at, updated_at";

/// One row of `tasks`, as stored.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct TaskRow {
    id: String,
    title: String,
    description: String,
    status: String,
    command: Option<String>,
    requirements: String,
    input: Option<String>,
    output: Option<String>,
    exit_code: Option<i32>,
    error: Option<String>,
    created_at: i64,
    updated_at: i64,
}

impl TryFrom<TaskRow> for Task {
    type Error = StoreError;

    fn try_from(row: TaskRow) -> Result<Task> {
        Ok(Task {
            id: parse_task_id(&row.id)?,
            title: row.title,
            description: row.description,
            status: parse_status(&row.status)?,
            command: row
                .command
                .map(|c| decode_json(&c, "task command"))
                .transpose()?,
            requirements: decode_json(&row.requirements, "task requirements")?,
            input: row
                .input
                .map(|i| decode_json(&i, "task input"))
                .transpose()?,
            output: row
                .output
                .map(|o| decode_json(&o, "task output"))
                .transpose()?,
            exit_code: row.exit_code,
            error: row.error,
            created_at: row.created_at,
            updated_at: row.updated_at,
            device_id: None,
        })
    }
}

/// One row of `task_logs`, as read (without its task id).
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct LogRow {
    seq: i64,
    stream: String,
    at: i64,
    text: String,
}

impl TryFrom<LogRow> for LogLine {
    type Error = StoreError;

    fn try_from(row: LogRow) -> Result<LogLine> {
        Ok(LogLine {
            seq: log_seq(row.seq)?,
            stream: parse_stream(&row.stream)?,
            at: row.at,
            text: row.text,
        })
    }
}

/// How many tasks are in one status: a row of `SELECT status, COUNT(*) AS n ... GROUP BY
/// status`.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct StatusCount {
    status: String,
    n: i64,
}

/// The counts per status, every status present (0 when no row names it), and the total.
pub(crate) fn stats(counts: Vec<StatusCount>) -> Result<TaskStats> {
    let mut stats = TaskStats {
        by_status: TaskStatus::ALL.into_iter().map(|s| (s, 0)).collect(),
        total: 0,
    };
    for count in counts {
        let status = parse_status(&count.status)?;
        let n = u64::try_from(count.n).map_err(|_| StoreError::Corrupt("negative count".into()))?;
        stats.by_status.insert(status, n);
        stats.total += n;
    }
    Ok(stats)
}

/// A new task, checked and encoded for its row; only its `created_at` is missing, which
/// a backend takes while it holds the lock that orders creations.
#[derive(Debug)]
pub(crate) struct NewTaskRow {
    /// Its new id.
    pub(crate) id: TaskId,
    /// The title as stored (trimmed).
    pub(crate) title: String,
    /// The `command` column.
    pub(crate) command: Option<String>,
    /// The `requirements` column.
    pub(crate) requirements: String,
    /// The `input` column.
    pub(crate) input: Option<String>,
    new: NewTask,
}

impl NewTaskRow {
    /// Checks `new` (`Invalid` for an empty or long title, or NUL in the text) and
    /// encodes it; the task gets its id here.
    pub(crate) fn new(new: NewTask) -> Result<Self> {
        let title = validate_title(&new.title)?;
        validate_text("description", &new.description)?;
        Ok(NewTaskRow {
            command: new.command.as_ref().map(encode_json).transpose()?,
            requirements: encode_json(&new.requirements)?,
            input: new.input.as_ref().map(encode_json).transpose()?,
            id: TaskId::new(),
            title,
            new,
        })
    }

    /// The `description` column.
    pub(crate) fn description(&self) -> &str {
        &self.new.description
    }

    /// The task as stored, pending, created (and last updated) at `created_at`.
    pub(crate) fn into_task(self, created_at: i64) -> Task {
        Task {
            id: self.id,
            title: self.title,
            description: self.new.description,
            status: TaskStatus::Pending,
            command: self.new.command,
            requirements: self.new.requirements,
            input: self.new.input,
            output: None,
            exit_code: None,
            error: None,
            created_at,
            updated_at: created_at,
            device_id: None,
        }
    }
}

/// The listing query: [`TASK_COLUMNS`] of up to `limit` tasks matching `filter` after
/// `after`, newest first. `like` is the backend's case-insensitive `LIKE` (SQLite's
/// `LIKE` ignores case for ASCII letters by default; PostgreSQL needs `ILIKE`).
pub(crate) fn list_query<'a, DB>(
    filter: &TaskFilter,
    after: Option<Position>,
    limit: u32,
    like: &str,
) -> QueryBuilder<'a, DB>
where
    DB: Database,
    String: Encode<'a, DB> + Type<DB>,
    i64: Encode<'a, DB> + Type<DB>,
{
    let mut query = QueryBuilder::new(format!("SELECT {TASK_COLUMNS} FROM tasks WHERE 1 = 1"));
    if let Some(status) = filter.status {
        query
            .push(" AND status = ")
            .push_bind(status.as_str().to_owned());
    }
    if let Some(text) = filter.text.as_deref().filter(|t| !t.is_empty()) {
        let pattern = format!("%{}%", escape_like(text));
        query
            .push(format!(" AND (title {like} "))
            .push_bind(pattern.clone())
            .push(format!(" ESCAPE '\\' OR description {like} "))
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
    query
}

/// The `stream` column of a log line.
pub(crate) fn stream_str(stream: LogStream) -> &'static str {
    match stream {
        LogStream::Stdout => "stdout",
        LogStream::Stderr => "stderr",
        LogStream::System => "system",
    }
}

/// A log line's sequence number as stored (from 1), as the protocol counts it.
pub(crate) fn log_seq(seq: i64) -> Result<u64> {
    u64::try_from(seq).map_err(|_| StoreError::Corrupt(format!("log sequence {seq}")))
}

/// The `seq` column for "after this line": past the largest column value means past
/// every line.
pub(crate) fn after_seq(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// A stored task id.
pub(crate) fn parse_task_id(s: &str) -> Result<TaskId> {
    s.parse()
        .map_err(|_| StoreError::Corrupt(format!("task id {s:?}")))
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

/// A value for a JSON text column.
pub(crate) fn encode_json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(format!("encoding JSON: {e}")))
}

fn decode_json<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}
