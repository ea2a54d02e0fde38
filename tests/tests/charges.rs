//! Charges on the cloud's ledger as a device sees them: `synesis cloud usage --since --by`, and
//! `synesis cloud sync` mirroring them into the device's local ledger by request id.
//!
//! Escalations (which settle charges) come with the next issue; here the test settles them the
//! way the cloud will, through the cloud's ledger rules on the running cloud's database file.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::time::{SystemTime, UNIX_EPOCH};

use synesis_billing::ledger::{
    Account, HOLD_TTL_DEFAULT_MS, HoldRequest, LedgerError, hold, settle,
};
use synesis_billing::{PriceTable, Tier, TierRules, Usage, quote};
use synesis_cloud::ledger::SqliteLedger;
use synesis_cloud::storage::{Accounts, Db};
use synesis_e2e::{Cloud, Device, json_of, run_ok};
use synesis_proto::{DeviceId, RequestId, UnixMillis};

const DAY_MS: i64 = 24 * 3_600 * 1_000;

fn now() -> UnixMillis {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    UnixMillis(i64::try_from(ms).unwrap())
}

/// Holds and settles one request of `device` at `at`, as an escalation will; its total.
fn hold_and_settle(
    s: &mut SqliteLedger<'_>,
    account: Account,
    device: DeviceId,
    id: RequestId,
    model: &str,
    usage: Usage,
    at: UnixMillis,
) -> Result<i64, LedgerError> {
    let (prices, rules) = (PriceTable::default(), TierRules::default());
    let request = HoldRequest {
        model: model.into(),
        device: Some(device),
        input_tokens: usage.input_tokens,
        max_output_tokens: usage.output_tokens + 100,
        request_body: None,
    };
    hold(
        s,
        account,
        id,
        &request,
        at,
        HOLD_TTL_DEFAULT_MS,
        &prices,
        &rules,
    )?;
    Ok(settle(s, account, id, usage, at, &prices, &rules)?.amount.0)
}

fn acme(db: &Db) -> Account {
    Account {
        id: db.account_by_name("acme").unwrap().id,
        tier: Tier::Managed,
    }
}

/// Settles one request of `device` at `at`; returns its request id and charged total.
fn charge(
    cloud: &Cloud,
    device: DeviceId,
    model: &str,
    usage: Usage,
    at: UnixMillis,
) -> (RequestId, i64) {
    let mut db = Db::open(&cloud.dir().join("cloud.db")).unwrap();
    let account = acme(&db);
    let id = RequestId::from_parts(u64::try_from(at.0).unwrap(), rand_bytes(at));
    let total = synesis_cloud::ledger::transaction(&mut db, |s| {
        hold_and_settle(s, account, device, id, model, usage, at)
    })
    .unwrap();
    let expected = quote(
        Tier::Managed,
        model,
        usage,
        &PriceTable::default(),
        &TierRules::default(),
    )
    .unwrap();
    assert_eq!(total, expected.total.0);
    (id, total)
}

/// A cloud, and a device enrolled in the Managed account `acme` holding `credit` dollars.
fn managed_device(credit: &str) -> (Cloud, Device, DeviceId) {
    let cloud = Cloud::start();
    let device = Device::new();
    let device_id: DeviceId = device
        .login(&cloud.account_and_token("acme"))
        .parse()
        .unwrap();
    run_ok(
        cloud
            .admin()
            .args(["account", "set-tier", "acme", "managed"]),
    );
    run_ok(cloud.admin().args(["credit", "acme", credit]));
    (cloud, device, device_id)
}

fn rand_bytes(at: UnixMillis) -> [u8; 10] {
    let mut b = [0u8; 10];
    b[3..].copy_from_slice(&at.0.to_le_bytes()[..7]);
    b
}

#[test]
fn charges_show_in_usage_by_group_and_sync_mirrors_them() {
    let (cloud, device, device_id) = managed_device("20.00");

    let t = now();
    let u = |i, o| Usage {
        input_tokens: i,
        output_tokens: o,
    };
    let old = charge(
        &cloud,
        device_id,
        "claude-opus",
        u(5_000, 700),
        UnixMillis(t.0 - 3 * DAY_MS),
    );
    let a = charge(&cloud, device_id, "claude-sonnet", u(1_234, 321), t);
    let b = charge(
        &cloud,
        device_id,
        "claude-sonnet",
        u(10, 1),
        UnixMillis(t.0 + 1),
    );

    // All charges, exact.
    let usage = json_of(device.synesis().args(["--json", "cloud", "usage"]));
    let charges = usage["charges"].as_array().unwrap();
    assert_eq!(charges.len(), 3);
    assert_eq!(charges[1]["request_id"], a.0.to_string());
    assert_eq!(charges[1]["input_tokens"], 1_234);
    assert_eq!(charges[1]["output_tokens"], 321);
    assert_eq!(charges[1]["total_micro_usd"], a.1);
    assert_eq!(charges[1]["device_id"], device_id.to_string());
    assert_eq!(charges[1]["model"], "claude-sonnet");
    assert_eq!(usage["balance_micro_usd"], 20_000_000 - old.1 - a.1 - b.1);

    // --since leaves out the charge three days old; --by totals per model.
    let yesterday = chrono::DateTime::from_timestamp_millis(t.0 - DAY_MS)
        .unwrap()
        .format("%Y-%m-%d")
        .to_string();
    let recent = json_of(device.synesis().args([
        "--json", "cloud", "usage", "--since", &yesterday, "--by", "model",
    ]));
    assert_eq!(recent["charges"].as_array().unwrap().len(), 2);
    let groups = recent["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0]["key"], "claude-sonnet");
    assert_eq!(groups[0]["charges"], 2);
    assert_eq!(groups[0]["input_tokens"], 1_244);
    assert_eq!(groups[0]["total_micro_usd"], a.1 + b.1);
    let by_day = json_of(
        device
            .synesis()
            .args(["--json", "cloud", "usage", "--by", "day"]),
    );
    // The charge three days old is a day of its own; the two recent ones share one unless the
    // test runs across midnight UTC.
    let days = by_day["groups"].as_array().unwrap();
    assert!((2..=3).contains(&days.len()), "{by_day}");
    let total: i64 = days
        .iter()
        .map(|g| g["total_micro_usd"].as_i64().unwrap())
        .sum();
    assert_eq!(total, old.1 + a.1 + b.1);
    let by_device = json_of(
        device
            .synesis()
            .args(["--json", "cloud", "usage", "--by", "device"]),
    );
    assert_eq!(by_device["groups"][0]["key"], device_id.to_string());
    assert_eq!(by_device["groups"][0]["total_micro_usd"], old.1 + a.1 + b.1);

    // Sync: three charges added to the local ledger, then in agreement.
    let first = json_of(device.synesis().args(["--json", "cloud", "sync"]));
    assert_eq!(first["counts"]["added"], 3, "{first}");
    let second = json_of(device.synesis().args(["--json", "cloud", "sync"]));
    assert_eq!(second["counts"]["unchanged"], 3, "{second}");
    assert_eq!(second["counts"]["added"], 0);
    let local = json_of(device.synesis().args(["--json", "usage"]));
    assert_eq!(local["cloud"]["charges"], 3);
    assert_eq!(local["cloud"]["total_micro_usd"], old.1 + a.1 + b.1);

    // A local row that drifted is corrected to the cloud's values and reported.
    let ledger = rusqlite::Connection::open(device.home().join("data/ledger.db")).unwrap();
    let n = ledger
        .execute(
            "UPDATE entries SET micro_usd = micro_usd + 1 WHERE request_id = ?1",
            [a.0.to_string()],
        )
        .unwrap();
    assert_eq!(n, 1);
    drop(ledger);
    let third = json_of(device.synesis().args(["--json", "cloud", "sync"]));
    assert_eq!(third["counts"]["changed"], 1, "{third}");
    assert_eq!(third["changed"][0]["request_id"], a.0.to_string());
    assert_eq!(third["changed"][0]["fields"][0], "total_micro_usd");
    let local = json_of(device.synesis().args(["--json", "usage"]));
    assert_eq!(local["cloud"]["total_micro_usd"], old.1 + a.1 + b.1);
    run_ok(cloud.admin().args(["ledger", "verify"]));
}

/// After `cloud logout` and a new `cloud login`, the machine's charges from its earlier identity
/// stay in agreement with the cloud instead of being reported missing there; another device's
/// charges in the same account are never mirrored.
#[test]
fn sync_keeps_the_charges_of_an_earlier_identity() {
    let (cloud, device, first) = managed_device("20.00");
    let u = Usage {
        input_tokens: 100,
        output_tokens: 10,
    };
    let t = now();
    let before = charge(&cloud, first, "claude-sonnet", u, t);
    let synced = json_of(device.synesis().args(["--json", "cloud", "sync"]));
    assert_eq!(synced["counts"]["added"], 1, "{synced}");

    run_ok(device.synesis().args(["cloud", "logout"]));
    let second: DeviceId = device.login(&cloud.token("acme", "1h")).parse().unwrap();
    assert_ne!(first, second);
    let after = charge(&cloud, second, "claude-sonnet", u, UnixMillis(t.0 + 1));
    let other = Device::new();
    let stranger: DeviceId = other.login(&cloud.token("acme", "1h")).parse().unwrap();
    charge(&cloud, stranger, "claude-sonnet", u, UnixMillis(t.0 + 2));

    let synced = json_of(device.synesis().args(["--json", "cloud", "sync"]));
    let counts = &synced["counts"];
    assert_eq!(
        (counts["added"].as_u64(), counts["unchanged"].as_u64()),
        (Some(1), Some(1)),
        "{synced}"
    );
    assert_eq!(counts["missing_in_cloud"], 0, "{synced}");
    assert_eq!(synced["added"][0], after.0.to_string());
    let local = json_of(device.synesis().args(["--json", "usage"]));
    assert_eq!(local["cloud"]["total_micro_usd"], before.1 + after.1);
}

/// Settles `count` small requests of `device` in acme's account, the `n`th at `at(n)`, in one
/// transaction; their request ids (in the order settled) and total.
fn settle_many(
    db: &mut Db,
    device: DeviceId,
    count: usize,
    at: impl Fn(usize) -> UnixMillis,
) -> (Vec<RequestId>, i64) {
    let account = acme(db);
    let usage = Usage {
        input_tokens: 100,
        output_tokens: 10,
    };
    let (mut ids, mut total) = (Vec::with_capacity(count), 0);
    synesis_cloud::ledger::transaction(db, |s| {
        for n in 0..count {
            let at = at(n);
            // Ids in the opposite order to the settling within a millisecond: the listing's
            // order is the ledger's, not the ids'.
            let mut rand = [0u8; 10];
            rand[3..].copy_from_slice(&((count - n) as u64).to_be_bytes()[1..]);
            let id = RequestId::from_parts(u64::try_from(at.0).unwrap(), rand);
            total += hold_and_settle(s, account, device, id, "claude-sonnet", usage, at)?;
            ids.push(id);
        }
        Ok(())
    })
    .unwrap();
    (ids, total)
}

/// A usage page ends exactly where the next begins, inside one millisecond too: one more charge
/// than a page in a single millisecond lists as a full page naming its last charge, then one.
#[test]
fn usage_pages_meet_exactly_inside_one_millisecond() {
    use synesis_cloud::ledger::{LedgerReads, UsageError};
    use synesis_proto::message::{USAGE_CHARGES_MAX, UsageRequest};

    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(&dir.path().join("cloud.db")).unwrap();
    let account: synesis_proto::AccountId = "01a20356-1a8f-701e-b671-33a46efdd11c".parse().unwrap();
    db.create_account(account, "acme", Tier::Managed, now())
        .unwrap();
    synesis_cloud::ledger::transaction(&mut db, |s| {
        let credit = RequestId::from_parts(1, [9; 10]);
        synesis_billing::ledger::top_up(
            s,
            account,
            credit,
            synesis_billing::MicroUsd(i64::MAX / 2),
            now(),
        )
    })
    .unwrap();
    let device: DeviceId = "01a20356-1a9c-7054-9319-b9394efbaad6".parse().unwrap();
    let t = now();
    let (ids, _) = settle_many(&mut db, device, USAGE_CHARGES_MAX + 1, |_| t);
    let acct = db.account_by_id(account).unwrap();
    let rules = synesis_billing::TierRules::default();
    // One page of charges at or after `since`, after the charge `after`.
    let charges = |since: Option<UnixMillis>, after: Option<RequestId>| {
        let request = UsageRequest {
            request_id: RequestId::from_parts(2, [1; 10]),
            since,
            group_by: None,
            after,
        };
        db.usage(&acct, &request, now(), &rules, USAGE_CHARGES_MAX)
            .map(|reply| (reply.charges, reply.next))
    };
    let listed = |page: &[synesis_proto::message::Charge]| -> Vec<RequestId> {
        page.iter().map(|c| c.request_id).collect()
    };

    let (first, next) = charges(None, None).unwrap();
    assert_eq!(listed(&first), ids[..USAGE_CHARGES_MAX]);
    assert_eq!(next, Some(ids[USAGE_CHARGES_MAX - 1]));
    let (second, next) = charges(None, next).unwrap();
    assert_eq!(listed(&second), ids[USAGE_CHARGES_MAX..]);
    assert_eq!(next, None);

    // Exactly a page after the first charge: nothing follows it.
    let (rest, next) = charges(Some(t), Some(ids[0])).unwrap();
    assert_eq!(listed(&rest), ids[1..]);
    assert_eq!(next, None);
    // `since` past the cursor wins; a cursor that names no charge is the device's mistake.
    let (none, next) = charges(Some(UnixMillis(t.0 + 1)), Some(ids[0])).unwrap();
    assert!(none.is_empty() && next.is_none());
    let stranger = RequestId::from_parts(1, [7; 10]);
    assert!(matches!(
        charges(None, Some(stranger)),
        Err(UsageError::UnknownCursor(id)) if id == stranger
    ));
    assert_eq!(
        UsageError::UnknownCursor(stranger).code(),
        synesis_proto::ErrorCode::INVALID_REQUEST
    );
}

/// More charges than one usage reply lists: `cloud usage` and `cloud sync` page through them.
#[test]
fn more_charges_than_one_reply_holds_are_all_listed_and_synced() {
    use synesis_proto::message::USAGE_CHARGES_MAX;
    let (cloud, device, device_id) = managed_device("1000.00");

    // 2.5 pages settled in one transaction: the first 1.5 pages' worth in one millisecond (a
    // page boundary inside it), then seven to a millisecond.
    let count = USAGE_CHARGES_MAX * 5 / 2;
    let same_ms = USAGE_CHARGES_MAX * 3 / 2;
    let mut db = Db::open(&cloud.dir().join("cloud.db")).unwrap();
    let t = now();
    let (_, total) = settle_many(&mut db, device_id, count, |n| {
        UnixMillis(t.0 + i64::try_from(n.saturating_sub(same_ms) / 7).unwrap())
    });

    let listed = json_of(
        device
            .synesis()
            .args(["--json", "cloud", "usage", "--by", "model"]),
    );
    assert_eq!(listed["charges"].as_array().unwrap().len(), count);
    assert_eq!(listed["groups"][0]["charges"], count);
    assert_eq!(listed["groups"][0]["total_micro_usd"], total);
    assert_eq!(listed["balance_micro_usd"], 1_000_000_000 - total);

    let operator = json_of(cloud.admin().args(["usage", "acme", "--json"]));
    assert_eq!(operator["charges"].as_array().unwrap().len(), count);
    assert_eq!(operator["balance_micro_usd"], listed["balance_micro_usd"]);

    let synced = json_of(device.synesis().args(["--json", "cloud", "sync"]));
    assert_eq!(synced["counts"]["added"], count, "{}", synced["counts"]);
    let local = json_of(device.synesis().args(["--json", "usage"]));
    assert_eq!(local["cloud"]["total_micro_usd"], total);
}

/// PROTOCOL.md §2 *Usage*: each reply is one snapshot of the ledger (its balance and its charges
/// agree), and a charge settled between pages shows on the next page only when it comes after
/// the cursor in the listing's order. Over the wire: `UsageRequest` frames made here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_a_charge_settled_between_pages_shows_only_if_after_the_cursor() {
    use synesis_e2e::wire::{exchange, usage_request};
    use synesis_proto::Message;
    use synesis_proto::message::{USAGE_CHARGES_MAX, UsageReply, UsageRequest};

    let (cloud, device, device_id) = managed_device("1000.00");
    let credit = 1_000_000_000;
    let t = now();
    let mut db = Db::open(&cloud.dir().join("cloud.db")).unwrap();
    // One page and one charge, a millisecond apart, ten seconds ago.
    let (ids, total) = settle_many(&mut db, device_id, USAGE_CHARGES_MAX + 1, |n| {
        UnixMillis(t.0 - 10_000 + i64::try_from(n).unwrap())
    });
    let (_endpoint, conn) = synesis_e2e::connect(&device).await;
    let page = |after: Option<RequestId>| {
        let conn = conn.clone();
        async move {
            match exchange(
                &conn,
                UsageRequest {
                    after,
                    ..usage_request()
                },
            )
            .await
            {
                Some(Message::UsageReply(u)) => u,
                other => panic!("{other:?}"),
            }
        }
    };
    let listed = |u: &UsageReply| u.charges.iter().map(|c| c.request_id).collect::<Vec<_>>();

    let first = page(None).await;
    assert_eq!(listed(&first), ids[..USAGE_CHARGES_MAX]);
    assert_eq!(first.next, Some(ids[USAGE_CHARGES_MAX - 1]));
    assert_eq!(
        first.balance.0,
        credit - total,
        "the balance of the same snapshot"
    );

    // Between the pages: one charge earlier than the cursor, one later than every other.
    let usage = Usage {
        input_tokens: 1_000,
        output_tokens: 100,
    };
    let (early, early_total) = charge(
        &cloud,
        device_id,
        "claude-sonnet",
        usage,
        UnixMillis(t.0 - 20_000),
    );
    let (late, late_total) = charge(&cloud, device_id, "claude-sonnet", usage, t);

    let second = page(first.next).await;
    assert_eq!(
        listed(&second),
        [ids[USAGE_CHARGES_MAX], late],
        "the later one follows the cursor; the earlier one is behind it"
    );
    assert_eq!(second.next, None);
    assert_eq!(second.balance.0, credit - total - early_total - late_total);
    // A listing from the start has it, first.
    assert_eq!(listed(&page(None).await)[0], early);
}

/// PROTOCOL.md §3: a device that announced a lower frame maximum in `Hello` gets every reply
/// within it. A page of 1,000 charges is larger than 64 KiB, so the cloud sends smaller pages,
/// each with its `next`, and together they list every charge once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_pages_fit_the_frame_maximum_the_device_announced() {
    use synesis_e2e::wire::{frame, usage_request};
    use synesis_proto::message::{Hello, USAGE_CHARGES_MAX, UsageRequest};
    use synesis_proto::{FrameLimits, Message, PROTOCOL_VERSION};
    use synesis_wire::FramedRecv;

    // A device of a member with a long name (254 bytes, the most): each charge names its member,
    // so a page of 1,000 is about 320 KB.
    let (cloud, _owner, _) = managed_device("1000.00");
    let member = "m".repeat(254);
    run_ok(
        cloud
            .admin()
            .args(["member", "add", "acme", &member, "--role", "viewer"]),
    );
    let token =
        run_ok(
            cloud
                .admin()
                .args(["token", "create", "--account", "acme", "--member", &member]),
        );
    let device = Device::new();
    let device_id: DeviceId = device
        .login(String::from_utf8(token.stdout).unwrap().trim())
        .parse()
        .unwrap();
    let mut db = Db::open(&cloud.dir().join("cloud.db")).unwrap();
    let t = now();
    let (ids, _) = settle_many(&mut db, device_id, USAGE_CHARGES_MAX + 1, |_| t);
    let small = FrameLimits::new(64 * 1024);
    let (_endpoint, conn) = synesis_e2e::connect(&device).await;
    let (mut control, rx) = conn.open_bi().await.unwrap();
    let hello = Hello {
        protocol_versions: vec![PROTOCOL_VERSION],
        client: "charges-test/0".into(),
        heartbeat_interval_ms: 15_000,
        max_frame_bytes: small.max_payload_bytes(),
    };
    control.write_all(&frame(hello)).await.unwrap();
    let mut welcome = FramedRecv::new(rx, small);
    assert!(matches!(
        welcome.next().await.unwrap(),
        Some(Message::Welcome(_))
    ));

    let mut listed = Vec::new();
    let mut pages = 0;
    let mut after = None;
    loop {
        let (mut tx, rx) = conn.open_bi().await.unwrap();
        tx.write_all(&frame(UsageRequest {
            after,
            ..usage_request()
        }))
        .await
        .unwrap();
        // Held to 64 KiB here: a larger frame is FRAME_OVERSIZE on this side.
        let mut rx = FramedRecv::new(rx, small);
        let Some(Message::UsageReply(page)) = rx.next().await.unwrap() else {
            panic!("a usage page within 64 KiB");
        };
        pages += 1;
        listed.extend(page.charges.iter().map(|c| c.request_id));
        after = page.next;
        if after.is_none() {
            break;
        }
        assert_eq!(
            after,
            listed.last().copied(),
            "next names the page's last charge"
        );
    }
    assert_eq!(listed, ids, "every charge once, in order");
    assert!(pages > 2, "{pages} pages: smaller than {USAGE_CHARGES_MAX}");
}
