//! Support for end-to-end tests: find the workspace's binaries and give each simulated device
//! a fresh `SYNESIS_HOME` (ripgrep's `tests/util.rs` is the model).
//!
//! The binaries are the ones `cargo test --workspace` builds (cargo builds a package's binaries
//! for its own integration tests, and `synesis-cli` has some), found beside this test
//! executable's `deps/` directory. Tests never use fixed ports: servers bind port 0.

// Test support: a setup step that fails should fail the test, loudly and at once.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The path of a workspace binary, e.g. `bin("synesis")`.
///
/// # Panics
/// If the binary was not built, with the command that builds it.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/*/deps");
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} is not built; run `cargo test --workspace` (or `cargo build --bins`) first",
        path.display()
    );
    path
}

/// One simulated device: a fresh, empty `SYNESIS_HOME` removed when dropped.
#[derive(Debug)]
pub struct Device {
    home: tempfile::TempDir,
}

impl Device {
    pub fn new() -> Device {
        Device {
            home: tempfile::tempdir().expect("a temporary SYNESIS_HOME"),
        }
    }

    pub fn home(&self) -> &Path {
        self.home.path()
    }

    /// `synesis` with this device's home and nothing else from the environment that could leak
    /// the developer's own files in (HOME, XDG_*).
    pub fn synesis(&self) -> Command {
        let mut cmd = Command::new(bin("synesis"));
        cmd.env_clear()
            .env("SYNESIS_HOME", self.home())
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        cmd
    }
}

impl Default for Device {
    fn default() -> Self {
        Device::new()
    }
}

/// Runs `cmd`, asserts it succeeded, and parses its stdout as one JSON value.
pub fn json_of(cmd: &mut Command) -> serde_json::Value {
    let out = run_ok(cmd);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Runs `cmd` and asserts it succeeded, showing its stderr when not.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("the command starts");
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
