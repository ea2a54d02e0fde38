//! The real sampler: one long-lived set of sysinfo handles, refreshed only in what each sample
//! needs.
//!
//! CPU usage is a difference between two readings of the kernel's counters, so the first usable
//! reading exists only [`CPU_READING_INTERVAL_MIN`] after the sampler was made. The first
//! [`SystemSampler::sample`] waits out the rest of that interval rather than report a made-up
//! number; later samples refresh the CPU counters when at least that long has passed since the
//! last refresh, and otherwise report the last real reading (never older than the interval).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use synesis_proto::UnixMillis;
use synesis_proto::vitals::{CpuVitals, DiskVitals, MemoryVitals, Temperature, Vitals};
use sysinfo::{
    Components, CpuRefreshKind, DiskRefreshKind, Disks, MemoryRefreshKind, RefreshKind, System,
};

use crate::VitalsSource;
use crate::disk::{existing_ancestor, mount_holding};
use crate::gpu::GpuProbe;

/// The shortest time between two CPU counter readings that gives a meaningful usage figure.
pub const CPU_READING_INTERVAL_MIN: Duration = sysinfo::MINIMUM_CPU_UPDATE_INTERVAL;

#[derive(Debug, thiserror::Error)]
pub enum VitalsError {
    #[error("this operating system is not supported for vitals: {0}")]
    Unsupported(String),
}

/// Samples this machine. Make one and keep it: construction lists CPUs, disks and sensors and
/// loads NVML; sampling only refreshes.
#[derive(Debug)]
pub struct SystemSampler {
    system: System,
    /// The disks, when the OS lets us list them, and the index of the one holding the data
    /// directory, chosen once.
    disks: Option<(Disks, usize)>,
    data_dir: PathBuf,
    components: Option<Components>,
    gpus: GpuProbe,
    /// When the CPU counters were last refreshed, and whether that refresh gave a usage figure
    /// (the very first one only sets the baseline).
    cpu_refreshed_at: Instant,
    cpu_has_reading: bool,
}

impl SystemSampler {
    /// A sampler whose disk figures are for the file system holding `data_dir` (which need not
    /// exist yet).
    pub fn new(data_dir: impl Into<PathBuf>) -> Result<SystemSampler, VitalsError> {
        let data_dir = data_dir.into();
        let refresh = RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing().with_usage())
            .with_memory(MemoryRefreshKind::everything());
        let system = System::new_with_specifics(refresh)
            .map_err(|e| VitalsError::Unsupported(e.to_string()))?;
        let cpu_refreshed_at = Instant::now();
        let disks =
            Disks::new_with_refreshed_list_specifics(DiskRefreshKind::nothing().with_storage())
                .inspect_err(|e| tracing::debug!(error = %e, "disks not listable"))
                .ok()
                .and_then(|disks| {
                    let path = existing_ancestor(&data_dir)?;
                    let index = mount_holding(&path, disks.iter().map(|d| d.mount_point()))?;
                    Some((disks, index))
                });
        let components = Components::new_with_refreshed_list()
            .inspect_err(|e| tracing::debug!(error = %e, "temperature sensors not listable"))
            .ok();
        Ok(SystemSampler {
            system,
            disks,
            data_dir,
            components,
            gpus: GpuProbe::new(),
            cpu_refreshed_at,
            cpu_has_reading: false,
        })
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The sample a heartbeat takes: heartbeats are at least [`CPU_READING_INTERVAL_MIN`] apart,
    /// so each re-reads the CPU counters, which a sample taken sooner reuses. For measuring that
    /// path without waiting between samples (`benches/benches/vitals.rs`); the usage figure
    /// covers the time since the last reading, however short.
    pub fn sample_as_heartbeat(&mut self) -> Vitals {
        if self.cpu_has_reading {
            self.cpu_refreshed_at = Instant::now()
                .checked_sub(CPU_READING_INTERVAL_MIN)
                .unwrap_or(self.cpu_refreshed_at);
        }
        self.sample()
    }

    fn refresh_cpu(&mut self) {
        match cpu_refresh(self.cpu_has_reading, self.cpu_refreshed_at.elapsed()) {
            CpuRefresh::Reuse => return,
            CpuRefresh::WaitThenRefresh(wait) => std::thread::sleep(wait),
            CpuRefresh::Refresh => {}
        }
        self.system.refresh_cpu_usage();
        self.cpu_refreshed_at = Instant::now();
        self.cpu_has_reading = true;
    }

    fn cpu(&self) -> CpuVitals {
        let load_average = System::load_average().ok().map(|l| {
            #[allow(clippy::cast_possible_truncation)] // load averages are small; f32 is plenty
            [l.one as f32, l.five as f32, l.fifteen as f32]
        });
        let per_core_percent: Vec<f32> = self.system.cpus().iter().map(|c| c.usage()).collect();
        CpuVitals {
            usage_percent: self.system.global_cpu_usage(),
            cores: u32::try_from(per_core_percent.len()).unwrap_or(u32::MAX),
            per_core_percent,
            load_average,
        }
    }

    fn disk(&mut self) -> Option<DiskVitals> {
        let (disks, index) = self.disks.as_mut()?;
        let disk = disks.get_mut(*index)?;
        disk.refresh_specifics(DiskRefreshKind::nothing().with_storage());
        Some(DiskVitals {
            path: self.data_dir.display().to_string(),
            total_bytes: disk.total_space(),
            available_bytes: disk.available_space(),
        })
    }

    fn temperatures(&mut self) -> Vec<Temperature> {
        let Some(components) = &mut self.components else {
            return Vec::new();
        };
        components.refresh(false);
        components
            .iter()
            .filter_map(|c| {
                Some(Temperature {
                    label: c.label().to_owned(),
                    celsius: c.temperature()?,
                })
            })
            .filter(|t| t.celsius.is_finite())
            .collect()
    }
}

impl VitalsSource for SystemSampler {
    fn sample(&mut self) -> Vitals {
        self.refresh_cpu();
        self.system.refresh_memory();
        let (gpus, gpu_unavailable_reason) = self.gpus.sample();
        Vitals {
            sampled_at: unix_now(),
            cpu: self.cpu(),
            memory: MemoryVitals {
                total_bytes: self.system.total_memory(),
                used_bytes: self.system.used_memory(),
                swap_total_bytes: self.system.total_swap(),
                swap_used_bytes: self.system.used_swap(),
            },
            disk: self.disk(),
            temperatures: self.temperatures(),
            gpus,
            gpu_unavailable_reason,
        }
    }
}

/// What to do with the CPU counters before a sample.
#[derive(Debug, PartialEq, Eq)]
enum CpuRefresh {
    /// The last reading is real and recent enough.
    Reuse,
    Refresh,
    /// No usage figure exists yet: wait until one can be computed.
    WaitThenRefresh(Duration),
}

fn cpu_refresh(has_reading: bool, since_last_refresh: Duration) -> CpuRefresh {
    match CPU_READING_INTERVAL_MIN.checked_sub(since_last_refresh) {
        None => CpuRefresh::Refresh,
        Some(wait) if wait.is_zero() => CpuRefresh::Refresh,
        Some(_) if has_reading => CpuRefresh::Reuse,
        Some(wait) => CpuRefresh::WaitThenRefresh(wait),
    }
}

/// The wall clock, read here at the edge.
fn unix_now() -> UnixMillis {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    UnixMillis(i64::try_from(ms).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_sample_waits_for_a_real_cpu_reading() {
        let min = CPU_READING_INTERVAL_MIN;
        let early = min / 4;
        assert_eq!(
            cpu_refresh(false, early),
            CpuRefresh::WaitThenRefresh(min - early)
        );
        assert_eq!(cpu_refresh(false, min), CpuRefresh::Refresh);
        assert_eq!(cpu_refresh(true, early), CpuRefresh::Reuse);
        assert_eq!(cpu_refresh(true, min), CpuRefresh::Refresh);
        assert_eq!(cpu_refresh(true, min * 10), CpuRefresh::Refresh);
    }
}
