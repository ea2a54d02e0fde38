//! Members, roles, quotas, invitations, handovers, the audit log and stored answers behave the
//! same on both backends: one scenario, run on SQLite (a file in a temporary directory) and on
//! PostgreSQL (a database of its own on `SYNESIS_TEST_POSTGRES`; see `support/postgres.rs`),
//! whose audit logs must then read the same.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

#[path = "support/postgres.rs"]
mod support;

use synesis_cloud::storage::answers::{Asker, StoredAnswer};
use synesis_cloud::storage::members::{AuditRow, HandoverError, Invitation, Invited, MemberError};
use synesis_cloud::storage::postgres::Pg;
use synesis_cloud::storage::{
    Accounts, AnswerStore, Db, Devices, EnrollError, Enrollment, IssuedCert, MemberChanges,
    MemberStore,
};
use synesis_proto::message::{Cost, EscalationDone, FinishReason, Role, Tier, Usage};
use synesis_proto::{AccountId, DeviceId, MicroUsd, RequestId, UnixMillis};

const SECRET: [u8; 32] = [9; 32];

/// A backend as the handlers see it: its changes, and its reads (on SQLite, through a unit).
trait Backend: Accounts + Devices + MemberChanges {
    fn reads(&self) -> impl MemberStore + AnswerStore + '_;
}

impl Backend for Db {
    fn reads(&self) -> impl MemberStore + AnswerStore + '_ {
        self.unit()
    }
}

impl Backend for Pg {
    fn reads(&self) -> impl MemberStore + AnswerStore + '_ {
        self.clone()
    }
}

fn device_id(n: u8) -> DeviceId {
    DeviceId::try_from_uuid(uuid::Uuid::from_u128(1_000 + u128::from(n))).unwrap()
}

fn request(n: u8) -> RequestId {
    RequestId::from_parts(1, [n; 10])
}

/// A device for the member `member` (a token of its own, `[n; 16]`), as request `n`.
fn device_of(store: &mut impl Backend, account: AccountId, member: &str, n: u8) -> DeviceId {
    store
        .create_token(
            account,
            [n; 16],
            &SECRET,
            Some(member),
            UnixMillis(0),
            UnixMillis(1_000_000),
        )
        .unwrap();
    enroll(store, n).unwrap();
    device_id(n)
}

fn enroll(store: &mut impl Backend, n: u8) -> Result<(), EnrollError> {
    store.enroll(
        &Enrollment {
            token_id: [n; 16],
            secret: &SECRET,
            request: request(n),
            device_name: "laptop",
            new_device_id: device_id(n),
        },
        UnixMillis(10),
        &mut |_| {
            Ok(IssuedCert {
                der: vec![n; 8],
                not_after: UnixMillis(1_000_000),
            })
        },
    )?;
    Ok(())
}

fn names(store: &impl Backend, account: AccountId) -> Vec<(String, Role)> {
    let members = store.reads().members(account).unwrap();
    members.into_iter().map(|m| (m.name, m.role)).collect()
}

fn invitation(account: AccountId, n: u8, invitee: &str, by: DeviceId) -> Invitation<'_> {
    Invitation {
        account,
        request: request(n),
        token_id: [n; 16],
        secret_sha256: [n; 32],
        invitee,
        role: Role::Viewer,
        quota_tokens: Some(50),
        created_by: by,
        expires_at: UnixMillis(5_000),
    }
}

/// Everything the members promise, on one store; its audit log at the end.
fn scenario(store: &mut impl Backend) -> Vec<AuditRow> {
    let acme = AccountId::try_from_uuid(uuid::Uuid::from_u128(7)).unwrap();
    store
        .create_account(acme, "acme", Tier::Managed, UnixMillis(0))
        .unwrap();
    let now = UnixMillis(100);
    let reads = store.reads();
    reads
        .add_member(acme, "m-ada", "ada", Role::Editor, None, "operator", now)
        .unwrap();
    reads
        .add_member(
            acme,
            "m-bob",
            "bob",
            Role::Commenter,
            Some(100),
            "operator",
            now,
        )
        .unwrap();
    assert!(matches!(
        reads.add_member(acme, "m-ada2", "ada", Role::Viewer, None, "operator", now),
        Err(MemberError::Exists(n)) if n == "ada"
    ));
    assert!(matches!(
        reads.add_member(acme, "m-eve", "eve", Role::Owner, None, "operator", now),
        Err(MemberError::SecondOwner)
    ));
    assert!(matches!(
        reads.set_member_role(acme, "acme", Role::Viewer, "operator", now),
        Err(MemberError::Owner)
    ));
    assert!(matches!(
        reads.set_member_role(acme, "nobody", Role::Viewer, "operator", now),
        Err(MemberError::NoSuchMember(_))
    ));
    drop(reads);
    assert_eq!(
        names(store, acme),
        [
            ("acme".to_owned(), Role::Owner),
            ("ada".to_owned(), Role::Editor),
            ("bob".to_owned(), Role::Commenter),
        ]
    );

    // A device each; a spare token of bob's ends when bob's role changes.
    let ada_laptop = device_of(store, acme, "ada", 1);
    let bob_laptop = device_of(store, acme, "bob", 2);
    store
        .create_token(
            acme,
            [3; 16],
            &SECRET,
            Some("bob"),
            now,
            UnixMillis(1_000_000),
        )
        .unwrap();
    store
        .reads()
        .set_member_role(acme, "bob", Role::Viewer, "operator", UnixMillis(200))
        .unwrap();
    assert!(enroll(store, 3).is_err(), "a token outlives no role change");
    let members = store.reads().members(acme).unwrap();
    assert_eq!(
        members.iter().map(|m| m.devices).collect::<Vec<_>>(),
        [0, 1, 1]
    );

    // Quotas: bob has one, with nothing used yet; ada has none.
    let reads = store.reads();
    assert_eq!(
        reads.member_quota_use(bob_laptop, UnixMillis(0)).unwrap(),
        Some((100, 0))
    );
    assert_eq!(
        reads.member_quota_use(ada_laptop, UnixMillis(0)).unwrap(),
        None
    );
    drop(reads);

    // An invitation: issued, issued again for the same request, refused for another, then
    // withdrawn; the same request after that finds it used.
    let cleo = invitation(acme, 4, "cleo", ada_laptop);
    assert_eq!(
        store.invite(&cleo, UnixMillis(300)).unwrap(),
        Invited::Issued
    );
    assert_eq!(
        store.invite(&cleo, UnixMillis(301)).unwrap(),
        Invited::Issued
    );
    let other = invitation(acme, 4, "dan", ada_laptop);
    assert_eq!(
        store.invite(&other, UnixMillis(302)).unwrap(),
        Invited::Conflict
    );
    let pending = store
        .reads()
        .pending_invites(acme, UnixMillis(400))
        .unwrap();
    assert_eq!(
        pending
            .iter()
            .map(|p| (p.invitee.as_str(), p.role, p.quota_tokens, p.expires_at))
            .collect::<Vec<_>>(),
        [("cleo", Role::Viewer, Some(50), UnixMillis(5_000))]
    );
    assert!(
        store
            .reads()
            .pending_invites(acme, UnixMillis(5_000))
            .unwrap()
            .is_empty(),
        "expired"
    );
    assert_eq!(
        store
            .revoke_invites(acme, "cleo", "operator", UnixMillis(500))
            .unwrap(),
        1
    );
    assert_eq!(
        store.invite(&cleo, UnixMillis(501)).unwrap(),
        Invited::Used,
        "withdrawn"
    );

    // A handover: offered to ada, taken by ada's device; the former owner is an editor.
    assert!(matches!(
        store.accept_handover(acme, ada_laptop, UnixMillis(600)),
        Err(HandoverError::NotOffered)
    ));
    assert!(matches!(
        store.offer_handover(acme, "operator", "acme", UnixMillis(600)),
        Err(MemberError::Owner)
    ));
    let until = store
        .offer_handover(acme, "operator", "ada", UnixMillis(600))
        .unwrap();
    assert!(matches!(
        store.accept_handover(acme, bob_laptop, UnixMillis(700)),
        Err(HandoverError::NotOffered)
    ));
    assert!(matches!(
        store.accept_handover(acme, ada_laptop, until),
        Err(HandoverError::Lapsed)
    ));
    assert_eq!(
        store
            .accept_handover(acme, ada_laptop, UnixMillis(700))
            .unwrap(),
        ("acme".to_owned(), "acme".to_owned())
    );
    assert_eq!(
        names(store, acme),
        [
            ("ada".to_owned(), Role::Owner),
            ("acme".to_owned(), Role::Editor),
            ("bob".to_owned(), Role::Viewer),
        ]
    );

    // Removal revokes the member's devices; the owner cannot be removed.
    assert!(matches!(
        store.remove_member(acme, "ada", "operator", UnixMillis(800)),
        Err(MemberError::Owner)
    ));
    assert_eq!(
        store
            .remove_member(acme, "bob", "operator", UnixMillis(800))
            .unwrap(),
        1
    );
    assert!(matches!(
        store.remove_member(acme, "bob", "operator", UnixMillis(801)),
        Err(MemberError::NoSuchMember(_))
    ));
    assert_eq!(names(store, acme).len(), 2);

    // A stored answer: once, read back whole, and whose it is.
    let reads = store.reads();
    assert_eq!(
        reads.asker_of_device(ada_laptop).unwrap(),
        Some(Asker::new(members[1].id.clone()))
    );
    assert_eq!(reads.asker_of_device(device_id(99)).unwrap(), None);
    let answer = StoredAnswer {
        body: [5; 32],
        chunks: vec!["hello".into(), " world".into()],
        done: EscalationDone {
            request_id: request(9),
            chunks: 2,
            finish_reason: FinishReason::Stop,
            usage: Usage {
                input_tokens: 3,
                output_tokens: 2,
            },
            cost: Cost {
                base: MicroUsd(100),
                markup: MicroUsd(3),
                total: MicroUsd(103),
            },
            usage_counted: false,
            logprobs: Vec::new(),
        },
        asker: None,
    };
    assert_eq!(reads.answer(acme, request(9)).unwrap(), None);
    reads
        .put_answer(acme, request(9), &answer, UnixMillis(900))
        .unwrap();
    assert_eq!(
        reads.answer(acme, request(9)).unwrap(),
        Some(answer.clone())
    );
    assert!(
        reads
            .put_answer(acme, request(9), &answer, UnixMillis(901))
            .is_err(),
        "an answer is stored once"
    );
    assert_eq!(reads.asker(acme, request(9)).unwrap(), None, "no hold");
    reads.audit_log(acme).unwrap()
}

fn actions(log: &[AuditRow]) -> Vec<(&str, &str)> {
    log.iter()
        .map(|r| (r.action.as_str(), r.subject.as_str()))
        .collect()
}

#[test]
fn members_and_answers_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(&dir.path().join("cloud.db")).unwrap();
    let log = scenario(&mut db);
    assert_eq!(
        actions(&log),
        [
            ("member_added", "ada"),
            ("member_added", "bob"),
            ("role_changed", "bob"),
            ("invited", "cleo"),
            ("invite_revoked", "cleo"),
            ("handover_offered", "ada"),
            ("handover_accepted", "ada"),
            ("member_removed", "bob"),
        ]
    );
}

#[test]
fn members_and_answers_on_postgres_as_on_sqlite() {
    support::same_on_both(scenario, scenario);
}

/// The owner-to-be removed while the handover is being taken: one of the two happens, never
/// both (an account whose owner is removed has none). Rounds of the two at once, on `store`
/// and `other` (two handles on one database).
fn removal_against_handover(store: &mut impl Backend, other: &mut (impl Backend + Send)) {
    for round in 0..12u8 {
        let account =
            AccountId::try_from_uuid(uuid::Uuid::from_u128(100 + u128::from(round))).unwrap();
        store
            .create_account(
                account,
                &format!("acct{round}"),
                Tier::Managed,
                UnixMillis(0),
            )
            .unwrap();
        store
            .reads()
            .add_member(
                account,
                &format!("ada{round}"),
                "ada",
                Role::Editor,
                None,
                "op",
                UnixMillis(1),
            )
            .unwrap();
        let laptop = device_of(store, account, "ada", 10 + round);
        store
            .offer_handover(account, "operator", "ada", UnixMillis(2))
            .unwrap();
        let start = std::sync::Barrier::new(2);
        let (removed, taken) = std::thread::scope(|s| {
            let remover = s.spawn(|| {
                start.wait();
                other.remove_member(account, "ada", "operator", UnixMillis(3))
            });
            start.wait();
            let taken = store.accept_handover(account, laptop, UnixMillis(3));
            (remover.join().unwrap(), taken)
        });
        let owners = names(store, account)
            .into_iter()
            .filter(|(_, role)| *role == Role::Owner)
            .count();
        assert_eq!(
            (owners, removed.is_ok() && taken.is_ok()),
            (1, false),
            "round {round}: removed {removed:?}, handover {taken:?}"
        );
    }
}

#[test]
fn a_removal_and_a_handover_at_once_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.db");
    let (mut a, mut b) = (Db::open(&path).unwrap(), Db::open(&path).unwrap());
    removal_against_handover(&mut a, &mut b);
}

#[test]
fn a_removal_and_a_handover_at_once_on_postgres() {
    let Some((mut pg, _)) = support::fresh_database() else {
        return;
    };
    let mut other = pg.clone();
    removal_against_handover(&mut pg, &mut other);
}
