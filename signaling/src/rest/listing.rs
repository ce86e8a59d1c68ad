//! The query of a task listing, and the devices a merged listing covers: shared by the
//! REST routes and the client socket, so both validate a query the same way and ask
//! the same devices.

use std::time::Duration;

use adi_protocol::client::{DeviceStatus, PartStatus};
use adi_protocol::tasks::{TaskFilter, TaskStatus};
use adi_protocol::{ErrorCode, Scope};
use serde::Deserialize;

use super::error::ApiError;
use crate::access;
use crate::access::Caller;
use crate::aggregate;
use crate::catalog::DeviceRecord;
use crate::HubState;

/// How long a merged listing waits for each device, unless the query says otherwise.
const FANOUT_DEADLINE: Duration = Duration::from_secs(5);
/// The longest a query may ask a merged listing to wait.
const MAX_FANOUT_DEADLINE: Duration = Duration::from_secs(60);
/// Page size unless the query says otherwise.
const DEFAULT_LIMIT: u32 = 50;
/// The largest page a query may ask for.
pub(crate) const MAX_LIMIT: u32 = 500;

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::BadRequest, msg)
}

/// Query parameters of the listings, parsed by hand so each bad one gets its reason.
#[derive(Deserialize, Default)]
pub(crate) struct ListParams {
    status: Option<String>,
    q: Option<String>,
    limit: Option<String>,
    pub(crate) cursor: Option<String>,
    created_from: Option<String>,
    created_to: Option<String>,
    timeout_ms: Option<String>,
}

impl ListParams {
    /// Builds the parameters a WebSocket query carries, to validate them the same way.
    pub(crate) fn from_query(
        filter: &TaskFilter,
        limit: Option<u32>,
        timeout_ms: Option<u64>,
    ) -> Self {
        ListParams {
            status: filter.status.map(|s| s.as_str().to_owned()),
            q: filter.text.clone(),
            limit: limit.map(|l| l.to_string()),
            cursor: None,
            created_from: filter.created_from.map(|v| v.to_string()),
            created_to: filter.created_to.map(|v| v.to_string()),
            timeout_ms: timeout_ms.map(|v| v.to_string()),
        }
    }

    pub(crate) fn filter(&self) -> Result<TaskFilter, ApiError> {
        let status = match self.status.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => Some(s.parse::<TaskStatus>().map_err(bad)?),
        };
        let text = self
            .q
            .as_deref()
            .map(str::trim)
            .filter(|q| !q.is_empty())
            .map(str::to_owned);
        if text.as_ref().is_some_and(|t| t.chars().count() > 200) {
            return Err(bad("q must be at most 200 characters"));
        }
        let micros = |name: &str, v: &Option<String>| -> Result<Option<i64>, ApiError> {
            v.as_deref()
                .map(|s| {
                    s.trim().parse::<i64>().map_err(|_| {
                        bad(format!("{name} must be microseconds since the Unix epoch"))
                    })
                })
                .transpose()
        };
        Ok(TaskFilter {
            status,
            text,
            created_from: micros("created_from", &self.created_from)?,
            created_to: micros("created_to", &self.created_to)?,
        })
    }

    pub(crate) fn limit(&self) -> Result<u32, ApiError> {
        match self.limit.as_deref() {
            None => Ok(DEFAULT_LIMIT),
            Some(s) => s
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| bad(format!("limit must be between 1 and {MAX_LIMIT}"))),
        }
    }

    pub(crate) fn deadline(&self) -> Result<Duration, ApiError> {
        match self.timeout_ms.as_deref() {
            None => Ok(FANOUT_DEADLINE),
            Some(s) => s
                .trim()
                .parse::<u64>()
                .ok()
                .map(Duration::from_millis)
                .filter(|d| !d.is_zero() && *d <= MAX_FANOUT_DEADLINE)
                .ok_or_else(|| bad("timeout_ms must be between 1 and 60000")),
        }
    }
}

/// The caller's devices that keep tasks, split into online ones (to ask) and the
/// statuses of offline ones (reported without asking).
pub(crate) async fn task_devices(
    state: &HubState,
    caller: &Caller,
) -> Result<(Vec<DeviceRecord>, Vec<DeviceStatus>), ApiError> {
    let devices = access::devices(state, caller, Scope::DevicesRead).await?;
    let (online, offline): (Vec<_>, Vec<_>) = devices
        .into_iter()
        .filter(aggregate::keeps_tasks)
        .partition(|d| state.presence(&d.id).online);
    let offline = offline
        .into_iter()
        .map(|d| DeviceStatus {
            device_id: d.id,
            name: d.name,
            status: PartStatus::Offline,
            error: Some("the device is offline".into()),
        })
        .collect();
    Ok((online, offline))
}
