//! `adi keys ...`: the signed-in user's API keys. A key made here is shown once; the hub
//! keeps only its hash. Narrow keys (a few scopes, a few devices, an expiry) are what
//! scripts, CI jobs and other machines should hold.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};

use adi_protocol::views::{KeyCreated, KeyList, KeyView};
use adi_protocol::Scope;

use crate::client::{HubArgs, HubClient, ListArgs};

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Make a named key and print it (only the key, on one line); it is shown once.
    Create(CreateArgs),
    /// List your keys, revoked ones too (never their secrets).
    List(ListArgs),
    /// Revoke a key (its name or id): every session opened with it ends at once.
    Revoke(RevokeArgs),
}

#[derive(Args)]
pub struct CreateArgs {
    /// A name for the key, unique among your keys (e.g. ci, laptop).
    name: String,
    /// What it may do; repeat for several (default: everything your session may).
    /// One of: devices:read, tasks:write, proxy, capabilities, members:write, keys:write.
    #[arg(long = "scope", value_name = "SCOPE", value_parser = parse_scope)]
    scopes: Vec<Scope>,
    /// A device (id or name) it is limited to; repeat for several (default: no limit).
    #[arg(long = "device", value_name = "DEVICE")]
    devices: Vec<String>,
    /// When it stops working (e.g. 30d, 12h; default: never).
    #[arg(long, value_parser = humantime::parse_duration)]
    expires: Option<Duration>,
    /// Print the hub's full answer as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    hub: HubArgs,
}

#[derive(Args)]
pub struct RevokeArgs {
    /// The key's name or id.
    key: String,
    #[command(flatten)]
    hub: HubArgs,
}

fn parse_scope(s: &str) -> Result<Scope, String> {
    Scope::parse(s).ok_or_else(|| {
        let all: Vec<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
        format!("{s:?} is not a scope: use one of {}", all.join(", "))
    })
}

pub async fn run(cmd: KeysCmd) -> Result<()> {
    match cmd {
        KeysCmd::Create(a) => create(a).await,
        KeysCmd::List(a) => list(a).await,
        KeysCmd::Revoke(a) => revoke(a).await,
    }
}

async fn create(args: CreateArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let mut body = serde_json::json!({ "name": args.name.trim() });
    if !args.scopes.is_empty() {
        body["scopes"] = serde_json::to_value(&args.scopes)?;
    }
    if !args.devices.is_empty() {
        body["devices"] = serde_json::to_value(&args.devices)?;
    }
    if let Some(expires) = args.expires {
        if expires.is_zero() {
            bail!("--expires must be longer than nothing");
        }
        body["expires_in_secs"] = expires.as_secs().max(1).into();
    }
    let created: KeyCreated = client.post("/api/keys", &body).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&created)?);
        return Ok(());
    }
    println!("{}", created.key);
    eprintln!(
        "key {} ({}): {}; shown this once, the hub keeps only its hash",
        created.view.name.as_deref().unwrap_or("-"),
        created.view.id,
        allows(&created.view)
    );
    Ok(())
}

/// What a key allows, in words.
fn allows(k: &KeyView) -> String {
    let scopes = k.scopes.as_ref().map_or_else(
        || "every scope".to_owned(),
        |s| s.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
    );
    let devices = k.devices.as_ref().map_or_else(
        || "every device".to_owned(),
        |d| format!("{} device(s)", d.len()),
    );
    format!("{scopes} on {devices}")
}

async fn list(args: ListArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let list: KeyList = client.get("/api/keys").await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list.keys)?);
        return Ok(());
    }
    let rows: Vec<[String; 5]> = list
        .keys
        .iter()
        .map(|k| {
            [
                k.name.clone().unwrap_or_else(|| "-".into()),
                k.id.clone(),
                k.state.clone(),
                allows(k),
                k.expires_at.map_or_else(|| "never".into(), when),
            ]
        })
        .collect();
    crate::table::print_table(["NAME", "ID", "STATE", "ALLOWS", "EXPIRES"], &rows);
    Ok(())
}

/// Unix seconds as an RFC 3339 time.
fn when(unix: i64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap_or(0));
    humantime::format_rfc3339_seconds(at).to_string()
}

async fn revoke(args: RevokeArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let given =
        percent_encoding::utf8_percent_encode(args.key.trim(), percent_encoding::NON_ALPHANUMERIC);
    let key: KeyView = client.delete(&format!("/api/keys/{given}")).await?;
    println!(
        "revoked key {} ({}); every session opened with it has ended",
        key.name.as_deref().unwrap_or("-"),
        key.id
    );
    Ok(())
}
