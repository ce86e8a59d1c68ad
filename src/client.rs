//! The CLI's side of the REST API: where the hub is, which session to present, and
//! turning the hub's error bodies into plain sentences.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use adi_signaling::owner_only;

use crate::paths;

/// Flags every client command takes.
#[derive(Args, Debug, Clone)]
pub struct HubArgs {
    /// Hub URL; defaults to the one `adi login` stored.
    #[arg(long, env = "ADI_HUB", global = true)]
    pub hub: Option<String>,
    /// API key to use instead of the stored session.
    #[arg(long, env = "ADI_API_KEY", global = true, hide_env_values = true)]
    pub api_key: Option<String>,
    /// A private CA (PEM) to trust besides the public roots, for a hub served over
    /// TLS with a certificate of its own CA; defaults to the one `adi login` stored.
    #[arg(long, env = "ADI_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
}

/// A listing command's arguments: the hub, and whether to print JSON.
#[derive(Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub hub: HubArgs,
}

/// What this process trusts besides the public roots: set once, by whichever command
/// first says which hub it talks to, and used by every request to it after; built once.
static TRUST: std::sync::OnceLock<adi_cocoon::trust::Trust> = std::sync::OnceLock::new();

/// Trusts `ca` (besides the public roots) for the rest of this process; checked now,
/// so a bad file is named before anything is sent.
pub fn trust_ca(ca: Option<&std::path::Path>) -> Result<()> {
    let _ = TRUST.set(adi_cocoon::trust::Trust::new(ca)?);
    Ok(())
}

/// The trust set by [`trust_ca`], or the public roots alone when none was (left unset,
/// so a later [`trust_ca`] still takes effect).
fn trust() -> Result<adi_cocoon::trust::Trust> {
    match TRUST.get() {
        Some(t) => Ok(t.clone()),
        None => Ok(adi_cocoon::trust::Trust::new(None)?),
    }
}

/// An HTTP client builder that trusts the public roots and the CA given, if any.
pub fn trusting_builder() -> Result<reqwest::ClientBuilder> {
    Ok(trust()?.http())
}

/// [`trusting_builder`], saying it is adi.
pub fn http_builder() -> Result<reqwest::ClientBuilder> {
    Ok(trusting_builder()?.user_agent(concat!("adi/", env!("CARGO_PKG_VERSION"))))
}

/// Why the hub at `hub` could not be reached: a certificate that does not verify is
/// said with the name and the CAs tried.
pub fn unreachable(hub: &str, e: reqwest::Error) -> anyhow::Error {
    let why = trust()
        .ok()
        .and_then(|t| t.explain(hub, &adi_cocoon::trust::chain(&e)));
    match why {
        Some(why) => anyhow!("cannot reach the hub at {hub}: {why}"),
        None => anyhow::Error::new(e).context(format!("cannot reach the hub at {hub}")),
    }
}

/// What `adi login` keeps in the config dir.
#[derive(Serialize, Deserialize)]
pub struct Session {
    pub hub: String,
    /// The private CA the hub's certificate is checked against, if one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    pub token: String,
    pub expires_at: u64,
    pub user: String,
}

/// Where `adi login` keeps the session.
pub fn session_path() -> PathBuf {
    paths::config_dir().join("session.json")
}

/// Stores the session owner-only (0600, in a 0700 dir): it is a bearer credential.
pub fn save_session(session: &Session) -> Result<PathBuf> {
    let path = session_path();
    if let Some(dir) = path.parent() {
        owner_only::dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    owner_only::write(&path, &serde_json::to_vec_pretty(session)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn load_session() -> Result<Option<Session>> {
    load_session_at(&session_path())
}

/// The session stored at `path`, if there is one; a session (or its dir) others could
/// read is made owner-only first.
pub fn load_session_at(path: &std::path::Path) -> Result<Option<Session>> {
    if let Some(dir) = path.parent().filter(|d| d.exists()) {
        owner_only::tighten(dir).with_context(|| format!("restricting {}", dir.display()))?;
    }
    owner_only::tighten(path).with_context(|| format!("restricting {}", path.display()))?;
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// An authenticated connection to one hub.
pub struct HubClient {
    pub base: String,
    pub token: String,
    /// When `token` expires, unix seconds.
    pub expires_at: u64,
    http: reqwest::Client,
}

#[derive(Deserialize)]
pub struct TokenAnswer {
    pub token: String,
    pub expires_at: u64,
    pub user: UserAnswer,
}

#[derive(Deserialize)]
pub struct UserAnswer {
    pub name: String,
}

pub fn http() -> Result<reqwest::Client> {
    Ok(http_builder()?.build()?)
}

/// Trims a trailing slash so paths join cleanly.
pub fn normalize_hub(url: &str) -> Result<String> {
    let url = url.trim().trim_end_matches('/');
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("hub URL must start with http:// or https:// (got {url:?})");
    }
    Ok(url.to_owned())
}

/// The route every adi hub has always served: what answers it otherwise is no adi hub.
const TOKEN_ROUTE: &str = "/api/auth/token";

/// Exchanges an API key for a JWT. Also where a mistyped hub URL shows: an answer
/// that is not adi's is said to be one, with what came back.
pub async fn exchange_key(hub: &str, api_key: &str) -> Result<TokenAnswer> {
    let resp = http()?
        .post(format!("{hub}{TOKEN_ROUTE}"))
        .json(&serde_json::json!({ "api_key": api_key }))
        .send()
        .await
        .map_err(|e| unreachable(hub, e))?;
    let status = resp.status();
    let bytes = resp.bytes().await.context("reading the hub's answer")?;
    let not_a_hub = || {
        anyhow!(
            "{hub} is not an adi hub (it answered POST {TOKEN_ROUTE} with HTTP {status}{}); \
             check the hub URL",
            snippet(&bytes)
        )
    };
    if status.is_success() {
        return serde_json::from_slice(&bytes).map_err(|_| not_a_hub());
    }
    match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(b) => Err(adi_error(b)),
        // What a reverse proxy says while the hub behind it is down or restarting.
        Err(_) if matches!(status.as_u16(), 502..=504) => Err(anyhow!(
            "the hub at {hub} answered HTTP {status}: it may be restarting, or a proxy in \
             front of it cannot reach it"
        )),
        Err(_) => Err(not_a_hub()),
    }
}

/// What a foreign answer said, as a clause to append.
fn snippet(bytes: &[u8]) -> String {
    match adi_protocol::http::excerpt(bytes) {
        e if e.is_empty() => e,
        e => format!(": {e}"),
    }
}

impl HubClient {
    /// Resolves hub and credentials: flags/env first, then the stored session.
    pub async fn connect(args: &HubArgs) -> Result<Self> {
        let stored = load_session()?;
        let hub = match (&args.hub, &stored) {
            (Some(h), _) => normalize_hub(h)?,
            (None, Some(s)) => s.hub.clone(),
            (None, None) => bail!("no hub given: pass --hub or set ADI_HUB, or run `adi login`"),
        };
        let stored_ca = stored
            .as_ref()
            .filter(|s| s.hub == hub)
            .and_then(|s| s.ca_cert.clone());
        trust_ca(args.ca_cert.as_deref().or(stored_ca.as_deref()))?;
        let (token, expires_at) = if let Some(key) = &args.api_key {
            let answer = exchange_key(&hub, key).await?;
            (answer.token, answer.expires_at)
        } else {
            match stored {
                Some(s) if s.hub == hub => {
                    if s.expires_at <= adi_signaling::auth::unix_now() {
                        bail!("your session expired: run `adi login` again (or set ADI_API_KEY)");
                    }
                    (s.token, s.expires_at)
                }
                _ => bail!("not logged in to {hub}: run `adi login --hub {hub} --api-key KEY` or set ADI_API_KEY"),
            }
        };
        Ok(HubClient {
            base: hub,
            token,
            expires_at,
            http: http()?,
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    /// Sends a request with the session and reads the hub's JSON answer or error.
    async fn call<T: DeserializeOwned>(&self, request: reqwest::RequestBuilder) -> Result<T> {
        let resp = request
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| unreachable(&self.base, e))?;
        parse(resp).await
    }

    /// GET that hands back the raw response, for streams (server-sent events).
    pub async fn get_stream(&self, path: &str) -> Result<reqwest::Response> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header("accept", "text/event-stream")
            .send()
            .await
            .map_err(|e| unreachable(&self.base, e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        parse::<serde_json::Value>(resp).await?;
        bail!("the hub refused the stream")
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T> {
        self.call(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    pub async fn patch<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T> {
        self.call(self.http.patch(format!("{}{path}", self.base)).json(body))
            .await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(self.http.delete(format!("{}{path}", self.base)))
            .await
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

async fn parse<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T> {
    let status = resp.status();
    let bytes = resp.bytes().await.context("reading the hub's answer")?;
    if status.is_success() {
        return serde_json::from_slice(&bytes)
            .context("the hub's answer is not what this adi expects");
    }
    match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(b) => Err(adi_error(b)),
        Err(_) => Err(anyhow!("the hub answered HTTP {status}{}", snippet(&bytes))),
    }
}

fn adi_error(b: ErrorBody) -> anyhow::Error {
    if b.error.code == "unauthorized" {
        anyhow!(
            "{} — run `adi login` again or check ADI_API_KEY",
            b.error.message
        )
    } else {
        anyhow!("{} ({})", b.error.message, b.error.code)
    }
}

/// Accepts a device id, or a device name that matches exactly one of your devices.
pub async fn resolve_device(client: &HubClient, given: &str) -> Result<String> {
    if given.parse::<adi_protocol::DeviceId>().is_ok() {
        return Ok(given.to_owned());
    }
    #[derive(serde::Deserialize)]
    struct CocoonList {
        cocoons: Vec<adi_protocol::views::CocoonView>,
    }
    let list: CocoonList = client.get("/api/cocoons").await?;
    let matches: Vec<&adi_protocol::views::CocoonView> =
        list.cocoons.iter().filter(|c| c.name == given).collect();
    match matches.as_slice() {
        [one] => Ok(one.id.to_string()),
        [] => bail!("no device of yours is called {given:?} (see `adi cocoon list`)"),
        _ => bail!("several devices are called {given:?}; give the id instead"),
    }
}
