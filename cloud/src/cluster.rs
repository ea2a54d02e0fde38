//! This process as one node of the cloud, among the others on the same database
//! (ARCHITECTURE.md §4, *Several nodes*).
//!
//! Every [`NODE_HEARTBEAT_INTERVAL`] a node records itself in `nodes`, reads which others
//! serve (their addresses go to devices in `Welcome`, so a device whose node is gone dials
//! another), forgets the runs of its own whose holds closed, and looks after the nodes that
//! are gone:
//!
//! - a node with no heartbeat for [`NODE_DEAD_AFTER_MS`](crate::storage::NODE_DEAD_AFTER_MS)
//!   (or that stopped) is *gone*: the devices still shown connected to it are offline;
//! - [`RELEASE_AFTER`] later, the holds of the requests it was running that no other node took
//!   over (a device asking again on another node takes its request over: `escalation.rs`) are
//!   voided, nothing charged, and the node is *swept*: nobody looks at it again.
//!
//! Every survivor may do this at once: each void is one ledger operation under the account's
//! lock that voids only a hold still open and still the dead node's, so a hold is released at
//! most once and never after another node took it over.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use synesis_billing::ledger::{HoldState, hold_state, void};
use synesis_proto::UnixMillis;

use crate::ledger::Writer;
use crate::shared::{Storage, now};
use crate::storage::NodeRow;
use crate::storage::ledger::LedgerUnit;

/// How often a node records that it is serving (the others take it for dead after
/// `storage::NODE_DEAD_AFTER_MS` without).
const NODE_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
const _: () = assert!(
    NODE_HEARTBEAT_INTERVAL.as_secs() * 3_000 < crate::storage::NODE_DEAD_AFTER_MS.unsigned_abs(),
    "a node missing two heartbeats is not yet dead"
);
/// How long after a node is known gone the holds of its requests are released: time for their
/// devices to find another node and take them over (they ask again every half second).
pub(crate) const RELEASE_AFTER: Duration = Duration::from_secs(20);

/// This process as a node.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    /// A UUID v7, new for each process.
    pub(crate) id: String,
    /// Where devices reach it (`serve --advertise`, else the address it listens on).
    pub(crate) addr: String,
    pub(crate) started_at: UnixMillis,
}

/// What a node knows of the cloud it belongs to.
#[derive(Debug)]
pub(crate) struct Cluster {
    pub(crate) node: Node,
    /// The addresses of the other nodes serving, as last read (every heartbeat).
    peers: RwLock<Vec<String>>,
}

impl Cluster {
    pub(crate) fn new(addr: String) -> Cluster {
        Cluster {
            node: Node {
                id: uuid::Uuid::now_v7().to_string(),
                addr,
                started_at: now(),
            },
            peers: RwLock::default(),
        }
    }

    /// The addresses of the other nodes serving, for `Welcome` and setup tokens.
    pub(crate) fn peers(&self) -> Vec<String> {
        self.peers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Records the node as serving, now and every [`NODE_HEARTBEAT_INTERVAL`], and looks after
    /// the nodes that are gone.
    pub(crate) async fn heartbeat(self: Arc<Self>, storage: Storage, ledger: Writer) {
        let mut ticker = tokio::time::interval(NODE_HEARTBEAT_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if let Err(e) = self.beat(&storage, &ledger).await {
                tracing::warn!(error = %e, "cannot record this node's heartbeat");
            }
        }
    }

    async fn beat(&self, storage: &Storage, ledger: &Writer) -> anyhow::Result<()> {
        let me = self.node.clone();
        let nodes = storage
            .write(move |db| {
                db.node_seen(&me.id, &me.addr, me.started_at, now())?;
                db.prune_runs(&me.id)?;
                db.nodes()
            })
            .await?;
        let at = now();
        let peers = nodes
            .iter()
            .filter(|n| n.id != self.node.id && n.serving(at) && dialable(&n.addr))
            .map(|n| n.addr.clone())
            .collect();
        *self
            .peers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = peers;
        for gone in nodes
            .into_iter()
            .filter(|n| n.id != self.node.id && !n.serving(at) && n.swept_at.is_none())
        {
            sweep(&gone, at, storage, ledger).await?;
        }
        Ok(())
    }

    /// Records a clean stop.
    pub(crate) async fn stopped(&self, storage: &Storage) {
        let id = self.node.id.clone();
        if let Err(e) = storage.write(move |db| db.node_stopped(&id, now())).await {
            tracing::warn!(error = %e, "cannot record this node's stop");
        }
    }
}

/// Whether a device can dial `addr`: `host:port`, and not an unspecified address (a node
/// listening on all addresses without `--advertise`).
pub(crate) fn dialable(addr: &str) -> bool {
    match addr.parse::<std::net::SocketAddr>() {
        Ok(a) => !a.ip().is_unspecified() && a.port() != 0,
        Err(_) => addr.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
        }),
    }
}

/// When `node` (not serving) is known gone: its last heartbeat's deadline, or its stop.
fn gone_since(node: &NodeRow) -> UnixMillis {
    node.stopped_at.unwrap_or(UnixMillis(
        node.seen_at
            .0
            .saturating_add(crate::storage::NODE_DEAD_AFTER_MS),
    ))
}

/// Looks after a node that is gone: its devices offline now, its requests' holds released
/// [`RELEASE_AFTER`] later.
async fn sweep(
    gone: &NodeRow,
    at: UnixMillis,
    storage: &Storage,
    ledger: &Writer,
) -> anyhow::Result<()> {
    let id = gone.id.clone();
    storage.write(move |db| db.node_gone(&id)).await?;
    let release_at = gone_since(gone)
        .0
        .saturating_add(i64::try_from(RELEASE_AFTER.as_millis()).unwrap_or(i64::MAX));
    if at.0 < release_at {
        return Ok(());
    }
    let id = gone.id.clone();
    let runs = storage.read(move |db| db.runs_of(&id)).await?;
    let mut released = 0usize;
    for (account, request) in runs {
        let dead = gone.id.clone();
        let voided = ledger
            .run(move |store| {
                let at = now();
                let open = matches!(
                    hold_state(store, account, request, at)?,
                    HoldState::Active(_)
                );
                if !open || store.runner(account, request)?.as_deref() != Some(dead.as_str()) {
                    return Ok(false); // settled, lapsed, or taken over by another node
                }
                void(store, account, request, at)?;
                Ok(true)
            })
            .await?;
        if voided {
            released += 1;
            tracing::info!(node = %gone.id, %account, %request, "released the hold of a request its node died running");
        }
    }
    let id = gone.id.clone();
    storage.write(move |db| db.node_swept(&id, now())).await?;
    tracing::info!(node = %gone.id, addr = %gone.addr, released, "swept a node that is gone");
    Ok(())
}
