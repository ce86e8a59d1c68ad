//! The test command the README gives a newcomer, `scripts/test`, run against stand-ins
//! for the tools it calls (a non-root `id`, an `apt-get` that fails, a `cargo` that
//! says how it was called): it sets up what is missing, refuses when it cannot, and
//! runs the tests so that none may skip.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use anyhow::Result;

/// Writes an executable shell script `name` into `dir`.
fn stand_in(dir: &Path, name: &str, body: &str) -> Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Runs `scripts/test ARGS` with the stand-ins in `bin` first on the PATH; returns
/// (exit code, stderr, what the stand-in cargo was called with, or "" if it was not).
fn run(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<(i32, String, String)> {
    let called = bin.join("cargo-called");
    let _ = std::fs::remove_file(&called);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/test"))
        .args(args)
        .env("PATH", path)
        .env("CARGO_CALLED", &called)
        .env_remove("CI")
        .env_remove("ADI_TEST_ALLOW_SKIP")
        .envs(env.iter().copied())
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stderr)?,
        std::fs::read_to_string(&called).unwrap_or_default(),
    ))
}

#[test]
fn the_test_command_sets_up_or_refuses_and_lets_nothing_skip() -> Result<()> {
    let bin = tempfile::tempdir()?;
    let bin = bin.path();
    stand_in(
        bin,
        "cargo",
        r#"echo "CI=${CI:-unset} $*" > "$CARGO_CALLED""#,
    )?;
    for tool in [
        "pg_isready",
        "objcopy",
        "curl",
        "systemd-analyze",
        "start-stop-daemon",
    ] {
        stand_in(bin, tool, "exit 0")?;
    }
    let present = bin.join("cargo");
    let present = present.to_str().unwrap_or_default();
    let missing = bin.join("no-chromium");
    let missing = missing.to_str().unwrap_or_default();

    // Everything there: the whole workspace, with skipping made a failure.
    stand_in(bin, "id", "echo 0")?;
    stand_in(bin, "apt-get", "exit 0")?;
    let all_there = [
        ("ADI_TEST_CHROMIUM", present),
        ("ADI_TEST_CHROMEDRIVER", present),
    ];
    let (code, err, called) = run(bin, &[], &all_there)?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(called.trim(), "CI=true test --workspace", "{err}");
    // Arguments go to cargo test instead.
    let (code, err, called) = run(bin, &["-p", "adi-protocol"], &all_there)?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(called.trim(), "CI=true test -p adi-protocol", "{err}");

    // Chromium missing and not installable: it fails saying what is missing.
    stand_in(bin, "apt-get", "exit 100")?;
    let (code, err, called) = run(
        bin,
        &[],
        &[
            ("ADI_TEST_CHROMIUM", missing),
            ("ADI_TEST_CHROMEDRIVER", missing),
        ],
    )?;
    assert_ne!(code, 0);
    assert!(
        err.contains("could not install") && err.contains("chromium chromium-driver"),
        "{err}"
    );
    assert!(called.is_empty(), "ran the tests anyway: {called}");

    // Not root: it says why it cannot set up, and runs nothing.
    stand_in(bin, "id", "echo 1000")?;
    let (code, err, called) = run(bin, &[], &all_there)?;
    assert_ne!(code, 0);
    assert!(
        err.contains("needs root") && err.contains("ADI_TEST_ALLOW_SKIP=1"),
        "{err}"
    );
    assert!(called.is_empty(), "{called}");

    // Skipping only when asked, and then without CI's strictness.
    let (code, err, called) = run(bin, &[], &[("ADI_TEST_ALLOW_SKIP", "1"), ("CI", "true")])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(called.trim(), "CI=unset test --workspace");
    assert!(err.contains("SKIPPED"), "{err}");
    Ok(())
}
