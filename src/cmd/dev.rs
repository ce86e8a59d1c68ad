//! `adi dev`: the whole system on one machine in one process — a hub on its embedded
//! SQLite catalog plus a cocoon for this machine attached to it. Prints the hub URL,
//! the web UI and an API key to sign in with.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use adi_cocoon::CocoonConfig;
use adi_signaling::catalog::TokenKind;
use adi_signaling::HubConfig;

use crate::paths;

/// User the dev setup signs in as.
const DEV_USER: &str = "dev";

#[derive(Args)]
pub struct DevArgs {
    /// Address for the hub (port 0 picks a free one).
    #[arg(long, env = "ADI_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Where the hub catalog and the local cocoon keep their state.
    #[arg(long, env = "ADI_DATA_DIR", default_value = ".adi-dev")]
    data_dir: PathBuf,
    /// Name of the local device (default: host name).
    #[arg(long)]
    name: Option<String>,
    /// A service on this machine's loopback to offer, NAME:PORT[/HEALTH]; repeatable.
    #[arg(long = "service", value_parser = crate::cmd::cocoon::parse_service)]
    services: Vec<adi_protocol::ServiceInfo>,
}

pub async fn run(args: DevArgs) -> Result<()> {
    // The hub's keys and the device's secret live under it.
    adi_signaling::owner_only::dir(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let hub = adi_signaling::spawn(HubConfig {
        listen: args.listen,
        data_dir: args.data_dir.join("hub"),
        ..HubConfig::default()
    })
    .await
    .with_context(|| {
        format!(
            "starting the hub (is {} taken? try --listen 127.0.0.1:0)",
            args.listen
        )
    })?;
    let catalog = hub.catalog();
    let user = match catalog.user_by_name(DEV_USER).await? {
        Some(u) => u,
        None => catalog.create_user(DEV_USER).await?,
    };
    // A fresh key each run: keys are stored hashed, so an old one cannot be shown again.
    let api_key = adi_signaling::auth::add_api_key(catalog.as_ref(), user.id).await?;

    let cocoon_dir = args.data_dir.join("cocoon");
    let enrolled = cocoon_dir.join(adi_cocoon::identity::SECRET_FILE).exists();
    let mut config = CocoonConfig::new(
        hub.url(),
        cocoon_dir,
        args.name.unwrap_or_else(paths::hostname),
    );
    config.services = args.services;
    if !enrolled {
        let token = adi_signaling::tokens::issue(
            catalog.as_ref(),
            user.id,
            TokenKind::Setup,
            None,
            Duration::from_secs(600),
            adi_signaling::auth::unix_now_i64(),
        )
        .await?;
        config.setup_token = Some(token.token);
    }
    let name = config.name.clone();
    let plugins = config
        .plugin_config()
        .dir
        .unwrap_or_default()
        .display()
        .to_string();
    let cocoon = adi_cocoon::start(config)
        .await
        .context("starting the local cocoon")?;
    let device = tokio::time::timeout(Duration::from_secs(15), cocoon.online())
        .await
        .context("the local cocoon did not come online within 15 s")??;

    let url = hub.url();
    println!("adi dev is running (state in {})", args.data_dir.display());
    println!("  hub:      {url}");
    println!("  web UI:   {url}/");
    println!("  API key:  {api_key}");
    println!("  log in:   adi login --hub {url} --api-key {api_key}");
    println!("  cocoon:   {name} ({device}) online");
    println!("  plugins:  {plugins} (capability manifests, read live)");
    println!("Ctrl-C stops both.");

    crate::cmd::signaling::shutdown_signal().await;
    eprintln!("stopping: finishing the requests in flight; Ctrl-C again stops now");
    let stopping = async {
        cocoon.stop();
        let _ = cocoon.join().await;
        hub.shutdown().await;
    };
    tokio::select! {
        () = stopping => {}
        () = crate::cmd::signaling::shutdown_signal() => {}
    }
    Ok(())
}
