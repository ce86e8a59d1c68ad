//! Setup and share tokens: minting one (`POST /api/tokens`), claiming a share
//! (`POST /api/tokens/claim`), listing one's own (`GET /api/tokens`) and revoking one
//! before it is used (`DELETE /api/tokens/{id}`).

use std::sync::Arc;
use std::time::Duration;

use adi_protocol::views::{CocoonView, TokenList, TokenState, TokenView};
use adi_protocol::{DeviceId, ErrorCode, Role, Scope};
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::error::ApiError;
use super::extract::{Caller, Json};
use super::view;
use crate::access::{self, AccessError};
use crate::audit;
use crate::auth::unix_now_i64;
use crate::catalog::{TokenKind, TokenRecord};
use crate::registry::Grants;
use crate::tokens::{self, Grant};
use crate::HubState;

type AppState = Arc<HubState>;

/// This module's routes.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/tokens", post(create_token).get(list_tokens))
        .route("/api/tokens/claim", post(claim_token))
        .route("/api/tokens/{id}", delete(revoke_token))
}

#[derive(Deserialize)]
struct TokenRequest {
    kind: TokenKind,
    #[serde(default)]
    device_id: Option<String>,
    /// For a share token: the role it grants; `user` unless said.
    #[serde(default)]
    role: Option<Role>,
    #[serde(default = "default_token_ttl")]
    expires_in_secs: u64,
}

fn default_token_ttl() -> u64 {
    3600
}

#[derive(Serialize)]
struct TokenResponse {
    token: String,
    kind: TokenKind,
    expires_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_id: Option<DeviceId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<Role>,
}

async fn create_token(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<TokenRequest>,
) -> Result<(StatusCode, Json<TokenResponse>), ApiError> {
    caller.require(Scope::MembersWrite)?;
    let grant = match (req.kind, req.device_id.as_deref()) {
        (TokenKind::Setup, None) if req.role.is_none() => {
            // The device it enrols would lie outside the key's devices.
            if caller.device_limit().is_some() {
                return Err(AccessError::DeviceLimited.into());
            }
            Grant::Setup
        }
        (TokenKind::Setup, _) => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "a setup token enrols a new device owned by you; it takes no device_id or role",
            ))
        }
        (TokenKind::Share, None) => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "a share token needs the device_id of a device you own",
            ))
        }
        (TokenKind::Share, Some(id)) => Grant::Share {
            device: access::owned_device(&state, &caller, id).await?.id,
            role: req.role.unwrap_or(Role::User),
        },
    };
    let (device, role) = match &grant {
        Grant::Setup => (None, None),
        Grant::Share { device, role } => (Some(device.clone()), Some(*role)),
    };
    let issued = tokens::issue(
        state.catalog.as_ref(),
        caller.id,
        grant,
        Duration::from_secs(req.expires_in_secs),
        unix_now_i64(),
    )
    .await?;
    tracing::info!(token_id = %issued.id, kind = req.kind.as_str(), user = %caller.id, "token issued");
    let mut event = audit::by(&caller, audit::Kind::TokenCreated).detail(match role {
        Some(role) => format!("share token {}, role {role}", issued.id),
        None => format!("setup token {}", issued.id),
    });
    event.device = device.clone();
    audit::record(&state, event).await;
    Ok((
        StatusCode::CREATED,
        Json(TokenResponse {
            token: issued.token,
            kind: req.kind,
            expires_at: issued.expires_at,
            device_id: device,
            role,
        }),
    ))
}

#[derive(Deserialize)]
struct ClaimRequest {
    token: String,
}

async fn claim_token(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    caller: Caller,
    Json(req): Json<ClaimRequest>,
) -> Result<Json<CocoonView>, ApiError> {
    caller.require(Scope::MembersWrite)?;
    if caller.device_limit().is_some() {
        return Err(AccessError::DeviceLimited.into());
    }
    let account = crate::credential::parse(&req.token).map(|p| p.account());
    state
        .throttle
        .admit(peer.ip(), account.as_deref())
        .map_err(|wait| ApiError::throttled("share claims", wait))?;
    let device_id = tokens::claim(
        state.catalog.as_ref(),
        &req.token,
        caller.id,
        unix_now_i64(),
    )
    .await
    .inspect_err(|e| {
        warn!(user = %caller.id, "share token refused: {e}");
        if !matches!(
            e,
            tokens::TokenError::Catalog(_) | tokens::TokenError::AlreadyMember(_)
        ) {
            state.throttle.failed(peer.ip(), account.as_deref());
        }
    })?;
    tracing::info!(device_id = %device_id, user = %caller.id, "device shared");
    let claimed = audit::by(&caller, audit::Kind::ShareClaimed).on(&device_id);
    let claimed = match &account {
        Some(token) => claimed.detail(token.clone()),
        None => claimed,
    };
    audit::record(&state, claimed).await;
    let device = state
        .catalog
        .device(&device_id)
        .await?
        .ok_or_else(ApiError::not_found_device)?;
    state
        .registry
        .set_grants(&device_id, &Grants::of(&device.members));
    Ok(Json(view(&state, device, caller.id)))
}

/// Most tokens one listing shows, newest first.
const LISTED: u32 = 1000;

/// A token as its maker sees it at `now`.
fn token_view(t: TokenRecord, now: i64) -> TokenView {
    let state = if t.used_at.is_some() {
        TokenState::Used
    } else if t.revoked_at.is_some() {
        TokenState::Revoked
    } else if t.expires_at <= now {
        TokenState::Expired
    } else {
        TokenState::Active
    };
    TokenView {
        id: t.id,
        kind: t.kind.as_str().to_owned(),
        device_id: t.device_id,
        role: match t.kind {
            TokenKind::Share => Some(t.role.unwrap_or(Role::Owner)),
            TokenKind::Setup => None,
        },
        state,
        created_at: t.created_at,
        expires_at: t.expires_at,
        used_at: t.used_at,
        revoked_at: t.revoked_at,
    }
}

async fn list_tokens(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<TokenList>, ApiError> {
    caller.require(Scope::MembersWrite)?;
    let now = unix_now_i64();
    let tokens = state.catalog.tokens_created_by(caller.id, LISTED).await?;
    Ok(Json(TokenList {
        tokens: tokens.into_iter().map(|t| token_view(t, now)).collect(),
    }))
}

/// Revokes one of the caller's tokens that nobody used yet; revoking it again changes
/// nothing. Someone else's token is answered like one that does not exist.
async fn revoke_token(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<TokenView>, ApiError> {
    caller.require(Scope::MembersWrite)?;
    let now = unix_now_i64();
    let token = state
        .catalog
        .revoke_token(&id, caller.id, now)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "you made no token with this id"))?;
    if token.used_at.is_some() {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "the token was already used; remove what it granted instead",
        ));
    }
    tracing::info!(token_id = %token.id, user = %caller.id, "token revoked");
    let mut event = audit::by(&caller, audit::Kind::TokenRevoked).detail(format!(
        "{} token {}",
        token.kind.as_str(),
        token.id
    ));
    event.device = token.device_id.clone();
    audit::record(&state, event).await;
    Ok(Json(token_view(token, now)))
}
