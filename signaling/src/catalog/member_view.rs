//! The RAM view of which devices each user is a member of, and of which users exist, in
//! front of the catalog, so that a merged view ("all my tasks") and the check that a
//! session's user still exists, made on every REST request, do not read the catalog.
//!
//! It owns two answers only, [`Catalog::devices_of`] (which [`Catalog::device_of`], what
//! every request to a device's routes asks, is answered from) and
//! [`Catalog::user_exists`] (when the user does), each kept per user with the
//! generation it was read at. Every write through this hub that can change a membership, a device's
//! name or capabilities (enrol, claim, member removal, deletion, a device's new
//! configuration, a user's removal or disabling) moves the generation on after it
//! returns, and so does every change the hub reads from the catalog's change feed (a
//! change made by an admin command or another hub; the feed is read every second, every
//! 250 ms in a cluster), which makes every view read before it stale. Devices enrolled or
//! reconfigured through another hub of a cluster record no change in the feed, so on a
//! shared catalog a view is also stale after [`SHARED_MAX_AGE`], the cluster's feed
//! interval: what one hub does is seen by the others within the same bound as today.
//!
//! It must never decide access: `access` filters what this view returns as it filtered
//! the catalog's answer. Nor may it answer from a view read before a write this hub
//! made returned: the generation is read before the catalog is, so a view that raced a
//! write is never used.
//!
//! That a user exists is also kept at most [`USER_MAX_AGE`], the interval at which a
//! hub reads the change feed, on any catalog: a user removed by any means, even one that
//! writes no change, stops being seen within it, as every other removal of access. Only
//! that check is answered from here; signing in, and everything that reads a user's
//! record, reads the catalog.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use adi_protocol::{DeviceId, Role};
use async_trait::async_trait;
use dashmap::DashMap;

use super::{
    ApiKeyRecord, AuditEvent, AuditQuery, Catalog, Change, DeviceConfig, DeviceRecord, Member,
    Orphans, Result, TokenRecord, User, UserId,
};

/// How long a view of a shared catalog is used at most: the interval at which a hub of
/// several reads the change feed.
pub const SHARED_MAX_AGE: Duration = crate::changes::CLUSTER_POLL;
/// How long that a user exists is used at most, on any catalog.
pub const USER_MAX_AGE: Duration = crate::changes::POLL;

/// One user's answer, as read at a generation.
struct View<T> {
    generation: u64,
    read_at: Instant,
    value: T,
}

/// A [`Catalog`] that keeps each user's devices, and which users exist, in RAM between
/// the changes that could alter them; every other call goes straight to the catalog it
/// wraps.
pub struct MemberView {
    inner: Arc<dyn Catalog>,
    generation: AtomicU64,
    views: DashMap<UserId, View<Arc<[DeviceRecord]>>>,
    users: DashMap<UserId, View<()>>,
    max_age: Option<Duration>,
    /// How long that a user exists is used at most: [`USER_MAX_AGE`], or less on a
    /// shared catalog.
    user_max_age: Duration,
}

impl MemberView {
    /// A view in front of `inner`, empty until asked.
    pub fn new(inner: Arc<dyn Catalog>) -> Self {
        let max_age = inner.is_shared().then_some(SHARED_MAX_AGE);
        MemberView {
            inner,
            generation: AtomicU64::new(0),
            views: DashMap::new(),
            users: DashMap::new(),
            max_age,
            user_max_age: max_age.map_or(USER_MAX_AGE, |age| age.min(USER_MAX_AGE)),
        }
    }

    /// Makes every view read so far stale, and drops them.
    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.views.clear();
        self.users.clear();
    }

    /// `user`'s answer in `views`, unless a change or its age (over `max_age`, when
    /// one is set) made it stale.
    fn fresh<T: Clone>(
        &self,
        views: &DashMap<UserId, View<T>>,
        user: UserId,
        max_age: Option<Duration>,
    ) -> Option<T> {
        let view = views.get(&user)?;
        let current = view.generation == self.generation.load(Ordering::SeqCst);
        let young = max_age.is_none_or(|age| view.read_at.elapsed() < age);
        (current && young).then(|| view.value.clone())
    }

    /// `user`'s devices: the view, or else the catalog's answer, kept as the view (a
    /// change that lands while the catalog is read leaves it stale already); and
    /// whether they came from the view.
    async fn devices(&self, user: UserId) -> Result<(Arc<[DeviceRecord]>, bool)> {
        if let Some(devices) = self.fresh(&self.views, user, self.max_age) {
            return Ok((devices, true));
        }
        let generation = self.generation.load(Ordering::SeqCst);
        let read_at = Instant::now();
        let devices: Arc<[DeviceRecord]> = self.inner.devices_of(user).await?.into();
        let view = View {
            generation,
            read_at,
            value: Arc::clone(&devices),
        };
        self.views.insert(user, view);
        Ok((devices, false))
    }
}

#[async_trait]
impl Catalog for MemberView {
    async fn devices_of(&self, user: UserId) -> Result<Vec<DeviceRecord>> {
        Ok(self.devices(user).await?.0.to_vec())
    }

    /// From the view when it lists the device; otherwise from the catalog, as a device
    /// enrolled through another hub of a cluster is missing from a view read before it
    /// (then the view is dropped, so the next listing shows it too). A list just read
    /// from the catalog is its answer already.
    async fn device_of(&self, user: UserId, id: &DeviceId) -> Result<Option<DeviceRecord>> {
        let (devices, from_view) = self.devices(user).await?;
        if let Some(device) = devices.iter().find(|d| &d.id == id) {
            return Ok(Some(device.clone()));
        }
        if !from_view {
            return Ok(None);
        }
        let device = self.inner.device_of(user, id).await?;
        if device.is_some() {
            self.views.remove(&user);
        }
        Ok(device)
    }

    async fn changes_since(&self, seq: i64, limit: u32) -> Result<Vec<Change>> {
        let changes = self.inner.changes_since(seq, limit).await?;
        if !changes.is_empty() {
            self.changed();
        }
        Ok(changes)
    }

    async fn enrol_device(
        &self,
        token_id: &str,
        now: i64,
        device: &DeviceConfig,
    ) -> Result<DeviceRecord> {
        let done = self.inner.enrol_device(token_id, now, device).await;
        self.changed();
        done
    }

    async fn claim_share(&self, token_id: &str, now: i64, user: UserId) -> Result<DeviceId> {
        let done = self.inner.claim_share(token_id, now, user).await;
        self.changed();
        done
    }

    async fn remove_member(
        &self,
        device: &DeviceId,
        user: UserId,
        now: i64,
    ) -> Result<Vec<Member>> {
        let done = self.inner.remove_member(device, user, now).await;
        self.changed();
        done
    }

    async fn set_role(
        &self,
        device: &DeviceId,
        user: UserId,
        role: Role,
        now: i64,
    ) -> Result<Vec<Member>> {
        let done = self.inner.set_role(device, user, role, now).await;
        self.changed();
        done
    }

    async fn delete_device(&self, device: &DeviceId, now: i64) -> Result<bool> {
        let done = self.inner.delete_device(device, now).await;
        self.changed();
        done
    }

    async fn update_device(&self, device: &DeviceConfig) -> Result<()> {
        let done = self.inner.update_device(device).await;
        self.changed();
        done
    }

    async fn remove_user(
        &self,
        user: UserId,
        orphans: Orphans,
        now: i64,
    ) -> Result<Vec<(DeviceId, String)>> {
        let done = self.inner.remove_user(user, orphans, now).await;
        self.changed();
        done
    }

    async fn set_user_disabled(&self, user: UserId, at: Option<i64>, now: i64) -> Result<bool> {
        let done = self.inner.set_user_disabled(user, at, now).await;
        self.changed();
        done
    }

    async fn hub_secret_or_insert(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>> {
        self.inner.hub_secret_or_insert(name, candidate).await
    }

    async fn hub_secret(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.inner.hub_secret(name).await
    }

    async fn remove_hub_secrets(&self, names: &[&str]) -> Result<()> {
        self.inner.remove_hub_secrets(names).await
    }

    async fn create_user(&self, name: &str) -> Result<User> {
        self.inner.create_user(name).await
    }

    async fn user_by_name(&self, name: &str) -> Result<Option<User>> {
        self.inner.user_by_name(name).await
    }

    async fn user(&self, id: UserId) -> Result<Option<User>> {
        self.inner.user(id).await
    }

    async fn user_exists(&self, id: UserId) -> Result<bool> {
        if self
            .fresh(&self.users, id, Some(self.user_max_age))
            .is_some()
        {
            return Ok(true);
        }
        let generation = self.generation.load(Ordering::SeqCst);
        let read_at = Instant::now();
        let exists = self.inner.user_exists(id).await?;
        // Only a user who exists is kept: one who does not is asked for again.
        if exists {
            let view = View {
                generation,
                read_at,
                value: (),
            };
            self.users.insert(id, view);
        }
        Ok(exists)
    }

    async fn users(&self) -> Result<Vec<User>> {
        self.inner.users().await
    }

    async fn insert_api_key(&self, key: &ApiKeyRecord) -> Result<()> {
        self.inner.insert_api_key(key).await
    }

    async fn api_key(&self, key_id: &str) -> Result<Option<ApiKeyRecord>> {
        self.inner.api_key(key_id).await
    }

    async fn api_keys_of(&self, user: UserId) -> Result<Vec<ApiKeyRecord>> {
        self.inner.api_keys_of(user).await
    }

    async fn revoke_api_key(
        &self,
        user: UserId,
        key_id: &str,
        now: i64,
    ) -> Result<Option<ApiKeyRecord>> {
        self.inner.revoke_api_key(user, key_id, now).await
    }

    async fn revoked_api_keys(&self) -> Result<Vec<String>> {
        self.inner.revoked_api_keys().await
    }

    async fn record_audit(&self, event: &AuditEvent, keep_secs: i64) -> Result<()> {
        self.inner.record_audit(event, keep_secs).await
    }

    async fn audit_events(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>> {
        self.inner.audit_events(query).await
    }

    async fn last_change(&self) -> Result<i64> {
        self.inner.last_change().await
    }

    async fn revoke_session(&self, id: &str, expires_at: i64, now: i64) -> Result<()> {
        self.inner.revoke_session(id, expires_at, now).await
    }

    async fn revoked_sessions(&self, now: i64) -> Result<Vec<(String, i64)>> {
        self.inner.revoked_sessions(now).await
    }

    async fn insert_token(&self, token: &TokenRecord) -> Result<()> {
        self.inner.insert_token(token).await
    }

    async fn token(&self, id: &str) -> Result<Option<TokenRecord>> {
        self.inner.token(id).await
    }

    async fn tokens_created_by(&self, user: UserId, limit: u32) -> Result<Vec<TokenRecord>> {
        self.inner.tokens_created_by(user, limit).await
    }

    async fn revoke_token(&self, id: &str, user: UserId, now: i64) -> Result<Option<TokenRecord>> {
        self.inner.revoke_token(id, user, now).await
    }

    async fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>> {
        self.inner.device(id).await
    }

    async fn role_of(&self, device: &DeviceId, user: UserId) -> Result<Option<Role>> {
        self.inner.role_of(device, user).await
    }

    async fn is_removed(&self, device: &DeviceId) -> Result<bool> {
        self.inner.is_removed(device).await
    }

    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }

    async fn probe_write(&self, now: i64) -> Result<()> {
        self.inner.probe_write(now).await
    }

    fn location(&self) -> String {
        self.inner.location()
    }

    fn is_shared(&self) -> bool {
        self.inner.is_shared()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{SqliteCatalog, TokenKind};

    const NOW: i64 = 1_800_000_000;

    fn token(id: &str, kind: TokenKind, by: UserId, device: Option<&DeviceId>) -> TokenRecord {
        TokenRecord {
            id: id.to_owned(),
            kind,
            secret_hash: id.as_bytes().to_vec(),
            created_by: by,
            device_id: device.cloned(),
            role: Some(Role::User),
            created_at: NOW,
            expires_at: NOW + 3600,
            used_at: None,
            revoked_at: None,
        }
    }

    fn config(id: &DeviceId, name: &str) -> DeviceConfig {
        DeviceConfig {
            id: id.clone(),
            name: name.to_owned(),
            services: Vec::new(),
            capabilities: Vec::new(),
            location: None,
            hardware: None,
        }
    }

    async fn ids(view: &MemberView, user: UserId) -> Vec<DeviceId> {
        view.devices_of(user)
            .await
            .expect("devices")
            .into_iter()
            .map(|d| d.id)
            .collect()
    }

    /// A catalog file in `dir`, and a view in front of it.
    async fn catalog_and_view(dir: &std::path::Path) -> (Arc<dyn Catalog>, MemberView) {
        let inner: Arc<dyn Catalog> = Arc::new(
            SqliteCatalog::open(&dir.join("catalog.db"))
                .await
                .expect("catalog"),
        );
        let view = MemberView::new(Arc::clone(&inner));
        (inner, view)
    }

    /// Enrol, claim, removal and deletion through the hub show at once; a change made
    /// behind the view's back (another hub, an admin command) shows once the change
    /// feed is read.
    #[tokio::test]
    async fn a_users_devices_follow_every_membership_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (inner, view) = catalog_and_view(dir.path()).await;
        let alice = view.create_user("alice").await.expect("alice").id;
        let bob = view.create_user("bob").await.expect("bob").id;
        assert!(ids(&view, alice).await.is_empty());
        assert!(ids(&view, bob).await.is_empty());

        let device = DeviceId::from_mac(&[7; 16]);
        view.insert_token(&token("setup", TokenKind::Setup, alice, None))
            .await
            .expect("setup token");
        view.enrol_device("setup", NOW, &config(&device, "lab"))
            .await
            .expect("enrol");
        assert_eq!(ids(&view, alice).await, vec![device.clone()], "enrolled");

        view.insert_token(&token("share", TokenKind::Share, alice, Some(&device)))
            .await
            .expect("share token");
        view.claim_share("share", NOW, bob).await.expect("claim");
        assert_eq!(ids(&view, bob).await, vec![device.clone()], "claimed");
        assert!(view
            .device_of(bob, &device)
            .await
            .expect("device")
            .is_some());

        view.update_device(&config(&device, "renamed"))
            .await
            .expect("rename");
        let names: Vec<String> = view
            .devices_of(alice)
            .await
            .expect("devices")
            .into_iter()
            .map(|d| d.name)
            .collect();
        assert_eq!(names, ["renamed"]);
        assert_eq!(ids(&view, bob).await, vec![device.clone()], "still bob's");

        inner
            .remove_member(&device, bob, NOW)
            .await
            .expect("removed elsewhere");
        let seen = view.last_change().await.expect("last change");
        assert_eq!(
            ids(&view, bob).await,
            vec![device.clone()],
            "not yet read from the feed"
        );
        assert!(!view
            .changes_since(seen - 1, 10)
            .await
            .expect("feed")
            .is_empty());
        assert!(
            ids(&view, bob).await.is_empty(),
            "removed, once the feed is read"
        );
        assert!(
            view.device_of(bob, &device)
                .await
                .expect("device")
                .is_none(),
            "nor found by id"
        );
        assert_eq!(
            view.device_of(alice, &device)
                .await
                .expect("device")
                .map(|d| d.name),
            Some("renamed".to_owned())
        );

        view.delete_device(&device, NOW).await.expect("delete");
        assert!(ids(&view, alice).await.is_empty(), "deleted");
    }

    /// A user removed through the hub is gone at once; one removed behind the view's
    /// back, once the change feed is read; one removed without a trace in the feed,
    /// once the view of them is [`USER_MAX_AGE`] old. Nothing else is kept: a user's
    /// record is always read from the catalog.
    #[tokio::test]
    async fn a_removed_user_is_gone_after_the_removal_the_feed_or_the_age_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (inner, view) = catalog_and_view(dir.path()).await;
        let [alice, bob, carol] = ["alice", "bob", "carol"];
        let mut ids = Vec::new();
        for name in [alice, bob, carol] {
            let id = view.create_user(name).await.expect("user").id;
            assert!(view.user_exists(id).await.expect("exists"), "{name}");
            ids.push(id);
        }
        let [alice, bob, carol] = [ids[0], ids[1], ids[2]];

        view.set_user_disabled(alice, Some(NOW), NOW)
            .await
            .expect("disable");
        assert_eq!(
            view.user(alice)
                .await
                .expect("alice")
                .and_then(|u| u.disabled_at),
            Some(NOW),
            "the record is the catalog's"
        );
        assert!(
            view.user_exists(alice).await.expect("alice"),
            "disabled, not gone"
        );
        view.remove_user(alice, Orphans::Delete, NOW)
            .await
            .expect("remove");
        assert!(!view.user_exists(alice).await.expect("alice"), "removed");

        assert!(view.user_exists(bob).await.expect("bob"));
        let before = view.last_change().await.expect("last change");
        inner
            .remove_user(bob, Orphans::Delete, NOW)
            .await
            .expect("removed elsewhere");
        assert!(
            view.user_exists(bob).await.expect("bob"),
            "not yet read from the feed"
        );
        assert!(!view
            .changes_since(before, 10)
            .await
            .expect("feed")
            .is_empty());
        assert!(
            !view.user_exists(bob).await.expect("bob"),
            "read from the feed"
        );

        assert!(view.user_exists(carol).await.expect("carol"));
        inner
            .remove_user(carol, Orphans::Delete, NOW)
            .await
            .expect("removed elsewhere");
        tokio::time::sleep(USER_MAX_AGE + Duration::from_millis(50)).await;
        assert!(
            !view.user_exists(carol).await.expect("carol"),
            "gone once the view is too old, feed or not"
        );
    }
}
