//! `adi dev`: the whole system on one machine in one process — a hub on its embedded
//! SQLite catalog plus a cocoon for this machine attached to it, offering a small demo
//! page as a service so the proxy can be tried at once. Prints the hub URL, the web UI,
//! an API key to sign in with and the demo page's address through the hub.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use adi_cocoon::CocoonConfig;
use adi_signaling::HubConfig;

use crate::paths;

/// User the dev setup signs in as.
const DEV_USER: &str = "dev";

/// The service the local cocoon offers unless one of `--service` takes the name.
const DEMO_SERVICE: &str = "demo";

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
    #[arg(long = "service", value_parser = crate::cmd::agent::parse_service)]
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
    let demo = if config.services.iter().any(|s| s.name == DEMO_SERVICE) {
        None
    } else {
        let (port, server) = demo_service(&config.name).await?;
        config.services.push(adi_protocol::ServiceInfo {
            name: DEMO_SERVICE.to_owned(),
            port,
            health_path: Some("/".to_owned()),
            kind: adi_protocol::ServiceKind::Http,
            models: Vec::new(),
        });
        Some(server)
    };
    if !enrolled {
        let token = adi_signaling::tokens::issue(
            catalog.as_ref(),
            user.id,
            adi_signaling::tokens::Grant::Setup,
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
    if demo.is_some() {
        println!(
            "  demo:     {url}/proxy/{device}/{DEMO_SERVICE}/ (a page on this machine, \
             through the hub's proxy; sign in to the web UI first)"
        );
    }
    println!("  plugins:  {plugins} (capability manifests, read live)");
    println!("Ctrl-C stops both.");

    crate::signals::shutdown().await;
    eprintln!("stopping: finishing the requests in flight; Ctrl-C again stops now");
    let stopping = async {
        cocoon.stop();
        let _ = cocoon.join().await;
        hub.shutdown().await;
        if let Some(server) = demo {
            server.abort();
        }
    };
    tokio::select! {
        () = stopping => {}
        () = crate::signals::shutdown() => {}
    }
    Ok(())
}

/// Serves the demo page on a free loopback port, as any service a cocoon offers would
/// listen; returns the port and the server's task.
async fn demo_service(device: &str) -> Result<(u16, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("starting the demo service")?;
    let port = listener.local_addr()?.port();
    let page = DEMO_PAGE
        .replace("@DEVICE@", &html_escape(device))
        .replace("@PORT@", &port.to_string());
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || async move { axum::response::Html(page) }),
    );
    let server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("the demo service stopped: {e}");
        }
    });
    Ok((port, server))
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const DEMO_PAGE: &str = r#"<!doctype html>
<html lang="en">
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>adi demo service</title>
<h1>Hello from @DEVICE@</h1>
<p>This page is served only on that device's loopback, at 127.0.0.1:@PORT@, and reached
through the hub's proxy: no port is open on the device. Any service started with
<code>adi cocoon run --service NAME:PORT</code> is reached the same way.</p>
"#;
