//! The device's long-lived secret, kept in `device.secret` in the data dir, both
//! owner-only (0600 and 0700). Generated on first run; the hub derives the device id
//! from it, so losing the file means becoming a new device.

use std::fs;
use std::path::{Path, PathBuf};

use adi_protocol::{DeviceSecret, SecretError};
use adi_storage::owner_only;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;

/// File name of the secret inside the data dir.
pub const SECRET_FILE: &str = "device.secret";

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing the data dir failed.
    #[error("{path}: {source}")]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The stored secret is not a valid secret.
    #[error("{path}: {source}")]
    Invalid {
        /// The secret file.
        path: PathBuf,
        /// Why it is refused.
        source: SecretError,
    },
}

/// Loads the device secret from `data_dir`, creating it (and the dir) on first run.
/// The data dir is made owner-only here, the first thing a cocoon does with it: it holds
/// this secret, the local API's token and the task store.
pub fn load_or_create(data_dir: &Path) -> Result<DeviceSecret, IdentityError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| IdentityError::Io { path, source }
    };
    owner_only::dir(data_dir).map_err(io(data_dir))?;
    let path = data_dir.join(SECRET_FILE);
    owner_only::tighten(&path).map_err(io(&path))?;
    match fs::read_to_string(&path) {
        Ok(s) => {
            DeviceSecret::new(s.trim()).map_err(|source| IdentityError::Invalid { path, source })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(&path),
        Err(e) => Err(io(&path)(e)),
    }
}

fn create(path: &Path) -> Result<DeviceSecret, IdentityError> {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    let secret = URL_SAFE_NO_PAD.encode(bytes);
    let io = |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    };
    // Two cocoons started on one data dir at once must not end up with two identities.
    if !owner_only::write_new(path, secret.as_bytes()).map_err(io)? {
        let stored = fs::read_to_string(path).map_err(io)?;
        return DeviceSecret::new(stored.trim()).map_err(|source| IdentityError::Invalid {
            path: path.to_owned(),
            source,
        });
    }
    DeviceSecret::new(secret).map_err(|source| IdentityError::Invalid {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_run_creates_a_private_secret_and_later_runs_reuse_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("nested/data");
        let first = load_or_create(&data).expect("created");
        assert!(first.expose().len() >= adi_protocol::MIN_SECRET_LEN);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(data.join(SECRET_FILE))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            let dir_mode = fs::metadata(&data).expect("meta").permissions().mode();
            assert_eq!(dir_mode & 0o777, 0o700);
        }
        let second = load_or_create(&data).expect("loaded");
        assert_eq!(first, second);
    }

    #[test]
    fn a_short_stored_secret_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(SECRET_FILE), "too-short").expect("write");
        let err = load_or_create(dir.path()).expect_err("refused");
        assert!(err.to_string().contains("at least 32"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn loose_permissions_are_tightened() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(SECRET_FILE);
        fs::write(&path, "a".repeat(43)).expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        load_or_create(dir.path()).expect("loaded");
        let mode = fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
