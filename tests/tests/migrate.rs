//! A cloud that outgrew SQLite moves to PostgreSQL and serves the same device: the operator
//! stops it, copies it over (`admin migrate --to`), and starts it on the PostgreSQL database.
//! The device sees the same balance and the same charges, the chains verify there, and it goes on
//! asking, charged on the new database.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use synesis_e2e::{json_of, postgres_database, run_ok, skip_unless, tiny_cloud};

const PROMPT: &str = "hello";

fn ask(device: &synesis_e2e::Device) -> serde_json::Value {
    json_of(
        device
            .synesis()
            .args(["--json", "cloud", "ask", "--max-tokens", "8", PROMPT]),
    )
}

/// What the device is told of its account: everything but the request's own id.
fn usage(device: &synesis_e2e::Device) -> serde_json::Value {
    let mut u = json_of(device.synesis().args(["--json", "cloud", "usage"]));
    if let Some(o) = u.as_object_mut() {
        o.remove("request_id");
    }
    u
}

#[test]
fn a_sqlite_cloud_moved_to_postgres_serves_the_same_device() {
    let target = postgres_database();
    if skip_unless(
        target.is_some(),
        "SYNESIS_TEST_POSTGRES names no PostgreSQL server",
    ) {
        return;
    }
    let target = target.unwrap();
    if std::env::var("SYNESIS_E2E_BACKEND").as_deref() == Ok("postgres") {
        return; // its clouds start on PostgreSQL already: nothing to move
    }
    let mut t = tiny_cloud("");
    ask(&t.owner);
    ask(&t.owner);
    let before = usage(&t.owner);
    assert_eq!(before["charges"].as_array().unwrap().len(), 2, "{before}");

    // Stopped, copied, started on PostgreSQL: the same data directory (its CA, its key), the
    // same port.
    let _ = t.cloud.process.child.kill();
    let _ = t.cloud.process.child.wait();
    let moved = json_of(t.cloud.admin().args(["--json", "migrate", "--to", &target]));
    assert_eq!(
        (
            moved["chains"].as_u64(),
            moved["accounts_agreeing"].as_u64()
        ),
        (Some(1), Some(1)),
        "{moved}"
    );
    let config = t.files.path().join("cloud.toml");
    t.cloud
        .restart_with(&["--config", config.to_str().unwrap(), "--database", &target]);
    let after = usage(&t.owner);
    assert_eq!(after, before, "the same account, seen from the device");

    // A new answer is charged on the new database.
    let third = ask(&t.owner);
    let now = usage(&t.owner);
    let charges = now["charges"].as_array().unwrap();
    assert_eq!(charges.len(), 3, "{now}");
    assert_eq!(
        now["balance_micro_usd"].as_i64().unwrap(),
        before["balance_micro_usd"].as_i64().unwrap() - third["total_micro_usd"].as_i64().unwrap()
    );
    let verified =
        json_of(
            t.cloud
                .admin()
                .args(["--json", "--database", &target, "ledger", "verify"]),
        );
    assert_eq!(verified["intact"], true, "{verified}");
    run_ok(t.cloud.admin().args(["--database", &target, "devices"]));
}
