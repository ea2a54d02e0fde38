//! What a ledger operation reads and writes beside the ledger (`LedgerUnit`, vouchers) behaves
//! the same through either backend's writer (`Writer`), as of the operation's place in its
//! batch: a member's holds sent at once never go past the member's quota; a stored answer is
//! read back in its own batch, stored once, and gone with a refused operation; a voucher's
//! redemption is undone with a refused operation.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

#[path = "support/postgres.rs"]
mod support;

use synesis_billing::ledger::{
    Account, HoldRequest, LedgerError, StoreError, hold, settle, top_up, void,
};
use synesis_billing::{PriceTable, Tier, TierRules, Usage};
use synesis_cloud::storage::answers::{Asker, StoredAnswer};
use synesis_cloud::storage::ledger::{LedgerTx, LedgerUnit, LedgerWriter, Writer};
use synesis_cloud::storage::postgres::ledger::PgLedgerWriter;
use synesis_cloud::storage::{
    Accounts, Db, Devices, Enrollment, IssuedCert, MemberStore, Vouchers,
};
use synesis_proto::message::{Cost, EscalationDone, FinishReason};
use synesis_proto::{AccountId, DeviceId, MicroUsd, RequestId, UnixMillis};

const NOW: UnixMillis = UnixMillis(1_795_000_000_000);
const ACME: u128 = 7;
const SECRET: [u8; 32] = [9; 32];

fn acme() -> Account {
    Account {
        id: AccountId::try_from_uuid(uuid::Uuid::from_u128(ACME)).unwrap(),
        tier: Tier::Managed,
    }
}

fn rid(n: u64) -> RequestId {
    let mut rand = [0u8; 10];
    rand[3..].copy_from_slice(&n.to_le_bytes()[..7]);
    RequestId::from_parts(1_795_000_000_000, rand)
}

fn device(n: u8) -> DeviceId {
    DeviceId::try_from_uuid(uuid::Uuid::from_u128(1_000 + u128::from(n))).unwrap()
}

/// The account, a credit, the member "kid" (quota 100 tokens a month) with devices 1 and 2,
/// and the owner's device 3; two vouchers.
fn populate(store: &mut (impl Accounts + Devices + Vouchers), reads: &impl MemberStore) {
    let account = acme().id;
    store
        .create_account(account, "acme", Tier::Managed, NOW)
        .unwrap();
    reads
        .add_member(
            account,
            "m-kid",
            "kid",
            synesis_proto::message::Role::Editor,
            Some(100),
            "op",
            NOW,
        )
        .unwrap();
    for (n, member) in [(1, Some("kid")), (2, Some("kid")), (3, None)] {
        store
            .create_token(
                account,
                [n; 16],
                &SECRET,
                member,
                NOW,
                UnixMillis(NOW.0 + 60_000),
            )
            .unwrap();
        store
            .enroll(
                &Enrollment {
                    token_id: [n; 16],
                    secret: &SECRET,
                    request: RequestId::from_parts(1, [n; 10]),
                    device_name: "laptop",
                    new_device_id: device(n),
                },
                NOW,
                &mut |_| {
                    Ok(IssuedCert {
                        der: vec![n; 8],
                        not_after: UnixMillis(NOW.0 + 60_000),
                    })
                },
            )
            .unwrap();
    }
    store
        .create_voucher("VCH-ONE", MicroUsd(5_000_000), NOW)
        .unwrap();
    store
        .create_voucher("VCH-TWO", MicroUsd(5_000_000), NOW)
        .unwrap();
}

/// A hold as the cloud admits one: under the device's member's quota, read with it.
fn admitted_hold(
    s: &mut LedgerTx<'_, '_>,
    id: RequestId,
    device: DeviceId,
) -> Result<(), LedgerError> {
    let request = HoldRequest {
        model: "claude-sonnet".into(),
        device: Some(device),
        input_tokens: 20,
        max_output_tokens: 10,
        request_body: None,
    };
    let since = synesis_billing::month_start(NOW).unwrap();
    if let Some((quota, used)) = s.member_quota_use(device, since)? {
        synesis_billing::admit_free(used, 30, quota).map_err(LedgerError::MemberQuota)?;
    }
    let (prices, rules) = (PriceTable::default(), TierRules::default());
    hold(s, acme(), id, &request, NOW, 60_000, &prices, &rules).map(drop)
}

fn answer(id: RequestId) -> StoredAnswer {
    StoredAnswer {
        body: [5; 32],
        chunks: vec!["hello".into()],
        done: EscalationDone {
            request_id: id,
            chunks: 1,
            finish_reason: FinishReason::Stop,
            usage: synesis_proto::message::Usage {
                input_tokens: 20,
                output_tokens: 1,
            },
            cost: Cost {
                base: MicroUsd(1),
                markup: MicroUsd(0),
                total: MicroUsd(1),
            },
            usage_counted: false,
            logprobs: Vec::new(),
        },
        asker: None,
    }
}

/// Everything, through `writer`; what came of it, to compare between the backends.
async fn scenario(writer: Writer) -> Vec<String> {
    let account = acme().id;
    let mut said = Vec::new();
    writer
        .run(move |s| top_up(s, account, rid(1), MicroUsd(10_000_000), NOW))
        .await
        .unwrap();

    // Twelve holds of 30 tokens at once from the member's two devices, queued behind a slow
    // operation so that they share a batch: 3 fit in the quota of 100.
    let slow = {
        let writer = writer.clone();
        tokio::spawn(async move {
            writer
                .run(|_| {
                    std::thread::sleep(std::time::Duration::from_millis(300));
                    Ok(())
                })
                .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let mut holds = tokio::task::JoinSet::new();
    for n in 0..12u64 {
        let writer = writer.clone();
        let dev = device(1 + u8::try_from(n % 2).unwrap());
        holds.spawn(async move {
            let held = writer
                .run(move |s| admitted_hold(s, rid(100 + n), dev))
                .await;
            (rid(100 + n), held)
        });
    }
    slow.await.unwrap().unwrap();
    let results = holds.join_all().await;
    let admitted: Vec<RequestId> = results
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(id, _)| *id)
        .collect();
    let refused = results
        .iter()
        .filter(|(_, r)| matches!(r, Err(LedgerError::MemberQuota(_))))
        .count();
    said.push(format!(
        "holds admitted {}, over quota {refused}",
        admitted.len()
    ));
    // Another member's device is not held to it.
    writer
        .run(move |s| admitted_hold(s, rid(200), device(3)))
        .await
        .unwrap();

    // Requests running (holds open, not lapsed), as the operation's batch sees them: capped,
    // lapsed, one closed and one opened within the operation; all of it gone with a refusal.
    let closing = admitted[1];
    let (tell, told) = std::sync::mpsc::channel();
    let refused = writer
        .run(move |s| {
            let counts = [
                s.running(account, NOW, 10)?,
                s.running(account, NOW, 2)?,
                s.running(account, UnixMillis(NOW.0 + 120_000), 10)?,
            ];
            void(s, account, closing, NOW)?;
            let closed = [s.running(account, NOW, 10)?, s.running(account, NOW, 3)?];
            admitted_hold(s, rid(901), device(3))?;
            let opened = s.running(account, NOW, 10)?;
            tell.send((counts, closed, opened)).unwrap();
            Err::<(), _>(LedgerError::NotPositive)
        })
        .await;
    assert!(matches!(refused, Err(LedgerError::NotPositive)));
    said.push(format!("running {:?}", told.recv().unwrap()));
    let after = writer
        .run(move |s| Ok(s.running(account, NOW, 10)?))
        .await
        .unwrap();
    said.push(format!("running after the refusal {after}"));

    // A settled request's answer: read back within its operation, stored once.
    let id = admitted[0];
    let read_back = writer
        .run(move |s| {
            let (prices, rules) = (PriceTable::default(), TierRules::default());
            let usage = Usage {
                input_tokens: 20,
                output_tokens: 1,
            };
            settle(s, acme(), id, usage, NOW, &prices, &rules)?;
            s.put_answer(account, id, &answer(id), NOW)?;
            let again = s.put_answer(account, id, &answer(id), NOW);
            assert!(matches!(again, Err(StoreError::Constraint(_))), "{again:?}");
            Ok(s.answer(account, id)?)
        })
        .await
        .unwrap()
        .unwrap();
    said.push(format!("asker {:?}", read_back.asker));
    assert_eq!(read_back.asker, Some(Asker::new("m-kid")));
    assert_eq!(read_back.chunks, answer(id).chunks);
    let later = writer
        .run(move |s| Ok(s.answer(account, id)?))
        .await
        .unwrap();
    assert_eq!(later, Some(read_back), "committed as read");
    let again = writer
        .run(move |s| {
            s.put_answer(account, id, &answer(id), NOW)
                .map_err(Into::into)
        })
        .await;
    assert!(again.is_err(), "stored once: {again:?}");
    // An operation that stores an answer and is then refused leaves none.
    let other = rid(250);
    let refused = writer
        .run(move |s| {
            s.put_answer(account, other, &answer(other), NOW)?;
            Err::<(), _>(LedgerError::NotPositive)
        })
        .await;
    assert!(matches!(refused, Err(LedgerError::NotPositive)));
    let gone = writer
        .run(move |s| Ok(s.answer(account, other)?))
        .await
        .unwrap();
    said.push(format!("refused answer stored: {}", gone.is_some()));
    // The quota counts the settlement now, and the holds still open.
    let used = writer
        .run(|s| {
            let since = synesis_billing::month_start(NOW).unwrap();
            Ok(s.member_quota_use(device(1), since)?)
        })
        .await
        .unwrap();
    said.push(format!("quota use {used:?}"));

    // Vouchers: a refused operation's redemption is undone; one request, one voucher.
    let refused = writer
        .run(move |s| {
            s.redeem_voucher("VCH-ONE", account, rid(300), NOW)?;
            Err::<(), _>(LedgerError::NotPositive)
        })
        .await;
    assert!(refused.is_err());
    for (code, n) in [
        ("VCH-ONE", 301),
        ("VCH-ONE", 301),
        ("VCH-ONE", 302),
        ("VCH-TWO", 301),
    ] {
        let redeemed = writer
            .run(move |s| s.redeem_voucher(code, account, rid(n), NOW))
            .await;
        said.push(format!("redeem {code} as {n}: {redeemed:?}"));
    }
    let others = AccountId::try_from_uuid(uuid::Uuid::from_u128(99)).unwrap();
    let theirs = writer
        .run(move |s| s.redeem_voucher("VCH-TWO", others, rid(301), NOW))
        .await;
    said.push(format!("another account's request: {theirs:?}"));
    let lapsed = writer
        .run(|s| Ok(s.accounts_with_lapsed_holds(UnixMillis(NOW.0 + 120_000))?))
        .await
        .unwrap();
    said.push(format!("lapsed {}", lapsed == [account]));
    said
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.db");
    let mut db = Db::open(&path).unwrap();
    let reads = Db::open(&path).unwrap();
    populate(&mut db, &reads.unit());
    let said = scenario(Writer::Sqlite(LedgerWriter::open(&path).unwrap())).await;
    assert_eq!(
        said,
        [
            "holds admitted 3, over quota 9",
            "running ([4, 2, 0], [3, 3], 4)",
            "running after the refusal 4",
            "asker Some(Asker(\"m-kid\"))",
            "refused answer stored: false",
            "quota use Some((100, 81))",
            "redeem VCH-ONE as 301: Ok(Some(MicroUsd(5000000)))",
            "redeem VCH-ONE as 301: Ok(Some(MicroUsd(5000000)))",
            "redeem VCH-ONE as 302: Ok(None)",
            "redeem VCH-TWO as 301: Err(IdempotencyConflict)",
            "another account's request: Ok(Some(MicroUsd(5000000)))",
            "lapsed true",
        ]
    );
}

/// Opened outside any runtime (the PostgreSQL handles block on runtimes of their own).
#[test]
fn on_postgres_as_on_sqlite() {
    let Some((mut pg, url)) = support::fresh_database() else {
        return;
    };
    let reads = pg.clone();
    populate(&mut pg, &reads);
    let writer = Writer::Postgres(PgLedgerWriter::open(&url).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.db");
    let mut db = Db::open(&path).unwrap();
    populate(&mut db, &Db::open(&path).unwrap().unit());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let on_postgres = runtime.block_on(scenario(writer));
    let on_sqlite = runtime.block_on(scenario(Writer::Sqlite(LedgerWriter::open(&path).unwrap())));
    assert_eq!(on_postgres, on_sqlite);
}
