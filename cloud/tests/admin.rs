//! `synesis-cloud admin` without a running server.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::process::Command;

fn admin(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_synesis-cloud"));
    cmd.arg("admin").arg("--data-dir").arg(dir);
    cmd
}

#[test]
fn accounts_are_unique_and_tokens_need_an_address() {
    let dir = tempfile::tempdir().unwrap();
    assert!(
        admin(dir.path())
            .args(["account", "create", "acme", "--tier", "managed"])
            .status()
            .unwrap()
            .success()
    );
    let again = admin(dir.path())
        .args(["account", "create", "acme"])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    let no_server = admin(dir.path())
        .args(["token", "create", "--account", "acme"])
        .output()
        .unwrap();
    assert!(!no_server.status.success());
    assert!(String::from_utf8_lossy(&no_server.stderr).contains("--server"));

    let token = admin(dir.path())
        .args([
            "token",
            "create",
            "--account",
            "acme",
            "--server",
            "127.0.0.1:4433",
        ])
        .output()
        .unwrap();
    assert!(token.status.success());
    let token = String::from_utf8(token.stdout).unwrap();
    assert_eq!(token.lines().count(), 1, "only the token on stdout");
    assert!(token.starts_with("SYN1:127.0.0.1:4433:"));

    let unknown = admin(dir.path())
        .args(["token", "create", "--account", "nobody", "--server", "h:1"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no account named"));
}

#[test]
fn the_ca_is_made_once_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    admin(dir.path())
        .args(["account", "create", "a"])
        .status()
        .unwrap();
    let fingerprint = |_: ()| {
        let out = admin(dir.path())
            .args(["token", "create", "--account", "a", "--server", "h:1"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .split(':')
            .nth(3)
            .unwrap()
            .to_owned()
    };
    assert_eq!(fingerprint(()), fingerprint(()));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca.key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
