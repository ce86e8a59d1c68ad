//! Hub configuration, validated before any port is bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use adi_protocol::DEFAULT_MAX_FRAME_BYTES;

/// Everything a hub needs to start.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Address to listen on; port 0 picks a free one (tests, `adi dev`).
    pub listen: SocketAddr,
    /// Where the embedded SQLite catalog lives when no database URL is given.
    pub data_dir: PathBuf,
    /// `postgres://...` (or `sqlite:PATH`) to use instead of the embedded catalog.
    pub database_url: Option<String>,
    /// File (0600) that holds the hub's signing and device-id keys instead of the
    /// catalog, so a shared catalog's readers do not hold them; created when missing,
    /// taking the catalog's keys if it has some. Hubs sharing a catalog share this file.
    pub key_file: Option<PathBuf>,
    /// How often cocoons heartbeat; told to each cocoon at registration.
    pub heartbeat_interval: Duration,
    /// Largest control frame accepted from a cocoon.
    pub max_frame_bytes: usize,
    /// Lifetime of the JWTs handed out for API keys.
    pub jwt_ttl: Duration,
    /// URL under which users reach this hub (for the install script); when unset the
    /// request's Host header is used.
    pub public_url: Option<String>,
    /// Bytes of the read buffer of each cocoon socket. Control frames are small, so
    /// a small buffer keeps per-device memory low; larger frames still arrive whole.
    pub ws_read_buffer_bytes: usize,
    /// Bytes of the read buffer of the socket of a cocoon that says it serves proxied
    /// bodies (it registers services). The WebSocket reader sizes the buffers it
    /// allocates for large frames after this first one, so a small buffer makes every
    /// 64 KiB body frame land in a fresh allocation: a 1 MiB download then costs the hub
    /// half as much CPU again as with 64 KiB here (see BENCHMARKS.md). Devices without
    /// services, most of a large fleet, keep the small buffer.
    pub ws_body_read_buffer_bytes: usize,
    /// How long a proxied request waits for the service's response head, unless the
    /// request says otherwise.
    pub proxy_timeout: Duration,
    /// Largest proxied request body; `None` for no limit (bodies stream, so size costs
    /// no memory).
    pub proxy_max_body_bytes: Option<u64>,
    /// How long a capability request waits for the serving device, unless the request
    /// says otherwise.
    pub capability_timeout: Duration,
    /// How long a hub that was asked to stop keeps serving the requests already in
    /// flight (a download, an SSE stream, a capability call) before it closes them; it
    /// accepts no new connection meanwhile, and stops as soon as none is left.
    pub shutdown_grace: Duration,
    /// Bearer token that lets a scraper off the hub's loopback read `/metrics`; `None`
    /// serves metrics to loopback only.
    pub metrics_token: Option<String>,
    /// How long a client has to send a whole request head once it connects or once
    /// its previous request is answered: it bounds slow senders and idle keep-alive
    /// connections alike.
    pub header_timeout: Duration,
    /// How long a new WebSocket has to send its first frame (a cocoon's registration,
    /// a client's sign-in) before it is closed.
    pub handshake_timeout: Duration,
    /// Connections held at once, WebSockets included. The last
    /// [`HubConfig::reserved_connections`] of them take only health checks, sign-ins
    /// and device reconnects, so a flood of idle sockets cannot lock those out.
    pub max_connections: usize,
    /// Connections one source address may hold at once; 0 for no cap (a hub behind a
    /// reverse proxy sees every client as the proxy's address).
    pub max_connections_per_source: usize,
    /// Serve HTTPS and WSS with these files instead of plain HTTP.
    pub tls: Option<TlsFiles>,
    /// How long the audit log keeps an event.
    pub audit_retention: Duration,
    /// The NATS server hubs sharing this catalog talk through (`nats://host:port`):
    /// set, the hub joins them as one cluster; unset, it runs alone.
    pub nats_url: Option<String>,
    /// The base URL other hubs and devices reach this hub at (default: the public URL,
    /// else `http://` and the listen address).
    pub hub_url: Option<String>,
    /// A PEM CA to trust, besides the public roots, for other hubs served over TLS.
    pub hub_ca_cert: Option<PathBuf>,
}

/// The certificate and key files the hub serves TLS with, re-read when they change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, the hub's own certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("adi-hub-data"),
            database_url: None,
            key_file: None,
            heartbeat_interval: Duration::from_secs(5),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            jwt_ttl: Duration::from_secs(3600),
            public_url: None,
            ws_read_buffer_bytes: 4096,
            ws_body_read_buffer_bytes: 64 * 1024,
            proxy_timeout: Duration::from_secs(30),
            proxy_max_body_bytes: None,
            capability_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            metrics_token: None,
            header_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            max_connections: 16_384,
            max_connections_per_source: 512,
            tls: None,
            audit_retention: Duration::from_secs(90 * 86_400),
            nats_url: None,
            hub_url: None,
            hub_ca_cert: None,
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Heartbeat interval out of range.
    #[error("heartbeat interval must be between 100 ms and 1 hour")]
    HeartbeatInterval,
    /// Frame limit out of range.
    #[error("max frame size must be between 1 KiB and 64 MiB")]
    MaxFrame,
    /// JWT lifetime out of range.
    #[error("JWT lifetime must be between 1 minute and 30 days")]
    JwtTtl,
    /// Capability timeout out of range.
    #[error("capability timeout must be between 10 ms and 10 minutes")]
    CapabilityTimeout,
    /// Shutdown grace period out of range.
    #[error("shutdown grace period must be at most 1 hour")]
    ShutdownGrace,
    /// Metrics token too short to be a secret.
    #[error("the metrics token must be at least 16 characters")]
    MetricsToken,
    /// Public URL is not an http(s) URL.
    #[error("public URL must start with http:// or https://")]
    PublicUrl,
    /// A connection timeout out of range.
    #[error("header and handshake timeouts must be between 100 ms and 10 minutes")]
    ConnectionTimeout,
    /// Connection caps out of range.
    #[error("max connections must be at least 64, and the cap per source at most that")]
    MaxConnections,
    /// Several hubs need a catalog they can share.
    #[error("--nats joins hubs that share a catalog: give --database-url postgres://... too")]
    ClusterWithoutSharedCatalog,
    /// The hub URL is not an http(s) URL.
    #[error("hub URL must start with http:// or https://")]
    HubUrl,
}

impl HubConfig {
    /// Connections kept for health checks, sign-ins and device reconnects: a sixteenth
    /// of [`HubConfig::max_connections`], at least 4.
    pub fn reserved_connections(&self) -> usize {
        (self.max_connections / 16).max(4)
    }

    /// Checks every field; called by `spawn` before anything starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.heartbeat_interval < Duration::from_millis(100)
            || self.heartbeat_interval > Duration::from_secs(3600)
        {
            return Err(ConfigError::HeartbeatInterval);
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.max_frame_bytes) {
            return Err(ConfigError::MaxFrame);
        }
        if self.jwt_ttl < Duration::from_secs(60) || self.jwt_ttl > Duration::from_secs(30 * 86400)
        {
            return Err(ConfigError::JwtTtl);
        }
        if self.capability_timeout < Duration::from_millis(10)
            || self.capability_timeout > Duration::from_secs(600)
        {
            return Err(ConfigError::CapabilityTimeout);
        }
        if self.shutdown_grace > Duration::from_secs(3600) {
            return Err(ConfigError::ShutdownGrace);
        }
        if self.metrics_token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err(ConfigError::MetricsToken);
        }
        let timeouts = Duration::from_millis(100)..=Duration::from_secs(600);
        if !timeouts.contains(&self.header_timeout) || !timeouts.contains(&self.handshake_timeout) {
            return Err(ConfigError::ConnectionTimeout);
        }
        if self.max_connections < 64 || self.max_connections_per_source > self.max_connections {
            return Err(ConfigError::MaxConnections);
        }
        if let Some(url) = &self.public_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::PublicUrl);
            }
        }
        if let Some(url) = &self.hub_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::HubUrl);
            }
        }
        if self.nats_url.is_some()
            && !self
                .database_url
                .as_deref()
                .is_some_and(|u| u.starts_with("postgres://") || u.starts_with("postgresql://"))
        {
            return Err(ConfigError::ClusterWithoutSharedCatalog);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_hubs_need_a_shared_catalog_and_an_http_url() {
        let alone = HubConfig {
            nats_url: Some("nats://127.0.0.1:4222".into()),
            ..HubConfig::default()
        };
        assert!(matches!(
            alone.validate(),
            Err(ConfigError::ClusterWithoutSharedCatalog)
        ));
        let shared = HubConfig {
            database_url: Some("postgres://127.0.0.1/adi".into()),
            ..alone
        };
        assert!(shared.validate().is_ok());
        let bad_url = HubConfig {
            hub_url: Some("hub.example:8080".into()),
            ..shared
        };
        assert!(matches!(bad_url.validate(), Err(ConfigError::HubUrl)));
    }
}
