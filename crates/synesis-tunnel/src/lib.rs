//! `synesis-tunnel` — the device's one outbound QUIC connection to the Synesis cloud.
//!
//! - [`machine`]: the pure reconnect/heartbeat state machine (no IO, no clock, seeded jitter).
//! - [`driver`]: the actor that executes the machine with quinn and tokio ([`Tunnel::spawn`],
//!   [`TunnelHandle`], [`TunnelStatus`] on a `watch` channel).
//! - [`enroll`](enroll::enroll): trade a setup token for an [`Identity`] (`synesis cloud login`).
//! - [`request`](request::request): one request/reply on a fresh mutual-TLS connection;
//!   [`answer`](request::answer) makes an `ErrorMsg` reply a typed [`RequestError`].
//! - [`escalate`](escalate::escalate): one escalation, streamed and resumed across broken
//!   connections, through the service or a connection of its own.
//! - [`upload`](upload::push): one adapter file pushed to the cloud in chunks, resumed across
//!   broken connections from what the cloud holds.
//! - [`route`]: which way those streams go (the service, or a connection of one's own).
//! - [`nodes`]: which of the cloud's nodes to dial, and the next one when a dial fails.
//! - [`renew`]: the device certificate renewed over the tunnel before it expires.
//! - [`identity`], [`tls`], [`connect`]: the device's files, TLS configuration and dialing.
//! - [`clock`]: the device's one reading of the wall clock and one maker of request ids.
//! - [`local`]: the tunnel service's local API on a Unix socket, both sides: how commands on
//!   this machine reach the cloud over the tunnel's one connection.
//!
//! It must not import the cloud, and it holds no policy about what to escalate.

pub mod clock;
pub mod connect;
pub mod driver;
pub mod enroll;
pub mod escalate;
pub mod identity;
pub mod local;
pub mod machine;
pub mod nodes;
pub mod renew;
pub mod request;
pub mod route;
#[cfg(test)]
mod testing;
pub mod tls;
pub mod upload;

pub use driver::{OpenError, Options, PingError, Tunnel, TunnelHandle, TunnelState, TunnelStatus};
pub use identity::{Identity, IdentityError, IdentityInfo};
pub use request::RequestError;
