//! The PostgreSQL backend of the [`Catalog`]: one database shared by several hubs.
//!
//! This module owns what is PostgreSQL's alone: the schema migrations under
//! `migrations/postgres` (sqlx serialises concurrent migrators with an advisory lock),
//! its SQL and its locking; the pool is the shared `adi_storage::pool`, and rows are read
//! and written through `rows`, as for SQLite. Token use relies on
//! PostgreSQL's row locks: of two transactions updating the same unused token, the
//! second waits for the first and then re-checks `used_at IS NULL`, so exactly one wins.

use adi_protocol::{DeviceId, Role};
use adi_storage::pool;
use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool};

use super::rows::{
    self, ApiKeyRow, AuditRow, ChangeRow, DeviceColumns, DeviceMemberRow, DeviceRow, KeyColumns,
    MemberRow, TokenRow, UserRow, API_KEY_COLUMNS, AUDIT_COLUMNS, DEVICE_COLUMNS, MEMBER_COLUMNS,
    MEMBER_ORDER, TOKEN_COLUMNS, USER_COLUMNS,
};
use super::{
    ApiKeyRecord, AuditEvent, AuditQuery, Catalog, CatalogError, Change, ChangeKind, DeviceConfig,
    DeviceRecord, Member, Orphans, Result, TokenRecord, User, UserId, CHANGES_KEPT_SECS,
};

/// The catalog in a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PgCatalog {
    pool: PgPool,
    /// `postgres://USER@HOST:PORT/DATABASE`, without the password.
    location: String,
}

impl PgCatalog {
    /// Connects to the database at `url` (`postgres://...`) and brings its schema up
    /// to date.
    pub async fn connect(url: &str) -> Result<Self> {
        let options: PgConnectOptions = url.parse()?;
        Self::connect_with(options).await
    }

    /// Connects with explicit options and brings the schema up to date.
    pub async fn connect_with(options: PgConnectOptions) -> Result<Self> {
        let location = format!(
            "postgres://{}@{}:{}/{}",
            options.get_username(),
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or_default()
        );
        let pool = pool::postgres(options).await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(PgCatalog { pool, location })
    }

    /// Closes every connection, waiting for those in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[async_trait]
impl Catalog for PgCatalog {
    async fn hub_secret_or_insert(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>> {
        // A concurrent inserter waits for the first one's commit, then does nothing; the
        // read that follows sees the committed row either way.
        sqlx::query(
            "INSERT INTO hub_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(candidate)
        .execute(&self.pool)
        .await?;
        let value: Vec<u8> = sqlx::query_scalar("SELECT value FROM hub_secrets WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(value)
    }

    async fn hub_secret(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(
            sqlx::query_scalar("SELECT value FROM hub_secrets WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn remove_hub_secrets(&self, names: &[&str]) -> Result<()> {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        sqlx::query("DELETE FROM hub_secrets WHERE name = ANY($1)")
            .bind(names)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn create_user(&self, name: &str) -> Result<User> {
        let user = rows::new_user(name);
        sqlx::query("INSERT INTO users (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(user.id.to_string())
            .bind(&user.name)
            .bind(user.created_at)
            .execute(&self.pool)
            .await
            .map_err(|e| CatalogError::from_insert(e, || format!("user {name:?}")))?;
        Ok(user)
    }

    async fn user_by_name(&self, name: &str) -> Result<Option<User>> {
        sqlx::query_as::<_, UserRow>(&format!("SELECT {USER_COLUMNS} FROM users WHERE name = $1"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .map(User::try_from)
            .transpose()
    }

    async fn user(&self, id: UserId) -> Result<Option<User>> {
        sqlx::query_as::<_, UserRow>(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"))
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
        let mut tx = self.pool.begin().await?;
        let found = sqlx::query("UPDATE users SET disabled_at = $1 WHERE id = $2")
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
        let mut tx = self.pool.begin().await?;
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users WHERE id = $1)")
            .bind(&id)
            .fetch_one(&mut *tx)
            .await?;
        if !exists {
            return Err(CatalogError::NotFound(format!("user {user}")));
        }
        let orphaned: Vec<(String, String)> = sqlx::query_as(
            "SELECT d.id, d.name FROM devices d JOIN device_owners o ON o.device_id = d.id \
             WHERE o.user_id = $1 AND o.role = 'owner' AND NOT EXISTS (SELECT 1 FROM \
             device_owners x WHERE x.device_id = d.id AND x.user_id <> $2 AND x.role = 'owner') \
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
                let heir_exists: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM users WHERE id = $1 AND id <> $2)",
                )
                .bind(heir.to_string())
                .bind(&id)
                .fetch_one(&mut *tx)
                .await?;
                if !heir_exists {
                    return Err(CatalogError::NotFound(format!("user {heir}")));
                }
                for (device, _) in &orphaned {
                    sqlx::query(
                        "INSERT INTO device_owners (device_id, user_id, added_at, role) \
                         VALUES ($1, $2, $3, 'owner') \
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
            sqlx::query_scalar("SELECT device_id FROM device_owners WHERE user_id = $1")
                .bind(&id)
                .fetch_all(&mut *tx)
                .await?;
        for device in &member_of {
            record_change(&mut tx, ChangeKind::Device, device, now).await?;
        }
        for statement in [
            "DELETE FROM device_owners WHERE user_id = $1",
            "DELETE FROM tokens WHERE created_by = $1",
            "UPDATE tokens SET used_by = NULL WHERE used_by = $1",
            "DELETE FROM api_keys WHERE user_id = $1",
            "DELETE FROM users WHERE id = $1",
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
             devices, expires_at, revoked_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
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
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE user_id = $1 \
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
        let mut tx = self.pool.begin().await?;
        let revoked = sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 \
             WHERE key_id = $2 AND user_id = $3 AND revoked_at IS NULL",
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
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE key_id = $1 AND user_id = $2"
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
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM audit_events WHERE at < $1")
            .bind(event.at.saturating_sub(keep_secs))
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO audit_events (at, kind, actor_user, actor_key, actor_device, device, \
             target_user, source, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
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
             WHERE (e.actor_user = $1 OR e.target_user = $1 OR e.device IN (SELECT device_id FROM device_owners WHERE user_id = $1 AND role = 'owner')) AND e.at >= $2{} ORDER BY e.seq DESC LIMIT $3",
            if q.device.is_some() { " AND e.device = $4" } else { "" }
        );
        let query = sqlx::query_as::<_, AuditRow>(&sql)
            .bind(&viewer)
            .bind(q.since)
            .bind(i64::from(q.limit));
        let query = match &q.device {
            Some(device) => query.bind(device.as_str()),
            None => query,
        };
        query
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(AuditEvent::try_from)
            .collect()
    }

    async fn changes_since(&self, seq: i64, limit: u32) -> Result<Vec<Change>> {
        sqlx::query_as::<_, ChangeRow>(
            "SELECT seq, kind, subject FROM access_changes WHERE seq > $1 ORDER BY seq LIMIT $2",
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
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE key_id = $1"
        ))
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await?
        .map(ApiKeyRecord::try_from)
        .transpose()
    }

    async fn revoke_session(&self, id: &str, expires_at: i64, now: i64) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM revoked_sessions WHERE expires_at <= $1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO revoked_sessions (id, expires_at) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
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
            "SELECT id, expires_at FROM revoked_sessions WHERE expires_at > $1",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn insert_token(&self, token: &TokenRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO tokens \
             (id, kind, secret_hash, created_by, device_id, role, created_at, expires_at, used_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
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
        sqlx::query_as::<_, TokenRow>(&format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(TokenRecord::try_from)
            .transpose()
    }

    async fn tokens_created_by(&self, user: UserId, limit: u32) -> Result<Vec<TokenRecord>> {
        sqlx::query_as::<_, TokenRow>(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE created_by = $1 \
             ORDER BY created_at DESC, id LIMIT $2"
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
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE tokens SET revoked_at = $1 \
             WHERE id = $2 AND created_by = $3 AND used_at IS NULL AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(id)
        .bind(user.to_string())
        .execute(&mut *tx)
        .await?;
        let record = sqlx::query_as::<_, TokenRow>(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = $1 AND created_by = $2"
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
        let mut tx = self.pool.begin().await?;
        let owner: Option<String> = sqlx::query_scalar(
            "UPDATE tokens SET used_at = $1, used_by = created_by \
             WHERE id = $2 AND kind = 'setup' AND used_at IS NULL AND revoked_at IS NULL \
             AND expires_at > $1 \
             RETURNING created_by",
        )
        .bind(now)
        .bind(token_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(owner) = owner else {
            return Err(CatalogError::TokenUnavailable);
        };
        sqlx::query(
            "INSERT INTO devices (id, name, services, capabilities, location, hardware, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
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
             VALUES ($1, $2, $3, 'owner')",
        )
        .bind(device.id.as_str())
        .bind(&owner)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM removed_devices WHERE id = $1")
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
        let mut tx = self.pool.begin().await?;
        let claimed: Option<(Option<String>, Option<String>)> = sqlx::query_as(
            "UPDATE tokens SET used_at = $1, used_by = $2 \
             WHERE id = $3 AND kind = 'share' AND used_at IS NULL AND revoked_at IS NULL AND expires_at > $1 \
             RETURNING device_id, role",
        )
        .bind(now)
        .bind(&user)
        .bind(token_id)
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
            "INSERT INTO device_owners (device_id, user_id, added_at, role) \
             VALUES ($1, $2, $3, $4) \
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
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await?;
        let Some(row) = sqlx::query_as::<_, DeviceRow>(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1"
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
        // One snapshot, so the member lists match the device list.
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await?;
        let devices = sqlx::query_as::<_, DeviceRow>(
            "SELECT d.id, d.name, d.services, d.capabilities, d.location, d.hardware, d.created_at \
             FROM devices d JOIN device_owners o ON o.device_id = d.id \
             WHERE o.user_id = $1 ORDER BY d.name, d.id",
        )
        .bind(&user)
        .fetch_all(&mut *tx)
        .await?;
        let members = sqlx::query_as::<_, DeviceMemberRow>(&format!(
            "SELECT o.device_id, {MEMBER_COLUMNS} \
             FROM device_owners o JOIN users u ON u.id = o.user_id \
             WHERE o.device_id IN (SELECT device_id FROM device_owners WHERE user_id = $1) \
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
            "SELECT role FROM device_owners WHERE device_id = $1 AND user_id = $2",
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
        let mut tx = self.pool.begin().await?;
        lock_device(&mut tx, device).await?;
        let members = members_of(&mut tx, device).await?;
        rows::check_removable(&members, user)?;
        sqlx::query("DELETE FROM device_owners WHERE device_id = $1 AND user_id = $2")
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
        let mut tx = self.pool.begin().await?;
        lock_device(&mut tx, device).await?;
        let members = members_of(&mut tx, device).await?;
        rows::check_role_change(&members, user, role)?;
        sqlx::query("UPDATE device_owners SET role = $1 WHERE device_id = $2 AND user_id = $3")
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
        let mut tx = self.pool.begin().await?;
        lock_device(&mut tx, device).await?;
        let gone = forget_device(&mut tx, device, now).await?;
        tx.commit().await?;
        Ok(gone)
    }

    async fn is_removed(&self, device: &DeviceId) -> Result<bool> {
        let removed: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM removed_devices WHERE id = $1)")
                .bind(device.as_str())
                .fetch_one(&self.pool)
                .await?;
        Ok(removed)
    }

    async fn update_device(&self, device: &DeviceConfig) -> Result<()> {
        let columns = DeviceColumns::of(device)?;
        let done = sqlx::query(
            "UPDATE devices SET name = $1, services = $2, capabilities = $3, location = $4, \
             hardware = $5 WHERE id = $6",
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
        sqlx::query(
            "INSERT INTO readiness (id, checked_at) VALUES (1, $1) \
             ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
        )
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    fn location(&self) -> String {
        self.location.clone()
    }

    fn is_shared(&self) -> bool {
        true
    }
}

/// Forgets a device, its members and its share tokens, remembers that it was removed
/// and records the change; returns whether there was such a device.
async fn forget_device(conn: &mut PgConnection, device: &DeviceId, now: i64) -> Result<bool> {
    for statement in [
        "DELETE FROM device_owners WHERE device_id = $1",
        "DELETE FROM tokens WHERE device_id = $1",
    ] {
        sqlx::query(statement)
            .bind(device.as_str())
            .execute(&mut *conn)
            .await?;
    }
    let gone = sqlx::query("DELETE FROM devices WHERE id = $1")
        .bind(device.as_str())
        .execute(&mut *conn)
        .await?
        .rows_affected()
        > 0;
    if gone {
        sqlx::query(
            "INSERT INTO removed_devices (id, removed_at) VALUES ($1, $2) \
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
    conn: &mut PgConnection,
    kind: ChangeKind,
    subject: &str,
    now: i64,
) -> Result<()> {
    sqlx::query("DELETE FROM access_changes WHERE at < $1")
        .bind(now.saturating_sub(CHANGES_KEPT_SECS))
        .execute(&mut *conn)
        .await?;
    sqlx::query("INSERT INTO access_changes (kind, subject, at) VALUES ($1, $2, $3)")
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
    conn: &mut PgConnection,
    device: &DeviceId,
    user: UserId,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "UPDATE tokens SET revoked_at = $1 WHERE device_id = $2 AND created_by = $3 \
         AND used_at IS NULL AND revoked_at IS NULL",
    )
    .bind(now)
    .bind(device.as_str())
    .bind(user.to_string())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Locks `device`'s row until the transaction ends: what changes its members or removes
/// it takes this lock first, so two owners removing or demoting each other at once
/// cannot leave it with none.
async fn lock_device(conn: &mut PgConnection, device: &DeviceId) -> Result<()> {
    sqlx::query("SELECT id FROM devices WHERE id = $1 FOR UPDATE")
        .bind(device.as_str())
        .execute(conn)
        .await?;
    Ok(())
}

/// The members of `device`, owners first, each by name.
async fn members_of(conn: &mut PgConnection, device: &DeviceId) -> Result<Vec<Member>> {
    let members = sqlx::query_as::<_, MemberRow>(&format!(
        "SELECT {MEMBER_COLUMNS} FROM device_owners o JOIN users u ON u.id = o.user_id \
         WHERE o.device_id = $1 ORDER BY {MEMBER_ORDER}"
    ))
    .bind(device.as_str())
    .fetch_all(&mut *conn)
    .await?;
    rows::members(members)
}
