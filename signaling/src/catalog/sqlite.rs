//! The embedded SQLite backend of the [`Catalog`]: one file, one hub.
//!
//! This module owns what is SQLite's alone: the catalog's durability (`synchronous=FULL`,
//! since the catalog is written on configuration changes only; WAL, foreign keys and the
//! busy timeout are the shared `adi_storage::pool`), the SQLite schema migrations under
//! `migrations/sqlite`, the checks a file passes before it is used as a catalog, and its
//! SQL. Rows are read and written through `rows`, as for PostgreSQL. Write transactions start with `BEGIN IMMEDIATE`, so two hub tasks racing for one
//! token serialise on the write lock instead of failing on a stale snapshot.
//!
//! Only a missing file makes a new catalog, and it appears whole: it is built beside
//! its final name and linked into place. An empty file, a file that is not SQLite, an
//! SQLite database that is not an adi catalog and one that fails `PRAGMA quick_check`
//! are refused, never replaced: a new catalog would hold new keys, and every device would
//! get a new id. The file is created 0600 before SQLite opens it, because SQLite gives
//! its `-wal` and `-shm` files the mode of the database file.

use std::io::Read;
use std::path::{Path, PathBuf};

use adi_protocol::DeviceId;
use adi_storage::{pool, Tx};
use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, SqliteConnection};

use adi_protocol::Role;

use super::rows::{
    self, ApiKeyRow, AuditRow, ChangeRow, DeviceColumns, DeviceMemberRow, DeviceRow, KeyColumns,
    MemberRow, TokenRow, UserRow, API_KEY_COLUMNS, AUDIT_COLUMNS, DEVICE_COLUMNS, MEMBER_COLUMNS,
    MEMBER_ORDER, TOKEN_COLUMNS, USER_COLUMNS,
};
use super::{
    ApiKeyRecord, AuditEvent, AuditQuery, Catalog, CatalogError, Change, ChangeKind, DeviceConfig,
    DeviceRecord, Member, Orphans, Result, TokenRecord, User, UserId, CHANGES_KEPT_SECS,
};
use crate::owner_only;

/// The first 16 bytes of every SQLite database file.
const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// The catalog in one SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteCatalog {
    pool: SqlitePool,
    path: PathBuf,
}

impl SqliteCatalog {
    /// Opens the catalog file at `path` and brings its schema up to date; creates it
    /// (and missing parent directories, 0700) only when nothing is there. Refuses a file
    /// that is not an intact adi catalog.
    pub async fn open(path: &Path) -> Result<Self> {
        owner_only::sqlite_database(path)?;
        if !inspect(path)? {
            create(path).await?;
        }
        // Checked on a plain connection first: setting the journal mode alone would
        // write to a file that turns out not to be ours.
        let mut conn = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(false)
            .busy_timeout(pool::SQLITE_BUSY_TIMEOUT)
            .connect()
            .await?;
        let checked = check(&mut conn, path).await;
        let _ = conn.close().await;
        checked?;
        let pool = pool::sqlite(
            SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(false)
                .synchronous(SqliteSynchronous::Full),
        )
        .await?;
        MIGRATOR.run(&pool).await?;
        Ok(SqliteCatalog {
            pool,
            path: path.to_owned(),
        })
    }

    /// Closes every connection, waiting for those in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// `path` with `suffix` appended to its file name, as SQLite names its `-wal` and `-shm`.
fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Whether an SQLite database is at `path`: `false` when nothing is there, an error
/// when something else is.
fn inspect(path: &Path) -> Result<bool> {
    let refuse = |reason| CatalogError::NotACatalog {
        path: path.to_owned(),
        reason,
    };
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // SQLite would replay a log left without its database into a new one.
            let wal = sidecar(path, "-wal");
            if std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0) {
                return Err(refuse(
                    "the database file is missing, but its write-ahead log (-wal) is there",
                ));
            }
            return Ok(false);
        }
        Err(source) => {
            return Err(CatalogError::File {
                path: path.to_owned(),
                source,
            })
        }
    };
    let mut header = Vec::with_capacity(SQLITE_HEADER.len());
    file.by_ref()
        .take(SQLITE_HEADER.len() as u64)
        .read_to_end(&mut header)
        .map_err(|source| CatalogError::File {
            path: path.to_owned(),
            source,
        })?;
    if header.is_empty() {
        return Err(refuse("the file is empty (zero bytes)"));
    }
    if header != SQLITE_HEADER {
        return Err(refuse("it is not an SQLite database"));
    }
    Ok(true)
}

/// Builds a new catalog beside `path` and links it into place, so a crash never leaves a
/// half-made catalog (which the next start would refuse) behind, and of two processes
/// creating one at once, one wins and both use its file.
async fn create(path: &Path) -> Result<()> {
    let new = sidecar(path, &format!(".{}.new", uuid::Uuid::new_v4().simple()));
    let file_error = |source| CatalogError::File {
        path: new.clone(),
        source,
    };
    owner_only::create_new_file(&new).map_err(file_error)?;
    let built = build(&new).await;
    let linked = built.and_then(|()| match std::fs::hard_link(&new, path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(source) => Err(CatalogError::File {
            path: path.to_owned(),
            source,
        }),
    });
    let _ = std::fs::remove_file(&new);
    if linked? {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Ok(dir) = std::fs::File::open(parent) {
                let _ = dir.sync_all();
            }
        }
        tracing::info!(path = %path.display(), "created a new catalog");
    }
    Ok(())
}

/// Makes the empty file at `path` a catalog, with a rollback journal rather than WAL, so
/// that one file holds all of it.
async fn build(path: &Path) -> Result<()> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .journal_mode(SqliteJournalMode::Delete)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?;
    let migrated = MIGRATOR.run(&pool).await;
    pool.close().await;
    Ok(migrated?)
}

/// Refuses a damaged file, and an SQLite database that is not an adi catalog.
async fn check(conn: &mut SqliteConnection, path: &Path) -> Result<()> {
    check_integrity(conn, path).await?;
    check_is_catalog(conn, path).await
}

/// Runs `PRAGMA quick_check`; the first problem it reports refuses the file. The check
/// may list problems and then fail outright, so its rows are read one by one.
async fn check_integrity(conn: &mut SqliteConnection, path: &Path) -> Result<()> {
    use futures_util::TryStreamExt;
    let mut rows = sqlx::query_scalar::<_, String>("PRAGMA quick_check").fetch(&mut *conn);
    let mut first_error = None;
    let outcome = loop {
        match rows.try_next().await {
            Ok(Some(row)) if row == "ok" => {}
            // A heading, such as "*** in database main ***".
            Ok(Some(row)) if row.starts_with("***") => {}
            Ok(Some(row)) => {
                first_error.get_or_insert(row.replace('\n', " "));
            }
            Ok(None) => break Ok(()),
            Err(sqlx::Error::Database(db)) if is_corrupt(db.code().as_deref()) => {
                first_error.get_or_insert_with(|| db.message().to_owned());
                break Ok(());
            }
            Err(e) => break Err(e),
        }
    };
    drop(rows);
    outcome?;
    match first_error {
        None => Ok(()),
        Some(first_error) => Err(CatalogError::Damaged {
            path: path.to_owned(),
            first_error,
        }),
    }
}

/// SQLITE_CORRUPT (11) and SQLITE_NOTADB (26), by primary code.
fn is_corrupt(code: Option<&str>) -> bool {
    adi_storage::outage::sqlite_primary_code(code).is_some_and(|c| matches!(c, 11 | 26))
}

/// Refuses an SQLite database that is not an adi catalog: one without our migrations
/// table, or whose first migration is not ours.
async fn check_is_catalog(conn: &mut SqliteConnection, path: &Path) -> Result<()> {
    let refuse = || CatalogError::NotACatalog {
        path: path.to_owned(),
        reason: "it is an SQLite database, but not an adi catalog",
    };
    let has_table: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sqlite_schema \
         WHERE type = 'table' AND name = '_sqlx_migrations')",
    )
    .fetch_one(&mut *conn)
    .await?;
    if !has_table {
        return Err(refuse());
    }
    let first = MIGRATOR
        .migrations
        .iter()
        .min_by_key(|m| m.version)
        .ok_or_else(|| CatalogError::Corrupt("this build has no catalog migrations".into()))?;
    let checksum: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT checksum FROM _sqlx_migrations WHERE version = ?")
            .bind(first.version)
            .fetch_optional(&mut *conn)
            .await?;
    match checksum {
        Some(c) if c == first.checksum.as_ref() => Ok(()),
        _ => Err(refuse()),
    }
}

#[async_trait]
impl Catalog for SqliteCatalog {
    async fn hub_secret_or_insert(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>> {
        sqlx::query(
            "INSERT INTO hub_secrets (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(candidate)
        .execute(&self.pool)
        .await?;
        let value: Vec<u8> = sqlx::query_scalar("SELECT value FROM hub_secrets WHERE name = ?")
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(value)
    }

    async fn hub_secret(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(
            sqlx::query_scalar("SELECT value FROM hub_secrets WHERE name = ?")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn remove_hub_secrets(&self, names: &[&str]) -> Result<()> {
        let mut tx = Tx::begin(&self.pool, "BEGIN IMMEDIATE").await?;
        for name in names {
            sqlx::query("DELETE FROM hub_secrets WHERE name = ?")
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn create_user(&self, name: &str) -> Result<User> {
        let user = rows::new_user(name);
        sqlx::query("INSERT INTO users (id, name, created_at) VALUES (?, ?, ?)")
            .bind(user.id.to_string())
            .bind(&user.name)
            .bind(user.created_at)
            .execute(&self.pool)
            .await
            .map_err(|e| CatalogError::from_insert(e, || format!("user {name:?}")))?;
        Ok(user)
    }

    async fn user_by_name(&self, name: &str) -> Result<Option<User>> {
        sqlx::query_as::<_, UserRow>(&format!("SELECT {USER_COLUMNS} FROM users WHERE name = ?"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .map(User::try_from)
            .transpose()
    }

    async fn user(&self, id: UserId) -> Result<Option<User>> {
        sqlx::query_as::<_, UserRow>(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = ?"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .map(User::try_from)
            .transpose()
    }

    async fn users(&self) -> Result<Vec<User>> {
        sqlx::query_as::<_, UserRow>(&format!("SELECT {USER_COLUMNS} FROM users ORDER BY name"))
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(User::try_from)
            .collect()
    }

    async fn set_user_disabled(&self, user: UserId, at: Option<i64>, now: i64) -> Result<bool> {
        let mut tx = Tx::begin(&self.pool, "BEGIN IMMEDIATE").await?;
        let found = sqlx::query("UPDATE users SET disabled_at = ? WHERE id = ?")
            .bind(at)
            .bind(user.to_string())
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        if found {
            record_change(&mut tx, ChangeKind::User, &user.to_string(), now).await?;
        }
        tx.commit().await?;
        Ok(found)
    }

    async fn remove_user(
        &self,
        user: UserId,
        orphans: Orphans,
        now: i64,
    ) -> Result<Vec<(DeviceId, String)>> {
        let id = user.to_string();
        let mut tx = Tx::begin(&self.pool, "BEGIN IMMEDIATE").await?;
        let exists: i64 = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users WHERE id = ?)")
            .bind(&id)
            .fetch_one(&mut *tx)
            .await?;
        if exists == 0 {
            return Err(CatalogError::NotFound(format!("user {user}")));
        }
        let orphaned: Vec<(String, String)> = sqlx::query_as(
            "SELECT d.id, d.name FROM devices d JOIN device_owners o ON o.device_id = d.id \
             WHERE o.user_id = ? AND o.role = 'owner' AND NOT EXISTS (SELECT 1 FROM \
             device_owners x WHERE x.device_id = d.id AND x.user_id <> ? AND x.role = 'owner') \
             ORDER BY d.name, d.id",
        )
        .bind(&id)
        .bind(&id)
        .fetch_all(&mut *tx)
        .await?;
        let orphaned = orphaned
            .into_iter()
            .map(|(d, name)| Ok((rows::parse_device_id(&d)?, name)))
            .collect::<Result<Vec<_>>>()?;
        match orphans {
            Orphans::Refuse if !orphaned.is_empty() => {
                return Err(CatalogError::WouldOrphan(orphaned))
            }
            Orphans::Refuse => {}
            Orphans::TransferTo(heir) => {
                let heir_exists: i64 = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM users WHERE id = ? AND id <> ?)",
                )
                .bind(heir.to_string())
                .bind(&id)
                .fetch_one(&mut *tx)
                .await?;
                if heir_exists == 0 {
                    return Err(CatalogError::NotFound(format!("user {heir}")));
                }
                for (device, _) in &orphaned {
                    sqlx::query(
                        "INSERT INTO device_owners (device_id, user_id, added_at, role) \
                         VALUES (?, ?, ?, 'owner') \
                         ON CONFLICT (device_id, user_id) DO UPDATE SET role = 'owner'",
                    )
                    .bind(device.as_str())
                    .bind(heir.to_string())
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            Orphans::Delete => {
                for (device, _) in &orphaned {
                    forget_device(&mut tx, device, now).await?;
                }
            }
        }
        let member_of: Vec<String> =
            sqlx::query_scalar("SELECT device_id FROM device_owners WHERE user_id = ?")
                .bind(&id)
                .fetch_all(&mut *tx)
                .await?;
        for device in &member_of {
            record_change(&mut tx, ChangeKind::Device, device, now).await?;
        }
        for statement in [
            "DELETE FROM device_owners WHERE user_id = ?",
            "DELETE FROM tokens WHERE created_by = ?",
            "UPDATE tokens SET used_by = NULL WHERE used_by = ?",
            "DELETE FROM api_keys WHERE user_id = ?",
            "DELETE FROM users WHERE id = ?",
        ] {
            sqlx::query(statement).bind(&id).execute(&mut *tx).await?;
        }
        record_change(&mut tx, ChangeKind::User, &id, now).await?;
        tx.commit().await?;
        Ok(orphaned)
    }

    async fn insert_api_key(&self, key: &ApiKeyRecord) -> Result<()> {
        let columns = KeyColumns::of(key)?;
        sqlx::query(
            "INSERT INTO api_keys (key_id, user_id, secret_hash, created_at, name, scopes, \
             devices, expires_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&key.key_id)
        .bind(key.user_id.to_string())
        .bind(&key.secret_hash)
        .bind(key.created_at)
        .bind(key.name.as_deref())
        .bind(&columns.scopes)
        .bind(&columns.devices)
        .bind(key.expires_at)
        .bind(key.revoked_at)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            CatalogError::from_insert(e, || match &key.name {
                Some(name) => format!("a key named {name:?}"),
                None => format!("api key {:?}", key.key_id),
            })
        })?;
        Ok(())
    }

    async fn api_keys_of(&self, user: UserId) -> Result<Vec<ApiKeyRecord>> {
        sqlx::query_as::<_, ApiKeyRow>(&format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE user_id = ? \
             ORDER BY created_at DESC, key_id"
        ))
        .bind(user.to_string())
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(ApiKeyRecord::try_from)
        .collect()
    }

    async fn revoke_api_key(
        &self,
        user: UserId,
        key_id: &str,
        now: i64,
    ) -> Result<Option<ApiKeyRecord>> {
        let mut tx = Tx::begin(&self.pool, "BEGIN IMMEDIATE").await?;
        let revoked = sqlx::query(
            "UPDATE api_keys SET revoked_at = ? \
             WHERE key_id = ? AND user_id = ? AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(key_id)
        .bind(user.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        if revoked {
            record_change(&mut tx, ChangeKind::Key, key_id, now).await?;
        }
        let record = sqlx::query_as::<_, ApiKeyRow>(&format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE key_id = ? AND user_id = ?"
        ))
        .bind(key_id)
        .bind(user.to_string())
        .fetch_optional(&mut *tx)
        .await?
        .map(ApiKeyRecord::try_from)
        .transpose()?;
        tx.commit().await?;
        Ok(record)
    }

    async fn revoked_api_keys(&self) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT key_id FROM api_keys WHERE revoked_at IS NOT NULL")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn record_audit(&self, event: &AuditEvent, keep_secs: i64) -> Result<()> {
        let mut tx = Tx::begin(&self.pool, "BEGIN IMMEDIATE").await?;
        sqlx::query("DELETE FROM audit_events WHERE at < ?")
            .bind(event.at.saturating_sub(keep_secs))
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO audit_events (at, kind, actor_user, actor_key, actor_device, device, \
             target_user, source, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(event.at)
        .bind(&event.kind)
        .bind(event.actor_user.map(|u| u.to_string()))
        .bind(event.actor_key.as_deref())
        .bind(event.actor_device.as_ref().map(DeviceId::as_str))
        .bind(event.device.as_ref().map(DeviceId::as_str))
        .bind(event.target_user.map(|u| u.to_string()))
        .bind(event.source.as_deref())
        .bind(event.detail.as_deref())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn audit_events(&self, q: &AuditQuery) -> Result<Vec<AuditEvent>> {
        let viewer = q.viewer.to_string();
        let sql = format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_events e \
             LEFT JOIN users a ON a.id = e.actor_user LEFT JOIN users t ON t.id = e.target_user \
             WHERE (e.actor_user = ? OR e.target_user = ? OR e.device IN (SELECT device_id FROM device_owners WHERE user_id = ? AND role = 'owner')) AND e.at >= ?{} ORDER BY e.seq DESC LIMIT ?",
            if q.device.is_some() { " AND e.device = ?" } else { "" }
        );
        let mut query = sqlx::query_as::<_, AuditRow>(&sql)
            .bind(&viewer)
            .bind(&viewer)
            .bind(&viewer)
            .bind(q.since);
        if let Some(device) = &q.device {
            query = query.bind(device.as_str());
        }
        query = query.bind(i64::from(q.limit));
        query
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(AuditEvent::try_from)
            .collect()
    }

    async fn changes_since(&self, seq: i64, limit: u32) -> Result<Vec<Change>> {
        sqlx::query_as::<_, ChangeRow>(
            "SELECT seq, kind, subject FROM access_changes WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(seq)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(Change::try_from)
        .collect()
    }

    async fn last_change(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM access_changes")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn api_key(&self, key_id: &str) -> Result<Option<ApiKeyRecord>> {
        sqlx::query_as::<_, ApiKeyRow>(&format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE key_id = ?"
        ))
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await?
        .map(ApiKeyRecord::try_from)
        .transpose()
    }

    async fn revoke_session(&self, id: &str, expires_at: i64, now: i64) -> Result<()> {
        let mut tx = Tx::begin(&self.pool, "BEGIN IMMEDIATE").await?;
        sqlx::query("DELETE FROM revoked_sessions WHERE expires_at <= ?")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO revoked_sessions (id, expires_at) VALUES (?, ?) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        record_change(&mut tx, ChangeKind::Session, id, now).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn revoked_sessions(&self, now: i64) -> Result<Vec<(String, i64)>> {
        Ok(sqlx::query_as::<_, (String, i64)>(
            "SELECT id, expires_at FROM revoked_sessions WHERE expires_at > ?",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn insert_token(&self, token: &TokenRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO tokens \
             (id, kind, secret_hash, created_by, device_id, role, created_at, expires_at, used_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&token.id)
        .bind(token.kind.as_str())
        .bind(&token.secret_hash)
        .bind(token.created_by.to_string())
        .bind(token.device_id.as_ref().map(DeviceId::as_str))
        .bind(token.role.map(Role::as_str))
        .bind(token.created_at)
        .bind(token.expires_at)
        .bind(token.used_at)
        .execute(&self.pool)
        .await
        .map_err(|e| CatalogError::from_insert(e, || format!("token {:?}", token.id)))?;
        Ok(())
    }

    async fn token(&self, id: &str) -> Result<Option<TokenRecord>> {
        sqlx::query_as::<_, TokenRow>(&format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(TokenRecord::try_from)
            .transpose()
    }

    async fn tokens_created_by(&self, user: UserId, limit: u32) -> Result<Vec<TokenRecord>> {
        sqlx::query_as::<_, TokenRow>(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE created_by = ? \
             ORDER BY created_at DESC, id LIMIT ?"
        ))
        .bind(user.to_string())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(TokenRecord::try_from)
        .collect()
    }

    async fn revoke_token(&self, id: &str, user: UserId, now: i64) -> Result<Option<TokenRecord>> {
        let mut tx = Tx::begin(&self.pool, "BEGIN IMMEDIATE").await?;
        sqlx::query(
            "UPDATE tokens SET revoked_at = ? \
             WHERE id = ? AND created_by = ? AND used_at IS NULL AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(id)
        .bind(user.to_string())
        .execute(&mut *tx)
        .await?;
        let record = sqlx::query_as::<_, TokenRow>(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = ? AND created_by = ?"
        ))
        .bind(id)
        .bind(user.to_string())
        .fetch_optional(&mut *tx)
        .await?
        .map(TokenRecord::try_from)
        .transpose()?;
        tx.commit().await?;
        Ok(record)
    }

    async fn enrol_device(
        &self,
        token_id: &str,
        now: i64,
        device: &DeviceConfig,
    ) -> Result<DeviceRecord> {
        let columns = DeviceColumns::of(device)?;
        // Dropping `tx` on any early return rolls everything back.
        let mut tx = Tx::begin(&self.pool, "BEGIN IMMEDIATE").await?;
        let owner: Option<String> = sqlx::query_scalar(
            "UPDATE tokens SET used_at = ?, used_by = created_by \
             WHERE id = ? AND kind = 'setup' AND used_at IS NULL AND revoked_at IS NULL \
             AND expires_at > ? \
             RETURNING created_by",
        )
        .bind(now)
        .bind(token_id)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(owner) = owner else {
            return Err(CatalogError::TokenUnavailable);
        };
        sqlx::query(
            "INSERT INTO devices (id, name, services, capabilities, location, hardware, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(device.id.as_str())
        .bind(&device.name)
        .bind(&columns.services)
        .bind(&columns.capabilities)
        .bind(device.location.as_deref())
        .bind(&columns.hardware)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| CatalogError::from_insert(e, || format!("device {}", device.id)))?;
        sqlx::query(
            "INSERT INTO device_owners (device_id, user_id, added_at, role) \
             VALUES (?, ?, ?, 'owner')",
        )
        .bind(device.id.as_str())
        .bind(&owner)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM removed_devices WHERE id = ?")
            .bind(device.id.as_str())
            .execute(&mut *tx)
            .await?;
        let members = members_of(&mut tx, &device.id).await?;
        tx.commit().await?;
        Ok(DeviceRecord {
            id: device.id.clone(),
            name: device.name.clone(),
            services: device.services.clone(),
            capabilities: device.capabilities.clone(),
            location: device.location.clone(),
            hardware: device.hardware.clone(),
            created_at: now,
            members,
        })
    }

    async fn claim_share(&self, token_id: &str, now: i64, user: UserId) -> Result<DeviceId> {
        let user = user.to_string();
        let mut tx = Tx::begin(&self.pool, "BEGIN IMMEDIATE").await?;
        let claimed: Option<(Option<String>, Option<String>)> = sqlx::query_as(
            "UPDATE tokens SET used_at = ?, used_by = ? \
             WHERE id = ? AND kind = 'share' AND used_at IS NULL AND revoked_at IS NULL \
             AND expires_at > ? \
             RETURNING device_id, role",
        )
        .bind(now)
        .bind(&user)
        .bind(token_id)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((device, role)) = claimed else {
            return Err(CatalogError::TokenUnavailable);
        };
        let device = device.ok_or_else(|| {
            CatalogError::Corrupt(format!("share token {token_id:?} has no device"))
        })?;
        let device_id = rows::parse_device_id(&device)?;
        let role = role.as_deref().map(rows::parse_role).transpose()?;
        // Raised to owner by an owner's token; never lowered by a user's.
        sqlx::query(
            "INSERT INTO device_owners (device_id, user_id, added_at, role) VALUES (?, ?, ?, ?) \
             ON CONFLICT (device_id, user_id) DO UPDATE SET role = 'owner' \
             WHERE excluded.role = 'owner'",
        )
        .bind(&device)
        .bind(&user)
        .bind(now)
        .bind(role.unwrap_or(Role::Owner).as_str())
        .execute(&mut *tx)
        .await?;
        record_change(&mut tx, ChangeKind::Device, &device, now).await?;
        tx.commit().await?;
        Ok(device_id)
    }

    async fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>> {
        // One snapshot for the device and its owners.
        let mut tx = Tx::begin(&self.pool, "BEGIN").await?;
        let Some(row) = sqlx::query_as::<_, DeviceRow>(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?"
        ))
        .bind(id.as_str())
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(None);
        };
        let members = members_of(&mut tx, id).await?;
        tx.commit().await?;
        row.into_record(members).map(Some)
    }

    async fn devices_of(&self, user: UserId) -> Result<Vec<DeviceRecord>> {
        let user = user.to_string();
        // Both reads in one transaction so the member lists match the device list.
        let mut tx = Tx::begin(&self.pool, "BEGIN").await?;
        let devices = sqlx::query_as::<_, DeviceRow>(
            "SELECT d.id, d.name, d.services, d.capabilities, d.location, d.hardware, d.created_at \
             FROM devices d JOIN device_owners o ON o.device_id = d.id \
             WHERE o.user_id = ? ORDER BY d.name, d.id",
        )
        .bind(&user)
        .fetch_all(&mut *tx)
        .await?;
        let members = sqlx::query_as::<_, DeviceMemberRow>(&format!(
            "SELECT o.device_id, {MEMBER_COLUMNS} \
             FROM device_owners o JOIN users u ON u.id = o.user_id \
             WHERE o.device_id IN (SELECT device_id FROM device_owners WHERE user_id = ?) \
             ORDER BY {MEMBER_ORDER}"
        ))
        .bind(&user)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows::devices_with_members(devices, members)
    }

    async fn role_of(&self, device: &DeviceId, user: UserId) -> Result<Option<Role>> {
        let role: Option<String> = sqlx::query_scalar(
            "SELECT role FROM device_owners WHERE device_id = ? AND user_id = ?",
        )
        .bind(device.as_str())
        .bind(user.to_string())
        .fetch_optional(&self.pool)
        .await?;
        role.as_deref().map(rows::parse_role).transpose()
    }

    async fn remove_member(
        &self,
        device: &DeviceId,
        user: UserId,
        now: i64,
    ) -> Result<Vec<Member>> {
        let mut tx = Tx::begin(&self.pool, "BEGIN IMMEDIATE").await?;
        let members = members_of(&mut tx, device).await?;
        rows::check_removable(&members, user)?;
        sqlx::query("DELETE FROM device_owners WHERE device_id = ? AND user_id = ?")
            .bind(device.as_str())
            .bind(user.to_string())
            .execute(&mut *tx)
            .await?;
        revoke_unused_shares(&mut tx, device, user, now).await?;
        record_change(&mut tx, ChangeKind::Device, device.as_str(), now).await?;
        tx.commit().await?;
        Ok(members.into_iter().filter(|m| m.id != user).collect())
    }

    async fn set_role(
        &self,
        device: &DeviceId,
        user: UserId,
        role: Role,
        now: i64,
    ) -> Result<Vec<Member>> {
        let mut tx = Tx::begin(&self.pool, "BEGIN IMMEDIATE").await?;
        let members = members_of(&mut tx, device).await?;
        rows::check_role_change(&members, user, role)?;
        sqlx::query("UPDATE device_owners SET role = ? WHERE device_id = ? AND user_id = ?")
            .bind(role.as_str())
            .bind(device.as_str())
            .bind(user.to_string())
            .execute(&mut *tx)
            .await?;
        if role == Role::User {
            revoke_unused_shares(&mut tx, device, user, now).await?;
        }
        record_change(&mut tx, ChangeKind::Device, device.as_str(), now).await?;
        let after = members_of(&mut tx, device).await?;
        tx.commit().await?;
        Ok(after)
    }

    async fn delete_device(&self, device: &DeviceId, now: i64) -> Result<bool> {
        let mut tx = Tx::begin(&self.pool, "BEGIN IMMEDIATE").await?;
        let gone = forget_device(&mut tx, device, now).await?;
        tx.commit().await?;
        Ok(gone)
    }

    async fn is_removed(&self, device: &DeviceId) -> Result<bool> {
        let removed: i64 =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM removed_devices WHERE id = ?)")
                .bind(device.as_str())
                .fetch_one(&self.pool)
                .await?;
        Ok(removed != 0)
    }

    async fn update_device(&self, device: &DeviceConfig) -> Result<()> {
        let columns = DeviceColumns::of(device)?;
        let done = sqlx::query(
            "UPDATE devices SET name = ?, services = ?, capabilities = ?, location = ?, \
             hardware = ? WHERE id = ?",
        )
        .bind(&device.name)
        .bind(&columns.services)
        .bind(&columns.capabilities)
        .bind(device.location.as_deref())
        .bind(&columns.hardware)
        .bind(device.id.as_str())
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(CatalogError::NotFound(format!("device {}", device.id)));
        }
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn probe_write(&self, now: i64) -> Result<()> {
        let mut tx = Tx::begin(&self.pool, "BEGIN IMMEDIATE").await?;
        sqlx::query(
            "INSERT INTO readiness (id, checked_at) VALUES (1, ?) \
             ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn is_shared(&self) -> bool {
        false
    }
}

/// Forgets a device, its members and its share tokens, remembers that it was removed
/// and records the change; returns whether there was such a device.
async fn forget_device(conn: &mut SqliteConnection, device: &DeviceId, now: i64) -> Result<bool> {
    for statement in [
        "DELETE FROM device_owners WHERE device_id = ?",
        "DELETE FROM tokens WHERE device_id = ?",
    ] {
        sqlx::query(statement)
            .bind(device.as_str())
            .execute(&mut *conn)
            .await?;
    }
    let gone = sqlx::query("DELETE FROM devices WHERE id = ?")
        .bind(device.as_str())
        .execute(&mut *conn)
        .await?
        .rows_affected()
        > 0;
    if gone {
        sqlx::query(
            "INSERT INTO removed_devices (id, removed_at) VALUES (?, ?) \
             ON CONFLICT (id) DO UPDATE SET removed_at = excluded.removed_at",
        )
        .bind(device.as_str())
        .bind(now)
        .execute(&mut *conn)
        .await?;
        record_change(conn, ChangeKind::Device, device.as_str(), now).await?;
    }
    Ok(gone)
}

/// Appends to the change feed, pruning what every hub has long read.
async fn record_change(
    conn: &mut SqliteConnection,
    kind: ChangeKind,
    subject: &str,
    now: i64,
) -> Result<()> {
    sqlx::query("DELETE FROM access_changes WHERE at < ?")
        .bind(now.saturating_sub(CHANGES_KEPT_SECS))
        .execute(&mut *conn)
        .await?;
    sqlx::query("INSERT INTO access_changes (kind, subject, at) VALUES (?, ?, ?)")
        .bind(kind.as_str())
        .bind(subject)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Revokes (at `now`) the share tokens for `device` that `user` made and nobody used:
/// what a member hands out goes with their right to hand it out.
async fn revoke_unused_shares(
    conn: &mut SqliteConnection,
    device: &DeviceId,
    user: UserId,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "UPDATE tokens SET revoked_at = ? WHERE device_id = ? AND created_by = ? \
         AND used_at IS NULL AND revoked_at IS NULL",
    )
    .bind(now)
    .bind(device.as_str())
    .bind(user.to_string())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The members of `device`, owners first, each by name.
async fn members_of(conn: &mut SqliteConnection, device: &DeviceId) -> Result<Vec<Member>> {
    let members = sqlx::query_as::<_, MemberRow>(&format!(
        "SELECT {MEMBER_COLUMNS} FROM device_owners o JOIN users u ON u.id = o.user_id \
         WHERE o.device_id = ? ORDER BY {MEMBER_ORDER}"
    ))
    .bind(device.as_str())
    .fetch_all(&mut *conn)
    .await?;
    rows::members(members)
}
