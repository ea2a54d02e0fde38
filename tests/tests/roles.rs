//! Roles, enforced by the cloud on every request (`cloud/src/roles.rs`): devices enrolled for
//! members of an account act with their member's role, read fresh on each request — a viewer
//! cannot ask or push, a commenter can ask but not push, an editor can push; a changed role
//! takes effect on the next request; a removed member's devices are refused at once and their
//! connections closed within seconds. Real binaries, real QUIC, the tiny model.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::time::Duration;

use synesis_e2e::{Cloud, Device, json_of, run_ok, signal, wait_for};

/// `synesis --json ARGS…` on `device`: success, stdout, stderr.
fn try_run(device: &Device, args: &[&str]) -> (bool, String, String) {
    let out = device.synesis().arg("--json").args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn forbidden(device: &Device, args: &[&str]) {
    let (ok, _, err) = try_run(device, args);
    assert!(!ok && err.contains("may not"), "{args:?}: {err}");
}

fn allowed(device: &Device, args: &[&str]) {
    let (ok, _, err) = try_run(device, args);
    assert!(ok, "{args:?}: {err}");
}

/// A cloud serving the tiny model, the account `acme` (Managed, $10) and its owner's device;
/// the directory holds `tiny.gguf` and `style.gguf` (a LoRA for it).
fn setup() -> (Cloud, Device, tempfile::TempDir) {
    let t = synesis_e2e::tiny_cloud("");
    let lora = t.files.path().join("style.gguf");
    synesis_infer::tiny::write_lora(&lora, synesis_infer::tiny::TinySpec::TINY, 7).unwrap();
    (t.cloud, t.owner, t.files)
}

#[test]
fn each_role_does_what_it_may_and_nothing_more() {
    let (cloud, owner, files) = setup();
    let lora = files.path().join("style.gguf");
    let member = |name: &str, role: &str| {
        run_ok(
            cloud
                .admin()
                .args(["member", "add", "acme", name, "--role", role]),
        );
        let out =
            run_ok(
                cloud
                    .admin()
                    .args(["token", "create", "--account", "acme", "--member", name]),
            );
        let device = Device::new();
        device.login(String::from_utf8(out.stdout).unwrap().trim());
        device
    };
    let viewer = member("vera@example.com", "viewer");
    let commenter = member("carl@example.com", "commenter");
    let editor = member("eda@example.com", "editor");
    let lora = lora.to_str().unwrap();
    let ask = ["cloud", "ask", "--max-tokens", "4", "hi"];
    let push = ["cloud", "push", lora, "--name", "style", "--base", "tiny"];

    forbidden(&viewer, &ask);
    forbidden(&viewer, &push);
    allowed(&viewer, &["cloud", "usage"]);
    allowed(&viewer, &["cloud", "adapters"]);
    forbidden(&viewer, &["cloud", "members"]);

    allowed(&commenter, &ask);
    forbidden(&commenter, &push);
    forbidden(&commenter, &["cloud", "topup", "--voucher", "VCH-NOPE"]);

    allowed(&editor, &push);
    allowed(
        &editor,
        &["cloud", "ask", "--lora", "style", "--max-tokens", "4", "hi"],
    );
    let members = json_of(editor.synesis().args(["--json", "cloud", "members"]));
    let roles: Vec<(String, String)> = members
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_owned(),
                m["role"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(roles[0], ("acme".into(), "owner".into()), "{members}");
    assert_eq!(roles.len(), 4, "{members}");
    forbidden(&editor, &["cloud", "topup", "--voucher", "VCH-NOPE"]);

    // A new role counts from the next request.
    run_ok(cloud.admin().args([
        "member",
        "role",
        "acme",
        "carl@example.com",
        "--role",
        "viewer",
    ]));
    forbidden(&commenter, &ask);

    // A removed member's devices: refused at once, their connections closed within seconds.
    let _tunnel = editor.tunnel("1s");
    assert!(wait_for(Duration::from_secs(15), || editor
        .state()
        .as_deref()
        == Some("connected")));
    run_ok(
        cloud
            .admin()
            .args(["member", "rm", "acme", "eda@example.com"]),
    );
    let (ok, _, err) = try_run(&editor, &["cloud", "usage"]);
    assert!(!ok && err.contains("revoked"), "{err}");
    assert!(
        wait_for(Duration::from_secs(10), || editor.state().as_deref()
            != Some("connected")),
        "{:?}",
        editor.state()
    );
    // The owner is not a member anyone can remove.
    let out = cloud
        .admin()
        .args(["member", "rm", "acme", "acme"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    allowed(&owner, &["cloud", "usage"]);
}

/// The owner invites; a device not enrolled anywhere accepts and becomes the invitee's, with
/// the role given; a code works once, not after it expires, not forged; only the owner invites.
#[test]
fn an_invitation_enrolls_a_new_members_device_once() {
    let (_cloud, owner, _files) = setup();
    let invite = |device: &Device, who: &str, role: &str, expires: &str| {
        try_run(
            device,
            &["cloud", "invite", who, "--role", role, "--expires", expires],
        )
    };
    let (ok, out, err) = invite(&owner, "carl@example.com", "commenter", "1h");
    assert!(ok, "{err}");
    let code = serde_json::from_str::<serde_json::Value>(&out).unwrap()["code"]
        .as_str()
        .unwrap()
        .to_owned();

    let carl = Device::new();
    let (ok, out, err) = try_run(&carl, &["cloud", "accept", &code]);
    assert!(ok, "{err}");
    assert!(out.contains("acme"), "{out}");
    allowed(&carl, &["cloud", "ask", "--max-tokens", "4", "hi"]);
    forbidden(
        &carl,
        &["cloud", "invite", "x@example.com", "--role", "viewer"],
    );
    let members = json_of(owner.synesis().args(["--json", "cloud", "members"]));
    assert!(
        members
            .to_string()
            .contains(r#""name":"carl@example.com","role":"commenter""#),
        "{members}"
    );

    // Used: refused, and the second device stays unenrolled.
    let again = Device::new();
    let (ok, _, err) = try_run(&again, &["cloud", "accept", &code]);
    assert!(!ok && err.contains("already used"), "{err}");
    // Forged: another secret.
    let forged = format!(
        "{}{}",
        &code[..code.len() - 1],
        if code.ends_with('0') { '1' } else { '0' }
    );
    let (ok, _, err) = try_run(&again, &["cloud", "accept", &forged]);
    assert!(
        !ok && err.contains("unknown setup token or wrong secret"),
        "{err}"
    );
    // Expired (a minute is the shortest; the cloud's clock is not ours to move, so the expiry
    // itself is checked in the storage tests) — and an invitee who is a member already.
    let (ok, out, _) = invite(&owner, "carl@example.com", "viewer", "1m");
    assert!(ok);
    let code = serde_json::from_str::<serde_json::Value>(&out).unwrap()["code"]
        .as_str()
        .unwrap()
        .to_owned();
    let (ok, _, err) = try_run(&again, &["cloud", "accept", &code]);
    assert!(!ok && err.contains("already a member"), "{err}");
    let (ok, _, err) = invite(&owner, "eve@example.com", "owner", "1h");
    assert!(!ok && err.contains("editor, commenter or viewer"), "{err}");

    // Pending invitations are listed, and withdrawn ones stop working.
    let (ok, out, _) = invite(&owner, "dana@example.com", "viewer", "1h");
    assert!(ok);
    let dana_code = serde_json::from_str::<serde_json::Value>(&out).unwrap()["code"]
        .as_str()
        .unwrap()
        .to_owned();
    let pending = json_of(owner.synesis().args(["--json", "cloud", "invites"]));
    assert!(
        pending
            .to_string()
            .contains(r#""invitee":"dana@example.com""#),
        "{pending}"
    );
    forbidden(&carl, &["cloud", "invites"]);
    allowed(&owner, &["cloud", "invites", "revoke", "dana@example.com"]);
    let (ok, _, err) = try_run(&again, &["cloud", "accept", &dana_code]);
    assert!(!ok && err.contains("already used"), "{err}");
    let (ok, _, err) = try_run(&owner, &["cloud", "invites", "revoke", "dana@example.com"]);
    assert!(!ok && err.contains("no pending invitation"), "{err}");
}

/// A device enrolled in an account of its own accepts an invitation to another: it joins it
/// with an identity of its own there (a device of the invitee's, with the invitation's role and
/// quota), keeps acting in its own account until told otherwise (`--account`, `cloud use`), and
/// never sends the other account's requests through its own account's tunnel service.
#[test]
fn an_enrolled_device_joins_another_account_and_acts_in_each() {
    let (cloud, owner, _files) = setup();
    run_ok(
        cloud
            .admin()
            .args(["account", "create", "globex", "--tier", "managed"]),
    );
    let gina = Device::new();
    let own_device = gina.login(&cloud.token("globex", "1h"));
    cloud.top_up(&gina, "1.00");

    let probe =
        json_of(
            owner
                .synesis()
                .args(["--json", "cloud", "ask", "--max-tokens", "8", "hi"]),
        );
    let per_request = probe["input_tokens"].as_u64().unwrap() + 8;
    let quota = 2 * per_request + per_request / 2;
    let invite = |who: &str| {
        let (ok, out, err) = try_run(
            &owner,
            &[
                "cloud",
                "invite",
                who,
                "--role",
                "commenter",
                "--quota",
                &quota.to_string(),
            ],
        );
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["code"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (ok, out, err) = try_run(&gina, &["cloud", "accept", &invite("gina@example.com")]);
    assert!(ok, "{err}");
    let joined: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(joined["account"], "acme");
    assert_eq!(joined["joined"], true);
    let member_device = joined["device_id"].as_str().unwrap().to_owned();
    assert_ne!(
        member_device, own_device,
        "a device of its own in each account"
    );

    // Both listed; the device still acts in its own account.
    let accounts = json_of(gina.synesis().args(["--json", "cloud", "accounts"]));
    let listed: Vec<(String, bool)> = accounts["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["account"].as_str().unwrap().to_owned(),
                a["active"] == true,
            )
        })
        .collect();
    assert_eq!(listed.len(), 2, "{accounts}");
    assert!(listed.contains(&("globex".into(), true)), "{accounts}");
    assert!(listed.contains(&("acme".into(), false)), "{accounts}");
    allowed(
        &gina,
        &["cloud", "invite", "x@example.com", "--role", "viewer"],
    );

    // In acme, as a commenter within a quota — also while the service of its own account runs.
    let mut service = gina.tunnel("1s");
    assert!(wait_for(Duration::from_secs(20), || gina
        .state()
        .as_deref()
        == Some("connected")));
    allowed(
        &gina,
        &[
            "--account",
            "acme",
            "cloud",
            "ask",
            "--max-tokens",
            "8",
            "hi",
        ],
    );
    forbidden(
        &gina,
        &[
            "--account",
            "acme",
            "cloud",
            "invite",
            "y@example.com",
            "--role",
            "viewer",
        ],
    );
    let mut refused = String::new();
    for _ in 0..4 {
        let (ok, _, err) = try_run(
            &gina,
            &[
                "--account",
                "acme",
                "cloud",
                "ask",
                "--max-tokens",
                "8",
                "hi",
            ],
        );
        if !ok {
            refused = err;
            break;
        }
    }
    assert!(refused.contains("this member's monthly quota"), "{refused}");
    // Charged to acme, as Gina's: never to globex through the service's connection.
    let by_member = json_of(
        owner
            .synesis()
            .args(["--json", "cloud", "usage", "--by", "member"]),
    );
    assert!(
        by_member["groups"].to_string().contains("gina@example.com"),
        "{by_member}"
    );
    let globex = json_of(gina.synesis().args(["--json", "cloud", "usage"]));
    assert_eq!(
        globex["charges"].as_array().map(Vec::len),
        Some(0),
        "{globex}"
    );
    signal(service.pid(), "TERM");
    service.wait(Duration::from_secs(20));

    // `use` switches for good; `logout` there leaves acme, and the device acts in globex again.
    allowed(&gina, &["cloud", "use", "acme"]);
    forbidden(
        &gina,
        &["cloud", "invite", "z@example.com", "--role", "viewer"],
    );
    let (ok, _, err) = try_run(&gina, &["cloud", "use", "initech"]);
    assert!(!ok && err.contains("no account named"), "{err}");
    // A second invitation into an account it is in already: refused, nothing left behind.
    let (ok, _, err) = try_run(&gina, &["cloud", "accept", &invite("gina2@example.com")]);
    assert!(!ok && err.contains("in account acme already"), "{err}");
    let devices = cloud.devices();
    let active = devices.iter().filter(|d| d["status"] != "revoked").count();
    assert_eq!(active, 3, "the extra device was revoked: {devices:?}");
    allowed(&gina, &["cloud", "logout"]);
    let accounts = json_of(gina.synesis().args(["--json", "cloud", "accounts"]));
    assert_eq!(
        accounts["accounts"].as_array().unwrap().len(),
        1,
        "{accounts}"
    );
    assert_eq!(accounts["accounts"][0]["account"], "globex");
    assert_eq!(accounts["accounts"][0]["active"], true);
    assert_eq!(
        cloud.device_status(&member_device).as_deref(),
        Some("revoked")
    );
}

/// A member's monthly token quota: a request that would cross it is refused before it runs —
/// also when 32 arrive at once — and what the member used never exceeds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_members_quota_holds_under_32_concurrent_requests() {
    use synesis_proto::message::EscalationDone;
    use synesis_proto::{ErrorCode, FrameLimits, Message, RequestId};
    let (_cloud, owner, _files) = setup();
    // What one request holds: its prompt's tokens and its most output.
    let max_tokens = 8u32;
    let probe =
        json_of(
            owner
                .synesis()
                .args(["--json", "cloud", "ask", "--max-tokens", "8", "hi"]),
        );
    let per_request = probe["input_tokens"].as_u64().unwrap() + u64::from(max_tokens);
    let quota = 3 * per_request + per_request / 2;
    let (ok, out, err) = try_run(
        &owner,
        &[
            "cloud",
            "invite",
            "quinn@example.com",
            "--role",
            "commenter",
            "--quota",
            &quota.to_string(),
        ],
    );
    assert!(ok, "{err}");
    let code = serde_json::from_str::<serde_json::Value>(&out).unwrap()["code"]
        .as_str()
        .unwrap()
        .to_owned();
    let quinn = Device::new();
    let (ok, _, err) = try_run(&quinn, &["cloud", "accept", &code]);
    assert!(ok, "{err}");

    let (_endpoint, conn) = synesis_e2e::connect(&quinn).await;
    let asks = (0..32u8).map(|n| {
        let conn = conn.clone();
        tokio::spawn(async move {
            let id = RequestId::from_parts(1_795_000_000_000, [n; 10]);
            let (mut tx, rx) = conn.open_bi().await.unwrap();
            let first = synesis_e2e::escalation_request(id, "tiny", "hi", max_tokens);
            synesis_wire::send(&mut tx, &first.into(), FrameLimits::default())
                .await
                .unwrap();
            let mut rx = synesis_wire::FramedRecv::new(rx, FrameLimits::default());
            loop {
                match rx.next().await.unwrap() {
                    Some(Message::EscalationChunk(_)) => {}
                    Some(Message::EscalationDone(d)) => return Ok::<EscalationDone, ErrorCode>(d),
                    Some(Message::ErrorMsg(e)) => return Err(e.code),
                    other => panic!("{other:?}"),
                }
            }
        })
    });
    let mut used = 0u64;
    let (mut answered, mut refused) = (0, 0);
    for ask in asks.collect::<Vec<_>>() {
        match ask.await.unwrap() {
            Ok(done) => {
                answered += 1;
                used += done.usage.input_tokens + done.usage.output_tokens;
            }
            // More than the account may run at once (16) are told to wait; the others that do
            // not fit are refused for the quota.
            Err(ErrorCode::LIMIT_EXCEEDED) => {}
            Err(code) => {
                assert_eq!(code, ErrorCode::QUOTA_EXCEEDED);
                refused += 1;
            }
        }
    }
    assert!(
        answered >= 3 && refused > 0,
        "{answered} answered, {refused} refused"
    );
    assert!(used <= quota, "{used} tokens used of a quota of {quota}");
    // Past it, `cloud ask` says so (and the owner, who has no quota, goes on).
    let mut said = String::new();
    for _ in 0..8 {
        let (ok, _, err) = try_run(&quinn, &["cloud", "ask", "--max-tokens", "8", "hi"]);
        if !ok {
            said = err;
            break;
        }
    }
    assert!(said.contains("this member's monthly quota"), "{said}");
    allowed(&owner, &["cloud", "ask", "--max-tokens", "8", "hi"]);

    // Usage per member: the owner's and Quinn's, apart.
    let by_member = json_of(
        owner
            .synesis()
            .args(["--json", "cloud", "usage", "--by", "member"]),
    );
    let groups = by_member["groups"].to_string();
    assert!(
        groups.contains("quinn@example.com") && groups.contains("acme"),
        "{by_member}"
    );
}

/// The owner hands the account to a member, who accepts: the roles swap (the former owner is
/// an editor and can no longer invite); a member cannot hand over; the owner removes a member;
/// the operator's audit log has every change.
#[test]
fn a_handover_swaps_the_roles_and_every_change_is_audited() {
    let (cloud, owner, _files) = setup();
    let join = |who: &str, role: &str| {
        let (ok, out, err) = try_run(&owner, &["cloud", "invite", who, "--role", role]);
        assert!(ok, "{err}");
        let code = serde_json::from_str::<serde_json::Value>(&out).unwrap()["code"]
            .as_str()
            .unwrap()
            .to_owned();
        let device = Device::new();
        let (ok, _, err) = try_run(&device, &["cloud", "accept", &code]);
        assert!(ok, "{err}");
        device
    };
    let ada = join("ada@example.com", "editor");
    let carl = join("carl@example.com", "commenter");

    forbidden(&carl, &["cloud", "handover", "carl@example.com"]);
    forbidden(&ada, &["cloud", "handover", "ada@example.com"]);
    let (ok, _, err) = try_run(&ada, &["cloud", "handover", "accept"]);
    assert!(!ok && err.contains("no handover"), "{err}");
    allowed(&owner, &["cloud", "handover", "ada@example.com"]);
    let (ok, _, err) = try_run(&carl, &["cloud", "handover", "accept"]);
    assert!(
        !ok && err.contains("no handover"),
        "not offered to carl: {err}"
    );
    allowed(&ada, &["cloud", "handover", "accept"]);

    let members = json_of(ada.synesis().args(["--json", "cloud", "members"]));
    assert_eq!(members[0]["name"], "ada@example.com", "{members}");
    assert_eq!(members[0]["role"], "owner", "{members}");
    assert!(
        members
            .to_string()
            .contains(r#""name":"acme","role":"editor""#),
        "{members}"
    );
    forbidden(
        &owner,
        &["cloud", "invite", "x@example.com", "--role", "viewer"],
    );
    allowed(&ada, &["cloud", "members", "rm", "carl@example.com"]);
    let (ok, _, err) = try_run(&carl, &["cloud", "usage"]);
    assert!(!ok && err.contains("revoked"), "{err}");

    let audit = json_of(cloud.admin().args(["--json", "audit", "acme"]));
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "invited",
            "member_joined",
            "invited",
            "member_joined",
            "handover_offered",
            "handover_accepted",
            "member_removed"
        ],
        "{audit}"
    );
}
