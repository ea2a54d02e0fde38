//! `synesis-cloud admin`: the operator's commands. They open the same database as a running
//! `serve` (SQLite WAL lets both work at once); a running server picks up revocations within
//! `REVOCATION_POLL_INTERVAL`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use rand::RngCore;
use serde::Serialize;
use synesis_proto::{AccountId, DeviceId, SetupToken, UnixMillis};

use crate::endpoint::LISTEN_ADDR_FILE;
use crate::pki::Pki;
use crate::shared::now;
use crate::storage::{Backend, DB_FILE, DeviceRow};

/// Where the cloud the operator acts on keeps its data: the data directory (the CA, the
/// adapters' content, SQLite's file) and, when it is not SQLite, the database's URL
/// (`--database`, `[storage] url`).
#[derive(Debug, Clone)]
pub struct Place {
    pub dir: PathBuf,
    pub database: Option<String>,
}

impl Place {
    /// The data directory's own SQLite database.
    pub fn dir(dir: &Path) -> Place {
        Place {
            dir: dir.to_owned(),
            database: None,
        }
    }

    pub fn location(&self) -> Result<crate::storage::Location, crate::storage::StorageError> {
        crate::storage::Location::new(&self.dir, self.database.as_deref())
    }
}

fn open(at: &Place) -> anyhow::Result<Box<dyn Backend>> {
    if at.database.is_none() {
        crate::storage::open_dir(&at.dir)?;
    }
    Ok(at.location()?.open()?)
}

/// A new account (`synesis demo` embeds the cloud and makes its account here).
pub fn account_new(
    at: &Place,
    name: &str,
    tier: synesis_proto::message::Tier,
) -> anyhow::Result<crate::storage::Account> {
    let name = name.trim();
    if name.is_empty() || name.len() > 64 {
        bail!("an account name is 1 to 64 characters");
    }
    let id = AccountId::try_from_uuid(uuid::Uuid::now_v7())?;
    Ok(open(at)?.create_account(id, name, tier, now())?)
}

pub fn account_create(
    at: &Place,
    name: &str,
    tier: synesis_proto::message::Tier,
    json: bool,
) -> anyhow::Result<()> {
    let account = account_new(at, name, tier)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"account_id": account.id, "name": account.name, "tier": account.tier.as_str()})
        );
    } else {
        println!(
            "created account {} ({}, tier {})",
            account.name,
            account.id,
            account.tier.as_str()
        );
    }
    Ok(())
}

/// Prints one setup token on stdout and nothing else: for a device of `member` (default: the
/// owner).
pub fn token_create(
    at: &Place,
    account: &str,
    ttl: Duration,
    server: Option<String>,
    member: Option<&str>,
) -> anyhow::Result<()> {
    let token = token_issue(at, account, member, ttl, server)?;
    println!("{token}");
    Ok(())
}

pub fn member_add(
    at: &Place,
    account: &str,
    name: &str,
    role: synesis_proto::message::Role,
    quota_tokens: Option<u64>,
) -> anyhow::Result<()> {
    let db = open(at)?;
    let acct = db.account_by_name(account)?;
    let name = crate::storage::printable(name);
    if name.is_empty() || name.len() > 254 {
        bail!("a member's name is 1 to 254 bytes (an e-mail address, a name)");
    }
    let id = uuid::Uuid::now_v7().to_string();
    db.unit()
        .add_member(acct.id, &id, &name, role, quota_tokens, "operator", now())?;
    println!(
        "added {name} to {account} as {}",
        crate::storage::members::role_str(role)
    );
    Ok(())
}

pub fn member_role(
    at: &Place,
    account: &str,
    name: &str,
    role: synesis_proto::message::Role,
) -> anyhow::Result<()> {
    let db = open(at)?;
    let acct = db.account_by_name(account)?;
    db.unit()
        .set_member_role(acct.id, name, role, "operator", now())?;
    println!(
        "{name} is now {} in {account}",
        crate::storage::members::role_str(role)
    );
    Ok(())
}

pub fn member_remove(at: &Place, account: &str, name: &str) -> anyhow::Result<()> {
    let mut db = open(at)?;
    let acct = db.account_by_name(account)?;
    let revoked = db.remove_member(acct.id, name, "operator", now())?;
    println!("removed {name} from {account}; {revoked} of their devices revoked");
    Ok(())
}

/// One member as `admin member list` shows it.
#[derive(Debug, serde::Serialize)]
struct MemberView {
    name: String,
    role: &'static str,
    joined_at: UnixMillis,
    devices: u64,
}

pub fn members(at: &Place, account: &str, json: bool) -> anyhow::Result<()> {
    let db = open(at)?;
    let acct = db.account_by_name(account)?;
    let views: Vec<MemberView> = db
        .unit()
        .members(acct.id)?
        .into_iter()
        .map(|m| MemberView {
            name: crate::storage::printable(&m.name),
            role: crate::storage::members::role_str(m.role),
            joined_at: m.joined_at,
            devices: m.devices,
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string(&views)?);
        return Ok(());
    }
    println!("{:<32}  {:<9}  {:>7}  joined", "member", "role", "devices");
    for v in views {
        println!(
            "{:<32}  {:<9}  {:>7}  {}",
            v.name,
            v.role,
            v.devices,
            v.joined_at.to_rfc3339().unwrap_or_default()
        );
    }
    Ok(())
}

/// A new setup token for a device of `member` of `account` (`None`: its owner now), bound to
/// that member as it is issued (benches and tests embed the cloud and enroll in process).
pub fn token_issue(
    at: &Place,
    account: &str,
    member: Option<&str>,
    ttl: Duration,
    server: Option<String>,
) -> anyhow::Result<SetupToken> {
    let server = match server {
        Some(s) => s,
        None => {
            let recorded = std::fs::read_to_string(at.dir.join(LISTEN_ADDR_FILE)).context(
                "no --server given and no running cloud recorded its address here; pass --server HOST:PORT",
            )?;
            let addr: std::net::SocketAddr =
                recorded.trim().parse().context("listen.addr is damaged")?;
            if addr.ip().is_unspecified() {
                bail!(
                    "the cloud listens on all addresses ({addr}); pass --server HOST:PORT with the address devices dial"
                );
            }
            addr.to_string()
        }
    };
    if !server.contains(':') {
        bail!("--server must be HOST:PORT, got {server:?}");
    }
    let pki = Pki::load_or_create(&at.dir)?;
    let mut db = open(at)?;
    let account = db.account_by_name(account)?;
    let mut token_id = [0u8; 16];
    let mut secret = [0u8; 32];
    let mut rng = rand::rng();
    rng.fill_bytes(&mut token_id);
    rng.fill_bytes(&mut secret);
    let created = now();
    // The other nodes serving now, so the device can go on without the first.
    let nodes = db
        .nodes()?
        .into_iter()
        .filter(|n| n.serving(created) && n.addr != server && crate::cluster::dialable(&n.addr))
        .map(|n| n.addr)
        .collect();
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    db.create_token(
        account.id,
        token_id,
        &secret,
        member,
        created,
        UnixMillis(created.0.saturating_add(ttl_ms)),
    )?;
    let token = SetupToken {
        server,
        nodes,
        ca_sha256: pki.ca_fingerprint(),
        token_id,
        secret,
    };
    Ok(token)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Online,
    Stale,
    Offline,
    Revoked,
}

/// A device's status from what the database holds: `stale` when it missed three heartbeats at
/// the interval it announced (also when the cloud itself died without marking it offline).
pub fn status(row: &DeviceRow, now: UnixMillis) -> Status {
    if row.revoked_at.is_some() {
        return Status::Revoked;
    }
    if !row.connected {
        return Status::Offline;
    }
    let interval = row.heartbeat_interval_ms.unwrap_or(5_000);
    match row.last_seen_at {
        Some(seen) if now.0.saturating_sub(seen.0) <= interval.saturating_mul(3) => Status::Online,
        _ => Status::Stale,
    }
}

#[derive(Serialize)]
struct DeviceView {
    device_id: DeviceId,
    account: String,
    name: String,
    status: Status,
    /// The node it is connected to (its address), while connected.
    node: Option<String>,
    last_seen_at: Option<UnixMillis>,
    rtt_ms: Option<f64>,
    vitals: Option<serde_json::Value>,
    /// The last pre-warm signal: the model the device expects to escalate to, why, when.
    prewarm: Option<serde_json::Value>,
}

/// `admin nodes`: the cloud's nodes (the processes serving it), each `serving`, `stopped`, or
/// `dead` (no heartbeat for 10 s, and no clean stop).
pub fn nodes(at: &Place, json: bool) -> anyhow::Result<()> {
    #[derive(serde::Serialize)]
    struct NodeView {
        #[serde(flatten)]
        row: crate::storage::NodeRow,
        state: &'static str,
    }
    let t = now();
    let views: Vec<NodeView> = open(at)?
        .nodes()?
        .into_iter()
        .map(|row| NodeView {
            state: row.state(t),
            row,
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string(&views)?);
        return Ok(());
    }
    if views.is_empty() {
        println!("no nodes; one records itself as `synesis-cloud serve` starts");
    }
    for v in views {
        println!(
            "{}  {:<8}  {:<22}  started {}  last seen {}",
            v.row.id,
            v.state,
            v.row.addr,
            v.row.started_at.to_rfc3339().unwrap_or_default(),
            v.row.seen_at.to_rfc3339().unwrap_or_default()
        );
    }
    Ok(())
}

pub fn devices(at: &Place, json: bool) -> anyhow::Result<()> {
    let db = open(at)?;
    let rows = db.devices()?;
    let addrs: std::collections::HashMap<String, String> =
        db.nodes()?.into_iter().map(|n| (n.id, n.addr)).collect();
    let at = now();
    let views: Vec<DeviceView> = rows
        .into_iter()
        .map(|r| DeviceView {
            device_id: r.id,
            status: status(&r, at),
            vitals: r
                .vitals_json
                .as_deref()
                .and_then(|v| serde_json::from_str(v).ok()),
            prewarm: r
                .prewarm_json
                .as_deref()
                .and_then(|v| serde_json::from_str(v).ok()),
            node: r
                .node
                .as_ref()
                .filter(|_| r.connected)
                .map(|id| addrs.get(id).cloned().unwrap_or_else(|| id.clone())),
            account: r.account,
            name: crate::storage::printable(&r.name),
            last_seen_at: r.last_seen_at,
            #[allow(clippy::cast_precision_loss)] // microseconds of RTT
            rtt_ms: r.rtt_us.map(|us| us as f64 / 1_000.0),
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string(&views)?);
        return Ok(());
    }
    if views.is_empty() {
        println!(
            "no devices; enroll one with `synesis cloud login TOKEN` (make a token with `admin token create`)"
        );
        return Ok(());
    }
    println!(
        "{:<36}  {:<8}  {:<16}  {:<16}  {:>7}  {:<24}  node",
        "device", "status", "account", "name", "rtt", "last seen"
    );
    for v in views {
        let seen = v
            .last_seen_at
            .and_then(UnixMillis::to_rfc3339)
            .unwrap_or_else(|| "-".into());
        let rtt = v
            .rtt_ms
            .map_or_else(|| "-".into(), |ms| format!("{ms:.2} ms"));
        let status = serde_json::to_value(v.status)
            .ok()
            .and_then(|s| s.as_str().map(str::to_owned))
            .unwrap_or_default();
        println!(
            "{:<36}  {:<8}  {:<16}  {:<16}  {:>7}  {seen:<24}  {}",
            v.device_id,
            status,
            v.account,
            v.name,
            rtt,
            v.node.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

pub fn device_revoke(at: &Place, id: DeviceId) -> anyhow::Result<()> {
    open(at)?.revoke(id, now())?;
    println!("revoked {id}; a running cloud closes its connection within a few seconds");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(connected: bool, last_seen: Option<i64>, revoked: bool) -> DeviceRow {
        DeviceRow {
            id: "0190f3a2-7c1e-7b3d-9f00-00000000d001".parse().unwrap(),
            account: "a".into(),
            name: "n".into(),
            revoked_at: revoked.then_some(UnixMillis(1)),
            connected,
            node: None,
            last_seen_at: last_seen.map(UnixMillis),
            heartbeat_interval_ms: Some(1_000),
            rtt_us: None,
            vitals_json: None,
            prewarm_json: None,
        }
    }

    #[test]
    fn stale_after_three_missed_intervals() {
        let now = UnixMillis(10_000);
        assert_eq!(status(&row(true, Some(7_000), false), now), Status::Online);
        assert_eq!(status(&row(true, Some(6_999), false), now), Status::Stale);
        assert_eq!(
            status(&row(false, Some(9_999), false), now),
            Status::Offline
        );
        assert_eq!(status(&row(true, Some(9_999), true), now), Status::Revoked);
        assert_eq!(status(&row(true, None, false), now), Status::Stale);
    }
}

/// A request id made here (the operator's own requests: credits).
fn operator_request_id() -> anyhow::Result<synesis_proto::RequestId> {
    Ok(synesis_proto::RequestId::try_from_uuid(
        uuid::Uuid::now_v7(),
    )?)
}

pub fn set_tier(at: &Place, name: &str, tier: synesis_proto::message::Tier) -> anyhow::Result<()> {
    open(at)?.set_tier(name, tier)?;
    println!("account {name} is now on the {} tier", tier.as_str());
    Ok(())
}

/// Adds credit to an account (one ledger entry, keyed by a fresh request id).
pub fn credit(
    at: &Place,
    name: &str,
    amount: synesis_proto::MicroUsd,
    json: bool,
) -> anyhow::Result<()> {
    let account = open(at)?.account_by_name(name)?;
    let request = operator_request_id()?;
    let when = now();
    // Through the ledger's writer, as the server's own operations go (either backend).
    let balance = at.location()?.ledger_writer()?.run_blocking(move |store| {
        synesis_billing::ledger::top_up(store, account.id, request, amount, when)?;
        synesis_billing::ledger::balance(store, account.id, when)
    })?;
    if json {
        println!(
            "{}",
            serde_json::json!({"account": name, "credited_micro_usd": amount.0, "balance_micro_usd": balance.balance.0})
        );
    } else {
        println!("credited ${amount} to {name}; balance ${}", balance.balance);
    }
    Ok(())
}

/// `count` new one-time voucher codes worth `amount` each; only their hashes are stored.
pub fn vouchers_new(
    at: &Place,
    amount: synesis_proto::MicroUsd,
    count: u32,
) -> anyhow::Result<Vec<String>> {
    if amount.0 <= 0 {
        bail!("a voucher must be worth more than $0");
    }
    let mut db = open(at)?;
    let mut rng = rand::rng();
    let mut codes = Vec::new();
    for _ in 0..count {
        let mut raw = [0u8; 10];
        rng.fill_bytes(&mut raw);
        let code = format!(
            "VCH-{}",
            raw.iter().map(|b| format!("{b:02X}")).collect::<String>()
        );
        db.create_voucher(&code, amount, now())?;
        codes.push(code);
    }
    Ok(codes)
}

/// Prints `count` one-time voucher codes worth `amount` each.
pub fn voucher_create(
    at: &Place,
    amount: synesis_proto::MicroUsd,
    count: u32,
) -> anyhow::Result<()> {
    for code in vouchers_new(at, amount, count)? {
        println!("{code}");
    }
    Ok(())
}

#[derive(Serialize)]
struct QuoteView<'a> {
    tier: &'a str,
    model: &'a str,
    input_tokens: u64,
    output_tokens: u64,
    base_micro_usd: i64,
    markup_micro_usd: i64,
    total_micro_usd: i64,
    quota_tokens_used: u64,
}

/// What a request would cost, with the cloud's prices and tier rules.
pub fn quote(
    billing: &crate::config::Billing,
    tier: synesis_proto::message::Tier,
    model: &str,
    input_tokens: u64,
    output_tokens: u64,
    json: bool,
) -> anyhow::Result<()> {
    let usage = synesis_billing::Usage {
        input_tokens,
        output_tokens,
    };
    let q = synesis_billing::quote(tier, model, usage, &billing.prices, &billing.rules)?;
    let view = QuoteView {
        tier: tier.as_str(),
        model,
        input_tokens,
        output_tokens,
        base_micro_usd: q.base.0,
        markup_micro_usd: q.markup.0,
        total_micro_usd: q.total.0,
        quota_tokens_used: q.quota_tokens,
    };
    if json {
        println!("{}", serde_json::to_string(&view)?);
    } else {
        println!(
            "{} on {}: {input_tokens} in + {output_tokens} out = ${} base + ${} markup = ${} ({} quota tokens)",
            model, view.tier, q.base, q.markup, q.total, q.quota_tokens
        );
    }
    Ok(())
}

/// The first thing `ledger verify` found wrong: in which account's chain, at which entry.
struct Broken {
    account: Option<AccountId>,
    seq: u64,
    reason: String,
    message: String,
}

/// Walks every account's hash chain; an error (exit 1) names the account and the first entry
/// of its chain that does not fit.
pub fn ledger_verify(at: &Place, json: bool) -> anyhow::Result<()> {
    let db = open(at)?;
    let crate::storage::ledger::LedgerSnapshot { entries, states } = db.ledger_snapshot()?;
    let chains = entries
        .iter()
        .map(|e| e.account)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let checked = synesis_billing::ledger::verify(&entries)
        .map_err(|e| Broken {
            account: Some(e.account),
            seq: e.seq,
            reason: e.reason.to_owned(),
            message: e.to_string(),
        })
        .and_then(|()| states_agree(&states, &entries));
    match checked {
        Ok(()) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"intact": true, "entries": entries.len(), "chains": chains})
                );
            } else {
                println!(
                    "ledger intact: {} entries in {chains} account chains",
                    entries.len()
                );
            }
            Ok(())
        }
        Err(broken) => {
            // The account's name, when it still has one (an id alone is hard to act on).
            let name = broken
                .account
                .and_then(|id| db.account_by_id(id).ok())
                .map(|a| a.name);
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "intact": false,
                        "entries": entries.len(),
                        "chains": chains,
                        "first_bad_account": broken.account.map(|a| a.to_string()),
                        "first_bad_account_name": name,
                        "first_bad_seq": broken.seq,
                        "reason": broken.reason,
                    })
                );
            }
            let named = name.map(|n| format!(" ({n})")).unwrap_or_default();
            bail!("ledger tampered{named}: {}", broken.message)
        }
    }
}

/// Whether the kept totals and open holds are what the (verified) entries say; the first
/// account that differs is named, with the last entry of its chain.
fn states_agree(
    have: &std::collections::BTreeMap<AccountId, synesis_billing::ledger::AccountState>,
    entries: &[synesis_billing::ledger::Entry],
) -> Result<(), Broken> {
    let fail = |account: AccountId, reason: String| {
        let seq = entries
            .iter()
            .rev()
            .find(|e| e.account == account)
            .map_or(0, |e| e.seq);
        let message = format!("account {account}: {reason} (its last entry is {seq})");
        Err(Broken {
            account: Some(account),
            seq,
            reason,
            message,
        })
    };
    let want = synesis_billing::ledger::rebuild_states(entries).map_err(|e| Broken {
        account: None,
        seq: 0,
        reason: e.to_string(),
        message: e.to_string(),
    })?;
    for (account, state) in &want {
        if have.get(account) != Some(state) {
            return fail(
                *account,
                "the kept totals or open holds do not follow from the entries".into(),
            );
        }
    }
    if let Some(account) = have.keys().find(|a| !want.contains_key(a)) {
        return fail(
            *account,
            "totals are kept for an account without entries".into(),
        );
    }
    Ok(())
}

/// Balance, holds, quota and charges of one account: what its devices see with
/// `synesis cloud usage`, in the same shape.
pub fn usage(
    at: &Place,
    name: &str,
    billing: &crate::config::Billing,
    json: bool,
) -> anyhow::Result<()> {
    let db = open(at)?;
    let account = db.account_by_name(name)?;
    let mut request = synesis_proto::message::UsageRequest {
        request_id: synesis_proto::RequestId::from_parts(
            u64::try_from(now().0).unwrap_or(0),
            rand::random(),
        ),
        since: None,
        group_by: None,
        after: None,
    };
    let at = now();
    let page = synesis_proto::message::USAGE_CHARGES_MAX;
    let mut reply = db.usage(&account, &request, at, &billing.rules, page)?;
    // Every charge, page after page (the balance is the first page's).
    request.after = reply.next.take();
    while request.after.is_some() {
        let mut page = db.usage(&account, &request, at, &billing.rules, page)?;
        reply.charges.append(&mut page.charges);
        request.after = page.next;
    }
    let view = synesis_billing::UsageView::new(&reply, None)?;
    if json {
        println!("{}", serde_json::to_string(&view)?);
    } else {
        print!("{}", view.text());
    }
    Ok(())
}

pub fn uploads(at: &Place, json: bool) -> anyhow::Result<()> {
    let db = open(at)?;
    let views = db.unit().upload_summaries()?;
    if json {
        println!("{}", serde_json::to_string(&views)?);
        return Ok(());
    }
    if views.is_empty() {
        println!("no uploads; devices push adapters with `synesis cloud push`");
        return Ok(());
    }
    println!(
        "{:<16}  {:<20}  {:>10}  {:>13}  {:>8}  state",
        "account", "name", "bytes", "chunks held", "received"
    );
    for v in views {
        println!(
            "{:<16}  {:<20}  {:>10}  {:>6}/{:<6}  {:>8}  {}",
            v.account,
            v.name,
            v.size_bytes,
            v.chunks_held,
            v.chunks,
            v.chunks_received,
            if v.completed {
                "complete"
            } else {
                "in progress"
            }
        );
    }
    Ok(())
}

/// `admin audit ACCOUNT`: every change to the account's members, oldest first.
pub fn audit(at: &Place, account: &str, json: bool) -> anyhow::Result<()> {
    let db = open(at)?;
    let acct = db.account_by_name(account)?;
    let rows = db.unit().audit_log(acct.id)?;
    if json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    for r in rows {
        println!(
            "{}  {:<18}  {:<24}  by {}  {}",
            r.at.to_rfc3339().unwrap_or_default(),
            r.action,
            crate::storage::printable(&r.subject),
            r.actor,
            r.detail
        );
    }
    Ok(())
}

/// `admin migrate --to postgres://…`: copies this cloud's database into an empty PostgreSQL
/// database and checks the copy; the SQLite file is only read.
pub fn migrate(at: &Place, to: &str, json: bool) -> anyhow::Result<()> {
    use crate::storage::postgres::{Pg, copy, redacted};
    let source = at.dir.join(DB_FILE);
    if !source.exists() {
        bail!("no cloud database at {}", source.display());
    }
    // Its errors name the database (without the password).
    let target = Pg::open(to)?;
    let copied = copy::from_sqlite(&source, &target, |table, rows| {
        if !json {
            eprintln!("  copied {table}: {rows} rows");
        }
    })
    .with_context(|| format!("copying {} into {}", source.display(), redacted(to)))?;
    if json {
        println!("{}", serde_json::to_string(&copied)?);
    } else {
        println!(
            "copied {} tables into {}; the ledger's {} entries in {} account chains verify, and {} accounts' totals and holds are the source's",
            copied.tables.len(),
            redacted(to),
            copied.entries,
            copied.chains,
            copied.accounts_agreeing
        );
    }
    Ok(())
}
