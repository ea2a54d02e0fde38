//! The device vitals snapshot: what a heartbeat carries and what `synesis vitals` shows.
//! Sampling lives in `synesis-vitals`; this is only the shape.

use serde::{Deserialize, Serialize};

use crate::ids::UnixMillis;

/// One sample of a device's load. Fields the OS does not expose are `None` or empty, never
/// made up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Vitals {
    pub sampled_at: UnixMillis,
    pub cpu: CpuVitals,
    pub memory: MemoryVitals,
    /// The disk that holds the Synesis data directory.
    pub disk: Option<DiskVitals>,
    pub temperatures: Vec<Temperature>,
    pub gpus: Vec<GpuVitals>,
    /// Why `gpus` is empty when no GPU library could be used (e.g. NVML not loadable).
    pub gpu_unavailable_reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct CpuVitals {
    pub usage_percent: f32,
    pub cores: u32,
    pub per_core_percent: Vec<f32>,
    /// 1, 5 and 15 minute load averages, where the OS has them.
    pub load_average: Option<[f32; 3]>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct MemoryVitals {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub swap_total_bytes: u64,
    pub swap_used_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct DiskVitals {
    pub path: String,
    pub total_bytes: u64,
    pub available_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Temperature {
    pub label: String,
    pub celsius: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct GpuVitals {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub utilization_percent: Option<f32>,
    pub memory_total_bytes: Option<u64>,
    pub memory_used_bytes: Option<u64>,
    pub temperature_celsius: Option<f32>,
    pub power_watts: Option<f32>,
    pub power_limit_watts: Option<f32>,
}
