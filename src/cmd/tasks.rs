//! `adi tasks ...`: the merged task list across your devices, and tasks on one device.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use serde::Deserialize;

use adi_protocol::tasks::{LogLine, Task};
use adi_protocol::views::{AggregateTasks, CanRun};

use crate::client::{resolve_device, HubArgs, HubClient};

#[derive(Subcommand)]
pub enum TasksCmd {
    /// All your tasks across your devices, newest first.
    List(ListArgs),
    /// Create a task on one device; with a command after `--`, the device runs it.
    Create(CreateArgs),
    /// Print a task's log; --follow streams it until the task ends.
    Logs(LogsArgs),
    /// Cancel a task (kills its command if it runs).
    Cancel(TaskRef),
    /// Show one task.
    Show(TaskRef),
    /// Ask a device whether it would run a task, without creating it; fails if not.
    Check(CheckArgs),
}

#[derive(Args)]
pub struct CheckArgs {
    /// Device id or name.
    #[arg(long)]
    device: String,
    /// Something the task needs, e.g. `gpu` (repeatable).
    #[arg(long = "requires")]
    requirements: Vec<String>,
    /// Print the device's answer as JSON.
    #[arg(long)]
    json: bool,
    /// Program and arguments the task would run.
    #[arg(last = true)]
    command: Vec<String>,
    #[command(flatten)]
    hub: HubArgs,
}

#[derive(Args)]
pub struct ListArgs {
    /// Only tasks in this status (pending, running, completed, failed, cancelled).
    #[arg(long)]
    status: Option<String>,
    /// Only tasks whose title or description contains this.
    #[arg(long)]
    search: Option<String>,
    /// Tasks per page.
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// Follow the cursor through every page.
    #[arg(long)]
    all: bool,
    /// Print JSON (the hub's answer; with --all, the merged tasks).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    hub: HubArgs,
}

#[derive(Args)]
pub struct CreateArgs {
    /// Device id or name.
    #[arg(long)]
    device: String,
    /// Title.
    #[arg(long)]
    title: String,
    /// Description.
    #[arg(long, default_value = "")]
    description: String,
    /// Print the created task as JSON.
    #[arg(long)]
    json: bool,
    /// Program and arguments to run on the device.
    #[arg(last = true)]
    command: Vec<String>,
    #[command(flatten)]
    hub: HubArgs,
}

#[derive(Args)]
pub struct LogsArgs {
    /// Device id or name.
    #[arg(long)]
    device: String,
    /// Task id.
    task: String,
    /// Stream new lines until the task ends.
    #[arg(long)]
    follow: bool,
    #[command(flatten)]
    hub: HubArgs,
}

#[derive(Args)]
pub struct TaskRef {
    /// Device id or name.
    #[arg(long)]
    device: String,
    /// Task id.
    task: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    hub: HubArgs,
}

pub async fn run(cmd: TasksCmd) -> Result<()> {
    match cmd {
        TasksCmd::List(a) => list(a).await,
        TasksCmd::Create(a) => create(a).await,
        TasksCmd::Logs(a) => logs(a).await,
        TasksCmd::Cancel(a) => cancel(a).await,
        TasksCmd::Show(a) => show(a).await,
        TasksCmd::Check(a) => check(a).await,
    }
}

async fn check(args: CheckArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let device = resolve_device(&client, &args.device).await?;
    let mut body = serde_json::json!({ "requirements": args.requirements });
    if !args.command.is_empty() {
        body["command"] = serde_json::json!(args.command);
    }
    let answer: CanRun = client
        .post(&format!("/api/cocoons/{device}/tasks/can-run"), &body)
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        println!("commands allowed: {}", yes_no(answer.exec_allowed));
        println!("GPU: {}", yes_no(answer.has_gpu));
    }
    match answer.reason {
        _ if answer.can_run => {
            if !args.json {
                println!("can run: yes");
            }
            Ok(())
        }
        Some(reason) => bail!("cannot run: {reason}"),
        None => bail!("cannot run"),
    }
}

fn encode_query(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (k, v) in pairs {
        out.push(if out.is_empty() { '?' } else { '&' });
        out.push_str(k);
        out.push('=');
        for b in v.bytes() {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

async fn list(args: ListArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let limit = args.limit.to_string();
    let mut cursor: Option<String> = None;
    let mut tasks: Vec<Task> = Vec::new();
    let mut notices = Vec::new();
    let mut names = std::collections::HashMap::new();
    loop {
        let mut q = vec![("limit", limit.as_str())];
        if let Some(s) = &args.status {
            q.push(("status", s));
        }
        if let Some(s) = &args.search {
            q.push(("q", s));
        }
        if let Some(c) = &cursor {
            q.push(("cursor", c));
        }
        let page: AggregateTasks = client
            .get(&format!("/api/aggregate/tasks{}", encode_query(&q)))
            .await?;
        if args.json && !args.all {
            println!("{}", serde_json::to_string_pretty(&page)?);
            return Ok(());
        }
        names.extend(
            page.devices
                .iter()
                .map(|d| (d.device_id.to_string(), d.name.clone())),
        );
        for d in &page.devices {
            let status = serde_json::to_value(d.status)?;
            if status != "ok" {
                notices.push(format!(
                    "{} ({}): {}",
                    d.name,
                    status.as_str().unwrap_or("?"),
                    d.error.clone().unwrap_or_default()
                ));
            }
        }
        tasks.extend(page.tasks);
        match page.next_cursor {
            Some(c) if args.all => cursor = Some(c),
            Some(_) => {
                eprintln!("more tasks: use --all, or --limit");
                break;
            }
            None => break,
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&tasks)?);
    } else {
        print_tasks(&tasks, &names);
    }
    notices.sort();
    notices.dedup();
    for n in notices {
        eprintln!("note: not all devices answered: {n}");
    }
    Ok(())
}

/// One table for every page, so the columns line up however long a name is.
fn print_tasks(tasks: &[Task], names: &std::collections::HashMap<String, String>) {
    let rows: Vec<[String; 4]> = tasks
        .iter()
        .map(|t| {
            let device = t
                .device_id
                .as_ref()
                .map(|d| {
                    names
                        .get(d.as_str())
                        .cloned()
                        .unwrap_or_else(|| d.to_string())
                })
                .unwrap_or_default();
            [
                t.id.to_string(),
                device,
                t.status.to_string(),
                t.title.clone(),
            ]
        })
        .collect();
    crate::table::print_table(["ID", "DEVICE", "STATUS", "TITLE"], &rows);
}

async fn create(args: CreateArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let device = resolve_device(&client, &args.device).await?;
    let mut body = serde_json::json!({ "title": args.title, "description": args.description });
    if !args.command.is_empty() {
        body["command"] = serde_json::json!(args.command);
    }
    let task: Task = client
        .post(&format!("/api/cocoons/{device}/tasks"), &body)
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&task)?);
    } else {
        println!("{}", task.id);
    }
    Ok(())
}

async fn show(args: TaskRef) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let device = resolve_device(&client, &args.device).await?;
    let task: Task = client
        .get(&format!("/api/cocoons/{device}/tasks/{}", args.task))
        .await?;
    println!("{}", serde_json::to_string_pretty(&task)?);
    Ok(())
}

async fn cancel(args: TaskRef) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let device = resolve_device(&client, &args.device).await?;
    let task: Task = client
        .post(
            &format!("/api/cocoons/{device}/tasks/{}/cancel", args.task),
            &serde_json::json!({}),
        )
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&task)?);
    } else {
        println!("{} {}", task.id, task.status);
    }
    Ok(())
}

#[derive(Deserialize)]
struct LogPage {
    lines: Vec<LogLine>,
    next_after: u64,
    complete: bool,
}

fn print_line(line: &LogLine) {
    match line.stream {
        adi_protocol::tasks::LogStream::Stderr => eprintln!("{}", line.text),
        adi_protocol::tasks::LogStream::System => eprintln!("[adi] {}", line.text),
        adi_protocol::tasks::LogStream::Stdout => println!("{}", line.text),
    }
}

async fn logs(args: LogsArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let device = resolve_device(&client, &args.device).await?;
    let base = format!("/api/cocoons/{device}/tasks/{}/logs", args.task);
    if !args.follow {
        let mut after = 0;
        loop {
            let page: LogPage = client
                .get(&format!("{base}?after={after}&limit=1000"))
                .await?;
            page.lines.iter().for_each(print_line);
            if page.lines.is_empty() || page.complete {
                return Ok(());
            }
            after = page.next_after;
        }
    }
    let resp = client.get_stream(&format!("{base}?follow=true")).await?;
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let (mut event, mut data) = (String::new(), String::new());
    while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(
            &chunk.context("reading the log stream")?,
        ));
        while let Some(pos) = buf.find('\n') {
            let line: String = buf.drain(..=pos).collect();
            let line = line.trim_end_matches(['\n', '\r']);
            if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_owned();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            } else if line.is_empty() && !data.is_empty() {
                match event.as_str() {
                    "log" => print_line(&serde_json::from_str(&data)?),
                    "end" => {
                        let v: serde_json::Value = serde_json::from_str(&data)?;
                        eprintln!("[adi] task ended: {}", v["status"].as_str().unwrap_or("?"));
                        return Ok(());
                    }
                    "error" => {
                        let v: serde_json::Value = serde_json::from_str(&data)?;
                        return Err(anyhow!(
                            "{}",
                            v["message"].as_str().unwrap_or("log stream failed")
                        ));
                    }
                    _ => {}
                }
                event.clear();
                data.clear();
            }
        }
    }
    bail!("the hub closed the log stream before the task ended")
}
