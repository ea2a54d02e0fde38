//! What every connection and stream task of a running cloud shares: storage, the ledger
//! writer, prices, the CA, the registry of live connections, and the presence recorder.
//! The clock is read here ([`now`]) and nowhere else in the server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use synesis_proto::{DeviceId, UnixMillis};

use crate::ledger::Writer;
use crate::metrics::Metrics;
use crate::pki::Pki;
use crate::registry::Registry;
use crate::storage::{Backend, Presence, StorageError};

/// How often presence changes (connects, heartbeats, disconnects) are written, together.
pub(crate) const PRESENCE_FLUSH_INTERVAL: Duration = Duration::from_millis(250);
/// Presence changes waiting for a write, at most; heartbeats beyond it are dropped (each
/// device's newest heartbeat replaces its older one, so this bounds reconnect storms only).
const PRESENCE_PENDING_MAX: usize = 100_000;

/// How far before its signing a device certificate starts being valid (clock skew): a minute,
/// or a tenth of a short lifetime.
const CERT_BACKDATE_MAX_MS: i64 = 60_000;

/// The cloud's clock: Unix milliseconds.
pub fn now() -> UnixMillis {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    UnixMillis(i64::try_from(ms).unwrap_or(i64::MAX))
}

/// The registry database: one connection for writes, one for the reads devices ask for
/// (usage), and one kept for identifying devices and checking revocations, so no device's
/// questions can delay another's connection (WAL lets reads go on while a write commits). Each
/// is a `std::sync::Mutex` locked only inside `spawn_blocking`.
#[derive(Debug, Clone)]
pub(crate) struct Storage {
    writer: Handle,
    reader: Handle,
    identifier: Handle,
}

/// One database handle, and how long its callers wait for it (`/metrics`).
#[derive(Debug, Clone)]
struct Handle {
    db: Arc<Mutex<Box<dyn Backend>>>,
    waits: prometheus_client::metrics::histogram::Histogram,
}

impl Handle {
    fn new(db: Box<dyn Backend>, name: &'static str, metrics: &Metrics) -> Handle {
        Handle {
            db: Arc::new(Mutex::new(db)),
            waits: metrics
                .database_wait
                .get_or_create(&crate::metrics::Connection { connection: name })
                .clone(),
        }
    }
}

impl Storage {
    pub(crate) fn new(
        writer: Box<dyn Backend>,
        reader: Box<dyn Backend>,
        identifier: Box<dyn Backend>,
        metrics: &Metrics,
    ) -> Storage {
        Storage {
            writer: Handle::new(writer, "writer", metrics),
            reader: Handle::new(reader, "reader", metrics),
            identifier: Handle::new(identifier, "identifier", metrics),
        }
    }

    /// Runs `f` on the connection kept for identification and revocation checks.
    pub(crate) async fn identify<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Backend) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        Self::on(&self.identifier, |db| f(db)).await
    }

    /// Runs `f` on `handle` on the blocking pool; the time until it had the handle (the pool's
    /// queue, then the handle's lock) is its wait.
    async fn on<T: Send + 'static>(
        handle: &Handle,
        f: impl FnOnce(&mut dyn Backend) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let (db, waits) = (Arc::clone(&handle.db), handle.waits.clone());
        let asked = std::time::Instant::now();
        tokio::task::spawn_blocking(move || {
            let mut guard = db.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            waits.observe(asked.elapsed().as_secs_f64());
            f(&mut **guard)
        })
        .await
        .map_err(|e| StorageError::Corrupt(format!("database task failed: {e}")))?
    }

    /// Runs `f` on the write connection, on the blocking pool.
    pub(crate) async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Backend) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        Self::on(&self.writer, f).await
    }

    /// Runs `f` on the read connection, on the blocking pool.
    pub(crate) async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Backend) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        Self::on(&self.reader, |db| f(db)).await
    }
}

/// Presence changes waiting to be written, in arrival order; a device's newer heartbeat
/// replaces its older one still waiting.
#[derive(Debug)]
pub(crate) struct PresenceQueue {
    /// The node the devices are connected to (this one).
    node: String,
    pending: Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    changes: Vec<Presence>,
    /// Where each device's newest waiting heartbeat is in `changes`.
    last_seen: HashMap<DeviceId, usize>,
}

impl PresenceQueue {
    pub(crate) fn new(node: String) -> PresenceQueue {
        PresenceQueue {
            node,
            pending: Mutex::default(),
        }
    }

    /// Queues a change; never waits.
    pub(crate) fn note(&self, change: Presence) {
        let mut p = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let device = change.device();
        match change {
            Presence::Seen { .. } => {
                if let Some(&i) = p.last_seen.get(&device) {
                    p.changes[i] = change;
                } else if p.changes.len() < PRESENCE_PENDING_MAX {
                    let i = p.changes.len();
                    p.changes.push(change);
                    p.last_seen.insert(device, i);
                }
            }
            // A signal for the operator's eyes only: dropped, not queued, past the bound.
            Presence::Prewarm { .. } => {
                if p.changes.len() < PRESENCE_PENDING_MAX {
                    p.changes.push(change);
                }
            }
            other => {
                p.last_seen.remove(&device);
                p.changes.push(other);
            }
        }
    }

    fn take(&self) -> Vec<Presence> {
        let mut p = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        p.last_seen.clear();
        std::mem::take(&mut p.changes)
    }

    /// Puts back changes whose write failed, before anything queued since.
    fn put_back(&self, mut changes: Vec<Presence>) {
        let mut p = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        changes.truncate(PRESENCE_PENDING_MAX);
        changes.append(&mut p.changes);
        p.changes = changes;
        p.last_seen.clear();
    }

    /// Writes what is waiting, every [`PRESENCE_FLUSH_INTERVAL`], in one transaction; a failed
    /// write (a busy database) is tried again at the next tick.
    pub(crate) async fn run(self: Arc<Self>, storage: Storage) {
        let mut ticker = tokio::time::interval(PRESENCE_FLUSH_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.flush(&storage).await;
        }
    }

    pub(crate) async fn flush(&self, storage: &Storage) {
        let changes = self.take();
        if changes.is_empty() {
            return;
        }
        let node = self.node.clone();
        let (result, changes) = storage
            .write(move |db| {
                let r = crate::storage::Devices::record_presence(db, &node, &changes);
                Ok((r, changes))
            })
            .await
            .unwrap_or_else(|e| (Err(e), Vec::new()));
        if let Err(e) = result {
            tracing::warn!(error = %e, waiting = changes.len(), "cannot record device presence; trying again");
            self.put_back(changes);
        }
    }
}

/// Settings of a running cloud that handlers read.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// How long a device certificate is valid from its signing.
    pub(crate) cert_lifetime: Duration,
}

#[derive(Debug)]
pub(crate) struct Shared {
    /// This node, and the others it knows.
    pub(crate) cluster: Arc<crate::cluster::Cluster>,
    pub(crate) storage: Storage,
    /// Every ledger operation the server makes goes through it (group commit, durable).
    pub(crate) ledger: Writer,
    pub(crate) billing: crate::config::Billing,
    pub(crate) pki: Arc<Pki>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) presence: Arc<PresenceQueue>,
    pub(crate) settings: Settings,
    pub(crate) escalations: Arc<crate::escalation::Escalations>,
    /// The data directory: adapters' content and partial uploads live under it.
    pub(crate) data_dir: std::path::PathBuf,
    pub(crate) adapters: crate::config::AdapterSettings,
    /// Which stream of each upload may write its part file.
    pub(crate) upload_fences: crate::upload::Fences,
    /// What the node counts (`/metrics`).
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    /// Woken when a device was revoked (here, or on another node of the same database), so
    /// its connections here close at once rather than at the next poll.
    pub(crate) changed: Arc<tokio::sync::Notify>,
}

impl Shared {
    /// When a certificate signed now starts and stops being valid. It starts a little early,
    /// so a device whose clock is a little behind accepts it as well.
    pub(crate) fn cert_validity(&self) -> (UnixMillis, UnixMillis) {
        let lifetime = i64::try_from(self.settings.cert_lifetime.as_millis()).unwrap_or(i64::MAX);
        let backdate = (lifetime / 10).min(CERT_BACKDATE_MAX_MS);
        let at = now();
        (
            UnixMillis(at.0.saturating_sub(backdate)),
            UnixMillis(at.0.saturating_add(lifetime)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> DeviceId {
        DeviceId::try_from_uuid(uuid::Uuid::now_v7()).unwrap()
    }

    fn seen(device: DeviceId, at: i64) -> Presence {
        Presence::Seen {
            device,
            at: UnixMillis(at),
            rtt_us: 1,
            vitals_json: String::new(),
        }
    }

    #[test]
    fn a_newer_heartbeat_replaces_the_waiting_one_and_order_is_kept() {
        let q = PresenceQueue::new("node".into());
        let (a, b) = (id(), id());
        q.note(Presence::Connected {
            device: a,
            heartbeat_interval_ms: 1_000,
            at: UnixMillis(1),
        });
        q.note(seen(a, 2));
        q.note(seen(b, 3));
        q.note(seen(a, 4));
        q.note(Presence::Disconnected {
            device: a,
            at: UnixMillis(5),
        });
        q.note(seen(a, 6));
        let got: Vec<(DeviceId, i64)> = q
            .take()
            .iter()
            .map(|p| {
                let at = match p {
                    Presence::Connected { at, .. }
                    | Presence::Seen { at, .. }
                    | Presence::Disconnected { at, .. } => at.0,
                    Presence::Prewarm { .. } => -1,
                };
                (p.device(), at)
            })
            .collect();
        assert_eq!(got, vec![(a, 1), (a, 4), (b, 3), (a, 5), (a, 6)]);
        assert!(q.take().is_empty());
    }
}
