//! Task rows: the one mapping between the protocol's task types and the columns both
//! backends keep them in (ids as lowercase hyphenated text, JSON in text columns, times
//! as microsecond integers). Every row either backend reads is decoded here, into row
//! types that sqlx fills on PostgreSQL (`sqlx::FromRow`) and rusqlite on SQLite
//! (`from_sqlite`), then into the protocol's types by one conversion; every value
//! either writes is encoded here; the listing query is built here once, in each
//! backend's placeholder style.
//!
//! This module must never run a statement: the backends own their connections, their
//! transactions and their locking.

use adi_protocol::tasks::{
    LogLine, LogStream, NewTask, Position, Task, TaskFilter, TaskId, TaskStats, TaskStatus,
};

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

impl TaskRow {
    /// The row rusqlite read, its columns in [`TASK_COLUMNS`] order.
    pub(crate) fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(TaskRow {
            id: row.get(0)?,
            title: row.get(1)?,
            description: row.get(2)?,
            status: row.get(3)?,
            command: row.get(4)?,
            requirements: row.get(5)?,
            input: row.get(6)?,
            output: row.get(7)?,
            exit_code: row.get(8)?,
            error: row.get(9)?,
            created_at: row.get(10)?,
            updated_at: row.get(11)?,
        })
    }
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

impl LogRow {
    /// The row rusqlite read from `SELECT seq, stream, at, text`.
    pub(crate) fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(LogRow {
            seq: row.get(0)?,
            stream: row.get(1)?,
            at: row.get(2)?,
            text: row.get(3)?,
        })
    }
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

impl StatusCount {
    /// The row rusqlite read from `SELECT status, COUNT(*) AS n`.
    pub(crate) fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(StatusCount {
            status: row.get(0)?,
            n: row.get(1)?,
        })
    }
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

/// A value bound to a placeholder of a [`ListQuery`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Bind {
    /// A text value.
    Text(String),
    /// An integer value.
    Int(i64),
}

impl rusqlite::ToSql for Bind {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Bind::Text(s) => s.to_sql(),
            Bind::Int(i) => i.to_sql(),
        }
    }
}

/// The listing query's text and the values of its placeholders, in order.
#[derive(Debug)]
pub(crate) struct ListQuery {
    /// The statement.
    pub(crate) sql: String,
    /// What each placeholder holds.
    pub(crate) binds: Vec<Bind>,
}

/// What differs between the backends' SQL in the listing query.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dialect {
    /// The case-insensitive `LIKE` (SQLite's `LIKE` ignores case for ASCII letters by
    /// default; PostgreSQL needs `ILIKE`).
    pub(crate) like: &'static str,
    /// Whether placeholders are numbered (`$1`, PostgreSQL) or not (`?`, SQLite).
    pub(crate) numbered: bool,
}

/// The listing query: [`TASK_COLUMNS`] of up to `limit` tasks matching `filter` after
/// `after`, newest first, in `dialect`.
pub(crate) fn list_query(
    filter: &TaskFilter,
    after: Option<Position>,
    limit: u32,
    dialect: Dialect,
) -> ListQuery {
    let mut sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE 1 = 1");
    let mut binds = Vec::new();
    let mut bind = |sql: &mut String, value: Bind| {
        binds.push(value);
        if dialect.numbered {
            sql.push('$');
            sql.push_str(&binds.len().to_string());
        } else {
            sql.push('?');
        }
    };
    if let Some(status) = filter.status {
        sql.push_str(" AND status = ");
        bind(&mut sql, Bind::Text(status.as_str().to_owned()));
    }
    if let Some(text) = filter.text.as_deref().filter(|t| !t.is_empty()) {
        let pattern = format!("%{}%", escape_like(text));
        let like = dialect.like;
        sql.push_str(&format!(" AND (title {like} "));
        bind(&mut sql, Bind::Text(pattern.clone()));
        sql.push_str(&format!(" ESCAPE '\\' OR description {like} "));
        bind(&mut sql, Bind::Text(pattern));
        sql.push_str(" ESCAPE '\\')");
    }
    if let Some(from) = filter.created_from {
        sql.push_str(" AND created_at >= ");
        bind(&mut sql, Bind::Int(from));
    }
    if let Some(to) = filter.created_to {
        sql.push_str(" AND created_at < ");
        bind(&mut sql, Bind::Int(to));
    }
    if let Some(pos) = after {
        // A row-value comparison, so the index serves it as a range.
        sql.push_str(" AND (created_at, id) < (");
        bind(&mut sql, Bind::Int(pos.created_at));
        sql.push_str(", ");
        bind(&mut sql, Bind::Text(pos.id.to_string()));
        sql.push(')');
    }
    sql.push_str(" ORDER BY created_at DESC, id DESC LIMIT ");
    bind(&mut sql, Bind::Int(i64::from(limit)));
    ListQuery { sql, binds }
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
