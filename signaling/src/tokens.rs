//! One-time setup and share tokens: minting, checking and redeeming them.
//!
//! Checks happen in a fixed order so the refusal names the real reason: format, then
//! existence (an unknown id and a wrong secret look the same), then kind, use,
//! revocation and expiry. Redemption is one catalog transaction guarded by "still
//! unused, unrevoked and unexpired", so two concurrent redeemers cannot both win, a
//! revocation cannot lose to a redemption already checked, and a failure leaves nothing
//! half-made.

use std::time::Duration;

use adi_protocol::{DeviceId, ErrorCode, Role};

use crate::catalog::{
    Catalog, CatalogError, DeviceConfig, DeviceRecord, TokenKind, TokenRecord, UserId,
};
use crate::credential::{self, SETUP_PREFIX, SHARE_PREFIX};

/// Longest lifetime a token may be given: long enough to ship a box, short enough
/// that a forgotten token does not stay a standing invitation.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Why a token was refused, worded for the person who presented it.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Not of the token format.
    #[error("the token is malformed (not an adi setup or share token)")]
    Malformed,
    /// Unknown to this hub, or its secret part is wrong.
    #[error("the token is unknown to this hub")]
    Unknown,
    /// Past its expiry.
    #[error("the token has expired")]
    Expired,
    /// Already used once.
    #[error("the token was already used")]
    Used,
    /// Taken back by its creator before anyone used it.
    #[error("the token was revoked by whoever made it")]
    Revoked,
    /// A token of the other kind.
    #[error("this is a {actual} token, but a {expected} token is needed here")]
    WrongKind {
        /// What was needed.
        expected: &'static str,
        /// What was given.
        actual: &'static str,
    },
    /// Lifetime out of range.
    #[error("token lifetime must be between 1 second and {} days", MAX_TTL.as_secs() / 86400)]
    BadTtl,
    /// A share token claimed by a member it would give nothing more: it is not spent,
    /// so it still works for whoever it was meant for.
    #[error(
        "you are already a member of this device (as {0}); the share token was not used and \
         still works for whoever you give it to"
    )]
    AlreadyMember(Role),
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

impl TokenError {
    /// The protocol error code for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            TokenError::Malformed => ErrorCode::TokenMalformed,
            TokenError::Unknown => ErrorCode::TokenUnknown,
            TokenError::Expired => ErrorCode::TokenExpired,
            TokenError::Used => ErrorCode::TokenUsed,
            TokenError::Revoked => ErrorCode::TokenRevoked,
            TokenError::WrongKind { .. } | TokenError::BadTtl => ErrorCode::BadRequest,
            TokenError::AlreadyMember(_) => ErrorCode::Conflict,
            TokenError::Catalog(e) => e.code(),
        }
    }
}

/// A token just minted: the full string is shown once and never stored.
#[derive(Debug)]
pub struct Issued {
    /// The token to hand over.
    pub token: String,
    /// Public id, safe to log.
    pub id: String,
    /// Unix seconds.
    pub expires_at: i64,
}

/// What a token is for: enrolling a new device, or sharing one with a role.
#[derive(Debug, Clone)]
pub enum Grant {
    /// Enrols a new device owned by the token's creator.
    Setup,
    /// Makes whoever claims it a member of `device` with `role`.
    Share {
        /// The device shared.
        device: DeviceId,
        /// The role the claimant gets.
        role: Role,
    },
}

/// Mints a token granting `grant` for `creator`, valid for `ttl` from `now`.
pub async fn issue(
    catalog: &dyn Catalog,
    creator: UserId,
    grant: Grant,
    ttl: Duration,
    now: i64,
) -> Result<Issued, TokenError> {
    let (kind, device, role) = match grant {
        Grant::Setup => (TokenKind::Setup, None, None),
        Grant::Share { device, role } => (TokenKind::Share, Some(device), Some(role)),
    };
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(TokenError::BadTtl);
    }
    let minted = credential::mint(prefix_of(kind));
    let expires_at = now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
    catalog
        .insert_token(&TokenRecord {
            id: minted.id.clone(),
            kind,
            secret_hash: minted.secret_hash,
            created_by: creator,
            device_id: device,
            role,
            created_at: now,
            expires_at,
            used_at: None,
            revoked_at: None,
        })
        .await?;
    Ok(Issued {
        token: minted.full,
        id: minted.id,
        expires_at,
    })
}

/// Checks `raw` is a valid, unused, unexpired token of `kind` at `now`.
pub async fn check(
    catalog: &dyn Catalog,
    raw: &str,
    kind: TokenKind,
    now: i64,
) -> Result<TokenRecord, TokenError> {
    let parsed = credential::parse(raw).ok_or(TokenError::Malformed)?;
    let given = match parsed.prefix {
        SETUP_PREFIX => TokenKind::Setup,
        SHARE_PREFIX => TokenKind::Share,
        _ => return Err(TokenError::Malformed),
    };
    if given != kind {
        return Err(TokenError::WrongKind {
            expected: kind.as_str(),
            actual: given.as_str(),
        });
    }
    let record = catalog
        .token(parsed.id)
        .await?
        .filter(|r| parsed.verify(&r.secret_hash) && r.kind == kind)
        .ok_or(TokenError::Unknown)?;
    if record.used_at.is_some() {
        return Err(TokenError::Used);
    }
    if record.revoked_at.is_some() {
        return Err(TokenError::Revoked);
    }
    if record.expires_at <= now {
        return Err(TokenError::Expired);
    }
    Ok(record)
}

/// Enrols a new device with a setup token, owned by the token's creator.
pub async fn enrol(
    catalog: &dyn Catalog,
    raw: &str,
    device: &DeviceConfig,
    now: i64,
) -> Result<DeviceRecord, TokenError> {
    let record = check(catalog, raw, TokenKind::Setup, now).await?;
    match catalog.enrol_device(&record.id, now, device).await {
        Ok(device) => Ok(device),
        Err(e) => Err(lost_race(catalog, e, now, &record).await),
    }
}

/// Makes `user` a member of the device a share token names, with the token's role.
pub async fn claim(
    catalog: &dyn Catalog,
    raw: &str,
    user: UserId,
    now: i64,
) -> Result<DeviceId, TokenError> {
    let record = check(catalog, raw, TokenKind::Share, now).await?;
    if let Some(device) = &record.device_id {
        let grants = record.role.unwrap_or(Role::Owner);
        if let Some(role) = catalog.role_of(device, user).await? {
            if role >= grants {
                return Err(TokenError::AlreadyMember(role));
            }
        }
    }
    match catalog.claim_share(&record.id, now, user).await {
        Ok(device) => Ok(device),
        Err(e) => Err(lost_race(catalog, e, now, &record).await),
    }
}

/// A token that passed `check` but failed the guarded update was used, revoked or
/// expired in between; say which.
async fn lost_race(
    catalog: &dyn Catalog,
    e: CatalogError,
    now: i64,
    record: &TokenRecord,
) -> TokenError {
    match e {
        CatalogError::TokenUnavailable if record.expires_at <= now => TokenError::Expired,
        CatalogError::TokenUnavailable => match catalog.token(&record.id).await {
            Ok(Some(now_stored)) if now_stored.revoked_at.is_some() => TokenError::Revoked,
            _ => TokenError::Used,
        },
        other => TokenError::Catalog(other),
    }
}

fn prefix_of(kind: TokenKind) -> &'static str {
    match kind {
        TokenKind::Setup => SETUP_PREFIX,
        TokenKind::Share => SHARE_PREFIX,
    }
}
