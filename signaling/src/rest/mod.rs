//! The REST routes. Every route lives in the module named for what it serves, each
//! refusal is a [`error::ApiError`], the caller and JSON bodies come from [`extract`],
//! and whether the caller may touch a device is decided by [`crate::access`], never
//! here. The route table that joins these with the proxy, the sockets and `/metrics` is
//! [`crate::router`]; nothing here imports it.
//!
//! - [`error`]: the one error shape and every conversion into it
//! - [`extract`]: the caller (bearer session, or the session cookie on `/proxy/`) and
//!   JSON bodies
//! - `devices`: the caller's devices, with live presence
//! - `tokens`: setup and share tokens, minted and claimed
//! - `keys`: a user's named, scoped API keys
//! - `audit`: the audit events a user may read
//! - `session`: signing in with an API key, and the web UI's sign-in and sign-out
//! - `tasks`: a device's tasks and the merged list across devices
//! - `capabilities`: capability requests, served by the best device
//! - `listing`: the query of a merged task listing, shared with the client socket
//! - `health`: liveness and readiness
//! - `hubs`: the hubs of a cluster, and device requests from one to another
//! - `install`: the install script, the hub's own executable and the web UI's page

pub(crate) mod audit;
pub(crate) mod capabilities;
pub(crate) mod devices;
pub mod error;
pub mod extract;
pub(crate) mod health;
pub mod hubs;
pub(crate) mod install;
pub(crate) mod keys;
pub(crate) mod listing;
pub(crate) mod session;
pub(crate) mod tasks;
pub(crate) mod tokens;

pub(crate) use devices::view;
