//! What this device offers: the built-in capabilities plus those declared by plugin
//! manifests, TOML files in the plugins directory, less the ones turned off.
//!
//! ```toml
//! name = "local-embeddings"
//! [[capabilities]]
//! protocol = "embeddings"
//! version = "1.2.0"
//! http = "http://127.0.0.1:8099/embed"   # the payload is POSTed here as JSON
//! idempotent = true                      # the hub may retry it on another device
//!
//! [[capabilities]]
//! protocol = "summarize"
//! version = "0.3.0"
//! command = ["python3", "summarize.py"] # payload on stdin, answer on stdout
//!
//! [[openai]]                            # an OpenAI-compatible server (llama.cpp, vLLM,
//! name = "llm"                          # Ollama) at 127.0.0.1:PORT: a service like
//! port = 8080                           # --openai llm:8080, its models offered to the hub
//!
//! [[tcp]]                               # a raw TCP service (SSH, a database) at
//! name = "pg"                           # 127.0.0.1:PORT, like --tcp pg:5432: reached with
//! port = 5432                           # `adi connect` or `adi proxy`
//! ```
//!
//! A manifest with any error is reported with its file and line and skipped whole; the
//! others still load. This module only reads files; it never runs or calls a plugin.
//! The directory is read again when a file in it changes, so editing a manifest takes
//! effect without a restart.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use adi_protocol::capability::{parse_version, validate_protocol};
use adi_protocol::{CapabilityOffer, ServiceInfo, ServiceKind};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Capabilities every cocoon serves itself.
pub const BUILTINS: &[(&str, &str)] = &[("tasks", "1.0.0"), ("proxy.http", "1.0.0")];

/// How a capability is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serve {
    /// By the cocoon itself.
    Builtin,
    /// POST the payload to this loopback URL; its JSON answer is the answer.
    Http(String),
    /// Run this program (cwd: the manifest's directory) with the payload on stdin; its
    /// stdout, as JSON, is the answer.
    Command {
        /// Program and arguments.
        argv: Vec<String>,
        /// Working directory.
        cwd: PathBuf,
    },
    /// By this device's OpenAI-compatible servers: the payload is POSTed to `path` on
    /// the first server that lists the model asked for.
    Models {
        /// `/v1/chat/completions` or `/v1/embeddings`.
        path: &'static str,
        /// The servers that list models now, in the order they are declared.
        servers: Vec<ModelServer>,
    },
}

/// One capability this device offers, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// What the hub is told.
    pub offer: CapabilityOffer,
    /// How requests for it are answered.
    pub serve: Serve,
    /// `builtin`, or the manifest's path.
    pub source: String,
    /// The manifest's `name`, if it gives one.
    pub plugin: Option<String>,
}

/// One OpenAI-compatible server behind a model offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelServer {
    /// The service's name.
    pub name: String,
    /// Its loopback port.
    pub port: u16,
    /// The models it listed last.
    pub models: Vec<String>,
}

/// A service a manifest declares (an OpenAI-compatible server or a raw TCP service),
/// and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginService {
    /// The service: of kind `openai`, with no models (the cocoon asks the server), or
    /// of kind `tcp`.
    pub service: ServiceInfo,
    /// The manifest's path.
    pub source: String,
    /// The manifest's `name`, if it gives one.
    pub plugin: Option<String>,
}

/// What one manifest declares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Declared {
    /// Its capabilities.
    pub served: Vec<Served>,
    /// Its OpenAI-compatible servers and raw TCP services.
    pub services: Vec<PluginService>,
}

/// Everything this device offers now, and the manifests that were skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapabilitySet {
    /// In the order they were found: built-ins, then manifests by file name.
    pub served: Vec<Served>,
    /// OpenAI-compatible servers and raw TCP services the manifests declare, by file
    /// name.
    pub services: Vec<PluginService>,
    /// One line per skipped manifest, capability or server: file, line, reason.
    pub errors: Vec<String>,
}

impl CapabilitySet {
    /// The offers, as sent to the hub.
    pub fn offers(&self) -> Vec<CapabilityOffer> {
        self.served.iter().map(|s| s.offer.clone()).collect()
    }

    /// The services the manifests declare, without models.
    pub fn services(&self) -> Vec<ServiceInfo> {
        self.services.iter().map(|s| s.service.clone()).collect()
    }
}

/// Where plugins come from and what is turned off.
#[derive(Debug, Clone, Default)]
pub struct PluginConfig {
    /// Directory of `*.toml` manifests; `None` for built-ins only.
    pub dir: Option<PathBuf>,
    /// Protocol names not to offer, built-ins included.
    pub disabled: BTreeSet<String>,
    /// Service names the flags and the config file already give: a manifest's service
    /// of one of these names is skipped, as the proxy could reach only one of them.
    pub services: BTreeSet<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    #[serde(default)]
    name: Option<String>,
    /// For people reading the file.
    #[serde(default, rename = "description")]
    _description: Option<String>,
    #[serde(default)]
    capabilities: Vec<toml::Spanned<ManifestCapability>>,
    #[serde(default)]
    openai: Vec<toml::Spanned<ManifestService>>,
    #[serde(default)]
    tcp: Vec<toml::Spanned<ManifestService>>,
}

/// An `[[openai]]` or `[[tcp]]` table: a service at `127.0.0.1:port`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestService {
    name: String,
    port: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestCapability {
    protocol: String,
    version: String,
    #[serde(default)]
    http: Option<String>,
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    idempotent: bool,
}

/// Loads the built-ins and every manifest in `config.dir`.
pub fn load(config: &PluginConfig) -> CapabilitySet {
    let mut set = CapabilitySet::default();
    for (protocol, version) in BUILTINS {
        if config.disabled.contains(*protocol) {
            continue;
        }
        if let Ok(offer) = CapabilityOffer::new(protocol, version) {
            set.served.push(Served {
                offer,
                serve: Serve::Builtin,
                source: "builtin".into(),
                plugin: None,
            });
        }
    }
    let Some(dir) = &config.dir else {
        return set;
    };
    for path in manifest_files(dir) {
        match read_manifest(&path) {
            Err(e) => set.errors.push(e),
            Ok(found) => {
                for declared in found.services {
                    let name = &declared.service.name;
                    let first = set
                        .services
                        .iter()
                        .find(|s| s.service.name == *name)
                        .map(|s| s.source.as_str())
                        .or_else(|| {
                            config
                                .services
                                .contains(name)
                                .then_some("the cocoon's flags or config file")
                        });
                    if let Some(first) = first {
                        set.errors.push(format!(
                            "{}: service {name:?} is already declared by {first}; skipped",
                            path.display(),
                        ));
                        continue;
                    }
                    set.services.push(declared);
                }
                for served in found.served {
                    if config.disabled.contains(&served.offer.protocol) {
                        continue;
                    }
                    if let Some(first) = set.served.iter().find(|s| {
                        s.offer.protocol == served.offer.protocol
                            && (s.serve == Serve::Builtin
                                || s.offer.version == served.offer.version)
                    }) {
                        set.errors.push(format!(
                            "{}: {} is already offered by {}; skipped",
                            path.display(),
                            served.offer,
                            first.source
                        ));
                        continue;
                    }
                    set.served.push(served);
                }
            }
        }
    }
    set
}

/// `*.toml` files directly in `dir`, by name; none if it does not exist.
fn manifest_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    files
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(1, |before| {
        before.bytes().filter(|b| *b == b'\n').count() + 1
    })
}

/// What one manifest declares, or one line saying why the file is skipped.
fn read_manifest(path: &Path) -> Result<Declared, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_manifest(&text, path)
}

/// What one manifest declares, from its text (`path` names it in errors and sources, and
/// its directory is a command's working directory), or one line saying why it is
/// skipped. Apart from reading the file so that its decoder can be fuzzed without a disk.
pub fn parse_manifest(text: &str, path: &Path) -> Result<Declared, String> {
    let shown = path.display();
    let manifest: Manifest = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        let message = e.message().trim().to_owned();
        match line {
            Some(l) => format!("{shown}:{l}: {message}"),
            None => format!("{shown}: {message}"),
        }
    })?;
    if manifest.capabilities.is_empty() && manifest.openai.is_empty() && manifest.tcp.is_empty() {
        return Err(format!(
            "{shown}: declares no [[capabilities]], [[openai]] or [[tcp]]"
        ));
    }
    let cwd = path
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let plugin = manifest.name;
    let mut services: Vec<PluginService> =
        Vec::with_capacity(manifest.openai.len() + manifest.tcp.len());
    let openai = manifest
        .openai
        .into_iter()
        .map(|o| (o, ServiceKind::OpenAi));
    let tcp = manifest.tcp.into_iter().map(|t| (t, ServiceKind::Tcp));
    for (spanned, kind) in openai.chain(tcp) {
        let line = line_of(text, spanned.span().start);
        let o = spanned.into_inner();
        let declared = match kind {
            ServiceKind::Tcp => crate::services::tcp(&o.name, o.port),
            _ => crate::services::openai(&o.name, o.port),
        };
        let service = declared.map_err(|e| format!("{shown}:{line}: {e}"))?;
        if services.iter().any(|s| s.service.name == service.name) {
            return Err(format!(
                "{shown}:{line}: service {:?} is declared twice",
                service.name
            ));
        }
        services.push(PluginService {
            service,
            source: path.display().to_string(),
            plugin: plugin.clone(),
        });
    }
    let served = manifest
        .capabilities
        .into_iter()
        .map(|spanned| {
            let line = line_of(text, spanned.span().start);
            let c = spanned.into_inner();
            let fail = |why: String| format!("{shown}:{line}: {why}");
            validate_protocol(&c.protocol).map_err(|e| fail(e.to_string()))?;
            let version = parse_version(&c.version).map_err(|e| fail(e.to_string()))?;
            let serve = match (c.http, c.command) {
                (Some(url), None) => Serve::Http(loopback_url(&url).map_err(fail)?),
                (None, Some(argv)) if !argv.is_empty() && !argv[0].trim().is_empty() => {
                    Serve::Command {
                        argv,
                        cwd: cwd.clone(),
                    }
                }
                (None, Some(_)) => return Err(fail("command must name a program".into())),
                (Some(_), Some(_)) => {
                    return Err(fail("give either http or command, not both".into()))
                }
                (None, None) => return Err(fail(
                    "say how it is served: http = \"http://127.0.0.1:PORT/...\" or command = [...]"
                        .into(),
                )),
            };
            Ok(Served {
                offer: CapabilityOffer {
                    protocol: c.protocol,
                    version,
                    idempotent: c.idempotent,
                    models: Vec::new(),
                },
                serve,
                source: path.display().to_string(),
                plugin: plugin.clone(),
            })
        })
        .collect::<Result<Vec<Served>, String>>()?;
    Ok(Declared { served, services })
}

/// Plugins are reached on this device's loopback only, like proxied services.
fn loopback_url(url: &str) -> Result<String, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("http = {url:?}: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("http = {url:?} must be an http:// URL"));
    }
    let loopback = match parsed.host_str() {
        Some(h) if h.eq_ignore_ascii_case("localhost") => true,
        Some(h) => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    };
    if !loopback || !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(format!(
            "http = {url:?} must point at this device's loopback (127.0.0.1, [::1] or localhost)"
        ));
    }
    Ok(parsed.to_string())
}

/// What the directory looks like, cheaply: names, sizes and modification times.
fn fingerprint(dir: Option<&Path>) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let Some(dir) = dir else {
        return Vec::new();
    };
    manifest_files(dir)
        .into_iter()
        .map(|p| {
            let meta = std::fs::metadata(&p).ok();
            let len = meta.as_ref().map_or(0, std::fs::Metadata::len);
            let modified = meta.and_then(|m| m.modified().ok());
            (p, len, modified)
        })
        .collect()
}

fn report(set: &CapabilitySet) {
    for e in &set.errors {
        warn!("plugin manifest skipped: {e}");
    }
    let offers: Vec<String> = set.served.iter().map(|s| s.offer.to_string()).collect();
    info!(capabilities = %offers.join(","), "capabilities loaded");
    let listed = |kind: ServiceKind| {
        set.services
            .iter()
            .filter(|s| s.service.kind == kind)
            .map(|s| format!("{}:{}", s.service.name, s.service.port))
            .collect::<Vec<String>>()
    };
    let servers = listed(ServiceKind::OpenAi);
    if !servers.is_empty() {
        info!(openai = %servers.join(","), "plugin manifests declare OpenAI-compatible servers");
    }
    let tcp = listed(ServiceKind::Tcp);
    if !tcp.is_empty() {
        info!(tcp = %tcp.join(","), "plugin manifests declare raw TCP services");
    }
}

/// Loads the set now, then reads the directory again every `every` and publishes a new
/// set whenever a manifest was added, changed or removed. Errors are logged once per
/// change, not on every look.
pub fn watch(
    config: PluginConfig,
    every: Duration,
    cancel: CancellationToken,
) -> watch::Receiver<Arc<CapabilitySet>> {
    // Looked at before loading: a change made while loading is then seen on the next look.
    let mut seen = fingerprint(config.dir.as_deref());
    let first = load(&config);
    report(&first);
    let (tx, rx) = watch::channel(Arc::new(first));
    if config.dir.is_some() {
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.reset();
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                let config = config.clone();
                let looked = tokio::task::spawn_blocking(move || {
                    let now = fingerprint(config.dir.as_deref());
                    (now, config)
                })
                .await;
                let Ok((now, config)) = looked else { return };
                if now == seen {
                    continue;
                }
                seen = now;
                let next = load(&config);
                if **tx.borrow() != next {
                    report(&next);
                    tx.send_replace(Arc::new(next));
                }
            }
        });
    }
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).expect("write manifest");
    }

    fn protocols(set: &CapabilitySet) -> Vec<String> {
        set.served.iter().map(|s| s.offer.to_string()).collect()
    }

    #[test]
    fn builtins_plus_valid_manifests_and_bad_ones_reported_by_file_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            "embed.toml",
            "name = \"local-embeddings\"\n[[capabilities]]\nprotocol = \"embeddings\"\nversion = \"1.2.0\"\nhttp = \"http://127.0.0.1:8099/embed\"\nidempotent = true\n",
        );
        write(
            dir.path(),
            "chat.toml",
            "[[capabilities]]\nprotocol = \"llm.chat\"\nversion = \"1\"\ncommand = [\"python3\", \"chat.py\"]\n",
        );
        write(
            dir.path(),
            "typo.toml",
            "[[capabilities]]\nprotocol = \"x\"\nversoin = \"1.0.0\"\nhttp = \"http://127.0.0.1:1/\"\n",
        );
        write(
            dir.path(),
            "remote.toml",
            "[[capabilities]]\nprotocol = \"ok\"\nversion = \"1.0.0\"\ncommand = [\"true\"]\n\n[[capabilities]]\nprotocol = \"evil\"\nversion = \"1.0.0\"\nhttp = \"http://10.0.0.1:80/steal\"\n",
        );
        write(dir.path(), "notes.txt", "not a manifest");
        let set = load(&PluginConfig {
            dir: Some(dir.path().to_owned()),
            disabled: BTreeSet::new(),
            services: BTreeSet::new(),
        });
        assert_eq!(
            protocols(&set),
            vec![
                "tasks:1.0.0",
                "proxy.http:1.0.0",
                "llm.chat:1.0.0",
                "embeddings:1.2.0"
            ]
        );
        let embed = set
            .served
            .iter()
            .find(|s| s.offer.protocol == "embeddings")
            .expect("embeddings");
        assert!(embed.offer.idempotent);
        assert_eq!(
            embed.serve,
            Serve::Http("http://127.0.0.1:8099/embed".into())
        );
        assert!(embed.source.ends_with("embed.toml"));
        assert_eq!(set.errors.len(), 2, "{:?}", set.errors);
        let remote = &set.errors[0];
        assert!(
            remote.contains("remote.toml:6:") && remote.contains("loopback"),
            "{remote}"
        );
        let typo = &set.errors[1];
        assert!(
            typo.contains("typo.toml:3:") && typo.contains("versoin"),
            "{typo}"
        );
    }

    #[test]
    fn disabled_capabilities_and_duplicates_are_left_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            "a.toml",
            "[[capabilities]]\nprotocol = \"embeddings\"\nversion = \"1.0.0\"\ncommand = [\"a\"]\n",
        );
        write(
            dir.path(),
            "b.toml",
            "[[capabilities]]\nprotocol = \"embeddings\"\nversion = \"1.0.0\"\ncommand = [\"b\"]\n[[capabilities]]\nprotocol = \"tasks\"\nversion = \"2.0.0\"\ncommand = [\"b\"]\n",
        );
        let mut config = PluginConfig {
            dir: Some(dir.path().to_owned()),
            disabled: ["proxy.http".to_owned()].into(),
            services: BTreeSet::new(),
        };
        let set = load(&config);
        assert_eq!(protocols(&set), vec!["tasks:1.0.0", "embeddings:1.0.0"]);
        assert_eq!(set.errors.len(), 2, "{:?}", set.errors);
        assert!(set.errors.iter().all(|e| e.contains("already offered")));
        config.disabled.insert("embeddings".into());
        config.disabled.insert("tasks".into());
        assert!(load(&config).served.is_empty());
    }

    #[test]
    fn openai_servers_are_declared_checked_and_never_named_twice() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            "a-llm.toml",
            "name = \"llama\"\n[[openai]]\nname = \"llm\"\nport = 8080\n",
        );
        // A second manifest reusing the name, and one reusing a flag's name.
        write(
            dir.path(),
            "b-again.toml",
            "[[openai]]\nname = \"llm\"\nport = 8081\n",
        );
        write(
            dir.path(),
            "c-web.toml",
            "[[openai]]\nname = \"web\"\nport = 8082\n[[capabilities]]\nprotocol = \"x\"\nversion = \"1.0.0\"\ncommand = [\"x\"]\n",
        );
        write(
            dir.path(),
            "d-bad.toml",
            "[[openai]]\nname = \"ok\"\nport = 1\n\n[[openai]]\nname = \"a b\"\nport = 2\n",
        );
        write(
            dir.path(),
            "e-typo.toml",
            "[[openai]]\nname = \"x\"\nprot = 1\n",
        );
        write(
            dir.path(),
            "f-twice.toml",
            "[[openai]]\nname = \"y\"\nport = 1\n[[openai]]\nname = \"y\"\nport = 2\n",
        );
        write(
            dir.path(),
            "g-port.toml",
            "[[openai]]\nname = \"z\"\nport = 0\n",
        );
        let set = load(&PluginConfig {
            dir: Some(dir.path().to_owned()),
            disabled: BTreeSet::new(),
            services: ["web".to_owned()].into(),
        });
        let names: Vec<(&str, u16)> = set
            .services
            .iter()
            .map(|s| (s.service.name.as_str(), s.service.port))
            .collect();
        assert_eq!(names, [("llm", 8080)]);
        let llm = &set.services[0];
        assert_eq!(llm.service.kind, adi_protocol::ServiceKind::OpenAi);
        assert_eq!(llm.plugin.as_deref(), Some("llama"));
        assert!(llm.source.ends_with("a-llm.toml"));
        // The manifest whose server clashes still offers its capability.
        assert!(protocols(&set).contains(&"x:1.0.0".to_owned()));
        let errors = set.errors.join("\n");
        assert_eq!(set.errors.len(), 6, "{errors}");
        assert!(
            set.errors[0].contains("b-again.toml") && set.errors[0].contains("a-llm.toml"),
            "{errors}"
        );
        assert!(
            set.errors[1].contains("c-web.toml") && set.errors[1].contains("flags"),
            "{errors}"
        );
        assert!(set.errors[2].contains("d-bad.toml:5:"), "{errors}");
        assert!(
            set.errors[3].contains("e-typo.toml:3:") && set.errors[3].contains("prot"),
            "{errors}"
        );
        assert!(set.errors[4].contains("f-twice.toml:4:"), "{errors}");
        assert!(set.errors[5].contains("g-port.toml:1:"), "{errors}");
        assert_eq!(set.services(), vec![llm.service.clone()]);
    }

    #[test]
    fn tcp_services_are_declared_checked_and_share_names_with_every_other_service() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            "a-db.toml",
            "name = \"db\"\n[[tcp]]\nname = \"pg\"\nport = 5432\n[[openai]]\nname = \"llm\"\nport = 8080\n",
        );
        // Reusing a name across kinds, in one manifest and across manifests.
        write(
            dir.path(),
            "b-clash.toml",
            "[[tcp]]\nname = \"llm\"\nport = 1\n",
        );
        write(
            dir.path(),
            "c-twice.toml",
            "[[openai]]\nname = \"x\"\nport = 1\n[[tcp]]\nname = \"x\"\nport = 2\n",
        );
        write(
            dir.path(),
            "d-health.toml",
            "[[tcp]]\nname = \"ssh\"\nport = 22\nhealth = \"/\"\n",
        );
        let set = load(&PluginConfig {
            dir: Some(dir.path().to_owned()),
            disabled: BTreeSet::new(),
            services: BTreeSet::new(),
        });
        let shown: Vec<(&str, u16, ServiceKind)> = set
            .services
            .iter()
            .map(|s| (s.service.name.as_str(), s.service.port, s.service.kind))
            .collect();
        assert_eq!(
            shown,
            [
                ("llm", 8080, ServiceKind::OpenAi),
                ("pg", 5432, ServiceKind::Tcp)
            ]
        );
        assert_eq!(set.services[1].plugin.as_deref(), Some("db"));
        let errors = set.errors.join("\n");
        assert_eq!(set.errors.len(), 3, "{errors}");
        assert!(
            set.errors[0].contains("b-clash.toml") && set.errors[0].contains("a-db.toml"),
            "{errors}"
        );
        assert!(set.errors[1].contains("c-twice.toml:4:"), "{errors}");
        assert!(set.errors[2].contains("d-health.toml"), "{errors}");
        let only = parse_manifest(
            "[[tcp]]\nname = \"ssh\"\nport = 22\n",
            Path::new("/p/t.toml"),
        )
        .expect("a tcp service alone is enough");
        assert!(only.served.is_empty() && only.services.len() == 1);
    }

    #[test]
    fn a_manifest_declaring_nothing_is_skipped() {
        let err = parse_manifest("name = \"empty\"\n", Path::new("/p/empty.toml"))
            .expect_err("nothing declared");
        assert!(err.contains("[[openai]]"), "{err}");
        let only = parse_manifest(
            "[[openai]]\nname = \"llm\"\nport = 9\n",
            Path::new("/p/o.toml"),
        )
        .expect("a server alone is enough");
        assert!(only.served.is_empty() && only.services.len() == 1);
    }

    #[test]
    fn a_missing_directory_means_builtins_only() {
        let set = load(&PluginConfig {
            dir: Some(PathBuf::from("/nonexistent/adi-plugins")),
            disabled: BTreeSet::new(),
            services: BTreeSet::new(),
        });
        assert_eq!(protocols(&set), vec!["tasks:1.0.0", "proxy.http:1.0.0"]);
        assert!(set.errors.is_empty());
    }

    #[tokio::test]
    async fn changes_are_picked_up_without_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cancel = CancellationToken::new();
        let mut rx = watch(
            PluginConfig {
                dir: Some(dir.path().to_owned()),
                disabled: BTreeSet::new(),
                services: BTreeSet::new(),
            },
            Duration::from_millis(20),
            cancel.clone(),
        );
        assert_eq!(rx.borrow_and_update().served.len(), 2);
        write(
            dir.path(),
            "new.toml",
            "[[capabilities]]\nprotocol = \"embeddings\"\nversion = \"1.0.0\"\ncommand = [\"x\"]\n",
        );
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("noticed in time")
            .expect("watcher alive");
        assert_eq!(rx.borrow_and_update().served.len(), 3);
        std::fs::remove_file(dir.path().join("new.toml")).expect("remove");
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("noticed in time")
            .expect("watcher alive");
        assert_eq!(rx.borrow().served.len(), 2);
        cancel.cancel();
    }
}
