//! `adi login`: exchange an API key for a short-lived session and remember the hub;
//! `adi logout`: revoke that session at the hub and forget it.

use anyhow::{Context, Result};
use clap::Args;

use crate::client::{
    exchange_key, load_session_at, normalize_hub, save_session, session_path, Session,
};

#[derive(Args)]
pub struct LoginArgs {
    /// Hub URL, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "ADI_HUB")]
    hub: String,
    /// Your API key (from `adi signaling user add` or `adi keys create`).
    #[arg(long, env = "ADI_API_KEY", hide_env_values = true)]
    api_key: String,
    /// A private CA (PEM) to trust besides the public roots, for a hub whose
    /// certificate it issued; remembered with the session.
    #[arg(long, env = "ADI_CA_CERT")]
    ca_cert: Option<std::path::PathBuf>,
}

pub async fn run(args: LoginArgs) -> Result<()> {
    let hub = normalize_hub(&args.hub)?;
    let ca_cert = args
        .ca_cert
        .as_deref()
        .map(std::path::absolute)
        .transpose()
        .context("--ca-cert")?;
    crate::client::trust_ca(ca_cert.as_deref())?;
    let answer = exchange_key(&hub, &args.api_key).await?;
    let path = save_session(&Session {
        ca_cert,
        hub: hub.clone(),
        token: answer.token,
        expires_at: answer.expires_at,
        user: answer.user.name.clone(),
    })?;
    let valid_for = answer
        .expires_at
        .saturating_sub(adi_signaling::auth::unix_now());
    println!(
        "logged in to {hub} as {} (session valid {}; stored in {})",
        answer.user.name,
        humantime::format_duration(std::time::Duration::from_secs(valid_for)),
        path.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct LogoutArgs {}

/// Revokes the stored session at its hub (so the token stops working everywhere, not
/// just here) and deletes it. The file goes even when the hub cannot be reached; then
/// the token stays valid at the hub until it expires, and this says so.
pub async fn logout(_args: LogoutArgs) -> Result<()> {
    let path = session_path();
    let Some(session) = load_session_at(&path)? else {
        println!("not logged in");
        return Ok(());
    };
    crate::client::trust_ca(session.ca_cert.as_deref())?;
    let revoked = crate::client::http()?
        .delete(format!("{}/api/auth/session", session.hub))
        .bearer_auth(&session.token)
        .send()
        .await;
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    match revoked {
        Ok(r) if r.status().is_success() => {
            println!("logged out of {}: the session is revoked", session.hub);
        }
        outcome => {
            let why = match outcome {
                Ok(r) => format!("it answered HTTP {}", r.status()),
                Err(e) => format!("it could not be reached: {e}"),
            };
            let left = session
                .expires_at
                .saturating_sub(adi_signaling::auth::unix_now());
            eprintln!(
                "warning: the hub {} did not revoke the session ({why}); it is forgotten \
                 here but stays valid at the hub for {}",
                session.hub,
                humantime::format_duration(std::time::Duration::from_secs(left))
            );
        }
    }
    Ok(())
}
