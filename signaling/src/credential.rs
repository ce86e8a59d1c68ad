//! The format of every bearer secret the hub hands out (API keys, setup and share
//! tokens): `PREFIX` + 16 hex id + `_` + 43-character secret. The id finds the stored
//! record; only a SHA-256 of the secret is stored and it is compared in constant time.
//!
//! The prefix names what a string is, so a share token pasted where a setup token
//! belongs is refused with a message that says so, and secret scanners can spot leaks.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Length of the public id part, in hex characters.
const ID_LEN: usize = 16;
/// Length of the secret part: 32 random bytes in unpadded base64url.
const SECRET_LEN: usize = 43;

/// Prefix of user API keys.
pub const API_KEY_PREFIX: &str = "adi_key_";
/// Prefix of one-time setup tokens.
pub const SETUP_PREFIX: &str = "adi_setup_";
/// Prefix of one-time share tokens.
pub const SHARE_PREFIX: &str = "adi_share_";

/// A freshly minted credential: the full string goes to the user once, the rest is
/// what the catalog keeps.
pub struct Minted {
    /// The whole credential; shown once, never stored or logged.
    pub full: String,
    /// Public id part.
    pub id: String,
    /// SHA-256 of the secret part.
    pub secret_hash: Vec<u8>,
}

/// A credential split into its parts, not yet verified.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed<'a> {
    /// The prefix it carried.
    pub prefix: &'static str,
    /// Public id part.
    pub id: &'a str,
    secret: &'a str,
}

impl Parsed<'_> {
    /// What the credential is known as without its secret (`PREFIX` + id): the account
    /// failed attempts are counted against.
    pub fn account(&self) -> String {
        format!("{}{}", self.prefix, self.id)
    }

    /// Whether the secret part matches a stored hash, compared in constant time.
    pub fn verify(&self, stored_hash: &[u8]) -> bool {
        hash(self.secret).ct_eq(stored_hash).into()
    }
}

/// Mints a new credential with the given prefix.
pub fn mint(prefix: &'static str) -> Minted {
    let mut rng = rand::thread_rng();
    let mut id = [0u8; ID_LEN / 2];
    rng.fill_bytes(&mut id);
    let mut secret = [0u8; 32];
    rng.fill_bytes(&mut secret);
    let id = hex::encode(id);
    let secret = URL_SAFE_NO_PAD.encode(secret);
    Minted {
        full: format!("{prefix}{id}_{secret}"),
        secret_hash: hash(&secret),
        id,
    }
}

/// Splits a credential of any known prefix; `None` if it is not of the format.
pub fn parse(s: &str) -> Option<Parsed<'_>> {
    let s = s.trim();
    let (prefix, rest) = [API_KEY_PREFIX, SETUP_PREFIX, SHARE_PREFIX]
        .into_iter()
        .find_map(|p| s.strip_prefix(p).map(|rest| (p, rest)))?;
    if rest.len() != ID_LEN + 1 + SECRET_LEN || !rest.is_char_boundary(ID_LEN) {
        return None;
    }
    let (id, tail) = rest.split_at(ID_LEN);
    let secret = tail.strip_prefix('_')?;
    let id_ok = id
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let secret_ok = secret
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (id_ok && secret_ok).then_some(Parsed { prefix, id, secret })
}

fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_credentials_parse_and_verify() {
        for prefix in [API_KEY_PREFIX, SETUP_PREFIX, SHARE_PREFIX] {
            let m = mint(prefix);
            let p = parse(&m.full).expect("own format parses");
            assert_eq!(p.prefix, prefix);
            assert_eq!(p.id, m.id);
            assert!(p.verify(&m.secret_hash));
            assert!(
                !p.verify(&mint(prefix).secret_hash),
                "other secret must fail"
            );
        }
    }

    #[test]
    fn malformed_strings_are_refused() {
        let good = mint(SETUP_PREFIX).full;
        assert!(parse("").is_none());
        assert!(parse("hello").is_none());
        assert!(parse(&good[..good.len() - 1]).is_none(), "truncated");
        assert!(parse(&format!("{good}x")).is_none(), "extended");
        assert!(parse(&good.replacen("adi_setup_", "adi_nope_", 1)).is_none());
        let mut bad_id = good.clone();
        bad_id.replace_range(10..11, "Z");
        assert!(parse(&bad_id).is_none(), "non-hex id");
        let multibyte = format!("{SETUP_PREFIX}{}", "é".repeat(30));
        assert!(parse(&multibyte).is_none());
    }

    #[test]
    fn same_secret_hashes_the_same_different_ones_do_not() {
        assert_eq!(hash("abc"), hash("abc"));
        assert_ne!(hash("abc"), hash("abd"));
    }
}
