//! The task rules both backends apply, so SQLite and PostgreSQL cannot drift apart: what
//! a title and a text may hold, which updates are legal and how one changes a task, when
//! a listing page has a next one, how search text is escaped for `LIKE`, and the clock
//! that gives every new task a later `created_at` than the one before.
//!
//! This module must never touch a database: the backends read and write, these decide.

use std::borrow::Cow;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use adi_protocol::tasks::{Position, Task, TaskPage, TaskStatus};

use crate::{legal_transition, Result, StoreError, TaskUpdate, MAX_PAGE};

/// Longest title, in characters.
const MAX_TITLE_CHARS: usize = 200;

/// The reason recorded on tasks that were running when the device went down.
pub(crate) const INTERRUPTED: &str = "interrupted: the device restarted while it ran";

/// The title to store (trimmed), or why it is refused.
pub(crate) fn validate_title(title: &str) -> Result<String> {
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
pub(crate) fn validate_text(what: &str, text: &str) -> Result<()> {
    if text.contains('\0') {
        return Err(StoreError::Invalid(format!(
            "the {what} contains a NUL character"
        )));
    }
    Ok(())
}

/// Log text as stored: NUL (which PostgreSQL text cannot hold) becomes U+FFFD, on both
/// backends, so a command printing NUL bytes cannot make logging fail.
pub(crate) fn log_text(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// `task` with `update` applied at `now`, or why the update is refused. A final task
/// refuses every update; asking for the current status changes nothing.
pub(crate) fn apply_update(mut task: Task, update: TaskUpdate, now: i64) -> Result<Task> {
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

/// The number of tasks a listing asks the database for: `limit`, at most [`MAX_PAGE`];
/// `Invalid` for 0, which could never page.
pub(crate) fn page_limit(limit: u32) -> Result<u32> {
    if limit == 0 {
        return Err(StoreError::Invalid("limit must be at least 1".into()));
    }
    Ok(limit.min(MAX_PAGE))
}

/// A page of `tasks` asked for with `limit`: `next` only when the page came back full.
pub(crate) fn page(tasks: Vec<Task>, limit: u32) -> TaskPage {
    let full = u32::try_from(tasks.len()).is_ok_and(|n| n >= limit);
    let next = tasks.last().filter(|_| full).map(|t| Position {
        created_at: t.created_at,
        id: t.id,
    });
    TaskPage { tasks, next }
}

/// Makes `%`, `_` and `\` in user text match literally under `ESCAPE '\'`.
pub(crate) fn escape_like(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Microseconds since the Unix epoch.
pub(crate) fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// Hands out `created_at` values: each later than the last this store made and than the
/// newest in the database, even when the clock stands still or steps back, so listing
/// order is creation order and keyset pages stay stable.
#[derive(Debug)]
pub(crate) struct CreationClock {
    /// The `created_at` of the last task this store created.
    last: AtomicI64,
}

impl CreationClock {
    /// A clock that starts after `newest`, the newest `created_at` stored.
    pub(crate) fn new(newest: Option<i64>) -> Self {
        CreationClock {
            last: AtomicI64::new(newest.unwrap_or(i64::MIN)),
        }
    }

    /// The next `created_at`: now, or one microsecond after `newest` (read from the
    /// database) or the last one handed out, whichever is later. Call it holding the
    /// lock that orders creations, so that commit order matches `created_at` order.
    pub(crate) fn next(&self, newest: Option<i64>) -> i64 {
        let floor = newest.unwrap_or(i64::MIN).saturating_add(1);
        let now = now_micros().max(floor);
        let mut chosen = now;
        // The closure always returns `Some`, so this cannot fail.
        let _ = self
            .last
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
                chosen = now.max(last.saturating_add(1));
                Some(chosen)
            });
        chosen
    }
}
