//! End-to-end tests: real `adi` processes (hub, cocoons, CLI) on loopback ports, real
//! SQLite files in temp dirs, the machine's PostgreSQL, raw WebSocket clients for the
//! wire-level refusals, and the web UI in a real headless Chromium.

mod access;
mod audit;
mod auth;
mod browser;
mod capabilities;
mod cluster;
mod connections;
mod enrolment;
mod failover;
mod harness;
mod install;
mod keys;
mod matrix;
mod members;
mod metrics;
mod openai;
mod openai_device;
mod operator;
mod presence;
mod proxy;
mod service;
mod setup;
mod storage;
mod task_files;
mod tasks;
mod tcp;
mod throttle;
mod tls;
mod wire;
