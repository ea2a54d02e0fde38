//! The cloud database's schema and its migrations, one step per version
//! (`PRAGMA user_version`). A new database runs every step from 0; an old one the steps it
//! lacks, each in its own transaction. A file from a newer build is refused, never guessed at.
//!
//! - 2: accounts, setup tokens, devices, the ledger (entries with device and token split, kept
//!   totals and open holds), vouchers. (Earlier versions were development builds: an empty
//!   ledger is remade, one with entries is refused, since their hashes cover neither field.)
//! - 3: a voucher records the account that redeemed it (a request id is a key only within its
//!   account); `device_certs` holds every certificate signed for a device, with its expiry,
//!   so a device can renew its certificate and keep its id.
//! - 4–9: stored answers, adapters, members, invitations, quotas, handovers and audit (each
//!   step's comment below).
//! - 10: one hash chain per account instead of one for the whole ledger (code, not SQL alone:
//!   the old chain is verified, then each account's entries are renumbered and rehashed).

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use super::StorageError;

/// The schema this build writes.
pub const SCHEMA_VERSION: i64 = 12;
const _: () = assert!(STEPS[STEPS.len() - 1].0 == SCHEMA_VERSION);

/// How a step changes the file: SQL alone, or code (inside the step's transaction) where the
/// change needs more than SQL can say.
#[derive(Clone, Copy)]
enum Step {
    Sql(&'static str),
    Code(fn(&rusqlite::Transaction<'_>) -> Result<(), StepError>),
}

/// Why a step could not run.
enum StepError {
    Database(rusqlite::Error),
    /// The file holds what this step cannot carry over: said to the operator as is.
    Refused(String),
}

impl From<rusqlite::Error> for StepError {
    fn from(e: rusqlite::Error) -> Self {
        StepError::Database(e)
    }
}

const BASE_V2: &str = "
CREATE TABLE IF NOT EXISTS accounts (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    tier        TEXT NOT NULL CHECK (tier IN ('free', 'managed', 'byok')),
    created_at  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS setup_tokens (
    id              BLOB PRIMARY KEY,          -- 16 bytes, not secret
    account_id      TEXT NOT NULL REFERENCES accounts(id),
    secret_sha256   BLOB NOT NULL,             -- the secret itself is never stored
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    used_at         INTEGER,
    used_by_request TEXT                       -- the enrollment's request id (idempotency key)
);
CREATE TABLE IF NOT EXISTS devices (
    id                    TEXT PRIMARY KEY,
    account_id            TEXT NOT NULL REFERENCES accounts(id),
    name                  TEXT NOT NULL,
    cert_sha256           BLOB NOT NULL UNIQUE,
    cert_der              BLOB NOT NULL,
    enroll_request        TEXT NOT NULL UNIQUE,
    enrolled_at           INTEGER NOT NULL,
    revoked_at            INTEGER,
    connected             INTEGER NOT NULL DEFAULT 0,
    last_seen_at          INTEGER,
    heartbeat_interval_ms INTEGER,
    rtt_us                INTEGER,
    vitals_json           TEXT
);
CREATE INDEX IF NOT EXISTS devices_revoked ON devices(revoked_at) WHERE revoked_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS ledger_entries (
    seq          INTEGER PRIMARY KEY,          -- 0, 1, 2, … with no gaps (the chain)
    account_id   TEXT NOT NULL,
    request_id   TEXT NOT NULL,
    kind         INTEGER NOT NULL,
    model        TEXT NOT NULL,
    device_id    TEXT,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    amount       INTEGER NOT NULL CHECK (amount >= 0),  -- micro-USD
    quota_tokens INTEGER NOT NULL,
    body         BLOB NOT NULL,
    at           INTEGER NOT NULL,
    expires_at   INTEGER,
    prev_hash    BLOB NOT NULL,
    hash         BLOB NOT NULL
);
-- Also serves an account's listing (its prefix): one index less to keep per entry.
CREATE INDEX IF NOT EXISTS ledger_by_request ON ledger_entries(account_id, request_id);
-- An account's charges (settlements, kind 3) by time, for usage pages.
CREATE INDEX IF NOT EXISTS ledger_charges ON ledger_entries(account_id, at) WHERE kind = 3;
-- Kept beside the entries in the same transactions, so no operation reads an account's
-- history; derived from the entries alone (`admin ledger verify` checks they agree).
CREATE TABLE IF NOT EXISTS ledger_totals (
    account_id    TEXT PRIMARY KEY,
    balance       INTEGER NOT NULL,            -- micro-USD
    quota_year    INTEGER,
    quota_month   INTEGER,
    quota_settled INTEGER NOT NULL,
    open_held     INTEGER NOT NULL,            -- micro-USD, the sum of the open holds
    open_quota    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ledger_open_holds (
    account_id   TEXT NOT NULL,
    request_id   TEXT NOT NULL,
    seq          INTEGER NOT NULL REFERENCES ledger_entries(seq),  -- the hold entry
    amount       INTEGER NOT NULL,
    quota_tokens INTEGER NOT NULL,
    expires_at   INTEGER,
    PRIMARY KEY (account_id, request_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ledger_open_holds_by_expiry ON ledger_open_holds(account_id, expires_at);
CREATE TABLE IF NOT EXISTS vouchers (
    code_sha256  BLOB PRIMARY KEY,             -- the code itself is never stored
    amount       INTEGER NOT NULL CHECK (amount > 0),
    created_at   INTEGER NOT NULL,
    redeemed_at  INTEGER,
    redeemed_by  TEXT
);
CREATE INDEX IF NOT EXISTS vouchers_by_request ON vouchers(redeemed_by) WHERE redeemed_by IS NOT NULL;
";

const STEP_V3: &str = "
ALTER TABLE vouchers ADD COLUMN redeemed_account TEXT;
-- The account whose top-up (kind 1) of the voucher's amount carries the redeeming request id;
-- none when several accounts' top-ups would match (that voucher then stays unattributed).
UPDATE vouchers SET redeemed_account = (
    SELECT MIN(e.account_id) FROM ledger_entries e
    WHERE e.request_id = vouchers.redeemed_by AND e.kind = 1 AND e.amount = vouchers.amount
    HAVING COUNT(DISTINCT e.account_id) = 1
) WHERE redeemed_by IS NOT NULL;
DROP INDEX IF EXISTS vouchers_by_request;
CREATE INDEX vouchers_by_request ON vouchers(redeemed_account, redeemed_by)
    WHERE redeemed_by IS NOT NULL;
CREATE TABLE device_certs (
    cert_sha256    BLOB PRIMARY KEY,
    device_id      TEXT NOT NULL REFERENCES devices(id),
    cert_der       BLOB NOT NULL,
    issued_at      INTEGER NOT NULL,
    not_after      INTEGER,                     -- NULL: signed before certificates expired
    renew_request  TEXT                         -- the renewal's request id (idempotency key)
) WITHOUT ROWID;
CREATE UNIQUE INDEX device_certs_by_renewal ON device_certs(device_id, renew_request)
    WHERE renew_request IS NOT NULL;
INSERT INTO device_certs (cert_sha256, device_id, cert_der, issued_at)
    SELECT cert_sha256, id, cert_der, enrolled_at FROM devices;
";

/// Finished escalations: the answer a repeated request id streams again (chunk by chunk, the
/// same sequence numbers) instead of running the model twice. Written in the transaction that
/// settles the request's hold, so a settled request always has its answer.
const STEP_V4: &str = "
CREATE TABLE escalation_answers (
    account_id  TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    body        BLOB NOT NULL,      -- SHA-256 of the request (without a BYOK key)
    chunks      TEXT NOT NULL,      -- the chunks' texts, a JSON array, in sequence order
    done        BLOB NOT NULL,      -- the EscalationDone frame's payload
    at          INTEGER NOT NULL,
    PRIMARY KEY (account_id, request_id)
) WITHOUT ROWID;
-- The device's last pre-warm signal (JSON: model, reason, at), for `admin devices`.
ALTER TABLE devices ADD COLUMN prewarm_json TEXT;
";

/// Accounts' LoRA adapters (PROTOCOL.md §2, *Upload*; `storage/adapters.rs`): uploads with
/// the chunks they hold, the content each account holds, and the names pointing to it.
const STEP_V5: &str = "
CREATE TABLE adapter_uploads (
    account_id      TEXT NOT NULL,
    upload_id       TEXT NOT NULL,
    body            BLOB NOT NULL,      -- SHA-256 of the declaration, to refuse a reused id
    name            TEXT NOT NULL,
    base_model      TEXT NOT NULL,
    size_bytes      INTEGER NOT NULL,
    sha256          BLOB NOT NULL,
    chunk_size      INTEGER NOT NULL,
    device_id       TEXT NOT NULL,
    chunks_held     BLOB NOT NULL,      -- a bit per chunk, recorded once its bytes are on disk
    chunks_received INTEGER NOT NULL,   -- chunks accepted over its life, re-sent ones included
    started_at      INTEGER NOT NULL,
    touched_at      INTEGER NOT NULL,
    completed_at    INTEGER,            -- NULL while in progress
    PRIMARY KEY (account_id, upload_id)
) WITHOUT ROWID;
CREATE INDEX adapter_uploads_by_name ON adapter_uploads (account_id, name)
    WHERE completed_at IS NULL;
-- Content an account holds (a file named by its digest); released_at: since when no name
-- points to it (removed after a grace period).
CREATE TABLE adapter_blobs (
    account_id  TEXT NOT NULL,
    sha256      BLOB NOT NULL,
    size_bytes  INTEGER NOT NULL,
    released_at INTEGER,
    PRIMARY KEY (account_id, sha256)
) WITHOUT ROWID;
CREATE TABLE adapters (
    account_id  TEXT NOT NULL,
    name        TEXT NOT NULL,
    sha256      BLOB NOT NULL,
    size_bytes  INTEGER NOT NULL,
    base_model  TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    uploaded_at INTEGER NOT NULL,
    PRIMARY KEY (account_id, name)
) WITHOUT ROWID;
CREATE TABLE adapter_removals (
    account_id  TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    name        TEXT NOT NULL,
    sha256      BLOB NOT NULL,
    at          INTEGER NOT NULL,
    PRIMARY KEY (account_id, request_id)
) WITHOUT ROWID;
";

/// The people of an account, with their roles (ARCHITECTURE.md §4, *Roles*). A device acts
/// with the role of the member it was enrolled for; an account's owner is the member whose id
/// is the account's own. Setup tokens name the member their device will belong to (none: the
/// owner).
const STEP_V6: &str = "
CREATE TABLE members (
    id          TEXT PRIMARY KEY,
    account_id  TEXT NOT NULL REFERENCES accounts(id),
    name        TEXT NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('owner', 'editor', 'commenter', 'viewer')),
    joined_at   INTEGER NOT NULL,
    removed_at  INTEGER,
    UNIQUE (account_id, name)
);
INSERT INTO members (id, account_id, name, role, joined_at)
    SELECT id, id, name, 'owner', created_at FROM accounts;
ALTER TABLE devices ADD COLUMN member_id TEXT REFERENCES members(id);
UPDATE devices SET member_id = account_id;
-- A setup token made for a member other than the owner (`admin token create --member`).
CREATE TABLE setup_token_members (
    token_id    BLOB PRIMARY KEY,
    member_id   TEXT NOT NULL REFERENCES members(id)
) WITHOUT ROWID;
";

/// Invitations: a setup token that enrolls its device as a new member (`InviteCreate`); the
/// token's own row carries the secret's hash, expiry and use.
const STEP_V7: &str = "
CREATE TABLE invites (
    token_id    BLOB PRIMARY KEY,
    account_id  TEXT NOT NULL REFERENCES accounts(id),
    request_id  TEXT NOT NULL,
    invitee     TEXT NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('editor', 'commenter', 'viewer')),
    created_by  TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    UNIQUE (account_id, request_id)
) WITHOUT ROWID;
";

/// A member's monthly token quota (NULL: none), also carried by the invitation that makes
/// the member.
const STEP_V8: &str = "
ALTER TABLE members ADD COLUMN quota_tokens INTEGER;
ALTER TABLE invites ADD COLUMN quota_tokens INTEGER;
";

/// An account's pending handover (one at a time), and the audit log of membership changes
/// (`admin audit`).
const STEP_V9: &str = "
CREATE TABLE handovers (
    account_id  TEXT PRIMARY KEY REFERENCES accounts(id),
    to_member   TEXT NOT NULL REFERENCES members(id),
    offered_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE audit (
    seq         INTEGER PRIMARY KEY,
    account_id  TEXT NOT NULL,
    at          INTEGER NOT NULL,
    actor       TEXT NOT NULL,      -- a device id, or 'operator'
    action      TEXT NOT NULL,
    subject     TEXT NOT NULL,      -- the member concerned
    detail      TEXT NOT NULL
);
CREATE INDEX audit_by_account ON audit (account_id, seq);
";

/// The steps after the base (version 2): the version each brings the file to, and its SQL.
const STEPS: &[(i64, Step)] = &[
    (3, Step::Sql(STEP_V3)),
    (4, Step::Sql(STEP_V4)),
    (5, Step::Sql(STEP_V5)),
    (6, Step::Sql(STEP_V6)),
    (7, Step::Sql(STEP_V7)),
    (8, Step::Sql(STEP_V8)),
    (9, Step::Sql(STEP_V9)),
    (10, Step::Code(chain_per_account)),
    (11, Step::Sql(STEP_V11)),
    (12, Step::Sql(STEP_V12)),
];

/// Version 11: the cloud's nodes, each recording itself as it serves (`Nodes`): several
/// processes on one PostgreSQL database know each other; on SQLite the one node is listed.
const STEP_V11: &str = "
CREATE TABLE nodes (
    id          TEXT PRIMARY KEY,
    addr        TEXT NOT NULL,      -- where devices reach it
    started_at  INTEGER NOT NULL,
    seen_at     INTEGER NOT NULL,   -- its last heartbeat
    stopped_at  INTEGER             -- a clean stop; a node never seen again without one died
) WITHOUT ROWID;
";

/// Version 12: which node each request runs on and each device is connected to, so that when a
/// node dies the others release what it held (ARCHITECTURE.md §4, *Several nodes*).
const STEP_V12: &str = "
ALTER TABLE devices ADD COLUMN node TEXT;       -- the node it is connected to, while connected
CREATE INDEX devices_by_node ON devices (node) WHERE connected = 1;
ALTER TABLE nodes ADD COLUMN swept_at INTEGER;  -- when the others released what it died holding
CREATE TABLE runs (
    account_id  TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    node        TEXT NOT NULL,      -- the node running it (its hold's owner while open)
    PRIMARY KEY (account_id, request_id)
) WITHOUT ROWID;
CREATE INDEX runs_by_node ON runs (node);
";

/// The ledger, chained per account (ARCHITECTURE.md §4): each entry is numbered within its
/// account and links to that account's previous entry, so writers for different accounts never
/// wait for one another. The key becomes `(account_id, seq)`; an open hold names its entry by it.
const STEP_V10: &str = "
CREATE TABLE ledger_chained (
    account_id   TEXT NOT NULL,
    seq          INTEGER NOT NULL,             -- 0, 1, 2, … with no gaps within the account
    request_id   TEXT NOT NULL,
    kind         INTEGER NOT NULL,
    model        TEXT NOT NULL,
    device_id    TEXT,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    amount       INTEGER NOT NULL CHECK (amount >= 0),  -- micro-USD
    quota_tokens INTEGER NOT NULL,
    body         BLOB NOT NULL,
    at           INTEGER NOT NULL,
    expires_at   INTEGER,
    prev_hash    BLOB NOT NULL,
    hash         BLOB NOT NULL,
    PRIMARY KEY (account_id, seq)
) WITHOUT ROWID;
CREATE TABLE ledger_open_holds_chained (
    account_id   TEXT NOT NULL,
    request_id   TEXT NOT NULL,
    seq          INTEGER NOT NULL,             -- the hold entry, in its account's chain
    amount       INTEGER NOT NULL,
    quota_tokens INTEGER NOT NULL,
    expires_at   INTEGER,
    PRIMARY KEY (account_id, request_id),
    FOREIGN KEY (account_id, seq) REFERENCES ledger_chained (account_id, seq)
) WITHOUT ROWID;
-- Where the one chain of the earlier schema ended, kept when it was rewritten per account.
CREATE TABLE ledger_global_chain (
    entries      INTEGER NOT NULL,
    head_hash    BLOB NOT NULL
);
";

/// After the tables of [`STEP_V10`] are filled: the new ones take the old names.
const STEP_V10_SWAP: &str = "
DROP TABLE ledger_open_holds;
DROP TABLE ledger_entries;
ALTER TABLE ledger_chained RENAME TO ledger_entries;
ALTER TABLE ledger_open_holds_chained RENAME TO ledger_open_holds;
-- Also serves an account's listing (its prefix).
CREATE INDEX ledger_by_request ON ledger_entries(account_id, request_id);
-- An account's charges (settlements, kind 3) by time, then chain order (the key ends every
-- index entry), for usage pages.
CREATE INDEX ledger_charges ON ledger_entries(account_id, at) WHERE kind = 3;
CREATE INDEX ledger_open_holds_by_expiry ON ledger_open_holds(account_id, expires_at);
";

/// Schema 10: rewrites the one global chain as one chain per account. The old chain must
/// verify first (a file whose ledger was tampered with is refused, untouched: rewriting it
/// would launder the change). Each account's entries keep their order and contents; their
/// numbers, links and hashes are made anew; where the old chain ended is kept.
fn chain_per_account(tx: &rusqlite::Transaction<'_>) -> Result<(), StepError> {
    tx.execute_batch(STEP_V10)?;
    let old = super::ledger::entries_in_global_order(tx)
        .map_err(|e| StepError::Refused(format!("its ledger cannot be read: {e}")))?;
    let mut prev = [0u8; 32];
    for (position, e) in old.iter().enumerate() {
        let fits = e.seq == position as u64 && e.prev_hash == prev && e.hash == e.compute_hash();
        if !fits {
            return Err(StepError::Refused(format!(
                "its ledger does not verify at entry {} (account {}), so it cannot be rechained per account; keep the file and check it with the previous build's `admin ledger verify`",
                e.seq, e.account
            )));
        }
        prev = e.hash;
    }
    let mut heads: std::collections::HashMap<_, (u64, [u8; 32])> = Default::default();
    let mut renumbered = std::collections::HashMap::new();
    for e in &old {
        let (next, link) = heads.get(&e.account).copied().unwrap_or((0, [0; 32]));
        let mut chained = e.clone();
        chained.seq = next;
        chained.prev_hash = link;
        chained.hash = chained.compute_hash();
        super::ledger::insert_entry(tx, "ledger_chained", &chained)
            .map_err(|e| StepError::Refused(format!("an entry cannot be rewritten: {e}")))?;
        renumbered.insert(e.seq, next);
        heads.insert(e.account, (next + 1, chained.hash));
    }
    {
        let mut holds = tx.prepare("SELECT account_id, request_id, seq, amount, quota_tokens, expires_at FROM ledger_open_holds")?;
        let rows = holds.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, Option<i64>>(5)?,
            ))
        })?;
        let mut insert = tx.prepare(
            "INSERT INTO ledger_open_holds_chained (account_id, request_id, seq, amount, quota_tokens, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for row in rows {
            let (account, request, seq, amount, tokens, expires_at) = row?;
            let seq = u64::try_from(seq)
                .ok()
                .and_then(|s| renumbered.get(&s))
                .and_then(|s| i64::try_from(*s).ok())
                .ok_or_else(|| {
                    StepError::Refused(format!(
                        "the open hold of request {request} names entry {seq}, which the ledger does not hold"
                    ))
                })?;
            insert.execute(rusqlite::params![
                account, request, seq, amount, tokens, expires_at
            ])?;
        }
    }
    tx.execute(
        "INSERT INTO ledger_global_chain (entries, head_hash) VALUES (?1, ?2)",
        rusqlite::params![
            i64::try_from(old.len()).unwrap_or(i64::MAX),
            prev.as_slice()
        ],
    )?;
    tx.execute_batch(STEP_V10_SWAP)?;
    Ok(())
}

/// Brings the database at `path` up to [`SCHEMA_VERSION`].
pub(crate) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StorageError> {
    let schema_error = |reason: String| StorageError::Schema {
        path: path.display().to_string(),
        reason,
    };
    // Read again inside each step's transaction: `serve` and `admin` may open a file at once.
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(schema_error(format!(
            "schema version {version} is newer than this build's ({SCHEMA_VERSION}); run a newer synesis-cloud"
        )));
    }
    if version < 2 {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version >= 2 {
            drop(tx);
            return migrate(conn, path);
        }
        let has_ledger: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'ledger_entries')",
            [],
            |r| r.get(0),
        )?;
        if has_ledger {
            let n: i64 = tx.query_row("SELECT COUNT(*) FROM ledger_entries", [], |r| r.get(0))?;
            if n > 0 {
                return Err(schema_error(format!(
                    "its ledger was written by a development build (schema {version}) whose {n} entries this build cannot carry over; keep the file and start from a new data directory"
                )));
            }
            tx.execute_batch("DROP TABLE ledger_entries")?;
        }
        tx.execute_batch(BASE_V2)?;
        tx.pragma_update(None, "user_version", 2)?;
        tx.commit()?;
    }
    // The later steps, each in a transaction of its own, each read again inside it (another
    // process may have taken the file further meanwhile).
    for &(to, step) in STEPS {
        if version >= to {
            continue;
        }
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if current >= to {
            continue;
        }
        match step {
            Step::Sql(sql) => tx.execute_batch(sql)?,
            Step::Code(run) => run(&tx).map_err(|e| match e {
                StepError::Database(e) => StorageError::from(e),
                StepError::Refused(reason) => schema_error(reason),
            })?,
        }
        tx.pragma_update(None, "user_version", to)?;
        tx.commit()?;
    }
    Ok(())
}
