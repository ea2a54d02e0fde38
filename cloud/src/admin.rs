//! `synesis-cloud admin`: the operator's commands. They open the same database as a running
//! `serve` (SQLite WAL lets both work at once); a running server picks up revocations within
//! `REVOCATION_POLL_INTERVAL`.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use rand::RngCore;
use serde::Serialize;
use synesis_proto::{AccountId, DeviceId, SetupToken, UnixMillis};

use crate::db::{Db, DeviceRow, tier_name};
use crate::pki::Pki;
use crate::server::{DB_FILE, LISTEN_ADDR_FILE};

fn now() -> UnixMillis {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    UnixMillis(i64::try_from(ms).unwrap_or(i64::MAX))
}

fn open(dir: &Path) -> anyhow::Result<Db> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(Db::open(&dir.join(DB_FILE))?)
}

pub fn account_create(
    dir: &Path,
    name: &str,
    tier: synesis_proto::message::Tier,
    json: bool,
) -> anyhow::Result<()> {
    let name = name.trim();
    if name.is_empty() || name.len() > 64 {
        bail!("an account name is 1 to 64 characters");
    }
    let id = AccountId::try_from_uuid(uuid::Uuid::now_v7())?;
    let account = open(dir)?.create_account(id, name, tier, now())?;
    if json {
        println!(
            "{}",
            serde_json::json!({"account_id": account.id, "name": account.name, "tier": tier_name(account.tier)})
        );
    } else {
        println!(
            "created account {} ({}, tier {})",
            account.name,
            account.id,
            tier_name(account.tier)
        );
    }
    Ok(())
}

/// Prints one setup token on stdout and nothing else.
pub fn token_create(
    dir: &Path,
    account: &str,
    ttl: Duration,
    server: Option<String>,
) -> anyhow::Result<()> {
    let server = match server {
        Some(s) => s,
        None => {
            let recorded = std::fs::read_to_string(dir.join(LISTEN_ADDR_FILE)).context(
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
    let pki = Pki::load_or_create(dir)?;
    let mut db = open(dir)?;
    let account = db.account_by_name(account)?;
    let mut token_id = [0u8; 16];
    let mut secret = [0u8; 32];
    let mut rng = rand::rng();
    rng.fill_bytes(&mut token_id);
    rng.fill_bytes(&mut secret);
    let created = now();
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    db.create_token(
        account.id,
        token_id,
        &secret,
        created,
        UnixMillis(created.0.saturating_add(ttl_ms)),
    )?;
    let token = SetupToken {
        server,
        ca_sha256: pki.ca_fingerprint(),
        token_id,
        secret,
    };
    println!("{token}");
    Ok(())
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
    last_seen_at: Option<UnixMillis>,
    rtt_ms: Option<f64>,
    vitals: Option<serde_json::Value>,
}

pub fn devices(dir: &Path, json: bool) -> anyhow::Result<()> {
    let rows = open(dir)?.devices()?;
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
            account: r.account,
            name: r.name,
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
        "{:<36}  {:<8}  {:<16}  {:<16}  {:>7}  last seen",
        "device", "status", "account", "name", "rtt"
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
            "{:<36}  {:<8}  {:<16}  {:<16}  {:>7}  {seen}",
            v.device_id, status, v.account, v.name, rtt
        );
    }
    Ok(())
}

pub fn device_revoke(dir: &Path, id: DeviceId) -> anyhow::Result<()> {
    open(dir)?.revoke(id, now())?;
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
            last_seen_at: last_seen.map(UnixMillis),
            heartbeat_interval_ms: Some(1_000),
            rtt_us: None,
            vitals_json: None,
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
