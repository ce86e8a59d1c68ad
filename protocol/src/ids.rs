//! Identifiers and secrets as newtypes, so a device id can never be passed where a secret
//! is expected and a secret can never end up in a log line through `Debug`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Device secrets shorter than this are refused: 32 characters of the generated alphabet
/// carry well over 128 bits, the floor for a credential that never expires.
pub const MIN_SECRET_LEN: usize = 32;

/// A device's identity as the hub derives it: lowercase hex of a truncated
/// HMAC-SHA256 over the device secret. Stable across hub restarts because the key is.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

/// Length in hex characters of a [`DeviceId`] (128 bits).
const DEVICE_ID_HEX_LEN: usize = 32;

/// A string that is not a well-formed device id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a device id: expected {DEVICE_ID_HEX_LEN} lowercase hex characters")]
pub struct InvalidId;

impl DeviceId {
    /// Builds an id from the first 16 bytes of a MAC; the hub is the only caller.
    pub fn from_mac(mac: &[u8]) -> Self {
        let mut s = String::with_capacity(DEVICE_ID_HEX_LEN);
        for b in mac.iter().take(DEVICE_ID_HEX_LEN / 2) {
            s.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
            s.push(char::from_digit(u32::from(b & 0xf), 16).unwrap_or('0'));
        }
        DeviceId(s)
    }

    /// The id as it appears in URLs and JSON.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for DeviceId {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<Self, InvalidId> {
        if s.len() == DEVICE_ID_HEX_LEN
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(DeviceId(s.to_owned()))
        } else {
            Err(InvalidId)
        }
    }
}

impl TryFrom<String> for DeviceId {
    type Error = InvalidId;
    fn try_from(s: String) -> Result<Self, InvalidId> {
        s.parse()
    }
}

impl From<DeviceId> for String {
    fn from(id: DeviceId) -> String {
        id.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.0)
    }
}

/// The long-lived credential a cocoon proves its identity with. `Debug` and `Display`
/// are redacted so it cannot leak through logs or error messages.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeviceSecret(String);

/// Why a device secret was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    /// Too short to be a credential.
    #[error("device secret is {0} characters; at least {MIN_SECRET_LEN} are required")]
    TooShort(usize),
}

impl DeviceSecret {
    /// Wraps a secret after checking it is long enough to be a credential.
    pub fn new(s: impl Into<String>) -> Result<Self, SecretError> {
        let s = s.into();
        let n = s.chars().count();
        if n < MIN_SECRET_LEN {
            return Err(SecretError::TooShort(n));
        }
        Ok(DeviceSecret(s))
    }

    /// Re-checks a secret that arrived over the wire, where `new` was not called.
    pub fn validate(&self) -> Result<(), SecretError> {
        let n = self.0.chars().count();
        if n < MIN_SECRET_LEN {
            return Err(SecretError::TooShort(n));
        }
        Ok(())
    }

    /// The raw secret, for hashing and for writing the cocoon's own secret file only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for DeviceSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceSecret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_parses_only_its_own_format() {
        let id = DeviceId::from_mac(&[0xab; 32]);
        assert_eq!(id.as_str().len(), 32);
        assert_eq!(id.as_str().parse::<DeviceId>(), Ok(id.clone()));
        assert!("ABABABABABABABABABABABABABABABAB"
            .parse::<DeviceId>()
            .is_err());
        assert!("../etc/passwd".parse::<DeviceId>().is_err());
        assert!("".parse::<DeviceId>().is_err());
    }

    #[test]
    fn secret_is_redacted_and_checked() {
        assert_eq!(DeviceSecret::new("short"), Err(SecretError::TooShort(5)));
        let s = DeviceSecret::new("x".repeat(40)).expect("long enough");
        assert!(!format!("{s:?}").contains("xxxx"));
    }
}

/// A user's stable id, as the hub's catalog and its API name users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(pub uuid::Uuid);

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
