//! Answers the hub's requests about this device's own data. Each request is handled in
//! its own task, so a slow one never holds up heartbeats or other answers; the answer
//! goes back on the session that asked, and is dropped if that session has ended.

use std::sync::Arc;

use adi_protocol::tasks::Task;
use adi_protocol::{DeviceId, DeviceReply, DeviceRequest, ErrorCode, Outcome, RemoteError};
use adi_task_store::StoreError;
use tracing::warn;

use crate::runner::{Runner, RunnerError};

/// Handles one request to completion.
pub(crate) async fn handle(
    runner: &Arc<Runner>,
    device: &DeviceId,
    request: DeviceRequest,
) -> Outcome {
    match answer(runner, device, request).await {
        Ok(reply) => Outcome::Ok(reply),
        Err(e) => Outcome::Error(e),
    }
}

async fn answer(
    runner: &Arc<Runner>,
    device: &DeviceId,
    request: DeviceRequest,
) -> Result<DeviceReply, RemoteError> {
    let store = runner.store();
    let mark = |mut task: Task| {
        task.device_id = Some(device.clone());
        DeviceReply::Task {
            task: Box::new(task),
        }
    };
    match request {
        DeviceRequest::CreateTask { task } => {
            runner.submit(task).await.map(mark).map_err(runner_error)
        }
        DeviceRequest::GetTask { id } => match store.get(id).await.map_err(store_error)? {
            Some(task) => Ok(mark(task)),
            None => Err(not_found()),
        },
        DeviceRequest::CancelTask { id } => runner.cancel(id).await.map(mark).map_err(runner_error),
        DeviceRequest::ListTasks {
            filter,
            after,
            limit,
        } => {
            let mut page = store
                .list(&filter, after, limit)
                .await
                .map_err(store_error)?;
            for t in &mut page.tasks {
                t.device_id = Some(device.clone());
            }
            Ok(DeviceReply::Tasks { page })
        }
        DeviceRequest::TaskStats => Ok(DeviceReply::Stats {
            stats: store.stats().await.map_err(store_error)?,
        }),
        DeviceRequest::ReadLogs {
            id,
            after_seq,
            limit,
        } => {
            // Status first: if it is final, the lines read next are all there will be.
            let status = store
                .get(id)
                .await
                .map_err(store_error)?
                .ok_or_else(not_found)?
                .status;
            let lines = store
                .read_logs(id, after_seq, limit)
                .await
                .map_err(store_error)?;
            Ok(DeviceReply::Logs { lines, status })
        }
        // Served by the capability server before it gets here.
        DeviceRequest::Capability { .. } => Err(RemoteError {
            code: ErrorCode::BadRequest,
            message: "capability requests are not task requests".into(),
        }),
    }
}

fn not_found() -> RemoteError {
    RemoteError {
        code: ErrorCode::NotFound,
        message: "no such task".into(),
    }
}

fn runner_error(e: RunnerError) -> RemoteError {
    match e {
        RunnerError::Refused(message) => RemoteError {
            code: ErrorCode::BadRequest,
            message,
        },
        RunnerError::AlreadyFinished(status) => RemoteError {
            code: ErrorCode::Conflict,
            message: format!("the task is already {status}"),
        },
        RunnerError::NotFound(_) => not_found(),
        RunnerError::Store(e) => store_error(e),
    }
}

fn store_error(e: StoreError) -> RemoteError {
    match e {
        StoreError::NotFound(_) => not_found(),
        StoreError::Invalid(message) => RemoteError {
            code: ErrorCode::BadRequest,
            message,
        },
        StoreError::InvalidTransition { from, .. } => RemoteError {
            code: ErrorCode::Conflict,
            message: format!("the task is already {from}"),
        },
        other => {
            warn!("task store failed: {other:#}");
            RemoteError {
                code: ErrorCode::Internal,
                message: "the device's task store failed".into(),
            }
        }
    }
}
