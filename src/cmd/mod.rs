//! One module per command: `agent` is `adi cocoon run` (also used to check a service
//! unit's arguments), `cocoon` the device commands, `service` the systemd unit.

pub mod agent;
pub mod audit;
pub mod cocoon;
pub mod connect;
pub mod dev;
pub mod keys;
pub mod login;
pub mod models;
pub mod proxy;
pub mod service;
pub mod signaling;
pub mod tasks;
pub mod token;
pub mod users;
