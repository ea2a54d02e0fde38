//! Every live connection of every device, whatever it has sent, and the one control session
//! each device may have. Revocation closes all of a device's connections; a newer control
//! session replaces an older one.
//!
//! Concurrency: one `std::sync::Mutex` held for map operations only, never across `.await`
//! (THREAD_SAFETY_PATTERNS.md §5).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use synesis_proto::{DeviceId, ErrorCode};
use synesis_wire::close_code;
use tokio::sync::mpsc;

/// What the endpoint may ask of a control session.
#[derive(Debug)]
pub(crate) enum ControlCommand {
    Drain {
        reconnect_after: std::time::Duration,
        /// The node to go to (another node's address), if the cloud has another.
        to: Option<String>,
    },
}

struct Session {
    generation: u64,
    conn: quinn::Connection,
    control: mpsc::Sender<ControlCommand>,
}

#[derive(Default)]
struct Inner {
    /// Every connection of a device, by quinn's connection id.
    connections: HashMap<DeviceId, HashMap<usize, quinn::Connection>>,
    sessions: HashMap<DeviceId, Session>,
}

#[derive(Default)]
pub(crate) struct Registry {
    inner: Mutex<Inner>,
    generations: AtomicU64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("Registry")
            .field("devices", &inner.connections.len())
            .field("sessions", &inner.sessions.len())
            .finish()
    }
}

/// Removes its connection from the registry when dropped (the connection's task ended).
#[derive(Debug)]
pub(crate) struct Registered {
    registry: std::sync::Arc<Registry>,
    device: DeviceId,
    conn_id: usize,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut inner = self.registry.lock();
        if let Some(conns) = inner.connections.get_mut(&self.device) {
            conns.remove(&self.conn_id);
            if conns.is_empty() {
                inner.connections.remove(&self.device);
            }
        }
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a connection of `device` for as long as the returned guard lives; `None` when
    /// the device has `max` connections already.
    pub(crate) fn add(
        self: &std::sync::Arc<Self>,
        device: DeviceId,
        conn: &quinn::Connection,
        max: usize,
    ) -> Option<Registered> {
        let conn_id = conn.stable_id();
        let mut inner = self.lock();
        let conns = inner.connections.entry(device).or_default();
        if conns.len() >= max {
            if conns.is_empty() {
                inner.connections.remove(&device);
            }
            return None;
        }
        conns.insert(conn_id, conn.clone());
        Some(Registered {
            registry: std::sync::Arc::clone(self),
            device,
            conn_id,
        })
    }

    /// Closes every connection of `device` with `code`.
    pub(crate) fn close_device(&self, device: DeviceId, code: ErrorCode, reason: &[u8]) -> usize {
        let conns: Vec<quinn::Connection> = self
            .lock()
            .connections
            .get(&device)
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default();
        for conn in &conns {
            conn.close(close_code(code), reason);
        }
        conns.len()
    }

    /// Records a device's new control session; an older one (a half-open connection the
    /// device gave up on) is closed.
    pub(crate) fn open_session(
        &self,
        device: DeviceId,
        conn: quinn::Connection,
        control: mpsc::Sender<ControlCommand>,
    ) -> u64 {
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        let old = self.lock().sessions.insert(
            device,
            Session {
                generation,
                conn,
                control,
            },
        );
        if let Some(old) = old {
            old.conn.close(
                close_code(ErrorCode::UNAVAILABLE),
                b"replaced by a newer connection of this device",
            );
        }
        generation
    }

    /// Forgets a session unless a newer one replaced it. Returns whether it was current.
    pub(crate) fn close_session(&self, device: DeviceId, generation: u64) -> bool {
        let mut inner = self.lock();
        match inner.sessions.get(&device) {
            Some(s) if s.generation == generation => {
                inner.sessions.remove(&device);
                true
            }
            _ => false,
        }
    }

    /// The control inboxes of every session, for a drain.
    pub(crate) fn sessions(&self) -> Vec<(DeviceId, mpsc::Sender<ControlCommand>)> {
        self.lock()
            .sessions
            .iter()
            .map(|(id, s)| (*id, s.control.clone()))
            .collect()
    }

    pub(crate) fn has_sessions(&self) -> bool {
        !self.lock().sessions.is_empty()
    }
}
