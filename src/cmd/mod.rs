//! One module per top-level command.

pub mod cocoon;
pub mod dev;
pub mod login;
pub mod proxy;
pub mod service;
pub mod signaling;
pub mod tasks;
pub mod token;
