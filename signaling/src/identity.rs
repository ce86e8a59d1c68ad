//! Device identity: the hub derives a device id as HMAC-SHA256 over the device secret
//! under a hub key that is generated once and kept in the catalog, so a restart never
//! changes an id and the hub stores no device secret.

use adi_protocol::{DeviceId, DeviceSecret};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Derives device ids; holds the hub key.
#[derive(Clone)]
pub struct DeviceIdKey(Vec<u8>);

impl DeviceIdKey {
    /// Wraps the key loaded from the catalog.
    pub fn new(key: Vec<u8>) -> Self {
        DeviceIdKey(key)
    }

    /// The id of the device holding `secret`.
    pub fn derive(&self, secret: &DeviceSecret) -> DeviceId {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(secret.expose().as_bytes());
        DeviceId::from_mac(&mac.finalize().into_bytes())
    }
}

impl std::fmt::Debug for DeviceIdKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceIdKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> DeviceSecret {
        DeviceSecret::new(s.repeat(40)).expect("long")
    }

    #[test]
    fn same_key_and_secret_give_the_same_id() {
        let a = DeviceIdKey::new(vec![7; 32]);
        let b = DeviceIdKey::new(vec![7; 32]);
        assert_eq!(a.derive(&secret("x")), b.derive(&secret("x")));
    }

    #[test]
    fn different_secrets_or_keys_give_different_ids() {
        let k = DeviceIdKey::new(vec![7; 32]);
        assert_ne!(k.derive(&secret("x")), k.derive(&secret("y")));
        let k2 = DeviceIdKey::new(vec![8; 32]);
        assert_ne!(k.derive(&secret("x")), k2.derive(&secret("x")));
    }

    #[test]
    fn is_hmac_sha256_truncated_to_128_bits() {
        let k = DeviceIdKey::new(b"Jefe".to_vec());
        let s = DeviceSecret::new("what do ya want for nothing?xxxx").expect("long");
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"Jefe").expect("key");
        mac.update(s.expose().as_bytes());
        let full = hex::encode(mac.finalize().into_bytes());
        assert_eq!(k.derive(&s).as_str(), &full[..32]);
    }
}
