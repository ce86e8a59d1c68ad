//! Task types shared by the device's task store, the cocoon's runner, the hub's merged
//! views and clients. Tasks live on their device; these types are how they travel.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::DeviceId;

/// A task's stable id (a UUID, lowercase hyphenated on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(pub uuid::Uuid);

impl TaskId {
    /// A fresh random id.
    pub fn new() -> Self {
        TaskId(uuid::Uuid::new_v4())
    }
}

impl Default for TaskId {
    fn default() -> Self {
        TaskId::new()
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl std::str::FromStr for TaskId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s).map(TaskId)
    }
}

/// Where a task is in its life. `Completed`, `Failed` and `Cancelled` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Waiting to run (or a task without a command, waiting for someone).
    Pending,
    /// Its command is running.
    Running,
    /// Ran and exited 0, or was marked done.
    Completed,
    /// Exited non-zero, could not start, or was interrupted.
    Failed,
    /// Cancelled before it finished.
    Cancelled,
}

impl TaskStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [TaskStatus; 5] = [
        TaskStatus::Pending,
        TaskStatus::Running,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ];

    /// Whether no further change is allowed.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }

    /// The wire and storage name.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Running => "running",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }
}

impl std::str::FromStr for TaskStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        TaskStatus::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!("unknown status {s:?}; expected pending, running, completed, failed or cancelled")
            })
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A task as stored on its device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Stable id.
    pub id: TaskId,
    /// Short human title.
    pub title: String,
    /// Longer description.
    #[serde(default)]
    pub description: String,
    /// Lifecycle state.
    pub status: TaskStatus,
    /// Program and arguments to run on the device, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// What the device must have to run it, e.g. `gpu`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requirements: Vec<String>,
    /// Input given at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<serde_json::Value>,
    /// Output recorded by whoever ran it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<serde_json::Value>,
    /// Exit code of the command, once it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Why it failed or was cancelled, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Microseconds since the Unix epoch.
    pub created_at: i64,
    /// Microseconds since the Unix epoch.
    pub updated_at: i64,
    /// The device the task lives on; set on every answer that leaves the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<DeviceId>,
}

/// What a creator gives; the store fills in id, status and times.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NewTask {
    /// Short human title (required, 1–200 characters).
    pub title: String,
    /// Longer description.
    #[serde(default)]
    pub description: String,
    /// Program and arguments to run on the device.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// What the device must have to run it, e.g. `gpu`.
    #[serde(default)]
    pub requirements: Vec<String>,
    /// Input for whoever runs it.
    #[serde(default)]
    pub input: Option<serde_json::Value>,
}

/// Which tasks to list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFilter {
    /// Only tasks in this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<TaskStatus>,
    /// Only tasks whose title or description contains this, case-insensitively.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Only tasks created at or after this instant (microseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_from: Option<i64>,
    /// Only tasks created before this instant (microseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_to: Option<i64>,
}

/// A point in the newest-first order: tasks strictly after it (older, or as old with a
/// smaller id) come next. Stable under inserts, since new tasks sort before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    /// `created_at` of the last task seen.
    pub created_at: i64,
    /// Its id; ties on `created_at` are broken by id, descending.
    pub id: TaskId,
}

/// One page of a newest-first listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskPage {
    /// The tasks, newest first.
    pub tasks: Vec<Task>,
    /// Where the next page starts, if there may be one.
    pub next: Option<Position>,
}

/// Counts of tasks by status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStats {
    /// Count per status; statuses with no task are present with 0.
    pub by_status: BTreeMap<TaskStatus, u64>,
    /// All tasks.
    pub total: u64,
}

/// Which output a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    /// The command's standard output.
    Stdout,
    /// The command's standard error.
    Stderr,
    /// Written by the runner itself (start, exit, cancel).
    System,
}

/// One chunk of a task's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Position in the task's log, from 1, without gaps.
    pub seq: u64,
    /// Source.
    pub stream: LogStream,
    /// Microseconds since the Unix epoch.
    pub at: i64,
    /// The text (a line, without its newline).
    pub text: String,
}
