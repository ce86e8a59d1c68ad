//! The hub's keys: the key JWTs are signed with and the key device ids are derived
//! under. They live in the catalog, or with a key file (`--key-file`) in a file of
//! their own, 0600, so that whoever reads a shared PostgreSQL catalog (its operators,
//! its backups) does not hold the signing key.
//!
//! This module owns where the keys are and moving them: a key file that does not exist
//! yet takes the catalog's keys (device ids stay the same) and the catalog drops them.
//! It must never let the keys change silently, as new keys give every device a new id
//! and end every session: a key file whose keys differ from the catalog's, or a catalog
//! whose keys went to a key file that is now missing, stops the hub. The catalog keeps a
//! fingerprint of keys that moved out, so each of several hubs on one catalog must hold
//! the same key file; the first of them to start writes it, the others read it.

use std::path::{Path, PathBuf};

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::catalog::{Catalog, CatalogError};
use crate::owner_only;

/// Catalog name of the key device ids are derived under.
const DEVICE_ID_KEY: &str = "device_id_key";
/// Catalog name of the key JWTs are signed with.
const JWT_KEY: &str = "jwt_key";
/// Catalog name of the fingerprint of keys that live in a key file.
const FINGERPRINT: &str = "key_file_fingerprint";
/// Bytes of a generated key; a key file's keys must be at least as long.
const KEY_BYTES: usize = 32;

/// The hub's keys.
#[derive(Clone, PartialEq, Eq)]
pub struct HubKeys {
    /// Device ids are HMAC-SHA256 of the device secret under this key.
    pub device_id: Vec<u8>,
    /// JWTs are signed with this key.
    pub jwt: Vec<u8>,
}

impl std::fmt::Debug for HubKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HubKeys(<redacted>)")
    }
}

/// Why the hub's keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read or written.
    #[error("key file {}: {source}", path.display())]
    File {
        /// The key file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The key file is not one the hub wrote.
    #[error("key file {}: not a hub key file: {reason}", path.display())]
    Malformed {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The key file and the catalog hold different keys.
    #[error(
        "key file {}: its keys differ from those of the catalog {catalog}; starting with \
         either would give every device a new id and end every session. Point --key-file \
         at this catalog's key file",
        path.display()
    )]
    Differ {
        /// The key file.
        path: PathBuf,
        /// Where the catalog is.
        catalog: String,
    },
    /// The catalog's keys moved to a key file the hub was not given, or that is gone.
    #[error(
        "{catalog}: this catalog's keys were moved to a key file; start the hub with \
         --key-file (ADI_KEY_FILE) pointing at it{}. Without it the hub would make new \
         keys, and every device would get a new id",
        missing.as_ref().map(|p| format!(" ({} does not exist)", p.display())).unwrap_or_default()
    )]
    MovedOut {
        /// Where the catalog is.
        catalog: String,
        /// The key file the hub was given, which does not exist.
        missing: Option<PathBuf>,
    },
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// What a key file holds, hex-encoded.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    device_id_key: String,
    jwt_key: String,
}

/// Loads the hub's keys: from `key_file` when given (creating it, or moving the
/// catalog's keys into it), else from the catalog (making them on first start).
pub async fn load(catalog: &dyn Catalog, key_file: Option<&Path>) -> Result<HubKeys, KeyError> {
    let stored = (
        catalog.hub_secret(DEVICE_ID_KEY).await?,
        catalog.hub_secret(JWT_KEY).await?,
    );
    let moved_out = catalog.hub_secret(FINGERPRINT).await?.is_some();
    let Some(path) = key_file else {
        if moved_out && stored.0.is_none() {
            return Err(KeyError::MovedOut {
                catalog: catalog.location(),
                missing: None,
            });
        }
        if catalog.is_shared() {
            tracing::warn!(
                catalog = %catalog.location(),
                "the hub's signing key lives in the shared catalog, readable by whoever reads \
                 that database; keep it in a file of its own with --key-file"
            );
        }
        return Ok(HubKeys {
            device_id: catalog
                .hub_secret_or_insert(DEVICE_ID_KEY, &random_key())
                .await?,
            jwt: catalog.hub_secret_or_insert(JWT_KEY, &random_key()).await?,
        });
    };
    let differ = || KeyError::Differ {
        path: path.to_owned(),
        catalog: catalog.location(),
    };
    let keys = match (read(path)?, stored) {
        (Some(file), (device_id, jwt)) => {
            if device_id.is_some_and(|k| k != file.device_id) || jwt.is_some_and(|k| k != file.jwt)
            {
                return Err(differ());
            }
            file
        }
        (None, (Some(device_id), jwt)) => {
            // An old catalog: its device-id key stays, or every device gets a new id.
            let keys = HubKeys {
                device_id,
                jwt: jwt.unwrap_or_else(random_key),
            };
            let written = write(path, &keys)?;
            tracing::info!(key_file = %path.display(), catalog = %catalog.location(), "moving the hub keys from the catalog to the key file");
            written
        }
        (None, (None, _)) if moved_out => {
            return Err(KeyError::MovedOut {
                catalog: catalog.location(),
                missing: Some(path.to_owned()),
            })
        }
        (None, (None, _)) => {
            let keys = HubKeys {
                device_id: random_key(),
                jwt: random_key(),
            };
            write(path, &keys)?
        }
    };
    let fingerprint = fingerprint(&keys);
    if catalog
        .hub_secret_or_insert(FINGERPRINT, &fingerprint)
        .await?
        != fingerprint
    {
        return Err(differ());
    }
    catalog
        .remove_hub_secrets(&[DEVICE_ID_KEY, JWT_KEY])
        .await?;
    Ok(keys)
}

/// The keys in `path`, or `None` when there is no such file.
fn read(path: &Path) -> Result<Option<HubKeys>, KeyError> {
    let io = |source| KeyError::File {
        path: path.to_owned(),
        source,
    };
    owner_only::tighten(path).map_err(io)?;
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let malformed = |reason: String| KeyError::Malformed {
        path: path.to_owned(),
        reason,
    };
    let file: KeyFile = serde_json::from_str(&text).map_err(|e| malformed(e.to_string()))?;
    let decode = |name: &str, hex_key: &str| {
        let key = hex::decode(hex_key.trim()).map_err(|e| malformed(format!("{name}: {e}")))?;
        if key.len() < KEY_BYTES {
            return Err(malformed(format!(
                "{name} is {} bytes; at least {KEY_BYTES} are needed",
                key.len()
            )));
        }
        Ok(key)
    };
    Ok(Some(HubKeys {
        device_id: decode(DEVICE_ID_KEY, &file.device_id_key)?,
        jwt: decode(JWT_KEY, &file.jwt_key)?,
    }))
}

/// Creates the key file holding `keys`, unless another hub created it first: then its
/// keys count, provided they are the same.
fn write(path: &Path, keys: &HubKeys) -> Result<HubKeys, KeyError> {
    let io = |source| KeyError::File {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        owner_only::create_missing_dirs(parent).map_err(io)?;
    }
    let text = serde_json::to_string_pretty(&KeyFile {
        device_id_key: hex::encode(&keys.device_id),
        jwt_key: hex::encode(&keys.jwt),
    })
    .map_err(|e| io(std::io::Error::other(e)))?;
    if owner_only::write_new(path, format!("{text}\n").as_bytes()).map_err(io)? {
        tracing::info!(key_file = %path.display(), "wrote the hub keys");
        return Ok(keys.clone());
    }
    read(path)?.ok_or_else(|| io(std::io::ErrorKind::NotFound.into()))
}

/// Names the keys without revealing them.
fn fingerprint(keys: &HubKeys) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(b"adi hub keys v1\0");
    h.update((keys.device_id.len() as u64).to_be_bytes());
    h.update(&keys.device_id);
    h.update(&keys.jwt);
    h.finalize().to_vec()
}

fn random_key() -> Vec<u8> {
    let mut key = vec![0u8; KEY_BYTES];
    rand::thread_rng().fill_bytes(&mut key);
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::SqliteCatalog;

    async fn catalog(dir: &Path) -> SqliteCatalog {
        SqliteCatalog::open(&dir.join("catalog.db"))
            .await
            .expect("catalog")
    }

    #[tokio::test]
    async fn keys_move_from_the_catalog_to_a_new_key_file_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = catalog(dir.path()).await;
        let in_catalog = load(&c, None).await.expect("made in the catalog");
        let path = dir.path().join("keys/hub.key");
        let moved = load(&c, Some(&path)).await.expect("moved");
        assert_eq!(moved, in_catalog);
        assert_eq!(c.hub_secret(DEVICE_ID_KEY).await.expect("read"), None);
        assert_eq!(c.hub_secret(JWT_KEY).await.expect("read"), None);
        assert_eq!(load(&c, Some(&path)).await.expect("from the file"), moved);
        let err = load(&c, None)
            .await
            .expect_err("the catalog alone is refused");
        assert!(
            matches!(err, KeyError::MovedOut { missing: None, .. }),
            "{err}"
        );
        std::fs::remove_file(&path).expect("remove");
        let err = load(&c, Some(&path))
            .await
            .expect_err("a lost file is refused");
        assert!(
            matches!(
                err,
                KeyError::MovedOut {
                    missing: Some(_),
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_key_file_of_another_catalog_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ours = catalog(&dir.path().join("a")).await;
        let theirs = catalog(&dir.path().join("b")).await;
        let their_file = dir.path().join("b.key");
        load(&theirs, Some(&their_file)).await.expect("theirs");
        // Keys still in our catalog.
        load(&ours, None).await.expect("ours");
        let err = load(&ours, Some(&their_file)).await.expect_err("differ");
        assert!(matches!(err, KeyError::Differ { .. }), "{err}");
        // Keys already moved out of our catalog.
        let our_file = dir.path().join("a.key");
        load(&ours, Some(&our_file)).await.expect("moved");
        let err = load(&ours, Some(&their_file)).await.expect_err("differ");
        assert!(matches!(err, KeyError::Differ { .. }), "{err}");
    }

    #[tokio::test]
    async fn hubs_starting_together_share_the_first_key_file_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = catalog(dir.path()).await;
        let path = dir.path().join("hub.key");
        let (a, b) = tokio::join!(load(&c, Some(&path)), load(&c, Some(&path)));
        assert_eq!(a.expect("a"), b.expect("b"));
    }

    #[tokio::test]
    async fn a_malformed_key_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = catalog(dir.path()).await;
        let path = dir.path().join("hub.key");
        std::fs::write(&path, r#"{"device_id_key": "00", "jwt_key": "00"}"#).expect("write");
        let err = load(&c, Some(&path)).await.expect_err("short keys");
        assert!(err.to_string().contains("at least 32"), "{err}");
    }
}
