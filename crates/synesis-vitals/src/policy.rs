//! Pure decisions over vitals samples. No clock, no OS: time is passed in, so tests step it.

use std::time::{Duration, Instant};

use synesis_proto::vitals::{GpuVitals, Vitals};

/// When a GPU counts as under stress. Both limits are exclusive: at exactly the limit the GPU
/// is not under stress, just above it it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuLimits {
    pub utilization_percent: f32,
    /// Memory in use, as a whole percentage of the total.
    pub memory_percent: u8,
}

impl Default for GpuLimits {
    fn default() -> Self {
        GpuLimits {
            utilization_percent: 80.0,
            memory_percent: 90,
        }
    }
}

impl GpuLimits {
    /// Why `gpu` is under stress, or `None`.
    fn exceeded_by(&self, gpu: &GpuVitals) -> Option<StressReason> {
        if let Some(u) = gpu
            .utilization_percent
            .filter(|&u| u > self.utilization_percent)
        {
            return Some(StressReason::GpuUtilization {
                index: gpu.index,
                percent: u,
            });
        }
        let (used, total) = (gpu.memory_used_bytes?, gpu.memory_total_bytes?);
        above_percent(used, total, self.memory_percent).then_some(StressReason::GpuMemory {
            index: gpu.index,
            used_bytes: used,
            total_bytes: total,
        })
    }
}

/// `used / total > percent / 100`, exactly, in integers.
fn above_percent(used: u64, total: u64, percent: u8) -> bool {
    total > 0 && u128::from(used) * 100 > u128::from(total) * u128::from(percent)
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrewarmConfig {
    pub gpu: GpuLimits,
    /// How many samples in a row must show a stressed GPU.
    pub consecutive_samples: u32,
    /// The least time between two signals.
    pub interval_min: Duration,
}

impl Default for PrewarmConfig {
    fn default() -> Self {
        PrewarmConfig {
            gpu: GpuLimits::default(),
            consecutive_samples: 2,
            interval_min: Duration::from_secs(60),
        }
    }
}

/// The local GPU is under stress: escalations are likely, warm a cloud model up.
#[derive(Debug, Clone, PartialEq)]
pub struct PrewarmSignal {
    pub reason: StressReason,
}

/// Fires when a GPU is under stress on `consecutive_samples` samples in a row, at most once per
/// `interval_min`.
#[derive(Debug, Clone)]
pub struct PrewarmPolicy {
    config: PrewarmConfig,
    streak: u32,
    last_signal: Option<Instant>,
}

impl PrewarmPolicy {
    pub fn new(config: PrewarmConfig) -> PrewarmPolicy {
        PrewarmPolicy {
            config,
            streak: 0,
            last_signal: None,
        }
    }

    /// Feeds one sample taken at `now`; returns a signal when the policy fires.
    pub fn observe(&mut self, now: Instant, vitals: &Vitals) -> Option<PrewarmSignal> {
        let Some(reason) = vitals
            .gpus
            .iter()
            .find_map(|g| self.config.gpu.exceeded_by(g))
        else {
            self.streak = 0;
            return None;
        };
        self.streak = self.streak.saturating_add(1);
        if self.streak < self.config.consecutive_samples.max(1) {
            return None;
        }
        let rested = self
            .last_signal
            .is_none_or(|last| now.saturating_duration_since(last) >= self.config.interval_min);
        if !rested {
            return None;
        }
        self.last_signal = Some(now);
        Some(PrewarmSignal { reason })
    }
}

/// When the device as a whole counts as stressed (for the escalation policy).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StressThresholds {
    pub gpu: GpuLimits,
    /// CPU usage above this, on a device with no GPU to take the work, is stress.
    pub cpu_percent: f32,
    /// Memory in use above this whole percentage of the total is stress.
    pub memory_percent: u8,
}

impl Default for StressThresholds {
    fn default() -> Self {
        StressThresholds {
            gpu: GpuLimits::default(),
            cpu_percent: 90.0,
            memory_percent: 90,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum StressReason {
    GpuUtilization {
        index: u32,
        percent: f32,
    },
    GpuMemory {
        index: u32,
        used_bytes: u64,
        total_bytes: u64,
    },
    CpuWithoutGpu {
        percent: f32,
    },
    Memory {
        used_bytes: u64,
        total_bytes: u64,
    },
}

impl std::fmt::Display for StressReason {
    #[allow(clippy::cast_precision_loss)] // a percentage for people
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = |used: u64, total: u64| used as f64 * 100.0 / total.max(1) as f64;
        match *self {
            StressReason::GpuUtilization { index, percent } => {
                write!(f, "GPU {index} at {percent:.0} % utilisation")
            }
            StressReason::GpuMemory {
                index,
                used_bytes,
                total_bytes,
            } => {
                write!(
                    f,
                    "GPU {index} memory {:.0} % used",
                    pct(used_bytes, total_bytes)
                )
            }
            StressReason::CpuWithoutGpu { percent } => {
                write!(f, "CPU at {percent:.0} % with no GPU")
            }
            StressReason::Memory {
                used_bytes,
                total_bytes,
            } => {
                write!(f, "memory {:.0} % used", pct(used_bytes, total_bytes))
            }
        }
    }
}

/// The device's stress verdict for one sample: every reason found, none when calm.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Stress {
    pub reasons: Vec<StressReason>,
}

impl Stress {
    pub fn is_stressed(&self) -> bool {
        !self.reasons.is_empty()
    }
}

pub fn assess(vitals: &Vitals, t: &StressThresholds) -> Stress {
    let mut reasons: Vec<StressReason> = vitals
        .gpus
        .iter()
        .filter_map(|g| t.gpu.exceeded_by(g))
        .collect();
    if vitals.gpus.is_empty() && vitals.cpu.usage_percent > t.cpu_percent {
        reasons.push(StressReason::CpuWithoutGpu {
            percent: vitals.cpu.usage_percent,
        });
    }
    let m = &vitals.memory;
    if above_percent(m.used_bytes, m.total_bytes, t.memory_percent) {
        reasons.push(StressReason::Memory {
            used_bytes: m.used_bytes,
            total_bytes: m.total_bytes,
        });
    }
    Stress { reasons }
}

#[cfg(test)]
mod tests {
    use synesis_proto::UnixMillis;
    use synesis_proto::vitals::{CpuVitals, MemoryVitals};

    use super::*;

    const GIB: u64 = 1 << 30;

    fn vitals(gpus: Vec<GpuVitals>) -> Vitals {
        Vitals {
            sampled_at: UnixMillis(0),
            cpu: CpuVitals {
                usage_percent: 10.0,
                cores: 2,
                per_core_percent: vec![10.0, 10.0],
                load_average: None,
            },
            memory: MemoryVitals {
                total_bytes: 16 * GIB,
                used_bytes: 4 * GIB,
                swap_total_bytes: 0,
                swap_used_bytes: 0,
            },
            disk: None,
            temperatures: vec![],
            gpus,
            gpu_unavailable_reason: None,
        }
    }

    fn gpu(util: f32, used: u64, total: u64) -> GpuVitals {
        GpuVitals {
            index: 0,
            name: "test GPU".into(),
            uuid: "GPU-0".into(),
            utilization_percent: Some(util),
            memory_total_bytes: Some(total),
            memory_used_bytes: Some(used),
            temperature_celsius: None,
            power_watts: None,
            power_limit_watts: None,
        }
    }

    fn busy() -> Vitals {
        vitals(vec![gpu(95.0, GIB, 80 * GIB)])
    }

    fn idle() -> Vitals {
        vitals(vec![gpu(5.0, GIB, 80 * GIB)])
    }

    /// A virtual clock: a fixed origin and offsets from it.
    fn at(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    #[test]
    fn utilisation_threshold_is_exclusive() {
        let limits = GpuLimits::default();
        assert_eq!(limits.exceeded_by(&gpu(80.0, 0, 100)), None);
        assert!(limits.exceeded_by(&gpu(80.01, 0, 100)).is_some());
        assert!(limits.exceeded_by(&gpu(100.0, 0, 100)).is_some());
    }

    #[test]
    fn memory_threshold_is_exclusive_and_exact_in_integers() {
        let limits = GpuLimits::default();
        let total = 80 * GIB;
        let ninety = total / 10 * 9;
        assert_eq!(limits.exceeded_by(&gpu(0.0, ninety, total)), None);
        assert!(limits.exceeded_by(&gpu(0.0, ninety + 1, total)).is_some());
        // No overflow at the extremes, and an empty total never counts.
        assert!(limits.exceeded_by(&gpu(0.0, u64::MAX, u64::MAX)).is_some());
        assert_eq!(limits.exceeded_by(&gpu(0.0, 5, 0)), None);
    }

    #[test]
    fn one_stressed_sample_is_not_enough() {
        let t0 = Instant::now();
        let mut p = PrewarmPolicy::new(PrewarmConfig::default());
        assert_eq!(p.observe(at(t0, 0), &busy()), None);
        assert!(p.observe(at(t0, 1), &busy()).is_some());
    }

    #[test]
    fn a_calm_sample_breaks_the_streak() {
        let t0 = Instant::now();
        let mut p = PrewarmPolicy::new(PrewarmConfig::default());
        assert_eq!(p.observe(at(t0, 0), &busy()), None);
        assert_eq!(p.observe(at(t0, 1), &idle()), None);
        assert_eq!(p.observe(at(t0, 2), &busy()), None);
        assert!(p.observe(at(t0, 3), &busy()).is_some());
    }

    #[test]
    fn fires_at_most_once_per_minute_while_stress_lasts() {
        let t0 = Instant::now();
        let mut p = PrewarmPolicy::new(PrewarmConfig::default());
        let fired: Vec<u64> = (0..=130)
            .filter(|&s| p.observe(at(t0, s), &busy()).is_some())
            .collect();
        assert_eq!(fired, vec![1, 61, 121]);
    }

    #[test]
    fn the_minute_is_counted_from_the_last_signal_even_across_calm_periods() {
        let t0 = Instant::now();
        let mut p = PrewarmPolicy::new(PrewarmConfig::default());
        p.observe(at(t0, 0), &busy());
        assert!(p.observe(at(t0, 1), &busy()).is_some());
        p.observe(at(t0, 2), &idle());
        p.observe(at(t0, 59), &busy());
        assert_eq!(
            p.observe(at(t0, 60), &busy()),
            None,
            "59 s after the last signal"
        );
        assert!(
            p.observe(at(t0, 61), &busy()).is_some(),
            "60 s after the last signal"
        );
    }

    #[test]
    fn memory_pressure_alone_fires_and_no_gpu_never_does() {
        let t0 = Instant::now();
        let mut p = PrewarmPolicy::new(PrewarmConfig::default());
        let full = vitals(vec![gpu(0.0, 79 * GIB, 80 * GIB)]);
        p.observe(at(t0, 0), &full);
        let signal = p.observe(at(t0, 1), &full).unwrap();
        assert!(matches!(
            signal.reason,
            StressReason::GpuMemory { index: 0, .. }
        ));

        let mut p = PrewarmPolicy::new(PrewarmConfig::default());
        let mut no_gpu = vitals(vec![]);
        no_gpu.cpu.usage_percent = 100.0;
        assert!((0..10).all(|s| p.observe(at(t0, s), &no_gpu).is_none()));
    }

    #[test]
    fn configurable_thresholds_and_streak_length() {
        let t0 = Instant::now();
        let config = PrewarmConfig {
            gpu: GpuLimits {
                utilization_percent: 50.0,
                memory_percent: 99,
            },
            consecutive_samples: 3,
            interval_min: Duration::from_secs(10),
        };
        let mut p = PrewarmPolicy::new(config);
        let warm = vitals(vec![gpu(60.0, 0, GIB)]);
        let fired: Vec<u64> = (0..25)
            .filter(|&s| p.observe(at(t0, s), &warm).is_some())
            .collect();
        assert_eq!(fired, vec![2, 12, 22]);
    }

    #[test]
    fn a_clock_that_goes_backwards_does_not_fire_early() {
        let t0 = Instant::now() + Duration::from_secs(1_000);
        let mut p = PrewarmPolicy::new(PrewarmConfig::default());
        p.observe(at(t0, 100), &busy());
        assert!(p.observe(at(t0, 101), &busy()).is_some());
        assert_eq!(p.observe(t0, &busy()), None);
    }

    #[test]
    fn stress_verdict_names_every_reason() {
        let t = StressThresholds::default();
        assert!(!assess(&idle(), &t).is_stressed());

        let mut cpu_bound = vitals(vec![]);
        cpu_bound.cpu.usage_percent = 95.0;
        assert_eq!(
            assess(&cpu_bound, &t).reasons,
            vec![StressReason::CpuWithoutGpu { percent: 95.0 }]
        );

        // With a GPU present, a busy CPU alone is not stress: the GPU does the model's work.
        let mut cpu_busy_gpu_idle = idle();
        cpu_busy_gpu_idle.cpu.usage_percent = 95.0;
        assert!(!assess(&cpu_busy_gpu_idle, &t).is_stressed());

        let mut everything = busy();
        everything.memory.used_bytes = 15 * GIB;
        let reasons = assess(&everything, &t).reasons;
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert_eq!(reasons[1].to_string(), "memory 94 % used");
    }
}
