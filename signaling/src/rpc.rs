//! Asking a device something and waiting for its one answer. The request travels as a
//! command to the device's connection actor, which numbers it, writes the frame and
//! routes the matching response back; a deadline bounds the wait, and a connection
//! that ends fails every request still waiting on it at once.

use std::time::Duration;

use adi_protocol::{DeviceId, DeviceReply, DeviceRequest, ProxyRequest};
use tokio::sync::oneshot;

use crate::link::command::{Call, Command, ProxyCall, ReplyTo};
pub use crate::link::command::{ProxyOpened, RpcError};
use crate::link::{ConnHandle, Refused};
use crate::HubState;

/// Sends `request` to `device` and waits up to `deadline` for its answer; a device
/// connected to another hub of the cluster is asked through that hub.
pub async fn request(
    state: &HubState,
    device: &DeviceId,
    request: DeviceRequest,
    deadline: Duration,
) -> Result<DeviceReply, RpcError> {
    match (state.registry.handle(device), &state.cluster) {
        (Some(handle), _) => call(&handle, request, deadline).await,
        (None, Some(cluster)) => cluster.request_device(device, request, deadline).await,
        (None, None) => Err(RpcError::Offline),
    }
}

/// Sends `request` to `device` only if it is connected to this hub: what another hub
/// of the cluster asks, so a request never travels between hubs twice.
pub async fn local_request(
    state: &HubState,
    device: &DeviceId,
    request: DeviceRequest,
    deadline: Duration,
) -> Result<DeviceReply, RpcError> {
    let handle = state.registry.handle(device).ok_or(RpcError::Offline)?;
    call(&handle, request, deadline).await
}

/// Sends `request` through a connection handle already in hand and waits up to
/// `deadline` for its answer.
pub async fn call(
    handle: &ConnHandle,
    request: DeviceRequest,
    deadline: Duration,
) -> Result<DeviceReply, RpcError> {
    let (tx, rx) = oneshot::channel();
    let call = Call {
        request,
        deadline,
        reply: ReplyTo::Waiter(tx),
    };
    handle
        .try_send(Command::Request(Box::new(call)))
        .map_err(refused)?;
    match tokio::time::timeout(deadline, rx).await {
        Err(_) => Err(RpcError::Timeout(deadline)),
        Ok(Err(_)) => Err(RpcError::Disconnected),
        Ok(Ok(answer)) => answer,
    }
}

/// Opens a proxied HTTP exchange with `device`.
pub async fn open_proxy(
    state: &HubState,
    device: &DeviceId,
    request: ProxyRequest,
) -> Result<ProxyOpened, RpcError> {
    let handle = state.registry.handle(device).ok_or(RpcError::Offline)?;
    let (tx, rx) = oneshot::channel();
    handle
        .try_send(Command::Proxy(Box::new(ProxyCall { request, reply: tx })))
        .map_err(refused)?;
    rx.await.map_err(|_| RpcError::Disconnected)?
}

/// A full queue means the device is not keeping up; a closed one that it is gone.
pub(crate) fn refused(e: Refused) -> RpcError {
    match e {
        Refused::Full => RpcError::Busy,
        Refused::Closed => RpcError::Offline,
    }
}
