//! `synesis-cloud` — the cloud side of Synesis, as a library the `synesis-cloud` binary (and
//! benches and tests) use.
//!
//! What it owns: [`server`] (the QUIC endpoint: enrollment, device sessions, the live registry,
//! revocation, drain), [`db`] (SQLite: accounts, setup tokens, devices), [`pki`] (the private CA
//! that signs the server's and the devices' certificates), [`admin`] (operator commands), [`config`] (prices and tier rules), [`ledger`]
//! (the authoritative ledger over SQLite).
//! What it must not do: import the device side (`synesis-cli`, `synesis-tunnel`).

pub mod admin;
pub mod config;
pub mod db;
pub mod ledger;
pub mod pki;
pub mod server;
