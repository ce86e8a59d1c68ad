//! Where `adi` keeps things by default: XDG data and config dirs, overridable by flags
//! and `ADI_*` variables.

use std::path::PathBuf;

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `$XDG_DATA_HOME/adi/<what>`, else `~/.local/share/adi/<what>`.
pub fn data_dir(what: &str) -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".local/share"));
    base.join("adi").join(what)
}

/// `$ADI_CONFIG_DIR`, else `$XDG_CONFIG_HOME/adi`, else `~/.config/adi`.
pub fn config_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ADI_CONFIG_DIR") {
        return PathBuf::from(dir);
    }
    config_home().join("adi")
}

/// `$XDG_CONFIG_HOME`, else `~/.config`: where systemd looks for user units too.
pub fn config_home() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".config"))
}

/// This machine's host name, the default device name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "device".to_owned())
}
