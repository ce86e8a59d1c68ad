//! `adi cocoon ...`: run this device's agent, and manage devices through the hub.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde::Deserialize;

use adi_cocoon::CocoonConfig;
use adi_protocol::views::{
    CocoonView, DeviceDeleted, MemberList, MemberView, TokenList, TokenView,
};
use adi_protocol::Role;

use crate::client::{HubArgs, HubClient, ListArgs};
use crate::cmd::agent::{data_dir_and_file, disabled_set, PluginArgs};
use crate::paths;

#[derive(Subcommand)]
pub enum CocoonCmd {
    /// Run this device's agent: connect to the hub and stay connected.
    Run(Box<crate::cmd::agent::RunArgs>),
    /// Print a one-time token: a setup token enrols a new device, a share token
    /// (--share DEVICE) makes whoever claims it a member (--role user, the default,
    /// or --role owner).
    GenerateToken(TokenArgs),
    /// Become a member of a device with a share token someone gave you.
    Claim(ClaimArgs),
    /// List who may use a device, and their role.
    Members(DeviceArgs),
    /// Remove a member from a device you own (a user name or id); they lose it at once.
    RemoveMember(RemoveMemberArgs),
    /// Give a member of a device you own another role: `owner` (also shares it, removes
    /// members and deletes it) or `user`.
    SetRole(SetRoleArgs),
    /// Stop being a member of a device someone shared with you.
    Leave(DeviceArgs),
    /// Remove a device you own from the hub: every member loses it, its agent is
    /// told and stops, and its secret is refused from then on. Its task store on the
    /// device is left alone.
    Delete(DeleteArgs),
    /// List the setup and share tokens you made, newest first, and where each stands
    /// (never their secrets, which the hub does not keep).
    Tokens(ListArgs),
    /// Take back a setup or share token nobody used yet (its id, or the token itself).
    RevokeToken(RevokeTokenArgs),
    /// List your devices.
    List(ListArgs),
    /// List a device's services: their kind, health and, for OpenAI-compatible
    /// servers, the models they serve.
    Services(ServicesArgs),
    /// List what this device would offer (built-ins and plugin manifests), and where
    /// each capability comes from. Exits 1 if a manifest is invalid.
    Capabilities(CapabilitiesArgs),
    /// Ask, as this device, for a capability served by the best device its owners may
    /// use; prints the answer (and, on stderr, the device that served it).
    Request(RequestArgs),
    /// Keep this device's agent running under systemd.
    #[command(subcommand)]
    Service(crate::cmd::service::ServiceCmd),
}

/// Where a cocoon's data dir and plugin settings are, for commands run beside it.
#[derive(Args)]
pub struct CapabilitiesArgs {
    /// The cocoon's data dir (default: XDG data dir).
    #[arg(long, env = "ADI_COCOON_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// TOML config file (default: cocoon.toml in the data dir, if present).
    #[arg(long, env = "ADI_COCOON_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    plugins: PluginArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct RequestArgs {
    /// PROTOCOL, PROTOCOL@VERSION or PROTOCOL:VERSION (least compatible version).
    capability: String,
    /// The request, as JSON; `-` reads it from stdin, `@FILE` from a file.
    #[arg(long, default_value = "null")]
    payload: String,
    /// Try this device first (a device id).
    #[arg(long, value_name = "DEVICE")]
    prefer: Option<String>,
    /// Only devices serving this model (`llm.chat`, `embeddings`); by default the
    /// payload's own `model` field, if it has one.
    #[arg(long)]
    model: Option<String>,
    /// How long to wait for the answer.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// The asking cocoon's data dir (default: XDG data dir).
    #[arg(long, env = "ADI_COCOON_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Print `{from_device, payload}` instead of the payload alone.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct TokenArgs {
    /// Make a share token for this device (id or name) instead of a setup token.
    #[arg(long, value_name = "DEVICE")]
    share: Option<String>,
    /// With --share: the role whoever claims it gets: `user` (uses the device) or
    /// `owner` (also shares it, removes members and deletes it).
    #[arg(long, requires = "share", value_parser = parse_role)]
    role: Option<Role>,
    /// How long the token stays valid (e.g. 10m, 1h, 7d).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    expires: Duration,
    /// Print the hub's full answer as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    hub: HubArgs,
}

#[derive(Args)]
pub struct ClaimArgs {
    /// The share token.
    token: String,
    #[command(flatten)]
    hub: HubArgs,
}

#[derive(Args)]
pub struct RevokeTokenArgs {
    /// The token's id (from `adi cocoon tokens`) or the whole token.
    token: String,
    #[command(flatten)]
    hub: HubArgs,
}

#[derive(Args)]
pub struct DeviceArgs {
    /// Device id or name.
    device: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    hub: HubArgs,
}

#[derive(Args)]
pub struct RemoveMemberArgs {
    /// Device id or name.
    device: String,
    /// The member's user name or id.
    user: String,
    #[command(flatten)]
    hub: HubArgs,
}

#[derive(Args)]
pub struct SetRoleArgs {
    /// Device id or name.
    device: String,
    /// The member's user name or id (`me` for yourself).
    user: String,
    /// `owner` or `user`.
    #[arg(value_parser = parse_role)]
    role: Role,
    #[command(flatten)]
    hub: HubArgs,
}

#[derive(Args)]
pub struct DeleteArgs {
    /// Device id or name.
    device: String,
    /// Delete without asking.
    #[arg(long, short = 'y')]
    yes: bool,
    #[command(flatten)]
    hub: HubArgs,
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("{s:?} is not a role: use `user` or `owner`"))
}

#[derive(Args)]
pub struct ServicesArgs {
    /// Device id or name.
    device: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    hub: HubArgs,
}

pub async fn run(cmd: CocoonCmd) -> Result<()> {
    match cmd {
        CocoonCmd::Run(a) => crate::cmd::agent::run(*a).await,
        CocoonCmd::GenerateToken(a) => generate_token(a).await,
        CocoonCmd::Claim(a) => claim(a).await,
        CocoonCmd::Members(a) => members(a).await,
        CocoonCmd::RemoveMember(a) => remove_member(a).await,
        CocoonCmd::SetRole(a) => set_role(a).await,
        CocoonCmd::Leave(a) => leave(a).await,
        CocoonCmd::Delete(a) => delete(a).await,
        CocoonCmd::Tokens(a) => tokens(a).await,
        CocoonCmd::RevokeToken(a) => revoke_token(a).await,
        CocoonCmd::List(a) => list(a).await,
        CocoonCmd::Services(a) => services(a).await,
        CocoonCmd::Capabilities(a) => capabilities(a),
        CocoonCmd::Request(a) => request(a).await,
        CocoonCmd::Service(c) => crate::cmd::service::run(c),
    }
}

/// Parses `--local-api`: a loopback `IP:PORT`, or `off`.
#[derive(Deserialize, serde::Serialize)]
struct TokenAnswer {
    token: String,
    kind: String,
    expires_at: i64,
    #[serde(default)]
    device_id: Option<String>,
    #[serde(default)]
    role: Option<Role>,
}

async fn generate_token(args: TokenArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let body = match &args.share {
        Some(device) => serde_json::json!({
            "kind": "share",
            "device_id": crate::client::resolve_device(&client, device).await?,
            "role": args.role.unwrap_or(Role::User),
            "expires_in_secs": args.expires.as_secs()
        }),
        None => serde_json::json!({ "kind": "setup", "expires_in_secs": args.expires.as_secs() }),
    };
    let answer: TokenAnswer = client.post("/api/tokens", &body).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    println!("{}", answer.token);
    let expires = humantime::format_duration(args.expires);
    if args.share.is_some() {
        eprintln!(
            "one-time share token ({} role), valid {expires}; the recipient runs: adi cocoon claim TOKEN",
            answer.role.unwrap_or(Role::User)
        );
    } else {
        eprintln!(
            "one-time setup token, valid {expires}; on the new device run:\n  curl -fsSL {hub}/install.sh | sh -s -- TOKEN\nor: adi cocoon run --hub {hub} --token TOKEN --name NAME",
            hub = client.base
        );
    }
    Ok(())
}

async fn claim(args: ClaimArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let device: CocoonView = client
        .post(
            "/api/tokens/claim",
            &serde_json::json!({ "token": args.token.trim() }),
        )
        .await?;
    let role = match device.role {
        Some(Role::Owner) => "an owner",
        Some(Role::User) => "a user",
        None => "a member",
    };
    println!("you are now {role} of {} ({})", device.name, device.id);
    Ok(())
}

fn print_members(members: &[MemberView]) {
    let rows: Vec<[String; 3]> = members
        .iter()
        .map(|m| [m.name.clone(), m.role.as_str().to_owned(), m.id.to_string()])
        .collect();
    crate::table::print_table(["USER", "ROLE", "ID"], &rows);
}

async fn members(args: DeviceArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let device = crate::client::resolve_device(&client, &args.device).await?;
    let list: MemberList = client
        .get(&format!("/api/cocoons/{device}/members"))
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list.members)?);
        return Ok(());
    }
    print_members(&list.members);
    Ok(())
}

async fn remove_member(args: RemoveMemberArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let device = crate::client::resolve_device(&client, &args.device).await?;
    let user =
        percent_encoding::utf8_percent_encode(args.user.trim(), percent_encoding::NON_ALPHANUMERIC);
    let list: MemberList = client
        .delete(&format!("/api/cocoons/{device}/members/{user}"))
        .await?;
    println!(
        "removed {} from {}; they lost it at once. Members now:",
        args.user.trim(),
        args.device
    );
    print_members(&list.members);
    Ok(())
}

async fn set_role(args: SetRoleArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let device = crate::client::resolve_device(&client, &args.device).await?;
    let user =
        percent_encoding::utf8_percent_encode(args.user.trim(), percent_encoding::NON_ALPHANUMERIC);
    let list: MemberList = client
        .patch(
            &format!("/api/cocoons/{device}/members/{user}"),
            &serde_json::json!({ "role": args.role }),
        )
        .await?;
    println!(
        "{} is now {} of {}. Members now:",
        args.user.trim(),
        match args.role {
            Role::Owner => "an owner",
            Role::User => "a user",
        },
        args.device
    );
    print_members(&list.members);
    Ok(())
}

async fn leave(args: DeviceArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let device = crate::client::resolve_device(&client, &args.device).await?;
    let _: MemberList = client
        .delete(&format!("/api/cocoons/{device}/members/me"))
        .await?;
    println!("you left {}; it is no longer in your devices", args.device);
    Ok(())
}

async fn delete(args: DeleteArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let device = crate::client::resolve_device(&client, &args.device).await?;
    if !args.yes {
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() {
            bail!(
                "deleting a device cannot be undone: pass --yes to delete {}",
                args.device
            );
        }
        eprint!(
            "Delete {} ({device})? Every member loses it, its agent stops, and it can only \
             come back with a new setup token. Type the device's name or id to confirm: ",
            args.device
        );
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        let answer = answer.trim();
        if answer != args.device && answer != device {
            bail!("not deleted");
        }
    }
    let deleted: DeviceDeleted = client.delete(&format!("/api/cocoons/{device}")).await?;
    println!(
        "deleted {} ({}){}",
        deleted.name,
        deleted.device_id,
        if deleted.agent_told {
            "; its agent was told and stops"
        } else {
            "; its agent is offline and will be refused when it comes back"
        }
    );
    Ok(())
}

async fn tokens(args: ListArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let list: TokenList = client.get("/api/tokens").await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list.tokens)?);
        return Ok(());
    }
    if list.tokens.is_empty() {
        println!("no tokens yet: `adi cocoon generate-token` makes one");
        return Ok(());
    }
    let now = adi_signaling::auth::unix_now_i64();
    let rows: Vec<[String; 5]> = list
        .tokens
        .iter()
        .map(|t| {
            let when = match (t.used_at, t.revoked_at) {
                (Some(at), _) => format!("used {}", ago(now, at)),
                (None, Some(at)) => format!("revoked {}", ago(now, at)),
                (None, None) if t.expires_at <= now => {
                    format!("expired {}", ago(now, t.expires_at))
                }
                (None, None) => format!("expires in {}", span(t.expires_at - now)),
            };
            [
                t.id.clone(),
                t.kind.clone(),
                t.device_id
                    .as_ref()
                    .map_or_else(|| "-".into(), ToString::to_string),
                t.state.as_str().to_owned(),
                when,
            ]
        })
        .collect();
    crate::table::print_table(["ID", "KIND", "DEVICE", "STATE", "WHEN"], &rows);
    Ok(())
}

/// A duration in whole seconds, in the largest unit that keeps it readable.
fn span(secs: i64) -> String {
    let secs = u64::try_from(secs.max(0)).unwrap_or(0);
    let rounded = match secs {
        s if s >= 86_400 => s / 3600 * 3600,
        s if s >= 3600 => s / 60 * 60,
        s => s,
    };
    humantime::format_duration(Duration::from_secs(rounded)).to_string()
}

fn ago(now: i64, at: i64) -> String {
    format!("{} ago", span(now - at))
}

/// The public id of a token given whole (`adi_setup_<id>_<secret>`), or the id itself.
fn token_id(given: &str) -> &str {
    let given = given.trim();
    ["adi_setup_", "adi_share_"]
        .iter()
        .find_map(|p| given.strip_prefix(p))
        .and_then(|rest| rest.get(..16))
        .unwrap_or(given)
}

async fn revoke_token(args: RevokeTokenArgs) -> Result<()> {
    let id = token_id(&args.token);
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("{id:?} is not a token id: give the ID column of `adi cocoon tokens`, or the token");
    }
    let client = HubClient::connect(&args.hub).await?;
    let token: TokenView = client.delete(&format!("/api/tokens/{id}")).await?;
    println!(
        "revoked {} token {}; it can no longer be used",
        token.kind, token.id
    );
    Ok(())
}

#[derive(Deserialize)]
struct CocoonList {
    cocoons: Vec<CocoonView>,
}

async fn list(args: ListArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let list: CocoonList = client.get("/api/cocoons").await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list.cocoons)?);
        return Ok(());
    }
    if list.cocoons.is_empty() {
        println!("no devices yet: `adi cocoon generate-token` makes a setup token for one");
        return Ok(());
    }
    let rows: Vec<[String; 8]> = list
        .cocoons
        .iter()
        .map(|c| {
            [
                c.id.to_string(),
                c.name.clone(),
                c.status.clone(),
                c.last_heartbeat_age_secs
                    .map(|a| format!("{a:.1}s ago"))
                    .unwrap_or_else(|| "-".into()),
                c.load
                    .as_ref()
                    .map(|l| {
                        format!(
                            "{}cpu {:.0}% {}/{}GiB",
                            l.cpu_count,
                            l.cpu_percent,
                            gib(l.ram_used_bytes),
                            gib(l.ram_total_bytes)
                        )
                    })
                    .unwrap_or_else(|| "-".into()),
                c.load
                    .as_ref()
                    .map(|l| {
                        if l.gpus.is_empty() {
                            "none".to_owned()
                        } else {
                            l.gpus
                                .iter()
                                .map(|g| {
                                    format!(
                                        "{} {}/{}GiB {}%",
                                        g.name,
                                        gib(g.memory_used_bytes),
                                        gib(g.memory_total_bytes),
                                        g.utilization_percent
                                    )
                                })
                                .collect::<Vec<_>>()
                                .join("; ")
                        }
                    })
                    .unwrap_or_else(|| "-".into()),
                join_or_dash(c.services.iter().map(|s| format!("{}:{}", s.name, s.port))),
                join_or_dash(c.capabilities.iter().map(ToString::to_string)),
            ]
        })
        .collect();
    crate::table::print_table(
        [
            "ID",
            "NAME",
            "STATUS",
            "HEARTBEAT",
            "CPU/RAM",
            "GPUS",
            "SERVICES",
            "CAPABILITIES",
        ],
        &rows,
    );
    for c in list.cocoons.iter() {
        if let Some(conflict) = &c.conflict {
            println!(
                "warning: {} ({}) was connected from two places at once: the agent from {} \
                 was stopped when one from {} connected with the same device secret",
                c.name,
                c.id,
                conflict
                    .displaced_from
                    .as_deref()
                    .unwrap_or("an unknown address"),
                conflict
                    .connected_from
                    .as_deref()
                    .unwrap_or("an unknown address"),
            );
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct ServiceList {
    services: Vec<ServiceRow>,
}

/// A service as the hub lists it: `ServiceView`'s fields, with the kind and models of
/// OpenAI-compatible servers read when the hub gives them (a hub that predates them
/// leaves them out, and the table shows `-`). Printed back with `--json`.
#[derive(Deserialize, serde::Serialize)]
struct ServiceRow {
    name: String,
    port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    health_path: Option<String>,
    #[serde(default = "unknown_health")]
    health: adi_protocol::HealthStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    health_detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<adi_protocol::ServiceKind>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    models: Vec<String>,
}

fn unknown_health() -> adi_protocol::HealthStatus {
    adi_protocol::HealthStatus::Unknown
}

/// Model names shown in a table cell; `--json` lists them all.
const SHOWN_MODELS: usize = 5;

/// A service's models for a table: the first few, then how many more.
fn models_cell(kind: Option<adi_protocol::ServiceKind>, models: &[String]) -> String {
    if kind != Some(adi_protocol::ServiceKind::OpenAi) {
        return "-".into();
    }
    if models.is_empty() {
        return "none listed".into();
    }
    let mut shown = models
        .iter()
        .take(SHOWN_MODELS)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if models.len() > SHOWN_MODELS {
        shown.push_str(&format!(" (+{} more)", models.len() - SHOWN_MODELS));
    }
    shown
}

async fn services(args: ServicesArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let device = crate::client::resolve_device(&client, &args.device).await?;
    let list: ServiceList = client
        .get(&format!("/api/cocoons/{device}/services"))
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list.services)?);
        return Ok(());
    }
    let rows: Vec<[String; 6]> = list
        .services
        .iter()
        .map(|s| {
            let health = serde_json::to_value(s.health)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let kind = s
                .kind
                .and_then(|k| serde_json::to_value(k).ok())
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| "-".into());
            [
                s.name.clone(),
                kind,
                s.port.to_string(),
                match &s.health_detail {
                    Some(d) => format!("{health} ({d})"),
                    None => health,
                },
                s.health_path.clone().unwrap_or_else(|| "-".into()),
                models_cell(s.kind, &s.models),
            ]
        })
        .collect();
    crate::table::print_table(
        ["NAME", "KIND", "PORT", "HEALTH", "HEALTH PATH", "MODELS"],
        &rows,
    );
    Ok(())
}

fn capabilities(args: CapabilitiesArgs) -> Result<()> {
    let (data_dir, file) = data_dir_and_file(args.data_dir.clone(), args.config.as_deref())?;
    let mut disabled = args.plugins.disable_capabilities;
    disabled.extend(file.disable_capabilities.iter().cloned());
    let mut config = CocoonConfig::new("http://unused", data_dir, "unused");
    config.plugins_dir = args.plugins.plugins_dir.or(file.plugins_dir.clone());
    config.disabled_capabilities = disabled_set(&disabled)?;
    // The file's services, so that a manifest's server reusing a name is reported.
    config.services =
        crate::cmd::agent::declared_services(Vec::new(), Vec::new(), Vec::new(), &file)?;
    let set = adi_cocoon::plugins::load(&config.plugin_config());
    for e in &set.errors {
        eprintln!("skipped: {e}");
    }
    if args.json {
        let rows: Vec<serde_json::Value> = set
            .served
            .iter()
            .map(|s| {
                serde_json::json!({
                    "protocol": s.offer.protocol,
                    "version": s.offer.version.to_string(),
                    "idempotent": s.offer.idempotent,
                    "source": s.source,
                    "plugin": s.plugin,
                    "serves": serves_text(&s.serve),
                })
            })
            .collect();
        let of_kind = |kind: adi_protocol::ServiceKind| -> Vec<serde_json::Value> {
            set.services
                .iter()
                .filter(|s| s.service.kind == kind)
                .map(|s| {
                    serde_json::json!({
                        "name": s.service.name,
                        "port": s.service.port,
                        "source": s.source,
                        "plugin": s.plugin,
                    })
                })
                .collect()
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "capabilities": rows,
                "openai": of_kind(adi_protocol::ServiceKind::OpenAi),
                "tcp": of_kind(adi_protocol::ServiceKind::Tcp),
                "errors": set.errors
            }))?
        );
    } else {
        let rows: Vec<[String; 5]> = set
            .served
            .iter()
            .map(|s| {
                [
                    s.offer.protocol.clone(),
                    s.offer.version.to_string(),
                    if s.offer.idempotent { "yes" } else { "no" }.into(),
                    match &s.plugin {
                        Some(name) => format!("{} ({name})", s.source),
                        None => s.source.clone(),
                    },
                    serves_text(&s.serve),
                ]
            })
            .collect();
        crate::table::print_table(
            ["PROTOCOL", "VERSION", "IDEMPOTENT", "SOURCE", "SERVES"],
            &rows,
        );
        if !set.services.is_empty() {
            println!();
            let rows: Vec<[String; 4]> = set
                .services
                .iter()
                .map(|s| {
                    [
                        s.service.name.clone(),
                        serde_json::to_value(s.service.kind)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default(),
                        format!("127.0.0.1:{}", s.service.port),
                        match &s.plugin {
                            Some(name) => format!("{} ({name})", s.source),
                            None => s.source.clone(),
                        },
                    ]
                })
                .collect();
            crate::table::print_table(["MANIFEST SERVICE", "KIND", "AT", "SOURCE"], &rows);
        }
    }
    if !set.errors.is_empty() {
        bail!(
            "{} manifest problem(s); the cocoon skips those and offers the rest",
            set.errors.len()
        );
    }
    Ok(())
}

fn serves_text(serve: &adi_cocoon::plugins::Serve) -> String {
    match serve {
        adi_cocoon::plugins::Serve::Builtin => "the cocoon itself".into(),
        adi_cocoon::plugins::Serve::Http(url) => format!("POST {url}"),
        adi_cocoon::plugins::Serve::Command { argv, .. } => argv.join(" "),
        adi_cocoon::plugins::Serve::Models { path, servers } => servers
            .iter()
            .map(|s| format!("POST 127.0.0.1:{}{path} ({})", s.port, s.name))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

#[derive(Deserialize)]
struct LocalError {
    error: LocalErrorDetail,
}

#[derive(Deserialize)]
struct LocalErrorDetail {
    code: String,
    message: String,
}

async fn request(args: RequestArgs) -> Result<()> {
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| paths::data_dir("cocoon"));
    let info = adi_cocoon::local_api::read_info(&data_dir).with_context(|| {
        format!(
            "no running cocoon's local API found in {} (is `adi cocoon run` running with this data dir, and its local API on?)",
            data_dir.display()
        )
    })?;
    let (protocol, version) = match args.capability.split_once(['@', ':']) {
        Some((p, v)) => (p.trim().to_owned(), Some(v.trim().to_owned())),
        None => (args.capability.trim().to_owned(), None),
    };
    adi_protocol::CapabilityQuery::new(&protocol, version.as_deref())?;
    let raw = if args.payload == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the payload from stdin")?;
        s
    } else if let Some(path) = args.payload.strip_prefix('@') {
        std::fs::read_to_string(path).with_context(|| format!("reading the payload from {path}"))?
    } else {
        args.payload.clone()
    };
    let payload = adi_protocol::Payload::from_json(raw).context("--payload is not valid JSON")?;
    let body = adi_protocol::capability::RequestBody {
        version,
        payload,
        prefer_device: args.prefer,
        model: args.model,
        timeout_ms: u64::try_from(args.timeout.as_millis()).ok(),
    };
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()?
        .post(format!("{}/v1/capabilities/{protocol}/request", info.url))
        .bearer_auth(&info.token)
        .json(&body)
        .timeout(args.timeout + Duration::from_secs(5))
        .send()
        .await
        .with_context(|| format!("cannot reach the cocoon's local API at {}", info.url))?;
    let status = resp.status();
    let bytes = resp.bytes().await?;
    if !status.is_success() {
        match serde_json::from_slice::<LocalError>(&bytes) {
            Ok(e) => bail!("{} ({})", e.error.message, e.error.code),
            Err(_) => bail!("the local API answered HTTP {status}"),
        }
    }
    let answer: adi_protocol::CapabilityAnswer = serde_json::from_slice(&bytes)
        .context("the local API's answer is not what this adi expects")?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::to_value(&answer)?)?
        );
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(&answer.payload.to_value())?
        );
        eprintln!("served by device {}", answer.from_device);
    }
    Ok(())
}

fn gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 30) as f64)
}

fn join_or_dash(items: impl Iterator<Item = String>) -> String {
    let joined: Vec<String> = items.collect();
    if joined.is_empty() {
        "-".into()
    } else {
        joined.join(",")
    }
}
