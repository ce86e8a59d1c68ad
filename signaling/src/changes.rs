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

/// How often the feed is read.
pub const POLL: Duration = Duration::from_secs(1);

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

/// Reads the feed from its start, then every [`POLL`], until `stop`.
pub async fn follow(
    catalog: Arc<dyn Catalog>,
    auth: &Auth,
    registry: &Registry,
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
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

/// Applies every change after `seen`, moving `seen` on.
async fn read(
    catalog: &dyn Catalog,
    auth: &Auth,
    registry: &Registry,
    seen: &mut i64,
) -> Result<(), CatalogError> {
    loop {
        let changes = catalog.changes_since(*seen, BATCH).await?;
        let full = changes.len() == BATCH as usize;
        for change in &changes {
            apply(catalog, auth, registry, change).await?;
            *seen = change.seq;
        }
        if !changes.is_empty() {
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
