//! The access-change feed, followed: every second the hub reads what the catalog's feed
//! holds that it has not seen (a session signed out, a key revoked, a user disabled or
//! removed, a device's members changed or the device deleted) and applies it to what it
//! keeps in RAM: the refused sessions, keys and users in [`Auth`](crate::auth::Auth),
//! and the members of connected devices in the registry. Changes made through this
//! hub's own API are applied at once as well; the feed is how a change made elsewhere
//! (an admin command on the hub host, another hub on the same database) takes effect
//! here within a second. Applying a change twice does nothing more.
//!
//! At start the hub replays the whole feed (it keeps what can still matter) after
//! loading every revoked key and disabled user, so nothing refused before a restart is
//! accepted after it.

use std::sync::Arc;
use std::time::Duration;

use adi_protocol::DeviceId;
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::catalog::{Catalog, CatalogError, Change, ChangeKind, UserId};
use crate::registry::{Grants, Registry, Stop};

/// How often the feed is read by a hub that runs alone.
pub const POLL: Duration = Duration::from_secs(1);
/// How often a hub of several reads it: a change made through another hub must be
/// seen by every hub within a second, reading and applying it included.
pub const CLUSTER_POLL: Duration = Duration::from_millis(250);

/// Most changes read at once.
const BATCH: u32 = 1000;

/// Loads what the catalog refuses into `auth`: every revoked key and disabled user.
pub async fn load(catalog: &dyn Catalog, auth: &Auth) -> Result<(), CatalogError> {
    for key in catalog.revoked_api_keys().await? {
        auth.revoke_key(&key);
    }
    for user in catalog.users().await? {
        if user.disabled_at.is_some() {
            auth.set_user_disabled(user.id, true);
        }
    }
    Ok(())
}

/// Reads the feed from its start, then every `poll`, until `stop`.
pub async fn follow(
    catalog: Arc<dyn Catalog>,
    auth: &Auth,
    registry: &Registry,
    poll: Duration,
    stop: CancellationToken,
) {
    let mut seen = 0;
    let mut failing = false;
    loop {
        match read(catalog.as_ref(), auth, registry, &mut seen).await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("the access-change feed is read again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(
                    "reading the access-change feed failed (retrying every second): {e}"
                );
            }
            Err(_) => {}
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(poll) => {}
        }
    }
}

/// Applies every change after `seen`, moving `seen` on. A batch is applied once per
/// subject, not once per change: a replay at start of a month of sign-outs reads the
/// signed-out sessions once, not once per sign-out.
async fn read(
    catalog: &dyn Catalog,
    auth: &Auth,
    registry: &Registry,
    seen: &mut i64,
) -> Result<(), CatalogError> {
    loop {
        let changes = catalog.changes_since(*seen, BATCH).await?;
        let full = changes.len() == BATCH as usize;
        let mut applied = std::collections::HashSet::new();
        for change in &changes {
            // Sessions are reloaded whole, so one session change stands for all.
            let key = match change.kind {
                ChangeKind::Session => (change.kind.as_str(), ""),
                kind => (kind.as_str(), change.subject.as_str()),
            };
            if applied.insert(key) {
                apply(catalog, auth, registry, change).await?;
            }
        }
        if let Some(last) = changes.last() {
            *seen = last.seq;
            auth.announce_change();
        }
        if !full {
            return Ok(());
        }
    }
}

/// Brings what RAM holds in line with the catalog after one change.
async fn apply(
    catalog: &dyn Catalog,
    auth: &Auth,
    registry: &Registry,
    change: &Change,
) -> Result<(), CatalogError> {
    match change.kind {
        ChangeKind::Session => {
            for (sid, expires_at) in catalog
                .revoked_sessions(crate::auth::unix_now_i64())
                .await?
            {
                auth.revoke(&sid, u64::try_from(expires_at).unwrap_or(0));
            }
        }
        ChangeKind::Key => auth.revoke_key(&change.subject),
        ChangeKind::User => {
            let Ok(id) = uuid::Uuid::parse_str(&change.subject).map(UserId) else {
                return Ok(());
            };
            let gone = catalog
                .user(id)
                .await?
                .is_none_or(|u| u.disabled_at.is_some());
            auth.set_user_disabled(id, gone);
        }
        ChangeKind::Device => {
            let Ok(id) = change.subject.parse::<DeviceId>() else {
                return Ok(());
            };
            match catalog.device(&id).await? {
                Some(device) => registry.set_grants(&id, &Grants::of(&device.members)),
                None => {
                    registry.set_grants(&id, &Grants::default());
                    registry.stop(&id, Stop::Removed);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Claims;
    use crate::catalog::{ApiKeyRecord, SqliteCatalog};
    use std::time::Duration;

    fn claims(user: UserId, sid: &str, kid: &str) -> Claims {
        Claims {
            sub: user,
            name: "alice".into(),
            iat: 0,
            exp: u64::MAX,
            iss: "adi-hub".into(),
            sid: Some(sid.into()),
            kid: Some(kid.into()),
            scp: None,
            dev: None,
        }
    }

    #[tokio::test]
    async fn a_replayed_feed_refuses_everything_it_names_once_applied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let catalog = SqliteCatalog::open(&dir.path().join("catalog.db"))
            .await
            .expect("catalog");
        let now = crate::auth::unix_now_i64();
        let alice = catalog.create_user("alice").await.expect("user");
        let bob = catalog.create_user("bob").await.expect("user");
        for sid in ["s1", "s2", "s3"] {
            catalog
                .revoke_session(sid, now + 3600, now)
                .await
                .expect("revoke");
        }
        let key = ApiKeyRecord::unlimited("k1".into(), alice.id, vec![1], now);
        catalog.insert_api_key(&key).await.expect("key");
        catalog
            .revoke_api_key(alice.id, "k1", now)
            .await
            .expect("revoke key");
        catalog
            .set_user_disabled(bob.id, Some(now), now)
            .await
            .expect("disable");

        // A hub that starts after all of it, reading the feed from its start.
        let auth = Auth::new(b"k", Duration::from_secs(60));
        let registry = Registry::new(Duration::from_secs(5));
        let mut seen = 0;
        read(&catalog, &auth, &registry, &mut seen)
            .await
            .expect("read");
        assert_eq!(seen, catalog.last_change().await.expect("last"));
        for sid in ["s1", "s2", "s3"] {
            assert!(
                auth.ended(&claims(alice.id, sid, "k0")).is_some(),
                "session {sid} refused"
            );
        }
        assert!(
            auth.ended(&claims(alice.id, "s9", "k1")).is_some(),
            "key k1 refused"
        );
        assert!(
            auth.ended(&claims(bob.id, "s9", "k0")).is_some(),
            "bob refused"
        );
        assert!(
            auth.ended(&claims(alice.id, "s9", "k0")).is_none(),
            "alice's other sessions go on"
        );
        // Nothing new: reading again changes nothing and moves nowhere.
        read(&catalog, &auth, &registry, &mut seen)
            .await
            .expect("read");
        assert_eq!(seen, catalog.last_change().await.expect("last"));
    }
}
