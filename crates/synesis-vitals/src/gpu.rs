//! NVIDIA GPUs through NVML, loaded once.
//!
//! NVML is a driver library opened at run time (`libnvidia-ml.so.1`). On a machine without the
//! NVIDIA driver (most laptops, CI) it cannot load: the probe remembers why, reports no GPUs with
//! that reason on every sample, and never tries again, so a sample costs nothing there.

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use synesis_proto::vitals::GpuVitals;

/// NVML, or the reason it is not available.
pub struct GpuProbe {
    nvml: Result<Nvml, String>,
}

impl std::fmt::Debug for GpuProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.nvml {
            Ok(_) => f.write_str("GpuProbe(NVML loaded)"),
            Err(reason) => write!(f, "GpuProbe(unavailable: {reason})"),
        }
    }
}

impl GpuProbe {
    /// Loads NVML once. Never fails: an unusable NVML becomes the reason reported with samples.
    pub fn new() -> GpuProbe {
        let nvml = Nvml::init().map_err(|e| {
            tracing::debug!(error = %e, "NVML not available");
            format!("NVML could not be loaded (no NVIDIA driver?): {e}")
        });
        GpuProbe { nvml }
    }

    /// Every NVIDIA GPU with what could be read of it, or an empty list and the reason.
    pub fn sample(&self) -> (Vec<GpuVitals>, Option<String>) {
        let nvml = match &self.nvml {
            Ok(nvml) => nvml,
            Err(reason) => return (Vec::new(), Some(reason.clone())),
        };
        let count = match nvml.device_count() {
            Ok(0) => return (Vec::new(), Some("NVML reports no NVIDIA GPU".to_owned())),
            Ok(n) => n,
            Err(e) => return (Vec::new(), Some(format!("NVML could not count GPUs: {e}"))),
        };
        let gpus = (0..count)
            .filter_map(|index| match nvml.device_by_index(index) {
                Ok(device) => Some(read_device(index, &device)),
                Err(e) => {
                    tracing::debug!(index, error = %e, "NVML device not readable");
                    None
                }
            })
            .collect();
        (gpus, None)
    }
}

impl Default for GpuProbe {
    fn default() -> Self {
        GpuProbe::new()
    }
}

/// Milliwatts (NVML's unit) to watts.
#[allow(clippy::cast_precision_loss)] // a power draw in mW is far below f32's exact range
fn watts(milliwatts: u32) -> f32 {
    milliwatts as f32 / 1000.0
}

#[allow(clippy::cast_precision_loss)] // percent and °C are small integers
fn read_device(index: u32, d: &nvml_wrapper::Device<'_>) -> GpuVitals {
    let memory = d.memory_info().ok();
    GpuVitals {
        index,
        name: d.name().unwrap_or_else(|_| "unknown NVIDIA GPU".to_owned()),
        uuid: d.uuid().unwrap_or_default(),
        utilization_percent: d.utilization_rates().ok().map(|u| u.gpu as f32),
        memory_total_bytes: memory.as_ref().map(|m| m.total),
        memory_used_bytes: memory.as_ref().map(|m| m.used),
        temperature_celsius: d.temperature(TemperatureSensor::Gpu).ok().map(|t| t as f32),
        power_watts: d.power_usage().ok().map(watts),
        power_limit_watts: d.enforced_power_limit().ok().map(watts),
    }
}
