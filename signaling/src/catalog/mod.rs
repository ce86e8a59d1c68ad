//! The catalog: everything the hub must remember across restarts — users, API-key
//! hashes, devices and their owners, setup/share token hashes, hub secrets.
//!
//! It is written on configuration changes only (enrol, claim, user add, a device
//! renaming itself). It must never be written per heartbeat: live state belongs to the
//! registry. Secrets are stored as hashes, never in the clear; device secrets are not
//! stored at all.
//!
//! Two backends implement [`Catalog`]: SQLite (embedded default, one hub) and
//! PostgreSQL (several hubs sharing one catalog). One conformance suite runs against both.
//! Layout, one job each:
//! - this file: the records, the [`Catalog`] trait, [`CatalogError`] and its
//!   conversions, and [`open`], which picks a backend.
//! - `sqlite` ([`SqliteCatalog`]) and `postgres` ([`PgCatalog`]): what differs per
//!   backend: connection, migrations, the SQLite file checks, SQL text and placeholders,
//!   locking.
//! - `rows`: the one mapping between catalog rows and the records, for both.
//! - `member_view` ([`MemberView`]): each user's devices kept in RAM in front of
//!   either backend, so that merged views read no catalog per request.
//! - `conformance` (tests): every behaviour, run against both backends.
//!
//! Failures are typed here once: a database error that says the store cannot read or
//! write now (disk full, I/O, a lock held too long, read-only, unreachable) becomes
//! [`CatalogError::Unavailable`], which callers answer with 503 and a reason and never
//! with a success.

mod member_view;
mod postgres;
mod rows;
mod sqlite;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use adi_protocol::{CapabilityOffer, DeviceId, ErrorCode, Hardware, Role, Scope, ServiceInfo};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use adi_storage::Outage;
pub use member_view::MemberView;
pub use postgres::PgCatalog;
pub use sqlite::SqliteCatalog;

pub use adi_protocol::UserId;

/// A person who owns devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    /// Stable id.
    pub id: UserId,
    /// Unique login name.
    pub name: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; a disabled user signs in nowhere.
    pub disabled_at: Option<i64>,
}

/// One API key of a user, as stored: the public key id and a hash of the secret part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    /// Public part of the key, used to find the record.
    pub key_id: String,
    /// Whose key it is.
    pub user_id: UserId,
    /// SHA-256 of the secret part.
    pub secret_hash: Vec<u8>,
    /// Unix seconds.
    pub created_at: i64,
    /// The name its user gave it, unique among their keys not revoked.
    pub name: Option<String>,
    /// What it may do; `None`: everything.
    pub scopes: Option<Vec<Scope>>,
    /// The devices it may reach; `None`: every device its user may use.
    pub devices: Option<Vec<DeviceId>>,
    /// Unix seconds; refused from then on.
    pub expires_at: Option<i64>,
    /// Unix seconds; set once, when revoked.
    pub revoked_at: Option<i64>,
}

impl ApiKeyRecord {
    /// A key of `user` with every scope, no device limit, no expiry and no name: what
    /// a user's first key is.
    pub fn unlimited(key_id: String, user_id: UserId, secret_hash: Vec<u8>, now: i64) -> Self {
        ApiKeyRecord {
            key_id,
            user_id,
            secret_hash,
            created_at: now,
            name: None,
            scopes: None,
            devices: None,
            expires_at: None,
            revoked_at: None,
        }
    }
}

/// What changed in who may do what; hubs replay these every second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// A session was signed out; the subject is its id.
    Session,
    /// An API key was revoked; the subject is its id.
    Key,
    /// A user was disabled, enabled or removed; the subject is their id.
    User,
    /// A device's members changed or it was deleted; the subject is its id.
    Device,
}

impl ChangeKind {
    /// The name stored.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Session => "session",
            ChangeKind::Key => "key",
            ChangeKind::User => "user",
            ChangeKind::Device => "device",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            ChangeKind::Session,
            ChangeKind::Key,
            ChangeKind::User,
            ChangeKind::Device,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// One entry of the change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Its place in the feed; later changes have larger ones.
    pub seq: i64,
    /// What changed.
    pub kind: ChangeKind,
    /// Whose: a session, key, user or device id.
    pub subject: String,
}

/// A security-relevant event, as the audit log keeps it: never a secret.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditEvent {
    /// Its place in the log (set by the catalog).
    pub seq: i64,
    /// Unix seconds.
    pub at: i64,
    /// What happened, e.g. `member_removed` (see `crate::audit::Kind`).
    pub kind: String,
    /// The user who acted, if a user did.
    pub actor_user: Option<UserId>,
    /// Their name, when read back.
    pub actor_name: Option<String>,
    /// The API key of the session they acted with, or the key tried.
    pub actor_key: Option<String>,
    /// The device that acted, if a device did.
    pub actor_device: Option<DeviceId>,
    /// The device it concerns.
    pub device: Option<DeviceId>,
    /// The user it concerns (removed, disabled, whose key was tried).
    pub target_user: Option<UserId>,
    /// Their name, when read back.
    pub target_name: Option<String>,
    /// The address it came from.
    pub source: Option<String>,
    /// What else identifies it (a token or key id, a role, a task id).
    pub detail: Option<String>,
}

/// Which audit events a user may read: their own actions, what was done to them, and
/// the events of the devices they own.
#[derive(Debug, Clone)]
pub struct AuditQuery {
    /// Who reads.
    pub viewer: UserId,
    /// Only this device's events.
    pub device: Option<DeviceId>,
    /// Only events at or after this instant (unix seconds).
    pub since: i64,
    /// At most this many, newest first.
    pub limit: u32,
}

/// What to do with the devices a removed user is the last owner of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orphans {
    /// Refuse to remove the user (`WouldOrphan`).
    Refuse,
    /// Make this user their owner.
    TransferTo(UserId),
    /// Delete them, as their owner would.
    Delete,
}

/// How long the change feed keeps an entry: longer than the longest session a hub may
/// issue (30 days), so a hub that starts replays every change that can still matter (a
/// removed user's sessions, say) as well as reading new ones within a second.
pub const CHANGES_KEPT_SECS: i64 = 31 * 24 * 3600;

/// What a token grants when it is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// Enrols a new device owned by the token's creator.
    Setup,
    /// Makes whoever claims it a member of an existing device, with the token's role.
    Share,
}

impl TokenKind {
    /// The name stored in the catalog and used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Setup => "setup",
            TokenKind::Share => "share",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "setup" => Some(TokenKind::Setup),
            "share" => Some(TokenKind::Share),
            _ => None,
        }
    }
}

/// A one-time token, as stored: id and a hash of the secret part, never the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Public part of the token, used to find the record.
    pub id: String,
    /// What it grants.
    pub kind: TokenKind,
    /// SHA-256 of the secret part.
    pub secret_hash: Vec<u8>,
    /// The user who made it; a setup token enrols devices owned by them.
    pub created_by: UserId,
    /// For share tokens: the device shared.
    pub device_id: Option<DeviceId>,
    /// For share tokens: the role it grants (tokens made before roles grant owner).
    pub role: Option<Role>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; the token is refused from this instant on.
    pub expires_at: i64,
    /// Unix seconds; set once, when the token is used.
    pub used_at: Option<i64>,
    /// Unix seconds; set once, when its creator revokes it unused.
    pub revoked_at: Option<i64>,
}

/// A device as the catalog knows it: its configuration, never its live state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceRecord {
    /// Derived from the device secret.
    pub id: DeviceId,
    /// Human name the device gave itself.
    pub name: String,
    /// Services it declared.
    pub services: Vec<ServiceInfo>,
    /// Capabilities it declared.
    pub capabilities: Vec<CapabilityOffer>,
    /// Where it is, in its owner's words.
    pub location: Option<String>,
    /// What it is built of, as last reported.
    pub hardware: Option<Hardware>,
    /// Unix seconds.
    pub created_at: i64,
    /// Users who may use it: owners first, then users, each ordered by name.
    pub members: Vec<Member>,
}

impl DeviceRecord {
    /// The role `user` has on this device, if they are a member.
    pub fn role_of(&self, user: UserId) -> Option<Role> {
        self.members.iter().find(|m| m.id == user).map(|m| m.role)
    }
}

/// A user who may use a device, and what else they may do with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    /// The user's id.
    pub id: UserId,
    /// The user's name.
    pub name: String,
    /// Owner or user.
    pub role: Role,
}

/// A device's declared configuration, as the device reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Derived device id.
    pub id: DeviceId,
    /// Human name.
    pub name: String,
    /// Declared services.
    pub services: Vec<ServiceInfo>,
    /// Declared capabilities.
    pub capabilities: Vec<CapabilityOffer>,
    /// Where it is, in its owner's words.
    pub location: Option<String>,
    /// What it is built of; `None` until its first load report.
    pub hardware: Option<Hardware>,
}

impl From<DeviceRecord> for DeviceConfig {
    fn from(d: DeviceRecord) -> Self {
        DeviceConfig {
            id: d.id,
            name: d.name,
            services: d.services,
            capabilities: d.capabilities,
            location: d.location,
            hardware: d.hardware,
        }
    }
}

/// Why a catalog operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// A unique name or id is already taken.
    #[error("{0} already exists")]
    Conflict(String),
    /// Removing the user would leave these devices with no owner.
    #[error(
        "the user is the last owner of {}; pass --transfer-to USER or --delete-devices",
        .0.iter().map(|(id, name)| format!("{name} ({id})")).collect::<Vec<_>>().join(", ")
    )]
    WouldOrphan(Vec<(DeviceId, String)>),
    /// The member is the device's last owner: removing them would leave a device
    /// nobody can manage. Delete the device instead, or make another member an owner.
    #[error("{0} is the device's last owner")]
    LastOwner(String),
    /// A token was used or expired between our check and our update.
    #[error("the token was used or expired concurrently")]
    TokenUnavailable,
    /// The row the operation needs does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The database cannot read or write now; nothing was stored. It may work again
    /// as soon as the cause is gone, without a restart.
    #[error("the hub's catalog is unavailable: {outage} ({detail})")]
    Unavailable {
        /// What is wrong, in words a caller may be shown.
        outage: Outage,
        /// What the database said, for the log.
        detail: sqlx::Error,
    },
    /// The database failed.
    #[error("catalog storage: {0}")]
    Storage(sqlx::Error),
    /// A file or directory of the catalog could not be made or read.
    #[error("{}: {source}", path.display())]
    File {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Where the catalog should be there is something else; it is neither used nor
    /// replaced, because a new catalog would mean new keys and every device a new id.
    #[error(
        "{}: {reason}; the hub will neither use it as its catalog nor replace it \
         (move it away to start a new, empty catalog)",
        path.display()
    )]
    NotACatalog {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        reason: &'static str,
    },
    /// The catalog file failed its integrity check.
    #[error(
        "{}: the catalog failed its integrity check: {first_error} \
         (restore it from a backup, or try the sqlite3 `.recover` command on a copy)",
        path.display()
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// The first problem the check found.
        first_error: String,
    },
    /// The schema could not be brought up to date.
    #[error("catalog migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database URL names a backend we do not have.
    #[error("unsupported database URL: use postgres://... or sqlite:PATH")]
    UnsupportedUrl,
    /// A stored value is not what this build expects.
    #[error("catalog holds a corrupt value: {0}")]
    Corrupt(String),
}

impl CatalogError {
    /// The protocol code a caller is answered with.
    pub fn code(&self) -> ErrorCode {
        match self {
            CatalogError::Conflict(_) | CatalogError::LastOwner(_) => ErrorCode::Conflict,
            CatalogError::Unavailable { .. } => ErrorCode::Unavailable,
            _ => ErrorCode::Internal,
        }
    }

    /// What a caller may be told: the outage or the conflict, never internal detail.
    pub fn public_message(&self) -> String {
        match self {
            CatalogError::Conflict(what) => format!("{what} already exists"),
            CatalogError::LastOwner(who) => format!(
                "{who} is the device's last owner; share it with another owner first \
                 (share --role owner), or delete the device"
            ),
            CatalogError::Unavailable { outage, .. } => {
                format!("the hub's catalog is unavailable: {outage}")
            }
            _ => "the hub's catalog failed".to_owned(),
        }
    }
}

impl From<adi_storage::FileError> for CatalogError {
    fn from(e: adi_storage::FileError) -> Self {
        CatalogError::File {
            path: e.path,
            source: e.source,
        }
    }
}

impl From<sqlx::Error> for CatalogError {
    fn from(e: sqlx::Error) -> Self {
        match Outage::of(&e) {
            Some(outage) => CatalogError::Unavailable { outage, detail: e },
            None => CatalogError::Storage(e),
        }
    }
}

impl CatalogError {
    /// A failed insert: `Conflict(what)` when it broke a unique constraint (the name or
    /// id is taken), else what any database error is.
    fn from_insert(e: sqlx::Error, what: impl FnOnce() -> String) -> Self {
        match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => CatalogError::Conflict(what()),
            _ => e.into(),
        }
    }
}

/// Shorthand for catalog results.
pub type Result<T, E = CatalogError> = std::result::Result<T, E>;

/// The hub's durable store. Both backends keep the same semantics; the conformance
/// suite in this module's tests holds them to it.
#[async_trait]
pub trait Catalog: Send + Sync + 'static {
    /// Returns the hub secret called `name`, storing `candidate` first if there is none.
    /// Concurrent callers (several hubs on one database) all get the same stored value.
    async fn hub_secret_or_insert(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>>;
    /// The hub secret called `name`, if the catalog holds one.
    async fn hub_secret(&self, name: &str) -> Result<Option<Vec<u8>>>;
    /// Deletes the hub secrets called `names` in one transaction (they moved to a key
    /// file); names it does not hold are skipped.
    async fn remove_hub_secrets(&self, names: &[&str]) -> Result<()>;

    /// Creates a user; `Conflict` if the name is taken.
    async fn create_user(&self, name: &str) -> Result<User>;
    /// Looks a user up by name.
    async fn user_by_name(&self, name: &str) -> Result<Option<User>>;
    /// Looks a user up by id.
    async fn user(&self, id: UserId) -> Result<Option<User>>;
    /// Whether a user with this id exists (disabled or not): what every request of a
    /// session checks, so a catalog may answer it from a view a second old at most
    /// (`MemberView`); anything that decides on the user's record reads
    /// [`Catalog::user`].
    async fn user_exists(&self, id: UserId) -> Result<bool> {
        Ok(self.user(id).await?.is_some())
    }

    /// Every user, by name.
    async fn users(&self) -> Result<Vec<User>>;
    /// Disables (`Some(at)`) or enables (`None`) a user, recording the change; returns
    /// whether the user exists.
    async fn set_user_disabled(&self, user: UserId, at: Option<i64>, now: i64) -> Result<bool>;
    /// In one transaction: removes a user with their keys, memberships and tokens,
    /// first dealing with the devices they are the last owner of as `orphans` says
    /// (`WouldOrphan` if it says refuse and there are some). Returns those devices.
    async fn remove_user(
        &self,
        user: UserId,
        orphans: Orphans,
        now: i64,
    ) -> Result<Vec<(DeviceId, String)>>;

    /// Stores an API key record; `Conflict` if the user has a live key of that name.
    async fn insert_api_key(&self, key: &ApiKeyRecord) -> Result<()>;
    /// Finds an API key record by its public id.
    async fn api_key(&self, key_id: &str) -> Result<Option<ApiKeyRecord>>;
    /// The user's keys, revoked ones too, newest first.
    async fn api_keys_of(&self, user: UserId) -> Result<Vec<ApiKeyRecord>>;
    /// Revokes the user's key `key_id` (if not yet), recording the change; returns it
    /// as it stands afterwards, `None` if the user has no such key.
    async fn revoke_api_key(
        &self,
        user: UserId,
        key_id: &str,
        now: i64,
    ) -> Result<Option<ApiKeyRecord>>;
    /// The ids of every revoked key.
    async fn revoked_api_keys(&self) -> Result<Vec<String>>;

    /// Appends an event to the audit log, first pruning events older than `keep_secs`.
    async fn record_audit(&self, event: &AuditEvent, keep_secs: i64) -> Result<()>;
    /// The events `query` lets its viewer read, newest first.
    async fn audit_events(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>>;

    /// The changes after `seq`, oldest first, at most `limit`.
    async fn changes_since(&self, seq: i64, limit: u32) -> Result<Vec<Change>>;
    /// The newest change's seq (0 when there is none): where a starting hub begins.
    async fn last_change(&self) -> Result<i64>;

    /// Records that session `id` was signed out; its JWT is refused until
    /// `expires_at`. Sessions already past their expiry are forgotten on the way.
    async fn revoke_session(&self, id: &str, expires_at: i64, now: i64) -> Result<()>;
    /// The signed-out sessions not yet past their expiry, with it.
    async fn revoked_sessions(&self, now: i64) -> Result<Vec<(String, i64)>>;

    /// Stores a new token record.
    async fn insert_token(&self, token: &TokenRecord) -> Result<()>;
    /// Finds a token record by its public id.
    async fn token(&self, id: &str) -> Result<Option<TokenRecord>>;
    /// The tokens `user` made, newest first, at most `limit`.
    async fn tokens_created_by(&self, user: UserId, limit: u32) -> Result<Vec<TokenRecord>>;
    /// Revokes token `id` if `user` made it and it is neither used nor revoked yet;
    /// returns the record as it stands afterwards (`None` if `user` made no such
    /// token), so the caller can tell a revocation from a token already used.
    async fn revoke_token(&self, id: &str, user: UserId, now: i64) -> Result<Option<TokenRecord>>;

    /// In one transaction: marks setup token `token_id` used (only if it is still unused,
    /// unrevoked and `expires_at > now`, else `TokenUnavailable`), creates the device (`Conflict`
    /// if it exists), makes the token's creator its owner and forgets that a device of
    /// this id was once removed. Nothing is written on error.
    async fn enrol_device(
        &self,
        token_id: &str,
        now: i64,
        device: &DeviceConfig,
    ) -> Result<DeviceRecord>;

    /// In one transaction: marks share token `token_id` used (same conditions as
    /// `enrol_device`) and makes `user` a member of the token's device with the token's
    /// role; a member already is kept, raised to owner if the token grants it, never
    /// lowered. Returns the device id.
    async fn claim_share(&self, token_id: &str, now: i64, user: UserId) -> Result<DeviceId>;

    /// A device with its members.
    async fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>>;
    /// Every device `user` is a member of, ordered by name then id.
    async fn devices_of(&self, user: UserId) -> Result<Vec<DeviceRecord>>;
    /// The device with this id, with its members, if `user` is one of them: what every
    /// request to a device's routes asks, so a catalog may answer it from its view of
    /// the user's devices (`MemberView`).
    async fn device_of(&self, user: UserId, id: &DeviceId) -> Result<Option<DeviceRecord>> {
        Ok(self.device(id).await?.filter(|d| d.role_of(user).is_some()))
    }
    /// The role `user` has on `device`, if they are a member.
    async fn role_of(&self, device: &DeviceId, user: UserId) -> Result<Option<Role>>;
    /// In one transaction: removes `user` from `device`'s members, unless they are its
    /// last owner (`LastOwner`), and revokes (at `now`) the share tokens for it they
    /// made that nobody used yet: what they handed out goes with them. Returns the
    /// members left; `NotFound` if `user` was not a member.
    async fn remove_member(&self, device: &DeviceId, user: UserId, now: i64)
        -> Result<Vec<Member>>;
    /// In one transaction: gives member `user` of `device` the role `role`, unless that
    /// would leave the device without an owner (`LastOwner`), and when that role is
    /// `User`, revokes (at `now`) the share tokens for it they made that nobody used yet,
    /// since a user may not share. Returns the members as they are after it;
    /// `NotFound` if `user` is not a member. Streams they hold stay: a user may hold
    /// them too.
    async fn set_role(
        &self,
        device: &DeviceId,
        user: UserId,
        role: Role,
        now: i64,
    ) -> Result<Vec<Member>>;
    /// In one transaction: forgets the device, its members and its share tokens, and
    /// remembers that it was removed (at `now`), so its secret is refused with that
    /// reason. Returns whether there was such a device.
    async fn delete_device(&self, device: &DeviceId, now: i64) -> Result<bool>;
    /// Whether `device` was removed by its owners and not enrolled again since.
    async fn is_removed(&self, device: &DeviceId) -> Result<bool>;
    /// Rewrites a device's declared configuration; `NotFound` if it is not enrolled.
    async fn update_device(&self, device: &DeviceConfig) -> Result<()>;

    /// Cheap round trip.
    async fn ping(&self) -> Result<()>;
    /// Reads and rewrites one tiny row and commits: proof, for readiness, that the
    /// catalog can write now.
    async fn probe_write(&self, now: i64) -> Result<()>;

    /// Where the catalog is (a file, or a database without its password), for messages.
    fn location(&self) -> String;
    /// Whether others read this catalog too (a database server, its operators and its
    /// backups), so that a secret in it is no longer the hub's alone.
    fn is_shared(&self) -> bool;
}

/// The embedded catalog's file in a hub's data dir.
pub const SQLITE_FILE: &str = "catalog.db";

/// Where the embedded catalog of a hub with this data dir and database URL is, if it is
/// embedded (no URL, or a `sqlite:` one): what admin commands check before opening, so
/// a mistyped path is not taken for a new catalog.
pub fn sqlite_path(database_url: Option<&str>, data_dir: &Path) -> Option<std::path::PathBuf> {
    match database_url {
        None => Some(data_dir.join(SQLITE_FILE)),
        Some(url) if url.starts_with("sqlite:") => Some(std::path::PathBuf::from(
            url.trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:"),
        )),
        Some(_) => None,
    }
}

/// Opens the catalog a hub is configured with: PostgreSQL when `database_url` is given,
/// else SQLite in `data_dir/catalog.db` (the data dir made or kept owner-only). Runs
/// migrations before returning.
pub async fn open(database_url: Option<&str>, data_dir: &Path) -> Result<Arc<dyn Catalog>> {
    match database_url {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(Arc::new(PgCatalog::connect(url).await?))
        }
        Some(url) if url.starts_with("sqlite:") => {
            let path = url
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:");
            Ok(Arc::new(SqliteCatalog::open(Path::new(path)).await?))
        }
        Some(_) => Err(CatalogError::UnsupportedUrl),
        None => {
            crate::owner_only::dir(data_dir).map_err(|source| CatalogError::File {
                path: data_dir.to_owned(),
                source,
            })?;
            Ok(Arc::new(
                SqliteCatalog::open(&data_dir.join(SQLITE_FILE)).await?,
            ))
        }
    }
}

#[cfg(test)]
mod conformance;

#[cfg(test)]
mod tests {
    use super::*;
    use adi_storage::test_database::read_only_write_error;

    #[tokio::test]
    async fn a_read_only_sqlite_database_is_an_outage() {
        let e = CatalogError::from(read_only_write_error().await);
        assert!(
            matches!(
                e,
                CatalogError::Unavailable {
                    outage: Outage::ReadOnly,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.code(), ErrorCode::Unavailable);
        assert_eq!(
            e.public_message(),
            "the hub's catalog is unavailable: read-only"
        );
    }

    #[tokio::test]
    async fn other_database_errors_are_not_outages() {
        let e = CatalogError::from(sqlx::Error::RowNotFound);
        assert!(matches!(e, CatalogError::Storage(_)), "{e}");
        assert_eq!(e.code(), ErrorCode::Internal);
        assert_eq!(e.public_message(), "the hub's catalog failed");
    }
}
