//! `adi token`: prints the bearer token (JWT) the REST API takes, for curl and scripts:
//! `curl -H "Authorization: Bearer $(adi token)" HUB/api/cocoons`.

use anyhow::Result;
use clap::Args;

use crate::client::{HubArgs, HubClient};

#[derive(Args)]
pub struct TokenArgs {
    #[command(flatten)]
    hub: HubArgs,
}

/// Prints only the token, on one line, so `$(adi token)` is the token. It is the
/// session `adi login` stored, or a fresh one for `ADI_API_KEY`; it expires like them.
pub async fn run(args: TokenArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    println!("{}", client.token);
    Ok(())
}
