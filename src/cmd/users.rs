//! `adi signaling user ...`: a hub's users, administered on the hub host against its
//! catalog (`--data-dir` or `--database-url`). What takes access away (disable, remove,
//! rotate-key) is written to the catalog's change feed, which running hubs apply within
//! a second: the user's sessions end on every route and their open sockets close.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::sync::Arc;

use adi_signaling::audit::{self, Kind};
use adi_signaling::catalog::{self, Catalog, CatalogError, Orphans, User};

use crate::cmd::signaling::CatalogArgs;

#[derive(Subcommand)]
pub enum UserCmd {
    /// Create a user and print their API key (only the key, on one line).
    Add(UserAddArgs),
    /// List users: name, id, state, live keys and devices.
    List(UserListArgs),
    /// Refuse a user everywhere: sign-in, every session, every socket.
    Disable(UserArgs),
    /// Let a disabled user back in (their old sessions stay ended).
    Enable(UserArgs),
    /// Remove a user with their keys, memberships and tokens. The devices they are the
    /// last owner of need --transfer-to USER or --delete-devices.
    Remove(UserRemoveArgs),
    /// Revoke every key of a user and print a new one (only the key, on one line).
    RotateKey(UserArgs),
}

#[derive(Args)]
pub struct UserAddArgs {
    /// Login name.
    name: String,
    #[command(flatten)]
    catalog: CatalogArgs,
    /// Start a new catalog if there is none yet (otherwise a missing one is an error,
    /// so a mistyped --data-dir does not make a catalog no hub uses).
    #[arg(long)]
    create: bool,
}

#[derive(Args)]
pub struct UserListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    catalog: CatalogArgs,
}

#[derive(Args)]
pub struct UserArgs {
    /// Login name.
    name: String,
    #[command(flatten)]
    catalog: CatalogArgs,
}

#[derive(Args)]
pub struct UserRemoveArgs {
    /// Login name.
    name: String,
    /// Make this user the owner of the devices the removed user is the last owner of.
    #[arg(long, value_name = "USER", conflicts_with = "delete_devices")]
    transfer_to: Option<String>,
    /// Delete the devices the removed user is the last owner of.
    #[arg(long)]
    delete_devices: bool,
    #[command(flatten)]
    catalog: CatalogArgs,
}

pub async fn run(cmd: UserCmd) -> Result<()> {
    match cmd {
        UserCmd::Add(a) => add(a).await,
        UserCmd::List(a) => list(a).await,
        UserCmd::Disable(a) => set_disabled(a, true).await,
        UserCmd::Enable(a) => set_disabled(a, false).await,
        UserCmd::Remove(a) => remove(a).await,
        UserCmd::RotateKey(a) => rotate_key(a).await,
    }
}

/// The hub's catalog; a missing embedded one is an error unless `create`, so a
/// mistyped --data-dir does not make a catalog no hub uses.
async fn open(args: &CatalogArgs, create: bool) -> Result<Arc<dyn Catalog>> {
    let data_dir = args.data_dir();
    let url = args.database_url.as_deref();
    if let Some(file) = catalog::sqlite_path(url, &data_dir).filter(|f| !f.exists()) {
        anyhow::ensure!(
            create,
            "no hub catalog at {}: is --data-dir the hub's? (`adi signaling serve` makes \
             one on its first start; `user add --create` makes a new one here)",
            file.display()
        );
    }
    catalog::open(url, &data_dir)
        .await
        .context("opening the catalog")
}

/// Records what an admin did on the hub host to `user`, under the default retention
/// (the hub prunes to its own when it next writes).
async fn admin_event(catalog: &dyn Catalog, kind: Kind, user: adi_signaling::catalog::UserId) {
    let event = audit::event(kind)
        .to(user)
        .detail("by an admin on the hub host");
    audit::record_in(catalog, event, audit::DEFAULT_RETENTION).await;
}

async fn named(catalog: &dyn Catalog, name: &str) -> Result<User> {
    catalog
        .user_by_name(name.trim())
        .await?
        .with_context(|| format!("no user {:?} on this hub", name.trim()))
}

async fn add(args: UserAddArgs) -> Result<()> {
    let name = args.name.trim();
    anyhow::ensure!(
        !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_alphanumeric() || "._-@".contains(c)),
        "user name must be 1-64 letters, digits or . _ - @"
    );
    let catalog = open(&args.catalog, args.create).await?;
    match adi_signaling::auth::add_user(catalog.as_ref(), name).await {
        Ok((_, key)) => {
            println!("{key}");
            Ok(())
        }
        Err(CatalogError::Conflict(_)) => bail!("user {name:?} already exists"),
        Err(e) => Err(e).context("creating the user"),
    }
}

#[derive(serde::Serialize)]
struct UserRow {
    name: String,
    id: String,
    created_at: i64,
    disabled_at: Option<i64>,
    keys: usize,
    devices: usize,
}

async fn list(args: UserListArgs) -> Result<()> {
    let catalog = open(&args.catalog, false).await?;
    let now = adi_signaling::auth::unix_now_i64();
    let mut rows = Vec::new();
    for user in catalog.users().await? {
        let keys = catalog
            .api_keys_of(user.id)
            .await?
            .iter()
            .filter(|k| k.revoked_at.is_none() && k.expires_at.is_none_or(|e| e > now))
            .count();
        let devices = catalog.devices_of(user.id).await?.len();
        rows.push(UserRow {
            name: user.name,
            id: user.id.to_string(),
            created_at: user.created_at,
            disabled_at: user.disabled_at,
            keys,
            devices,
        });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let table: Vec<[String; 5]> = rows
        .into_iter()
        .map(|r| {
            [
                r.name,
                r.id,
                if r.disabled_at.is_some() {
                    "disabled"
                } else {
                    "active"
                }
                .to_owned(),
                r.keys.to_string(),
                r.devices.to_string(),
            ]
        })
        .collect();
    crate::table::print_table(["USER", "ID", "STATE", "KEYS", "DEVICES"], &table);
    Ok(())
}

async fn set_disabled(args: UserArgs, disabled: bool) -> Result<()> {
    let catalog = open(&args.catalog, false).await?;
    let user = named(catalog.as_ref(), &args.name).await?;
    let now = adi_signaling::auth::unix_now_i64();
    catalog
        .set_user_disabled(user.id, disabled.then_some(now), now)
        .await?;
    let kind = if disabled {
        Kind::UserDisabled
    } else {
        Kind::UserEnabled
    };
    admin_event(catalog.as_ref(), kind, user.id).await;
    if disabled {
        println!(
            "disabled {}: every session ends within a second on every hub",
            user.name
        );
    } else {
        println!("enabled {}: they may sign in again", user.name);
    }
    Ok(())
}

async fn remove(args: UserRemoveArgs) -> Result<()> {
    let catalog = open(&args.catalog, false).await?;
    let user = named(catalog.as_ref(), &args.name).await?;
    let orphans = match (&args.transfer_to, args.delete_devices) {
        (Some(heir), _) => {
            let heir = named(catalog.as_ref(), heir).await?;
            anyhow::ensure!(
                heir.id != user.id,
                "a user cannot inherit their own devices"
            );
            Orphans::TransferTo(heir.id)
        }
        (None, true) => Orphans::Delete,
        (None, false) => Orphans::Refuse,
    };
    let now = adi_signaling::auth::unix_now_i64();
    let orphaned = catalog
        .remove_user(user.id, orphans, now)
        .await
        .map_err(|e| match e {
            CatalogError::WouldOrphan(_) => anyhow::anyhow!("cannot remove {}: {e}", user.name),
            other => anyhow::Error::new(other).context("removing the user"),
        })?;
    admin_event(catalog.as_ref(), Kind::UserRemoved, user.id).await;
    println!("removed {}", user.name);
    for (id, name) in orphaned {
        match (&args.transfer_to, orphans) {
            (Some(heir), _) => println!("  {name} ({id}) now owned by {heir}"),
            (None, _) => println!("  {name} ({id}) deleted"),
        }
    }
    Ok(())
}

async fn rotate_key(args: UserArgs) -> Result<()> {
    let catalog = open(&args.catalog, false).await?;
    let user = named(catalog.as_ref(), &args.name).await?;
    let now = adi_signaling::auth::unix_now_i64();
    let mut revoked = 0;
    for key in catalog.api_keys_of(user.id).await? {
        if key.revoked_at.is_none() {
            catalog.revoke_api_key(user.id, &key.key_id, now).await?;
            revoked += 1;
        }
    }
    let key = adi_signaling::auth::add_api_key(catalog.as_ref(), user.id).await?;
    admin_event(catalog.as_ref(), Kind::UserKeyRotated, user.id).await;
    println!("{key}");
    eprintln!(
        "revoked {revoked} key(s) of {}; their sessions end within a second",
        user.name
    );
    Ok(())
}
