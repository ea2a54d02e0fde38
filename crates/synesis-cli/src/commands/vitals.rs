//! `synesis vitals`: how busy this device is, once or live.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use synesis_proto::vitals::Vitals;
use synesis_vitals::{CPU_READING_INTERVAL_MIN, SystemSampler, VitalsSource};
use tokio::time::MissedTickBehavior;

use super::{Output, is_closed_pipe};
use crate::cli::VitalsArgs;
use crate::paths::Paths;
use crate::signals::Shutdown;

/// Clears a terminal and moves the cursor home, to redraw the live table in place.
const CLEAR_SCREEN: &str = "\x1b[2J\x1b[H";

pub(crate) async fn run(out: &Output, paths: &Paths, args: &VitalsArgs) -> anyhow::Result<()> {
    let sampler =
        SystemSampler::new(&paths.data.path).context("cannot read this device's vitals")?;
    if !args.watch {
        let (_, vitals) = sample(sampler).await?;
        return match out.report(&vitals, || render(&vitals)) {
            Err(e) if !is_closed_pipe(&e) => Err(e.into()),
            _ => Ok(()),
        };
    }
    watch(out, sampler, args.interval).await
}

/// Samples on the blocking pool (sysinfo reads /proc; the first sample waits for a CPU
/// reading) and hands the sampler back for the next tick.
async fn sample(mut sampler: SystemSampler) -> anyhow::Result<(SystemSampler, Vitals)> {
    tokio::task::spawn_blocking(move || {
        let vitals = sampler.sample();
        (sampler, vitals)
    })
    .await
    .context("the sampling thread failed")
}

/// One sample per interval until Ctrl-C, SIGTERM or a closed pipe; each of those exits 0.
async fn watch(out: &Output, sampler: SystemSampler, interval: Duration) -> anyhow::Result<()> {
    let mut shutdown = Shutdown::listen().context("cannot listen for Ctrl-C")?;
    let live = !out.json() && std::io::stdout().is_terminal();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sampler = sampler;
    loop {
        if shutdown.unless_stopped(ticker.tick()).await.is_none() {
            break;
        }
        let Some(result) = shutdown.unless_stopped(sample(sampler)).await else {
            break;
        };
        let vitals;
        (sampler, vitals) = result?;
        let printed = out.report(&vitals, || {
            let table = render(&vitals);
            if live {
                let every = humantime::format_duration(interval);
                format!("{CLEAR_SCREEN}{table}\nevery {every}; Ctrl-C to stop\n")
            } else {
                format!("{table}\n")
            }
        });
        match printed {
            Ok(()) => {}
            Err(e) if is_closed_pipe(&e) => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The interval flag: a duration (`500ms`, `2s`) no shorter than a CPU reading needs.
pub(crate) fn parse_interval(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d < CPU_READING_INTERVAL_MIN {
        return Err(format!(
            "must be at least {} (CPU usage needs that long between two readings)",
            humantime::format_duration(CPU_READING_INTERVAL_MIN)
        ));
    }
    Ok(d)
}

#[allow(clippy::cast_precision_loss)] // display only
fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

#[allow(clippy::cast_precision_loss)] // display only
fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.0} %", part as f64 * 100.0 / whole as f64)
    }
}

fn opt<T>(value: Option<T>, show: impl Fn(T) -> String) -> String {
    value.map_or_else(|| "-".into(), show)
}

/// The human view: one line per part, units on every number.
pub(crate) fn render(v: &Vitals) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let when = v
        .sampled_at
        .to_rfc3339()
        .unwrap_or_else(|| v.sampled_at.0.to_string());
    let _ = writeln!(s, "sampled   {when}");

    let c = &v.cpu;
    let load = opt(c.load_average, |[a, b, d]| {
        format!("   load {a:.2} {b:.2} {d:.2}")
    });
    let _ = writeln!(
        s,
        "cpu       {:5.1} %  of {} cores{}",
        c.usage_percent,
        c.cores,
        if c.load_average.is_some() {
            load
        } else {
            String::new()
        }
    );
    let cores: Vec<String> = c
        .per_core_percent
        .iter()
        .map(|p| format!("{p:.0} %"))
        .collect();
    let _ = writeln!(s, "  cores   {}", cores.join("  "));

    let m = &v.memory;
    let _ = writeln!(
        s,
        "memory    {} of {} used ({})   swap {} of {}",
        gib(m.used_bytes),
        gib(m.total_bytes),
        percent(m.used_bytes, m.total_bytes),
        gib(m.swap_used_bytes),
        gib(m.swap_total_bytes)
    );

    match &v.disk {
        Some(d) => {
            let _ = writeln!(
                s,
                "disk      {} free of {}   ({})",
                gib(d.available_bytes),
                gib(d.total_bytes),
                d.path
            );
        }
        None => {
            let _ = writeln!(
                s,
                "disk      - (the data directory's file system is not listed)"
            );
        }
    }

    if v.temperatures.is_empty() {
        let _ = writeln!(s, "temps     - (no sensors exposed by the OS)");
    }
    for t in &v.temperatures {
        let _ = writeln!(s, "temp      {:5.1} °C  {}", t.celsius, t.label);
    }

    if v.gpus.is_empty() {
        let why = v.gpu_unavailable_reason.as_deref().unwrap_or("none found");
        let _ = writeln!(s, "gpus      none: {why}");
    }
    for g in &v.gpus {
        let _ = writeln!(
            s,
            "gpu {}     {}  util {}  memory {} of {}  {}  power {} of {}",
            g.index,
            g.name,
            opt(g.utilization_percent, |u| format!("{u:.0} %")),
            opt(g.memory_used_bytes, gib),
            opt(g.memory_total_bytes, gib),
            opt(g.temperature_celsius, |t| format!("{t:.0} °C")),
            opt(g.power_watts, |w| format!("{w:.0} W")),
            opt(g.power_limit_watts, |w| format!("{w:.0} W")),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_below_a_cpu_reading_are_refused() {
        assert_eq!(parse_interval("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_interval("200ms"), Ok(Duration::from_millis(200)));
        assert!(
            parse_interval("100ms")
                .unwrap_err()
                .contains("at least 200ms")
        );
        assert!(parse_interval("soon").is_err());
    }
}
