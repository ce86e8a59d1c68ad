//! User authentication: API keys (stored hashed) are exchanged for short-lived JWTs,
//! and every REST call presents the JWT. Only HS256 under the hub's own key is
//! accepted: `alg: none`, other algorithms, wrong signatures and expired tokens fail.
//!
//! A JWT carries what its key allows (its id, scopes and devices) and never outlives
//! the key's expiry. A session is refused from the moment it is signed out, its key is
//! revoked or its user disabled or removed: those are kept in RAM, loaded from the
//! catalog at start and from its change feed every second after.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use adi_protocol::{DeviceId, Scope};

use crate::catalog::{ApiKeyRecord, Catalog, CatalogError, User, UserId};
use crate::credential::{self, API_KEY_PREFIX};

/// Issuer claim the hub writes and demands.
const ISSUER: &str = "adi-hub";

/// What a hub JWT asserts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user's id.
    pub sub: UserId,
    /// The user's name, for display only; authorization uses `sub`.
    pub name: String,
    /// Issued at, unix seconds.
    pub iat: u64,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// Always [`ISSUER`].
    pub iss: String,
    /// This session's id, so that signing out can revoke it alone. Sessions issued
    /// before hubs wrote it have none and cannot be revoked one by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    /// The API key the session was minted from, so revoking it ends the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// The scopes the key allows; every scope when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scp: Option<Vec<Scope>>,
    /// The devices the key is limited to; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<Vec<DeviceId>>,
}

/// Why a credential was refused. Messages are safe to show: they never quote it.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Not an API key of this hub's format.
    #[error("malformed API key")]
    MalformedKey,
    /// Unknown key id or wrong secret; the two are not told apart.
    #[error("invalid API key")]
    InvalidKey,
    /// The key was revoked by its user.
    #[error("this API key was revoked")]
    KeyRevoked,
    /// The key is past its expiry.
    #[error("this API key has expired")]
    KeyExpired,
    /// The key's user is disabled.
    #[error("this user is disabled")]
    UserDisabled,
    /// The JWT is expired.
    #[error("session expired; sign in again")]
    Expired,
    /// The JWT is malformed, wrongly signed or of a refused algorithm.
    #[error("invalid bearer token")]
    InvalidToken,
    /// The session was signed out.
    #[error("this session was signed out; sign in again")]
    Revoked,
    /// The session's API key was revoked.
    #[error("the API key this session was opened with was revoked")]
    SessionKeyRevoked,
    /// The session's user was disabled or removed.
    #[error("this session's user is disabled or removed")]
    SessionUserGone,
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// Tokens remembered as verified before the memory is cleared and refilled.
const VERIFIED_CAPACITY: usize = 4096;

/// Issues and checks JWTs under the hub's key.
pub struct Auth {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
    /// Tokens already verified, by their SHA-256: a client presents the same token
    /// on every request (proxied requests, thousands a second), and checking it again
    /// (base64, HMAC, JSON) cost more than the rest of the hub's work on a small
    /// request. Only the digest is kept, never the token; an entry counts only until
    /// the token's own expiry.
    verified: dashmap::DashMap<[u8; 32], Claims>,
    /// Sessions signed out before their expiry, by id, with that expiry: refused until
    /// then. Loaded from the catalog at start, which keeps them across restarts.
    revoked: dashmap::DashMap<String, u64>,
    /// Revoked API keys, by id: the sessions minted from them are refused.
    revoked_keys: dashmap::DashSet<String>,
    /// Disabled or removed users: their sessions are refused.
    disabled_users: dashmap::DashSet<UserId>,
    /// Bumped on every revocation and every loss of access (a member removed, a
    /// device deleted), so that open sockets and proxied streams can look whether
    /// theirs ended.
    revisions: tokio::sync::watch::Sender<u64>,
}

impl Auth {
    /// Builds the authenticator from the hub's JWT key and the token lifetime.
    pub fn new(key: &[u8], ttl: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.leeway = 5;
        Auth {
            encoding: EncodingKey::from_secret(key),
            decoding: DecodingKey::from_secret(key),
            validation,
            ttl,
            verified: dashmap::DashMap::new(),
            revoked: dashmap::DashMap::new(),
            revoked_keys: dashmap::DashSet::new(),
            disabled_users: dashmap::DashSet::new(),
            revisions: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Issues a JWT for `user` signed in with `key`, allowing what the key allows and
    /// ending at the key's expiry if that comes first; returns it and its expiry in
    /// unix seconds.
    pub fn issue(&self, user: &User, key: &ApiKeyRecord) -> (String, u64) {
        let iat = unix_now();
        let mut exp = iat + self.ttl.as_secs().max(1);
        if let Some(key_end) = key.expires_at.and_then(|e| u64::try_from(e).ok()) {
            exp = exp.min(key_end);
        }
        let claims = Claims {
            sub: user.id,
            name: user.name.clone(),
            iat,
            exp,
            iss: ISSUER.to_owned(),
            sid: Some(hex::encode(rand::random::<[u8; 16]>())),
            kid: Some(key.key_id.clone()),
            scp: key.scopes.clone(),
            dev: key.devices.clone(),
        };
        // HS256 signing of a plain struct cannot fail; an empty token would be refused.
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .unwrap_or_default();
        (token, exp)
    }

    /// Refuses session `sid` from now until `exp` (unix seconds).
    pub fn revoke(&self, sid: &str, exp: u64) {
        let now = unix_now();
        self.revoked.retain(|_, until| now < *until);
        self.revoked.insert(sid.to_owned(), exp);
        self.announce_change();
    }

    /// Tells everything waiting on [`changes`](Auth::changes) to look again whether
    /// what it serves is still allowed.
    pub fn announce_change(&self) {
        self.revisions.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Refuses every session minted from key `kid` from now on.
    pub fn revoke_key(&self, kid: &str) {
        self.revoked_keys.insert(kid.to_owned());
        self.announce_change();
    }

    /// Refuses (`disabled`) or accepts again the sessions of `user`.
    pub fn set_user_disabled(&self, user: UserId, disabled: bool) {
        if disabled {
            self.disabled_users.insert(user);
        } else {
            self.disabled_users.remove(&user);
        }
        self.announce_change();
    }

    /// Why a session with these claims is no longer good, if it is not: signed out,
    /// its key revoked, or its user disabled or removed.
    pub fn ended(&self, claims: &Claims) -> Option<AuthError> {
        self.ended_for(claims.sid.as_deref(), claims.kid.as_deref(), claims.sub)
    }

    /// [`ended`](Auth::ended), for a session known by its parts: its id, its key's id
    /// and its user.
    pub fn ended_for(
        &self,
        sid: Option<&str>,
        kid: Option<&str>,
        user: UserId,
    ) -> Option<AuthError> {
        if sid.is_some_and(|sid| self.revoked.contains_key(sid)) {
            return Some(AuthError::Revoked);
        }
        if kid.is_some_and(|kid| self.revoked_keys.contains(kid)) {
            return Some(AuthError::SessionKeyRevoked);
        }
        if self.disabled_users.contains(&user) {
            return Some(AuthError::SessionUserGone);
        }
        None
    }

    /// Changes on every revocation and loss of access: what a long-lived socket or
    /// stream waits on to end when its session is signed out or its access removed.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revisions.subscribe()
    }

    /// Checks a JWT's algorithm, signature, issuer, expiry, and that its session was
    /// not signed out.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let claims = self.verify_signed(token)?;
        match self.ended(&claims) {
            Some(why) => Err(why),
            None => Ok(claims),
        }
    }

    fn verify_signed(&self, token: &str) -> Result<Claims, AuthError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(claims) = self.verified.get(&digest) {
            // Stricter than the full check (no leeway): a token near its end is
            // checked in full again, which decides.
            if unix_now() < claims.exp {
                return Ok(claims.clone());
            }
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::InvalidToken,
            })?;
        if self.verified.len() >= VERIFIED_CAPACITY {
            self.verified.retain(|_, c| unix_now() < c.exp);
            if self.verified.len() >= VERIFIED_CAPACITY {
                self.verified.clear();
            }
        }
        self.verified.insert(digest, claims.clone());
        Ok(claims)
    }
}

/// Creates a user and their first API key; returns the key, shown once.
pub async fn add_user(catalog: &dyn Catalog, name: &str) -> Result<(User, String), CatalogError> {
    let user = catalog.create_user(name).await?;
    let key = add_api_key(catalog, user.id).await?;
    Ok((user, key))
}

/// Mints another API key for a user; returns it, shown once.
pub async fn add_api_key(catalog: &dyn Catalog, user: UserId) -> Result<String, CatalogError> {
    let minted = credential::mint(API_KEY_PREFIX);
    catalog
        .insert_api_key(&ApiKeyRecord::unlimited(
            minted.id,
            user,
            minted.secret_hash,
            unix_now_i64(),
        ))
        .await?;
    Ok(minted.full)
}

/// Finds the user an API key belongs to, with the key: refused when it is revoked or
/// expired or its user disabled. Only a caller who holds the key's secret learns which.
pub async fn user_for_api_key(
    catalog: &Arc<dyn Catalog>,
    key: &str,
) -> Result<(User, ApiKeyRecord), AuthError> {
    let parsed = credential::parse(key)
        .filter(|p| p.prefix == API_KEY_PREFIX)
        .ok_or(AuthError::MalformedKey)?;
    let record = catalog
        .api_key(parsed.id)
        .await?
        .ok_or(AuthError::InvalidKey)?;
    if !parsed.verify(&record.secret_hash) {
        return Err(AuthError::InvalidKey);
    }
    if record.revoked_at.is_some() {
        return Err(AuthError::KeyRevoked);
    }
    if record.expires_at.is_some_and(|e| e <= unix_now_i64()) {
        return Err(AuthError::KeyExpired);
    }
    let user = catalog
        .user(record.user_id)
        .await?
        .ok_or(AuthError::InvalidKey)?;
    if user.disabled_at.is_some() {
        return Err(AuthError::UserDisabled);
    }
    Ok((user, record))
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Seconds since the Unix epoch, in the catalog's integer type.
pub fn unix_now_i64() -> i64 {
    i64::try_from(unix_now()).unwrap_or(i64::MAX)
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;

    fn user() -> User {
        User {
            id: UserId(uuid::Uuid::new_v4()),
            name: "alice".into(),
            created_at: 0,
            disabled_at: None,
        }
    }

    fn api_key() -> ApiKeyRecord {
        ApiKeyRecord::unlimited("k1".into(), user().id, vec![], 0)
    }

    #[test]
    fn a_session_ends_with_its_key_and_its_user_and_never_outlives_the_key() {
        let auth = Auth::new(b"k", Duration::from_secs(3600));
        let alice = user();
        let mut narrow = api_key();
        narrow.scopes = Some(vec![Scope::Proxy]);
        narrow.expires_at = Some(unix_now_i64() + 60);
        let (token, exp) = auth.issue(&alice, &narrow);
        assert!(exp <= unix_now() + 60, "capped at the key's expiry");
        let claims = auth.verify(&token).expect("valid");
        assert_eq!(claims.kid.as_deref(), Some("k1"));
        assert_eq!(claims.scp, Some(vec![Scope::Proxy]));
        let (other_key, _) = auth.issue(
            &alice,
            &ApiKeyRecord::unlimited("k2".into(), alice.id, vec![], 0),
        );
        auth.revoke_key("k1");
        assert!(matches!(
            auth.verify(&token),
            Err(AuthError::SessionKeyRevoked)
        ));
        assert!(
            auth.verify(&other_key).is_ok(),
            "another key's session goes on"
        );
        auth.set_user_disabled(alice.id, true);
        assert!(matches!(
            auth.verify(&other_key),
            Err(AuthError::SessionUserGone)
        ));
        auth.set_user_disabled(alice.id, false);
        assert!(auth.verify(&other_key).is_ok(), "enabled again");
    }

    /// A token under `key` that expired an hour ago, and its claims.
    fn expired_token(key: &[u8]) -> (String, Claims) {
        let past = unix_now() - 3600;
        let claims = Claims {
            sub: user().id,
            name: "alice".into(),
            iat: past - 60,
            exp: past,
            iss: ISSUER.into(),
            sid: None,
            kid: None,
            scp: None,
            dev: None,
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(key),
        )
        .expect("encodes");
        (token, claims)
    }

    #[test]
    fn issued_token_verifies() {
        let auth = Auth::new(b"0123456789abcdef0123456789abcdef", Duration::from_secs(60));
        let u = user();
        let (token, exp) = auth.issue(&u, &api_key());
        let claims = auth.verify(&token).expect("valid");
        assert_eq!(claims.sub, u.id);
        assert_eq!(claims.exp, exp);
    }

    #[test]
    fn remembered_tokens_still_expire_and_tampered_ones_are_checked() {
        let key = b"0123456789abcdef0123456789abcdef";
        let auth = Auth::new(key, Duration::from_secs(60));
        let (token, _) = auth.issue(&user(), &api_key());
        auth.verify(&token).expect("valid");
        assert_eq!(auth.verified.len(), 1, "remembered by digest");
        // A remembered entry past its expiry does not stand in for the full check.
        let (expired, claims) = expired_token(key);
        let digest: [u8; 32] = Sha256::digest(expired.as_bytes()).into();
        auth.verified.insert(digest, claims);
        assert!(matches!(auth.verify(&expired), Err(AuthError::Expired)));
        // Any change to a remembered token is a different token, checked in full.
        let mut tampered = token.clone();
        tampered.pop();
        tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert!(matches!(
            auth.verify(&tampered),
            Err(AuthError::InvalidToken)
        ));
        for _ in 0..(VERIFIED_CAPACITY + 10) {
            let (t, _) = auth.issue(&user(), &api_key());
            auth.verify(&t).expect("valid");
        }
        assert!(auth.verified.len() <= VERIFIED_CAPACITY, "bounded");
    }

    #[test]
    fn wrong_key_is_refused() {
        let a = Auth::new(b"key-one-key-one-key-one-key-one!", Duration::from_secs(60));
        let b = Auth::new(b"key-two-key-two-key-two-key-two!", Duration::from_secs(60));
        let (token, _) = a.issue(&user(), &api_key());
        assert!(matches!(b.verify(&token), Err(AuthError::InvalidToken)));
    }

    #[test]
    fn expired_token_is_refused_as_expired() {
        let key = b"0123456789abcdef0123456789abcdef";
        let auth = Auth::new(key, Duration::from_secs(60));
        let (token, _) = expired_token(key);
        assert!(matches!(auth.verify(&token), Err(AuthError::Expired)));
    }

    #[test]
    fn alg_none_and_other_algorithms_are_refused() {
        let key = b"0123456789abcdef0123456789abcdef";
        let auth = Auth::new(key, Duration::from_secs(60));
        let (token, _) = auth.issue(&user(), &api_key());
        let payload = token.split('.').nth(1).expect("payload part");
        for header in [
            r#"{"alg":"none","typ":"JWT"}"#,
            r#"{"alg":"None","typ":"JWT"}"#,
            r#"{"alg":"HS512","typ":"JWT"}"#,
        ] {
            let forged = format!("{}.{payload}.", URL_SAFE_NO_PAD.encode(header));
            assert!(auth.verify(&forged).is_err(), "{header} accepted");
        }
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &auth.verify(&token).expect("valid"),
            &EncodingKey::from_secret(key),
        )
        .expect("encodes");
        assert!(
            auth.verify(&hs512).is_err(),
            "HS512 under the same key accepted"
        );
    }

    #[test]
    fn a_revoked_session_is_refused_and_others_of_the_user_are_not() {
        let auth = Auth::new(b"0123456789abcdef0123456789abcdef", Duration::from_secs(60));
        let (one, _) = auth.issue(&user(), &api_key());
        let (other, _) = auth.issue(&user(), &api_key());
        let claims = auth.verify(&one).expect("valid");
        let sid = claims.sid.expect("a new session has an id");
        auth.revoke(&sid, claims.exp);
        assert!(matches!(auth.verify(&one), Err(AuthError::Revoked)));
        assert!(auth.verify(&other).is_ok(), "only that session ends");
    }

    #[test]
    fn foreign_issuer_is_refused() {
        let key = b"0123456789abcdef0123456789abcdef";
        let auth = Auth::new(key, Duration::from_secs(60));
        let claims = Claims {
            sub: user().id,
            name: "alice".into(),
            iat: unix_now(),
            exp: unix_now() + 60,
            iss: "someone-else".into(),
            sid: None,
            kid: None,
            scp: None,
            dev: None,
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(key),
        )
        .expect("encodes");
        assert!(auth.verify(&token).is_err());
    }
}
