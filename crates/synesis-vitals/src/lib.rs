//! `synesis-vitals` — how busy is this device?
//!
//! What this crate owns:
//! - [`VitalsSource`]: anything that yields [`Vitals`] snapshots. [`SystemSampler`] is the real
//!   one (sysinfo for CPU, memory, disk and temperatures; NVML through [`GpuProbe`] for NVIDIA
//!   GPUs); tests feed recorded samples instead.
//! - [`policy`]: pure decisions over samples, with time passed in: the [`PrewarmPolicy`] (the GPU
//!   is under stress, warm a cloud model up) and the [`assess`] stress verdict the escalation
//!   policy reads.
//! - [`Monitor`]: a source and the policies together, one [`Reading`] per tick.
//!
//! What it must not do: the policies never read a clock or the OS; only the samplers touch the
//! OS. The snapshot type itself lives in `synesis-proto` because heartbeats carry it.

mod disk;
mod gpu;
pub mod policy;
mod sampler;

use std::time::Instant;

pub use gpu::GpuProbe;
pub use policy::{
    PrewarmConfig, PrewarmPolicy, PrewarmSignal, Stress, StressReason, StressThresholds, assess,
};
pub use sampler::{CPU_READING_INTERVAL_MIN, SystemSampler, VitalsError};
pub use synesis_proto::vitals::Vitals;

/// Anything that yields vitals snapshots: the real sampler, or recorded samples in tests.
pub trait VitalsSource {
    /// One snapshot. Never fails: what cannot be read is left empty and, for GPUs, explained.
    fn sample(&mut self) -> Vitals;
}

/// One tick of a [`Monitor`].
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub vitals: Vitals,
    pub stress: Stress,
    /// Set when the pre-warm policy fires on this tick.
    pub prewarm: Option<PrewarmSignal>,
}

/// A source of vitals with the pre-warm policy and the stress thresholds applied to each sample.
#[derive(Debug)]
pub struct Monitor<S> {
    source: S,
    prewarm: PrewarmPolicy,
    stress: StressThresholds,
}

impl<S: VitalsSource> Monitor<S> {
    pub fn new(source: S, prewarm: PrewarmConfig, stress: StressThresholds) -> Monitor<S> {
        Monitor {
            source,
            prewarm: PrewarmPolicy::new(prewarm),
            stress,
        }
    }

    /// Samples the source and applies the policies; `now` is the caller's monotonic time.
    pub fn read(&mut self, now: Instant) -> Reading {
        let vitals = self.source.sample();
        let prewarm = self.prewarm.observe(now, &vitals);
        let stress = assess(&vitals, &self.stress);
        Reading {
            vitals,
            stress,
            prewarm,
        }
    }

    pub fn source_mut(&mut self) -> &mut S {
        &mut self.source
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::time::Duration;

    use synesis_proto::UnixMillis;
    use synesis_proto::vitals::{CpuVitals, GpuVitals, MemoryVitals};

    use super::*;

    /// Recorded samples, replayed in order.
    struct Recorded(VecDeque<Vitals>);

    impl VitalsSource for Recorded {
        fn sample(&mut self) -> Vitals {
            self.0
                .pop_front()
                .expect("the test recorded enough samples")
        }
    }

    fn recorded(gpu_utilization: &[f32]) -> Recorded {
        Recorded(
            gpu_utilization
                .iter()
                .enumerate()
                .map(|(i, &u)| Vitals {
                    sampled_at: UnixMillis(i64::try_from(i).unwrap() * 1_000),
                    cpu: CpuVitals {
                        usage_percent: 20.0,
                        cores: 8,
                        per_core_percent: vec![],
                        load_average: None,
                    },
                    memory: MemoryVitals {
                        total_bytes: 100,
                        used_bytes: 10,
                        swap_total_bytes: 0,
                        swap_used_bytes: 0,
                    },
                    disk: None,
                    temperatures: vec![],
                    gpus: vec![GpuVitals {
                        index: 0,
                        name: "recorded".into(),
                        uuid: "GPU-rec".into(),
                        utilization_percent: Some(u),
                        memory_total_bytes: Some(100),
                        memory_used_bytes: Some(10),
                        temperature_celsius: Some(60.0),
                        power_watts: None,
                        power_limit_watts: None,
                    }],
                    gpu_unavailable_reason: None,
                })
                .collect(),
        )
    }

    #[test]
    fn monitor_applies_both_policies_to_each_recorded_sample() {
        let source = recorded(&[10.0, 90.0, 95.0, 97.0, 10.0]);
        let mut monitor = Monitor::new(
            source,
            PrewarmConfig::default(),
            StressThresholds::default(),
        );
        let t0 = Instant::now();
        let readings: Vec<Reading> = (0..5)
            .map(|s| monitor.read(t0 + Duration::from_secs(s)))
            .collect();
        let prewarm: Vec<bool> = readings.iter().map(|r| r.prewarm.is_some()).collect();
        let stressed: Vec<bool> = readings.iter().map(|r| r.stress.is_stressed()).collect();
        assert_eq!(prewarm, [false, false, true, false, false]);
        assert_eq!(stressed, [false, true, true, true, false]);
        assert_eq!(readings[2].vitals.sampled_at, UnixMillis(2_000));
    }
}
