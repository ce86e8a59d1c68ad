//! The web UI, compiled into the hub so running it needs no build step and no second
//! server. The page talks only to the hub's public REST API and its client WebSocket
//! (`/ws/client`), like the CLI does; it is tested in headless Chromium
//! (`tests/e2e/browser.rs`).

/// The single page the hub serves at `/`.
pub const INDEX_HTML: &str = include_str!("../assets/index.html");
