//! The cocoon's optional TOML config file, for settings a device keeps across restarts
//! (its services above all). Flags and environment variables override it. Unknown keys
//! are errors, so a typo is reported instead of silently ignored.
//!
//! ```toml
//! hub = "https://hub.example:8080"
//! hubs = ["https://hub-b.example:8080"]  # more hubs of its cluster, tried after `hub`
//! name = "gpu-box"
//! database_url = "postgres://tasks@127.0.0.1/tasks"
//! no_exec = false
//! max_concurrent_tasks = 4
//! location = "home office"
//! plugins_dir = "/etc/adi/plugins"
//! disable_capabilities = ["llm.chat"]
//! local_api = "127.0.0.1:7424"            # or "off"
//! openai = ["llm:8080"]                   # OpenAI-compatible servers, NAME:PORT
//! tcp = ["ssh:22", "pg:5432"]             # raw TCP services, NAME:PORT
//!
//! [[services]]
//! name = "grafana"
//! port = 3000
//! health = "/api/health"
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// File name looked for in the data dir when no `--config` is given.
pub const DEFAULT_FILE: &str = "cocoon.toml";

/// The file's contents.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CocoonFile {
    /// Hub URL: the primary.
    pub hub: Option<String>,
    /// Hubs to fall back on, after `hub`; the first is the primary when `hub` is not
    /// given.
    #[serde(default)]
    pub hubs: Vec<String>,
    /// Device name.
    pub name: Option<String>,
    /// Task store URL.
    pub database_url: Option<String>,
    /// Refuse command tasks.
    #[serde(default)]
    pub no_exec: bool,
    /// Commands running at once.
    pub max_concurrent_tasks: Option<usize>,
    /// Services on this device's loopback.
    #[serde(default)]
    pub services: Vec<FileService>,
    /// OpenAI-compatible servers on this device's loopback, `NAME:PORT` each.
    #[serde(default)]
    pub openai: Vec<String>,
    /// Raw TCP services (SSH, databases) on this device's loopback, `NAME:PORT` each.
    #[serde(default)]
    pub tcp: Vec<String>,
    /// Where the device is, in its owner's words.
    pub location: Option<String>,
    /// Directory of plugin manifests.
    pub plugins_dir: Option<PathBuf>,
    /// Protocol names not to offer.
    #[serde(default)]
    pub disable_capabilities: Vec<String>,
    /// Loopback address of the local API, or `"off"`.
    pub local_api: Option<String>,
    /// A private CA (PEM) to trust for the hub's TLS certificate.
    pub ca_cert: Option<PathBuf>,
}

impl CocoonFile {
    /// Every hub the file names, the primary first.
    pub fn hub_urls(&self) -> Vec<String> {
        self.hub.iter().chain(&self.hubs).cloned().collect()
    }
}

/// One service in the file.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileService {
    /// Name used in proxy URLs.
    pub name: String,
    /// Loopback port.
    pub port: u16,
    /// Health path, e.g. `/healthz`.
    pub health: Option<String>,
}

/// Why the file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// Unreadable.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Not valid TOML for this file, with line and column.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The parser's words, with line and column.
        message: String,
    },
}

/// Reads `path`; `Ok(None)` if it does not exist and `required` is false.
pub fn load(path: &Path, required: bool) -> Result<Option<CocoonFile>, ConfigFileError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(None),
        Err(source) => {
            return Err(ConfigFileError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    parse(&text)
        .map(Some)
        .map_err(|message| ConfigFileError::Invalid {
            path: path.to_owned(),
            message,
        })
}

/// Reads the file's text: the parser's words (with line and column) when it is not a
/// valid file. Apart from [`load`] so that its decoder can be fuzzed without a disk.
pub fn parse(text: &str) -> Result<CocoonFile, String> {
    toml::from_str(text).map_err(|e| e.to_string().trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DEFAULT_FILE);
        std::fs::write(
            &path,
            "hub = \"http://h:1\"\nname = \"n\"\nno_exec = true\n[[services]]\nname = \"web\"\nport = 80\nhealth = \"healthz\"\n",
        )
        .expect("write");
        let f = load(&path, true).expect("ok").expect("present");
        assert_eq!(f.hub_urls(), ["http://h:1"]);
        assert!(f.no_exec);
        let s = f.services.into_iter().next().expect("one");
        let s = crate::services::check(&s.name, s.port, s.health.as_deref()).expect("valid");
        assert_eq!(s.health_path.as_deref(), Some("/healthz"));
    }

    #[test]
    fn openai_servers_are_listed_as_name_port() {
        let f = parse("openai = [\"llm:8080\", \"embed:8081\"]\n").expect("ok");
        let parsed: Vec<_> = f
            .openai
            .iter()
            .map(|s| crate::services::parse_openai(s).expect("valid"))
            .collect();
        assert_eq!(parsed[1].name, "embed");
        assert!(parsed
            .iter()
            .all(|s| s.kind == adi_protocol::ServiceKind::OpenAi));
        assert!(
            parse("openai = \"llm:8080\"\n").is_err(),
            "a list, not a string"
        );
        assert!(parse("").expect("ok").openai.is_empty());
    }

    #[test]
    fn tcp_services_are_listed_as_name_port() {
        let f = parse("tcp = [\"ssh:22\", \"pg:5432\"]\n").expect("ok");
        let parsed: Vec<_> = f
            .tcp
            .iter()
            .map(|s| crate::services::parse_tcp(s).expect("valid"))
            .collect();
        assert_eq!((parsed[1].name.as_str(), parsed[1].port), ("pg", 5432));
        assert!(parsed
            .iter()
            .all(|s| s.kind == adi_protocol::ServiceKind::Tcp));
        assert!(parse("tcp = \"ssh:22\"\n").is_err(), "a list, not a string");
        assert!(parse("").expect("ok").tcp.is_empty());
    }

    #[test]
    fn several_hubs_are_listed_the_primary_first() {
        let f = parse("hubs = [\"http://a:1\", \"http://b:1\"]\n").expect("ok");
        assert_eq!(f.hub_urls(), ["http://a:1", "http://b:1"]);
        let f = parse("hub = \"http://a:1\"\nhubs = [\"http://b:1\"]\n").expect("ok");
        assert_eq!(f.hub_urls(), ["http://a:1", "http://b:1"]);
        assert!(parse("").expect("ok").hub_urls().is_empty());
    }

    #[test]
    fn typos_and_bad_values_are_reported_with_their_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DEFAULT_FILE);
        std::fs::write(&path, "name = \"n\"\nservicez = []\n").expect("write");
        let err = load(&path, true).expect_err("unknown key").to_string();
        assert!(err.contains("servicez") && err.contains("line 2"), "{err}");
        std::fs::write(&path, "[[services]]\nname = \"x\"\nport = 70000\n").expect("write");
        let err = load(&path, true).expect_err("bad port").to_string();
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn a_missing_optional_file_is_fine_a_missing_required_one_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(load(&dir.path().join("nope.toml"), false)
            .expect("ok")
            .is_none());
        assert!(load(&dir.path().join("nope.toml"), true).is_err());
    }
}
