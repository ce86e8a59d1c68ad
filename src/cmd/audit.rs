//! `adi audit`: the security events you may read (your own actions, what was done to
//! you, and the events of the devices you own), newest first.

use std::time::Duration;

use anyhow::Result;
use clap::Args;

use adi_protocol::views::AuditList;

use crate::client::{HubArgs, HubClient};

#[derive(Args)]
pub struct AuditArgs {
    /// Only this device's events (id or name).
    #[arg(long)]
    device: Option<String>,
    /// Only events this recent (e.g. 1h, 7d).
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// At most this many events.
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    hub: HubArgs,
}

pub async fn run(args: AuditArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let mut query = vec![format!("limit={}", args.limit)];
    if let Some(device) = &args.device {
        query.push(format!(
            "device={}",
            crate::client::resolve_device(&client, device).await?
        ));
    }
    if let Some(since) = args.since {
        let from = adi_signaling::auth::unix_now().saturating_sub(since.as_secs());
        query.push(format!("since={from}"));
    }
    let list: AuditList = client
        .get(&format!("/api/audit?{}", query.join("&")))
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list.events)?);
        return Ok(());
    }
    let rows: Vec<[String; 6]> = list
        .events
        .into_iter()
        .map(|e| {
            let at = std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(e.at).unwrap_or(0));
            let actor = e
                .actor_user
                .or(e.actor_device.map(|d| format!("device {d}")))
                .unwrap_or_else(|| "-".into());
            [
                humantime::format_rfc3339_seconds(at).to_string(),
                e.kind,
                actor,
                e.device.map_or_else(|| "-".into(), |d| d.to_string()),
                e.source.unwrap_or_else(|| "-".into()),
                [e.target_user.map(|u| format!("user {u}")), e.detail]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join("; "),
            ]
        })
        .collect();
    crate::table::print_table(["AT", "EVENT", "BY", "DEVICE", "FROM", "DETAIL"], &rows);
    Ok(())
}
