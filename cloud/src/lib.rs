//! `synesis-cloud` — the cloud side of Synesis, as a library the `synesis-cloud` binary (and
//! benches and tests) use. ARCHITECTURE.md has the map.
//!
//! - [`endpoint`]: the QUIC endpoint ([`endpoint::start`] → [`endpoint::Cloud`], a handle):
//!   accepts connections within their budgets, identifies the peer, dispatches each stream to
//!   the module of its kind — [`enrollment`], [`control`], [`account`], [`escalation`],
//!   [`upload`] — each `serve(peer, first_message, stream)`.
//! - [`provider`]: what answers an escalation — llama.cpp in process, an OpenAI-compatible or
//!   an Anthropic upstream — behind one trait.
//! - [`registry`]: every live connection of every device, so revocation reaches all of them.
//! - [`storage`]: schema, migrations, connections, typed errors, the storage traits (SQLite).
//! - [`ledger`]: the authoritative ledger (`synesis-billing`'s rules over [`storage`]) and its
//!   group-commit writer.
//! - [`pki`] (the private CA), [`config`] (prices and tier rules), [`admin`] (operator commands).
//!
//! What it must not do: import the device side (`synesis-cli`, `synesis-tunnel`), read the
//! clock outside [`shared::now`], or handle signals (that is `main`'s).

pub mod account;
pub mod admin;
mod cluster;
pub mod config;
pub mod control;
pub mod endpoint;
pub mod enrollment;
pub mod escalation;
pub mod ledger;
mod metrics;
pub mod pki;
pub mod provider;
pub mod registry;
pub mod roles;
pub mod shared;
pub mod storage;
pub mod streams;
pub mod upload;
