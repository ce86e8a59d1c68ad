//! A user's API keys: making a named one, narrowed to scopes and devices and given an
//! expiry (`POST /api/keys`, its secret shown once), listing them (`GET /api/keys`,
//! never a secret) and revoking one (`DELETE /api/keys/{id or name}`), which ends every
//! session opened with it at once. All need the `keys:write` scope, and a key can only
//! make keys that allow no more than it does and expire no later than it does.

use std::sync::Arc;
use std::time::Duration;

use adi_protocol::views::{KeyCreated, KeyList, KeyView};
use adi_protocol::{DeviceId, ErrorCode, Scope};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::Router;
use serde::Deserialize;

use super::error::ApiError;
use super::extract::{Caller, Json};
use crate::access::{self, AccessError};
use crate::audit;
use crate::auth::unix_now_i64;
use crate::catalog::{ApiKeyRecord, CatalogError};
use crate::credential::{self, API_KEY_PREFIX};
use crate::HubState;

type AppState = Arc<HubState>;

/// Longest expiry a key may be given.
pub const MAX_KEY_TTL: Duration = Duration::from_secs(3650 * 24 * 3600);

/// Most characters in a key's name.
const MAX_NAME: usize = 64;

/// This module's routes.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/keys", get(list_keys).post(create_key))
        .route("/api/keys/{key}", delete(revoke_key))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyRequest {
    name: String,
    /// What it may do; every scope the caller has when absent.
    #[serde(default)]
    scopes: Option<Vec<Scope>>,
    /// The devices (ids or names) it is limited to; none when absent.
    #[serde(default)]
    devices: Option<Vec<String>>,
    #[serde(default)]
    expires_in_secs: Option<u64>,
}

/// A key as its user sees it at `now`.
pub(crate) fn key_view(k: &ApiKeyRecord, now: i64) -> KeyView {
    let state = if k.revoked_at.is_some() {
        "revoked"
    } else if k.expires_at.is_some_and(|e| e <= now) {
        "expired"
    } else {
        "active"
    };
    KeyView {
        id: k.key_id.clone(),
        name: k.name.clone(),
        scopes: k.scopes.clone(),
        devices: k.devices.clone(),
        created_at: k.created_at,
        expires_at: k.expires_at,
        revoked_at: k.revoked_at,
        state: state.to_owned(),
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::BadRequest, message)
}

/// A key name: what people type and scripts pass around.
fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.chars().count() <= MAX_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "a key name is 1 to {MAX_NAME} letters, digits or . _ - @"
        )))
    }
}

/// The scopes a new key gets: those asked for, each of which the caller's own key must
/// have; all of the caller's when none are asked for.
fn new_scopes(caller: &Caller, asked: Option<Vec<Scope>>) -> Result<Option<Vec<Scope>>, ApiError> {
    let Some(mut asked) = asked else {
        return Ok(caller.scopes().map(<[Scope]>::to_vec));
    };
    if asked.is_empty() {
        return Err(bad(
            "give at least one scope, or none at all for every scope",
        ));
    }
    asked.sort();
    asked.dedup();
    for scope in &asked {
        caller.require(*scope)?;
    }
    Ok(Some(asked))
}

/// The devices a new key is limited to: each one the caller's (by id or name) and
/// within their own key's limit; the caller's limit when none are given.
async fn new_devices(
    state: &HubState,
    caller: &Caller,
    asked: Option<Vec<String>>,
) -> Result<Option<Vec<DeviceId>>, ApiError> {
    let Some(asked) = asked else {
        return Ok(caller.device_limit().map(<[DeviceId]>::to_vec));
    };
    if asked.is_empty() {
        return Err(bad(
            "give at least one device, or none at all for every device",
        ));
    }
    let mut ids = Vec::with_capacity(asked.len());
    for given in &asked {
        let id = match access::device_by_id_or_name(state, caller, given, Scope::KeysWrite).await {
            Ok(access::Found::Live(id, _) | access::Found::Remote(id, ..)) => id,
            Ok(access::Found::Stored(device)) => device.id,
            Err(AccessError::NotFound) => {
                return Err(ApiError::new(
                    ErrorCode::NotFound,
                    format!("you have no device {given:?}"),
                ))
            }
            Err(e) => return Err(e.into()),
        };
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    Ok(Some(ids))
}

async fn create_key(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<KeyRequest>,
) -> Result<(StatusCode, Json<KeyCreated>), ApiError> {
    caller.require(Scope::KeysWrite)?;
    let name = req.name.trim();
    check_name(name)?;
    let now = unix_now_i64();
    let expires_at = match req.expires_in_secs {
        None => None,
        Some(secs) if secs == 0 || secs > MAX_KEY_TTL.as_secs() => {
            return Err(bad(format!(
                "a key's lifetime is 1 second to {} days",
                MAX_KEY_TTL.as_secs() / 86_400
            )))
        }
        Some(secs) => Some(now.saturating_add(i64::try_from(secs).unwrap_or(i64::MAX))),
    };
    // Nor may it outlive the key of the session that makes it.
    let ceiling = match caller.key.as_deref() {
        Some(kid) => state.catalog.api_key(kid).await?.and_then(|k| k.expires_at),
        None => None,
    };
    let expires_at = match (expires_at, ceiling) {
        (Some(asked), Some(ceiling)) => Some(asked.min(ceiling)),
        (None, ceiling) => ceiling,
        (asked, None) => asked,
    };
    let scopes = new_scopes(&caller, req.scopes)?;
    let devices = new_devices(&state, &caller, req.devices).await?;
    let minted = credential::mint(API_KEY_PREFIX);
    let mut record = ApiKeyRecord::unlimited(minted.id, caller.id, minted.secret_hash, now);
    record.name = Some(name.to_owned());
    record.scopes = scopes;
    record.devices = devices;
    record.expires_at = expires_at;
    match state.catalog.insert_api_key(&record).await {
        Ok(()) => {}
        Err(CatalogError::Conflict(_)) => {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("you already have a key named {name:?}; revoke it or pick another name"),
            ))
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(key_id = %record.key_id, user = %caller.id, "api key created");
    audit::record(
        &state,
        audit::by(&caller, audit::Kind::KeyCreated)
            .detail(format!("key {} ({name})", record.key_id)),
    )
    .await;
    Ok((
        StatusCode::CREATED,
        Json(KeyCreated {
            key: minted.full,
            view: key_view(&record, now),
        }),
    ))
}

async fn list_keys(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<KeyList>, ApiError> {
    caller.require(Scope::KeysWrite)?;
    let now = unix_now_i64();
    let keys = state.catalog.api_keys_of(caller.id).await?;
    Ok(Json(KeyList {
        keys: keys.iter().map(|k| key_view(k, now)).collect(),
    }))
}

/// Revokes one of the caller's keys, named by its id or by the name of a key not yet
/// revoked; revoking it again changes nothing. Every session opened with it ends at once.
async fn revoke_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(given): Path<String>,
) -> Result<Json<KeyView>, ApiError> {
    caller.require(Scope::KeysWrite)?;
    let given = given.trim();
    let keys = state.catalog.api_keys_of(caller.id).await?;
    let key_id = keys
        .iter()
        .find(|k| k.key_id == given)
        .or_else(|| {
            keys.iter()
                .find(|k| k.revoked_at.is_none() && k.name.as_deref() == Some(given))
        })
        .map(|k| k.key_id.clone())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                format!("you have no key {given:?} (give its id or its name)"),
            )
        })?;
    let now = unix_now_i64();
    let record = state
        .catalog
        .revoke_api_key(caller.id, &key_id, now)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "you have no such key"))?;
    state.auth.revoke_key(&record.key_id);
    tracing::info!(key_id = %record.key_id, user = %caller.id, "api key revoked");
    audit::record(
        &state,
        audit::by(&caller, audit::Kind::KeyRevoked).detail(format!(
            "key {} ({})",
            record.key_id,
            record.name.as_deref().unwrap_or("unnamed")
        )),
    )
    .await;
    Ok(Json(key_view(&record, now)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_are_short_and_plain() {
        for ok in ["ci", "laptop-2", "alice@work", "a.b_c"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        let long = "x".repeat(MAX_NAME + 1);
        for bad in ["", "has space", "semi;colon", "ünï", long.as_str()] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
