//! The `synesis` binary as a person runs it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)] // test code

use std::process::Command;

fn synesis(home: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_synesis"));
    cmd.env_clear()
        .env("SYNESIS_HOME", home)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    cmd
}

#[test]
fn version_prints_the_package_version() {
    let home = tempfile::tempdir().unwrap();
    let out = synesis(home.path()).arg("--version").output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout.trim(),
        format!("synesis {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn help_teaches_the_files_and_exit_codes() {
    let home = tempfile::tempdir().unwrap();
    let out = synesis(home.path()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    for needle in ["--json", "--verbose", "SYNESIS_HOME", "Exit codes", "paths"] {
        assert!(stdout.contains(needle), "--help lacks {needle}:\n{stdout}");
    }
}

#[test]
fn synesis_home_moves_every_directory() {
    let home = tempfile::tempdir().unwrap();
    let out = synesis(home.path())
        .args(["paths", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for (key, sub) in [("config", "config"), ("data", "data"), ("runtime", "run")] {
        assert_eq!(
            v[key]["path"],
            home.path().join(sub).to_str().unwrap(),
            "{v}"
        );
        assert_eq!(v[key]["source"], "synesis_home");
    }
}

#[test]
fn no_home_anywhere_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_synesis"))
        .env_clear()
        .arg("paths")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SYNESIS_HOME"));
}

#[test]
fn missing_command_prints_usage_and_exits_2() {
    let home = tempfile::tempdir().unwrap();
    let out = synesis(home.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
