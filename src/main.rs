//! `adi`: one binary for both sides — the signaling hub and the cocoon device agent —
//! plus the client commands people use. This file only parses arguments, sets up
//! logging and hands over to the command modules.

/// The hub and the cocoon allocate and free buffers on every proxied request from
/// several tokio workers; glibc's arenas and fastbin consolidation cost a fifth of
/// their CPU there, jemalloc's per-thread caches much less, at the same idle RSS
/// (measured in `benches/proxy.rs` and `benches/connections.rs`, see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod client;
mod cmd;
mod paths;
mod signals;
mod table;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "adi",
    version,
    about = "Reach every device you own through one hub"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run or administer a signaling hub.
    #[command(subcommand)]
    Signaling(cmd::signaling::SignalingCmd),
    /// Exchange an API key for a session and remember the hub.
    Login(cmd::login::LoginArgs),
    /// Revoke the stored session at its hub and forget it.
    Logout(cmd::login::LogoutArgs),
    /// Print the session's bearer token (JWT) for curl and scripts.
    Token(cmd::token::TokenArgs),
    /// The security events you may read: your actions, and your devices' events.
    Audit(cmd::audit::AuditArgs),
    /// The models your devices' OpenAI-compatible servers serve, and which devices
    /// serve each, as the hub's OpenAI-compatible endpoint offers them.
    Models(client::ListArgs),
    /// Your API keys: make named ones narrowed to scopes and devices, list, revoke.
    #[command(subcommand)]
    Keys(cmd::keys::KeysCmd),
    /// Run a device agent, or manage devices.
    #[command(subcommand)]
    Cocoon(cmd::cocoon::CocoonCmd),
    /// Open a local port that forwards to a device's service through the hub.
    Proxy(cmd::proxy::ProxyArgs),
    /// Join stdin and stdout to a device's raw TCP service through the hub
    /// (`ssh -o ProxyCommand='adi connect %h ssh' user@DEVICE`).
    Connect(cmd::connect::ConnectArgs),
    /// Tasks across your devices.
    #[command(subcommand)]
    Tasks(cmd::tasks::TasksCmd),
    /// Run a hub on SQLite plus a local cocoon attached to it, in this process.
    Dev(cmd::dev::DevArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet = !matches!(
        cli.command,
        Command::Dev(_)
            | Command::Signaling(cmd::signaling::SignalingCmd::Serve(_))
            | Command::Cocoon(cmd::cocoon::CocoonCmd::Run(_))
    );
    init_logging(if quiet { "warn" } else { "info" });
    if !quiet {
        raise_open_file_limit();
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    let threads = match &cli.command {
        Command::Cocoon(cmd::cocoon::CocoonCmd::Run(args)) => Some(args.threads),
        Command::Signaling(cmd::signaling::SignalingCmd::Serve(args)) => args.threads,
        _ => None,
    };
    if let Some(n) = threads {
        builder.worker_threads(usize::from(n));
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Signaling(c) => cmd::signaling::run(c).await,
            Command::Login(a) => cmd::login::run(a).await,
            Command::Logout(a) => cmd::login::logout(a).await,
            Command::Token(a) => cmd::token::run(a).await,
            Command::Keys(c) => cmd::keys::run(c).await,
            Command::Audit(a) => cmd::audit::run(a).await,
            Command::Models(a) => cmd::models::run(a).await,
            Command::Cocoon(c) => cmd::cocoon::run(c).await,
            Command::Dev(a) => cmd::dev::run(a).await,
            Command::Tasks(c) => cmd::tasks::run(c).await,
            Command::Proxy(a) => cmd::proxy::run(a).await,
            Command::Connect(a) => cmd::connect::run(a).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<cmd::agent::FinalRefusal>().is_some() {
                ExitCode::from(cmd::agent::FinalRefusal::EXIT_STATUS)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Logs go to stderr, coloured only on a terminal: a log file or journal gets plain
/// text, without escape codes.
fn init_logging(default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// A hub holds one socket per device: lift the soft open-file limit to the hard one,
/// as servers that expect many connections do, instead of failing at 1,024.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
    }
}
