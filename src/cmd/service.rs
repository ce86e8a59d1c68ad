//! `adi cocoon service install|uninstall`: keep this device's agent running under
//! systemd, as a user unit by default (`systemctl --user`) or, with `--system`, as a
//! system unit that runs as a named account.
//!
//! The unit runs this very executable as `adi cocoon run` with the arguments given after
//! `--`, checked now by the same parser the agent uses, so a typo fails at install and
//! not at the next boot. The settings that came from the environment (`ADI_HUB`,
//! `COCOON_SERVICES`, ...) and a setup token go to an environment file beside the device
//! secret, readable by its owner only: a unit file is world-readable, a token is a secret.
//! systemd sends SIGTERM to the agent alone (`KillMode=mixed`), so it finishes its requests
//! in flight and stops its tasks' commands itself, and waits for that longer than the
//! agent's shutdown grace. The unit delegates its cgroup to the agent (`Delegate=yes`), so
//! the agent may give each task a cgroup of its own inside the unit's and end a task by
//! killing its cgroup; those stay inside the unit's cgroup, so systemd's final SIGKILL to
//! what remains after the stop still reaches every task process.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};

use adi_signaling::owner_only;

use crate::cmd::agent::RunArgs;
use crate::paths;

/// Name of the environment file written into the cocoon's data dir.
const ENV_FILE: &str = "service.env";
/// Extra time systemd gives the agent beyond its shutdown grace before it kills it.
const STOP_MARGIN: Duration = Duration::from_secs(15);

#[derive(Subcommand)]
pub enum ServiceCmd {
    /// Write a systemd unit that runs `adi cocoon run` with the arguments after `--`,
    /// then enable and start it.
    Install(InstallArgs),
    /// Stop and disable the unit, and remove it and its environment file.
    Uninstall(UninstallArgs),
}

/// Which unit, and where it lives.
#[derive(Args)]
pub struct UnitArgs {
    /// A system unit (run by the system manager, as --run-as) instead of a user unit.
    #[arg(long)]
    system: bool,
    /// Name of the unit, without `.service`; another name lets one host run several
    /// cocoons with their own data dirs.
    #[arg(long, default_value = "adi-cocoon")]
    unit: String,
    /// Directory to write the unit to (default: ~/.config/systemd/user, or
    /// /etc/systemd/system with --system).
    #[arg(long)]
    unit_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct InstallArgs {
    #[command(flatten)]
    unit: UnitArgs,
    /// The account a system unit runs as. Required with --system: the agent runs task
    /// commands for its owners, which root should not do by default (say `root` if it
    /// must).
    #[arg(long, value_name = "USER")]
    run_as: Option<String>,
    /// Replace a unit of the same name.
    #[arg(long)]
    force: bool,
    /// Only write the files; print the systemctl commands that enable and start it.
    #[arg(long)]
    no_start: bool,
    /// Arguments for `adi cocoon run` (after `--`), e.g. `-- --hub https://hub
    /// --service grafana:3000`.
    #[arg(last = true, value_name = "RUN_ARGS")]
    run_args: Vec<OsString>,
}

#[derive(Args)]
pub struct UninstallArgs {
    #[command(flatten)]
    unit: UnitArgs,
    /// Only remove the files (the unit may still be running).
    #[arg(long)]
    no_stop: bool,
}

/// `adi cocoon run`'s own arguments, parsed alone to check the service's.
#[derive(Parser)]
#[command(name = "adi cocoon run")]
struct RunOnly {
    #[command(flatten)]
    run: RunArgs,
}

pub fn run(cmd: ServiceCmd) -> Result<()> {
    match cmd {
        ServiceCmd::Install(a) => install(a),
        ServiceCmd::Uninstall(a) => uninstall(a),
    }
}

impl UnitArgs {
    fn validate(&self) -> Result<()> {
        let ok = !self.unit.is_empty()
            && self.unit.len() <= 64
            && self
                .unit
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
        if !ok {
            bail!("--unit must be 1-64 of [A-Za-z0-9-_.@]");
        }
        Ok(())
    }

    fn file_name(&self) -> String {
        format!("{}.service", self.unit)
    }

    fn path(&self) -> PathBuf {
        let dir = self.unit_dir.clone().unwrap_or_else(|| {
            if self.system {
                PathBuf::from("/etc/systemd/system")
            } else {
                paths::config_home().join("systemd/user")
            }
        });
        dir.join(self.file_name())
    }

    /// `systemctl` with `--user` for a user unit.
    fn systemctl(&self, args: &[&str]) -> Vec<String> {
        let mut all = vec!["systemctl".to_owned()];
        if !self.system {
            all.push("--user".to_owned());
        }
        all.extend(args.iter().map(|a| (*a).to_owned()));
        all
    }
}

fn install(args: InstallArgs) -> Result<()> {
    args.unit.validate()?;
    let run_as = match (&args.run_as, args.unit.system) {
        (Some(user), true) => Some(user.clone()),
        (None, true) => bail!(
            "--system needs --run-as USER: the agent runs task commands for its owners, \
             which it should not do as root unless you say so (--run-as root)"
        ),
        (Some(_), false) => {
            bail!("--run-as is for system units (--system); a user unit runs as you")
        }
        (None, false) => None,
    };
    let mut run_args = args
        .run_args
        .iter()
        .map(|a| {
            a.to_str()
                .map(str::to_owned)
                .context("the run arguments must be UTF-8")
        })
        .collect::<Result<Vec<String>>>()?;
    // Checked as `adi cocoon run` would check them, environment included.
    let parsed = parse_run_args(&run_args)?;
    let (data_dir, file) = crate::cmd::agent::data_dir_and_file(
        parsed.run.data_dir().map(Path::to_path_buf),
        parsed.run.config_path(),
    )?;
    let data_dir = std::path::absolute(&data_dir)
        .with_context(|| format!("resolving {}", data_dir.display()))?;
    if parsed.run.hub().is_none() && file.hub_urls().is_empty() {
        bail!(
            "the service must know its hub: pass it after --, as in \
             `adi cocoon service install -- --hub https://hub.example`"
        );
    }
    let unit_path = args.unit.path();
    if unit_path.exists() && !args.force {
        bail!("{} exists; pass --force to replace it", unit_path.display());
    }

    // The token leaves the command line for the environment file.
    let token = parsed.run.token().map(str::to_owned);
    strip_flag(&mut run_args, "--token");
    if parsed.run.data_dir().is_none() {
        run_args.push("--data-dir".to_owned());
        run_args.push(data_dir.to_string_lossy().into_owned());
    }
    let mut env = captured_env();
    if let Some(token) = token {
        env.retain(|(k, _)| k != "ADI_COCOON_TOKEN");
        env.push(("ADI_COCOON_TOKEN".to_owned(), token));
    }
    let env_path = data_dir.join(ENV_FILE);
    owner_only::dir(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    owner_only::write(&env_path, env_file(&env)?.as_bytes())
        .with_context(|| format!("writing {}", env_path.display()))?;

    let exe = std::env::current_exe()
        .and_then(|p| p.canonicalize())
        .context("finding this executable")?;
    let unit = unit_file(&UnitSpec {
        exe: &exe,
        run_args: &run_args,
        env_file: &env_path,
        run_as: run_as.as_deref(),
        system: args.unit.system,
        stop_timeout: parsed.run.shutdown_grace() + STOP_MARGIN,
    })?;
    if let Some(dir) = unit_path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&unit_path, unit).with_context(|| format!("writing {}", unit_path.display()))?;
    println!("wrote {}", unit_path.display());
    println!(
        "wrote {} (settings and token, owner-only)",
        env_path.display()
    );

    let name = args.unit.file_name();
    let steps = [
        args.unit.systemctl(&["daemon-reload"]),
        args.unit.systemctl(&["enable", "--now", &name]),
    ];
    let linger = (!args.unit.system).then(|| {
        "to keep it running while you are logged out: loginctl enable-linger $USER".to_owned()
    });
    if args.no_start {
        println!("to start it now and at every boot:");
        for step in &steps {
            println!("  {}", step.join(" "));
        }
    } else {
        for step in &steps {
            systemctl(step).with_context(|| {
                format!(
                    "the unit is written, but starting it failed; run by hand:\n  {}",
                    steps
                        .iter()
                        .map(|s| s.join(" "))
                        .collect::<Vec<_>>()
                        .join("\n  ")
                )
            })?;
        }
        println!("{name} is enabled and started");
    }
    if let Some(hint) = linger {
        println!("{hint}");
    }
    Ok(())
}

fn uninstall(args: UninstallArgs) -> Result<()> {
    args.unit.validate()?;
    let unit_path = args.unit.path();
    let unit = std::fs::read_to_string(&unit_path)
        .with_context(|| format!("reading {}", unit_path.display()))?;
    if !args.no_stop {
        let name = args.unit.file_name();
        systemctl(&args.unit.systemctl(&["disable", "--now", &name]))?;
    }
    std::fs::remove_file(&unit_path)
        .with_context(|| format!("removing {}", unit_path.display()))?;
    println!("removed {}", unit_path.display());
    if let Some(env) = unit
        .lines()
        .find_map(|l| l.strip_prefix("EnvironmentFile="))
        .map(setting_path)
    {
        match std::fs::remove_file(&env) {
            Ok(()) => println!("removed {}", env.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", env.display())),
        }
    }
    if !args.no_stop {
        systemctl(&args.unit.systemctl(&["daemon-reload"]))?;
    }
    Ok(())
}

fn parse_run_args(run_args: &[String]) -> Result<RunOnly> {
    RunOnly::try_parse_from(
        std::iter::once("adi cocoon run").chain(run_args.iter().map(String::as_str)),
    )
    .map_err(|e| anyhow::anyhow!("the arguments after -- are not valid for `adi cocoon run`:\n{e}"))
}

/// Removes `flag VALUE` and `flag=VALUE` from `args`.
fn strip_flag(args: &mut Vec<String>, flag: &str) {
    let prefix = format!("{flag}=");
    let mut out = Vec::with_capacity(args.len());
    let mut skip = false;
    for a in args.drain(..) {
        if skip {
            skip = false;
        } else if a == flag {
            skip = true;
        } else if !a.starts_with(&prefix) {
            out.push(a);
        }
    }
    *args = out;
}

/// The variables `adi cocoon run` reads that are set now: the service gets them too.
fn captured_env() -> Vec<(String, String)> {
    let names: Vec<String> = RunOnly::command()
        .get_arguments()
        .filter_map(|a| a.get_env())
        .filter_map(|n| n.to_str().map(str::to_owned))
        .collect();
    let mut env: Vec<(String, String)> = names
        .into_iter()
        .filter_map(|n| std::env::var(&n).ok().map(|v| (n, v)))
        .collect();
    if let Ok(level) = std::env::var("RUST_LOG") {
        env.push(("RUST_LOG".to_owned(), level));
    }
    env.sort();
    env
}

/// `KEY="VALUE"` lines as systemd's `EnvironmentFile=` reads them.
fn env_file(env: &[(String, String)]) -> Result<String> {
    let mut out = String::from("# Written by `adi cocoon service install`; read by its unit.\n");
    for (k, v) in env {
        if v.contains(['\n', '\r', '\0']) {
            bail!("{k} holds a line break, which an environment file cannot carry");
        }
        // In double quotes systemd takes these four after a backslash as themselves, and
        // expands nothing.
        let mut escaped = String::with_capacity(v.len());
        for c in v.chars() {
            if matches!(c, '\\' | '"' | '$' | '`') {
                escaped.push('\\');
            }
            escaped.push(c);
        }
        let _ = writeln!(out, "{k}=\"{escaped}\"");
    }
    Ok(out)
}

struct UnitSpec<'a> {
    exe: &'a Path,
    run_args: &'a [String],
    env_file: &'a Path,
    run_as: Option<&'a str>,
    system: bool,
    stop_timeout: Duration,
}

fn unit_file(spec: &UnitSpec<'_>) -> Result<String> {
    let exe = spec
        .exe
        .to_str()
        .context("the path of this executable is not UTF-8")?;
    let env_file = spec
        .env_file
        .to_str()
        .context("the data dir's path is not UTF-8")?;
    let mut exec = vec![quote(exe)?, "cocoon".to_owned(), "run".to_owned()];
    for a in spec.run_args {
        exec.push(quote(a)?);
    }
    let user = match spec.run_as {
        Some(user) => format!("User={}\n", setting(user)?),
        None => String::new(),
    };
    // Only the system manager has this target; the agent reconnects by itself anyway.
    let (network, wanted_by) = if spec.system {
        (
            "Wants=network-online.target\nAfter=network-online.target\n",
            "multi-user.target",
        )
    } else {
        ("", "default.target")
    };
    Ok(format!(
        "# Written by `adi cocoon service install`.\n\
         [Unit]\n\
         Description=adi cocoon: this device's agent for its adi hub\n\
         {network}\n\
         [Service]\n\
         Type=simple\n\
         {user}\
         EnvironmentFile={env_file}\n\
         ExecStart={exec}\n\
         Restart=on-failure\n\
         RestartSec=5s\n\
         RestartPreventExitStatus={refused}\n\
         KillMode=mixed\n\
         Delegate=yes\n\
         TimeoutStopSec={stop}s\n\
         \n\
         [Install]\n\
         WantedBy={wanted_by}\n",
        env_file = setting(env_file)?,
        exec = exec.join(" "),
        stop = spec.stop_timeout.as_secs(),
        refused = crate::cmd::agent::FinalRefusal::EXIT_STATUS,
    ))
}

/// One word of a unit's command line or setting, quoted as systemd reads it: in double
/// quotes, with `\` and `"` escaped and `%` and `$` doubled so systemd expands nothing.
fn quote(word: &str) -> Result<String> {
    if word.contains(['\n', '\r', '\0']) {
        bail!("{word:?} holds a line break, which a unit file cannot carry");
    }
    let mut q = String::with_capacity(word.len() + 2);
    q.push('"');
    for c in word.chars() {
        match c {
            '\\' => q.push_str("\\\\"),
            '"' => q.push_str("\\\""),
            '%' => q.push_str("%%"),
            '$' => q.push_str("$$"),
            c => q.push(c),
        }
    }
    q.push('"');
    Ok(q)
}

/// A setting's value that is taken whole, not split into words (a path, a user name):
/// only `%` is special there.
fn setting(value: &str) -> Result<String> {
    if value.contains(['\n', '\r', '\0']) || value.trim() != value || value.is_empty() {
        bail!("{value:?} cannot be a unit setting (empty, line breaks or outer spaces)");
    }
    Ok(value.replace('%', "%%"))
}

/// The path of an `EnvironmentFile=` value, as [`setting`] wrote it.
fn setting_path(v: &str) -> PathBuf {
    PathBuf::from(v.trim().replace("%%", "%"))
}

fn systemctl(argv: &[String]) -> Result<()> {
    let Some((program, rest)) = argv.split_first() else {
        return Ok(());
    };
    let out = Command::new(program)
        .args(rest)
        .output()
        .with_context(|| format!("running {}", argv.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_so_systemd_expands_nothing() -> Result<()> {
        assert_eq!(quote("plain")?, "\"plain\"");
        assert_eq!(quote("my box")?, "\"my box\"");
        assert_eq!(quote(r#"a"b\c"#)?, r#""a\"b\\c""#);
        assert_eq!(quote("100%$HOME")?, "\"100%%$$HOME\"");
        assert!(quote("two\nlines").is_err());
        let path = "/data/100% \"x\"/service.env";
        assert_eq!(setting(path)?, "/data/100%% \"x\"/service.env");
        assert_eq!(setting_path(&setting(path)?), PathBuf::from(path));
        assert!(setting(" padded").is_err());
        Ok(())
    }

    #[test]
    fn environment_values_are_escaped_so_systemd_expands_nothing() -> Result<()> {
        let env = vec![
            ("ADI_HUB".to_owned(), "http://hub:8080".to_owned()),
            ("X".to_owned(), r#"a"b\c$HOME`x`"#.to_owned()),
        ];
        let file = env_file(&env)?;
        assert!(file.contains("ADI_HUB=\"http://hub:8080\"\n"), "{file}");
        assert!(file.contains(r#"X="a\"b\\c\$HOME\`x\`""#), "{file}");
        assert!(env_file(&[("Y".to_owned(), "two\nlines".to_owned())]).is_err());
        Ok(())
    }

    #[test]
    fn the_token_flag_is_taken_out_in_both_spellings() {
        let mut args: Vec<String> = ["--hub", "h", "--token", "t1", "--token=t2", "--name", "n"]
            .map(str::to_owned)
            .to_vec();
        strip_flag(&mut args, "--token");
        assert_eq!(args, ["--hub", "h", "--name", "n"]);
    }
}
