//! `synesis-tunnel` — the device's one outbound QUIC connection to the Synesis cloud.
//!
//! - [`machine`]: the pure reconnect/heartbeat state machine (no IO, no clock).
pub mod machine;
