//! Changes every node must act on at once (a revoked device, a removed member), told over
//! PostgreSQL's `LISTEN`/`NOTIFY`: the transaction that makes one notifies [`CHANNEL`] as it
//! commits, and every node listening is woken to re-read what changed. The notification
//! carries nothing a node trusts: it only says "read again now", so the database stays the one
//! source of truth, and a node that missed notifications while its listening connection was
//! down re-reads as it reconnects (and its periodic poll covers the gap in any case).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;

/// The channel changes are told on.
pub const CHANNEL: &str = "synesis_changes";

/// How long a node waits before listening again after its connection failed.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// Tells every listening node that something changed (`$1`: what, in a word), as its
/// transaction commits.
pub(crate) const NOTIFY: &str = "SELECT pg_notify('synesis_changes', $1)";

/// Listens on [`CHANNEL`] of the database at `url` for as long as the task runs, waking `wake`
/// at each notification, and each time it (re)starts listening.
pub async fn listen(url: String, wake: Arc<Notify>) {
    loop {
        if let Err(e) = listen_once(&url, &wake).await {
            tracing::warn!(error = %super::causes(&e), "not listening for other nodes' changes; trying again");
        }
        // Whatever was told while not listening is read by the next poll; wake it now.
        wake.notify_one();
        tokio::time::sleep(RECONNECT_AFTER).await;
    }
}

async fn listen_once(url: &str, wake: &Arc<Notify>) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let told = Arc::clone(wake);
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => told.notify_one(),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    // Listening from here: what changed before is read now.
    wake.notify_one();
    let ended = driver.await;
    drop(client);
    match ended {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}
