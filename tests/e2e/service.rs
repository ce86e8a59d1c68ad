//! `adi cocoon service install|uninstall`: the unit it writes is checked by systemd's own
//! `systemd-analyze verify`, and its command line, read back as systemd reads it, runs a
//! real cocoon that enrols and comes online. systemd itself cannot run as the manager
//! here, so the `systemctl` calls go to a stand-in script that records them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::harness::{cli, signal, wait_for, Api, Hub, Proc};

/// The words of an `ExecStart=` line as systemd splits them: double-quoted items with
/// backslash escapes, `%%` and `$$` for a literal `%` and `$`.
fn exec_words(line: &str) -> Result<Vec<String>> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        let Some(&first) = chars.peek() else {
            return Ok(words);
        };
        let mut word = String::new();
        if first == '"' {
            chars.next();
            loop {
                match chars.next() {
                    None => bail!("unterminated quote in {line}"),
                    Some('"') => break,
                    Some('\\') => word.push(chars.next().context("dangling backslash")?),
                    Some(c) => word.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ' ' {
                    break;
                }
                word.push(c);
                chars.next();
            }
        }
        words.push(word.replace("%%", "%").replace("$$", "$"));
    }
}

/// `KEY="VALUE"` lines of an environment file, with backslash escapes.
fn env_entries(file: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for line in file
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (k, v) = line.split_once('=').context("a line without =")?;
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .context("an unquoted value")?;
        let mut value = String::new();
        let mut chars = v.chars();
        while let Some(c) = chars.next() {
            value.push(if c == '\\' {
                chars.next().context("dangling backslash")?
            } else {
                c
            });
        }
        out.push((k.to_owned(), value));
    }
    Ok(out)
}

fn setting<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

#[tokio::test]
async fn the_installed_unit_passes_systemd_and_runs_this_cocoon() -> Result<()> {
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let token = alice.setup_token(600).await?;
    let dir = tempfile::tempdir()?;
    let units = dir.path().join("units");
    // Spaces, `%` and `$` in a path and a name must reach the agent as they are.
    let data = dir.path().join("data 100% $HOME");
    let (data_s, units_s) = (data.to_string_lossy(), units.to_string_lossy());
    let (code, out, err) = cli(
        dir.path(),
        &[
            "cocoon",
            "service",
            "install",
            "--unit-dir",
            &units_s,
            "--no-start",
            "--",
            "--hub",
            &hub.url,
            "--data-dir",
            &data_s,
            "--token",
            &token,
            "--name",
            "my $box",
            "--local-api",
            "off",
        ],
        &[("ADI_COCOON_LOCATION", "rack \"3\"")],
    )?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("systemctl --user enable --now adi-cocoon.service"),
        "{out}"
    );
    let unit_path = units.join("adi-cocoon.service");
    let unit = std::fs::read_to_string(&unit_path)?;

    // systemd's own checker accepts it: syntax, an absolute existing executable, the
    // environment file's path.
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .output()
        .context("systemd-analyze (Debian: apt-get install systemd) checks the unit")?;
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "{}\n{unit}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        !unit.contains(&token),
        "the token stays out of the unit:\n{unit}"
    );
    assert_eq!(setting(&unit, "KillMode"), Some("mixed"), "{unit}");
    // The agent may make a cgroup per task inside the unit's.
    assert_eq!(setting(&unit, "Delegate"), Some("yes"), "{unit}");
    assert_eq!(setting(&unit, "WantedBy"), Some("default.target"), "{unit}");
    assert_eq!(
        setting(&unit, "After"),
        None,
        "a user manager has no network target"
    );
    assert_eq!(setting(&unit, "TimeoutStopSec"), Some("45s"), "{unit}");

    let env_path = data.join("service.env");
    let mode = std::fs::metadata(&env_path)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the environment file holds the token");
    let env = env_entries(&std::fs::read_to_string(&env_path)?)?;
    assert!(
        env.contains(&("ADI_COCOON_TOKEN".to_owned(), token.clone())),
        "{env:?}"
    );
    assert!(
        env.contains(&("ADI_COCOON_LOCATION".to_owned(), "rack \"3\"".to_owned())),
        "{env:?}"
    );
    let env_file = setting(&unit, "EnvironmentFile").context("EnvironmentFile=")?;
    assert_eq!(Path::new(&env_file.replace("%%", "%")), env_path);

    // Run the unit's command line with its environment, as systemd would.
    let words = exec_words(setting(&unit, "ExecStart").context("ExecStart=")?)?;
    let (program, args) = words.split_first().context("an empty ExecStart")?;
    let mut agent = Proc::spawn(
        Command::new(program)
            .args(args)
            .env_clear()
            .env("HOME", dir.path())
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
    )?;
    let device = wait_for(
        "the service's cocoon online",
        Duration::from_secs(15),
        || async {
            Ok(alice.cocoons().await?.into_iter().find(|c| {
                c["name"] == "my $box" && c["online"] == true && c["location"] == "rack \"3\""
            }))
        },
    )
    .await
    .with_context(|| agent.output())?;
    assert!(
        data.join("device.secret").exists(),
        "the identity lives in the given data dir"
    );
    // systemd stops it with SIGTERM to the agent alone; it leaves cleanly.
    signal(agent.pid(), "TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(15)).await?, 0);
    let id = device["id"].as_str().context("device id")?;
    alice
        .wait_online(id, false, Duration::from_secs(10))
        .await?;
    Ok(())
}

/// A `systemctl` that records its arguments, and fails when `FAIL` names a file that
/// exists (as on a machine without a running systemd).
fn fake_systemctl(dir: &Path) -> Result<(String, std::path::PathBuf)> {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    let log = dir.join("systemctl.log");
    let script = bin.join("systemctl");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             if [ -e '{fail}' ]; then echo 'System has not been booted with systemd' >&2; exit 1; fi\n\
             echo \"$@\" >> '{log}'\n",
            fail = dir.join("FAIL").display(),
            log = log.display()
        ),
    )?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Ok((path, log))
}

#[test]
fn install_and_uninstall_drive_systemctl_and_refuse_what_would_not_work() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (path, log) = fake_systemctl(dir.path())?;
    let units = dir.path().join("units").to_string_lossy().into_owned();
    let data = dir.path().join("data").to_string_lossy().into_owned();
    let env = [("PATH", path.as_str())];
    let run = |args: &[&str]| -> Result<(i32, String, String)> {
        let mut all = vec!["cocoon", "service"];
        all.extend_from_slice(args);
        cli(dir.path(), &all, &env)
    };
    let install = |extra: &[&str]| -> Result<(i32, String, String)> {
        let mut args = vec!["install", "--unit-dir", &units];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[
            "--",
            "--hub",
            "http://hub.example:8080",
            "--data-dir",
            &data,
        ]);
        run(&args)
    };

    let (code, out, err) = install(&[])?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("enabled and started"), "{out}");
    assert!(out.contains("loginctl enable-linger"), "{out}");
    assert_eq!(
        std::fs::read_to_string(&log)?,
        "--user daemon-reload\n--user enable --now adi-cocoon.service\n"
    );

    // An existing unit is replaced only when asked.
    let (code, _, err) = install(&[])?;
    assert_eq!(code, 1);
    assert!(err.contains("--force"), "{err}");

    // Starting fails: the files stay, and the commands to run by hand are named.
    std::fs::write(dir.path().join("FAIL"), "")?;
    let (code, _, err) = install(&["--force"])?;
    assert_eq!(code, 1);
    assert!(
        err.contains("run by hand") && err.contains("systemctl --user enable --now"),
        "{err}"
    );
    assert!(err.contains("not been booted with systemd"), "{err}");
    std::fs::remove_file(dir.path().join("FAIL"))?;

    // What would not run is refused before anything is written.
    for (flags, run_args, why) in [
        (&["--unit", "x"][..], &[][..], "must know its hub"),
        (
            &["--unit", "x"],
            &["--hub", "h", "--service", "nope"],
            "not valid for `adi cocoon run`",
        ),
        (&["--unit", "x", "--system"], &["--hub", "h"], "--run-as"),
        (
            &["--unit", "x", "--run-as", "bob"],
            &["--hub", "h"],
            "system units",
        ),
        (&["--unit", "../evil"], &["--hub", "h"], "--unit must be"),
    ] {
        let mut args = vec!["install", "--unit-dir", &units];
        args.extend_from_slice(flags);
        args.push("--");
        args.extend_from_slice(run_args);
        let (code, out, err) = run(&args)?;
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
    assert!(!Path::new(&units).join("x.service").exists());

    // A system unit runs as the account named.
    let (code, out, err) = run(&[
        "install",
        "--system",
        "--run-as",
        "adi",
        "--no-start",
        "--unit",
        "edge",
        "--unit-dir",
        &units,
        "--",
        "--hub",
        "http://hub.example:8080",
        "--data-dir",
        &data,
    ])?;
    assert_eq!(code, 0, "{out}{err}");
    let unit = std::fs::read_to_string(Path::new(&units).join("edge.service"))?;
    assert_eq!(setting(&unit, "User"), Some("adi"), "{unit}");
    assert_eq!(
        setting(&unit, "WantedBy"),
        Some("multi-user.target"),
        "{unit}"
    );
    assert_eq!(
        setting(&unit, "After"),
        Some("network-online.target"),
        "{unit}"
    );
    assert!(out.contains("systemctl enable --now edge.service"), "{out}");

    // Uninstall stops and disables it, then removes the unit and its environment file.
    std::fs::write(&log, "")?;
    let (code, out, err) = run(&["uninstall", "--unit-dir", &units])?;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        std::fs::read_to_string(&log)?,
        "--user disable --now adi-cocoon.service\n--user daemon-reload\n"
    );
    assert!(!Path::new(&units).join("adi-cocoon.service").exists());
    assert!(!Path::new(&data).join("service.env").exists());
    let (code, _, err) = run(&["uninstall", "--unit-dir", &units])?;
    assert_eq!(code, 1, "nothing left to uninstall");
    assert!(err.contains("adi-cocoon.service"), "{err}");
    Ok(())
}
