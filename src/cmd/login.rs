//! `adi login`: exchange an API key for a short-lived session and remember the hub.

use anyhow::Result;
use clap::Args;

use crate::client::{exchange_key, normalize_hub, save_session, Session};

#[derive(Args)]
pub struct LoginArgs {
    /// Hub URL, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "ADI_HUB")]
    hub: String,
    /// Your API key (from `adi signaling user add`).
    #[arg(long, env = "ADI_API_KEY", hide_env_values = true)]
    api_key: String,
}

pub async fn run(args: LoginArgs) -> Result<()> {
    let hub = normalize_hub(&args.hub)?;
    let answer = exchange_key(&hub, &args.api_key).await?;
    let path = save_session(&Session {
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
