//! Group commit: one thread owns the ledger's write connection and runs every operation the
//! server asks for, many to a transaction.
//!
//! - Operations run one after another, in the order they arrived, each seeing the ones before
//!   it: the rules' serial semantics are kept, as if each had its own transaction.
//! - Each runs inside a savepoint, so a refused one (insufficient funds, a conflict) or one that
//!   panics leaves no trace while its neighbours' writes stand.
//! - A batch is whatever is waiting when the thread comes back for more (at most
//!   [`MAX_BATCH`]); nobody waits for a batch to fill, so a lone operation commits at once.
//! - The transaction commits with `synchronous=FULL` (the WAL is synced), and only then is
//!   anyone answered: an answer means the outcome is on disk. If the commit fails (a full
//!   disk), everyone in the batch gets that error and nothing of the batch was written.
//!
//! The durable commit is the expensive part of an operation; sharing it is what makes many
//! concurrent requests cheap. The bench `ledger` measures it.
//!
//! An operation that depends on the time (a hold's expiry, the quota's month) should read the
//! clock inside the closure it sends: it runs after the operations queued before it, and a
//! time read earlier could be older than theirs.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rusqlite::Connection;
use synesis_billing::ledger::{LedgerError, StoreError};
use tokio::sync::{mpsc, oneshot};

use super::SqliteLedger;
use crate::storage::StorageError;

/// The most operations one transaction carries (every backend's writer).
pub(crate) const MAX_BATCH: usize = 1_024;

/// Operations waiting for a writer, at most (senders wait beyond it).
pub(crate) const QUEUE: usize = 4 * MAX_BATCH;

/// The handle every task uses; cheap to clone. The writer thread ends when the last handle is
/// dropped, after answering everything already sent.
#[derive(Debug, Clone)]
pub struct LedgerWriter {
    jobs: mpsc::Sender<Box<dyn Job>>,
    observer: Observer,
}

/// Told how each batch a writer ran ended: its operations, and whether it committed (a node's
/// metrics).
pub type BatchObserver = Box<dyn Fn(usize, bool) + Send + Sync>;

/// The writer thread's [`BatchObserver`], once one is set.
#[derive(Clone, Default)]
pub(crate) struct Observer(Arc<OnceLock<BatchObserver>>);

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Observer")
            .field(&self.0.get().is_some())
            .finish()
    }
}

impl Observer {
    /// Sets the observer; a second one is ignored (one node, one set of metrics).
    pub(crate) fn set(&self, observe: BatchObserver) {
        let _ = self.0.set(observe);
    }

    pub(crate) fn ran(&self, operations: usize, committed: bool) {
        if let Some(observe) = self.0.get() {
            observe(operations, committed);
        }
    }
}

/// An operation in the queue, with its answer.
trait Job: Send {
    /// Runs the operation on the open transaction; whether its writes are to be kept.
    fn run(&mut self, store: &mut SqliteLedger<'_>) -> bool;
    /// Answers the caller, once the transaction's fate is known.
    fn answer(self: Box<Self>, committed: Result<(), StoreError>);
}

type Reply<T> = oneshot::Sender<Result<T, LedgerError>>;

struct Pending<T, F> {
    op: Option<F>,
    result: Option<Result<T, LedgerError>>,
    reply: Reply<T>,
}

impl<T, F> Job for Pending<T, F>
where
    T: Send,
    F: FnOnce(&mut SqliteLedger<'_>) -> Result<T, LedgerError> + Send,
{
    fn run(&mut self, store: &mut SqliteLedger<'_>) -> bool {
        let Some(op) = self.op.take() else {
            return false;
        };
        let result = op(store);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn answer(self: Box<Self>, committed: Result<(), StoreError>) {
        // The caller may have gone (a closed connection); the outcome is kept regardless.
        let _ = self.reply.send(answer_of(self.result, committed));
    }
}

/// What the caller of an operation is told, from its own result and the fate of its batch's
/// transaction (every backend's writer answers this way).
pub(crate) fn answer_of<T>(
    result: Option<Result<T, LedgerError>>,
    committed: Result<(), StoreError>,
) -> Result<T, LedgerError> {
    match (result, committed) {
        // A refusal stands whatever became of the others: it wrote nothing.
        (Some(Err(refused)), _) => Err(refused),
        (Some(Ok(value)), Ok(())) => Ok(value),
        (_, Err(e)) => Err(e.into()),
        (None, Ok(())) => {
            Err(StoreError::Unavailable("the ledger operation did not run".into()).into())
        }
    }
}

pub(crate) fn stopped() -> LedgerError {
    StoreError::Unavailable("the ledger writer has stopped".into()).into()
}

/// Waits for the next operation, then takes every one already waiting, up to [`MAX_BATCH`]:
/// one transaction's worth, into `batch` (empty before). `false` once every sender is gone and
/// nothing is left.
pub(crate) fn next_batch<J>(queue: &mut mpsc::Receiver<J>, batch: &mut Vec<J>) -> bool {
    let Some(first) = queue.blocking_recv() else {
        return false;
    };
    batch.push(first);
    while batch.len() < MAX_BATCH {
        match queue.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    true
}

impl LedgerWriter {
    /// Opens its own connection to the cloud's database (whose schema `Db::open` made) and
    /// starts the writer thread.
    pub fn open(path: &Path) -> Result<LedgerWriter, StorageError> {
        let conn = connect(path)?;
        let (jobs, queue) = mpsc::channel(QUEUE);
        let path = path.to_owned();
        let observer = Observer::default();
        let told = observer.clone();
        std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || serve(conn, &path, queue, &told))
            .map_err(|e| StorageError::Corrupt(format!("cannot start the ledger writer: {e}")))?;
        Ok(LedgerWriter { jobs, observer })
    }

    /// Tells `observe` of every batch from now on.
    pub fn observe(&self, observe: BatchObserver) {
        self.observer.set(observe);
    }

    fn job<T, F>(op: F) -> (Box<dyn Job>, oneshot::Receiver<Result<T, LedgerError>>)
    where
        T: Send + 'static,
        F: FnOnce(&mut SqliteLedger<'_>) -> Result<T, LedgerError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Pending {
            op: Some(op),
            result: None,
            reply,
        };
        (Box::new(job), answer)
    }

    /// Runs `op` as one ledger operation and answers once it is durable.
    pub async fn run<T, F>(&self, op: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut SqliteLedger<'_>) -> Result<T, LedgerError> + Send + 'static,
    {
        let (job, answer) = Self::job(op);
        self.jobs.send(job).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// [`run`](Self::run) for a thread outside the async runtime.
    pub fn run_blocking<T, F>(&self, op: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut SqliteLedger<'_>) -> Result<T, LedgerError> + Send + 'static,
    {
        let (job, answer) = Self::job(op);
        self.jobs.blocking_send(job).map_err(|_| stopped())?;
        answer.blocking_recv().map_err(|_| stopped())?
    }
}

fn connect(path: &Path) -> Result<Connection, StorageError> {
    let conn = crate::storage::connect(path)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // The hot pages of the entries' indexes and the totals stay in memory (64 MiB).
    conn.pragma_update(None, "cache_size", -65_536)?;
    // Checkpoint (copy the WAL into the database, with its own syncs) every 40 MB of WAL
    // rather than every 4 MB: fewer, larger checkpoints between batches.
    conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
    // Each operation runs in a savepoint, and a savepoint keeps the pages it changes in a
    // journal of its own: in memory, not in a temporary file written (a system call per page)
    // for every operation of the batch.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(conn)
}

fn serve(
    mut conn: Connection,
    path: &Path,
    mut queue: mpsc::Receiver<Box<dyn Job>>,
    observer: &Observer,
) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(MAX_BATCH);
    while next_batch(&mut queue, &mut batch) {
        let committed = run_batch(&conn, &mut batch);
        observer.ran(batch.len(), committed.is_ok());
        if let Err(e) = &committed {
            tracing::error!(error = %e, operations = batch.len(), "a ledger transaction failed");
            if !conn.is_autocommit() {
                // The rollback failed too: this connection is stuck inside a transaction, and
                // every later batch would fail to begin. Start over on a new one.
                match connect(path) {
                    Ok(fresh) => conn = fresh,
                    Err(e) => {
                        tracing::error!(error = %e, "the ledger writer cannot reopen the database; it stops");
                        for job in batch.drain(..) {
                            job.answer(committed.clone());
                        }
                        return;
                    }
                }
            }
        }
        for job in batch.drain(..) {
            job.answer(committed.clone());
        }
    }
}

/// Runs the batch in one transaction; the commit's outcome.
fn run_batch(conn: &Connection, batch: &mut [Box<dyn Job>]) -> Result<(), StoreError> {
    let sql = |sql: &str| -> Result<(), StoreError> {
        conn.prepare_cached(sql)
            .and_then(|mut stmt| stmt.execute([]))
            .map(drop)
            .map_err(super::err)
    };
    sql("BEGIN IMMEDIATE")?;
    let ran = (|| {
        for job in batch.iter_mut() {
            sql("SAVEPOINT op")?;
            let mut store = SqliteLedger::new(conn);
            let keep =
                catch_unwind(AssertUnwindSafe(|| job.run(&mut store))).unwrap_or_else(|_| {
                    tracing::error!("a ledger operation panicked; its writes are rolled back");
                    false
                });
            if !keep {
                sql("ROLLBACK TO op")?;
            }
            sql("RELEASE op")?;
        }
        sql("COMMIT")
    })();
    if ran.is_err() {
        // Nothing of the batch is kept; the connection is ready for the next one.
        let _ = sql("ROLLBACK");
    }
    ran
}
