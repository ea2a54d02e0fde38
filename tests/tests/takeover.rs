//! The account takeover an outside review found (issue 23, item 1), replayed with the real
//! binaries: a setup token the owner kept must not enroll a device after the owner handed the
//! account over and was removed. A token is its member's from the moment it is issued, and any
//! change to that member ends it. Real QUIC, real SQLite, the tiny model.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use synesis_e2e::{Device, json_of};

/// `synesis --json ARGS…` on `device`: success, stdout, stderr.
fn try_run(device: &Device, args: &[&str]) -> (bool, String, String) {
    let out = device.synesis().arg("--json").args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_spare_owner_token_enrolls_nothing_after_a_handover() {
    let t = synesis_e2e::tiny_cloud("");
    let (cloud, owner) = (t.cloud, t.owner);
    // The operator gives the owner a second token, which the owner keeps.
    let spare = cloud.token("acme", "1h");

    let (ok, out, err) = try_run(
        &owner,
        &["cloud", "invite", "ada@example.com", "--role", "editor"],
    );
    assert!(ok, "{err}");
    let code: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ada = Device::new();
    let (ok, _, err) = try_run(&ada, &["cloud", "accept", code["code"].as_str().unwrap()]);
    assert!(ok, "{err}");
    let (ok, _, err) = try_run(&owner, &["cloud", "handover", "ada@example.com"]);
    assert!(ok, "{err}");
    let (ok, _, err) = try_run(&ada, &["cloud", "handover", "accept"]);
    assert!(ok, "{err}");
    let (ok, _, err) = try_run(&ada, &["cloud", "members", "rm", "acme"]);
    assert!(ok, "Ada removes the former owner: {err}");

    // The former owner tries the spare token on a new device.
    let intruder = Device::new();
    let (ok, out, err) = try_run(&intruder, &["cloud", "login", &spare]);
    assert!(
        !ok,
        "the spare token enrolled a device after the handover: {out}"
    );
    assert!(
        err.contains("already used") || err.contains("withdrawn"),
        "refused as a used token: {err}"
    );

    // Ada still owns the account, alone.
    let members = json_of(ada.synesis().args(["--json", "cloud", "members"]));
    let rows = members.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{members}");
    assert_eq!(rows[0]["name"], "ada@example.com", "{members}");
    assert_eq!(rows[0]["role"], "owner", "{members}");
}
