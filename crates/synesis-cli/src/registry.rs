//! The device's model and adapter registry, kept in `config.toml` under the config directory.
//!
//! ```toml
//! default_model = "demo"
//! [models.demo]
//! path = "/home/ada/.local/share/synesis/models/demo.gguf"
//! size_bytes = 471296
//! sha256 = "…"
//! architecture = "llama"
//! context_length = 256
//! tiny = true
//! [adapters.legal]
//! path = "…"  size_bytes = …  sha256 = "…"  architecture = "llama"  base = "demo"
//! ```
//!
//! Written atomically (temp file, rename): a crash leaves the old or the new file, never half.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use sha2::Digest;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Config {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) default_model: Option<String>,
    #[serde(default)]
    pub(crate) models: BTreeMap<String, ModelEntry>,
    #[serde(default)]
    pub(crate) adapters: BTreeMap<String, AdapterEntry>,
    /// The local-first policy's settings (`synesis ask`).
    #[serde(default, skip_serializing_if = "EscalationConfig::is_default")]
    pub(crate) escalation: EscalationConfig,
}

/// `[escalation]`: every key optional; `SYNESIS_MIN_CONFIDENCE` and `SYNESIS_CASCADE_TOKENS`
/// override the file for one run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EscalationConfig {
    /// Escalate when the first tokens' mean log-probability is under this (default -3.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) min_confidence: Option<f64>,
    /// How many tokens the confidence is measured on (0: never measure; default 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) cascade_tokens: Option<u32>,
    /// The cloud model `synesis ask` escalates to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) cloud_model: Option<String>,
    /// CPU use (on a device without a GPU) above which the device counts as stressed (default
    /// 90; 100 never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) stress_cpu_percent: Option<f32>,
    /// Memory in use above which the device counts as stressed (default 90; 100 never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) stress_memory_percent: Option<u8>,
}

impl EscalationConfig {
    fn is_default(&self) -> bool {
        *self == EscalationConfig::default()
    }

    /// The thresholds: the defaults, the file over them, the environment over that.
    pub(crate) fn thresholds(&self) -> anyhow::Result<synesis_route::Thresholds> {
        let mut t = synesis_route::Thresholds::default();
        if let Some(c) = self.min_confidence {
            t.min_confidence = c;
        }
        if let Some(k) = self.cascade_tokens {
            t.cascade_tokens = k;
        }
        if let Ok(v) = std::env::var("SYNESIS_MIN_CONFIDENCE") {
            t.min_confidence = v
                .trim()
                .parse()
                .with_context(|| format!("SYNESIS_MIN_CONFIDENCE={v:?} is not a number"))?;
        }
        if let Ok(v) = std::env::var("SYNESIS_CASCADE_TOKENS") {
            t.cascade_tokens = v
                .trim()
                .parse()
                .with_context(|| format!("SYNESIS_CASCADE_TOKENS={v:?} is not a whole number"))?;
        }
        if !t.min_confidence.is_finite() || t.min_confidence > 0.0 {
            bail!("min_confidence is a mean log-probability: a number at most 0 (e.g. -3.0)");
        }
        Ok(t)
    }

    /// The stress thresholds: the vitals' defaults, the file over them, the environment
    /// (`SYNESIS_STRESS_CPU_PERCENT`, `SYNESIS_STRESS_MEMORY_PERCENT`) over that.
    pub(crate) fn stress(&self) -> anyhow::Result<synesis_vitals::StressThresholds> {
        let mut t = synesis_vitals::StressThresholds::default();
        if let Some(c) = self.stress_cpu_percent {
            t.cpu_percent = c;
        }
        if let Some(m) = self.stress_memory_percent {
            t.memory_percent = m;
        }
        if let Ok(v) = std::env::var("SYNESIS_STRESS_CPU_PERCENT") {
            t.cpu_percent = v
                .trim()
                .parse()
                .with_context(|| format!("SYNESIS_STRESS_CPU_PERCENT={v:?} is not a number"))?;
        }
        if let Ok(v) = std::env::var("SYNESIS_STRESS_MEMORY_PERCENT") {
            t.memory_percent = v.trim().parse().with_context(|| {
                format!("SYNESIS_STRESS_MEMORY_PERCENT={v:?} is not a whole number")
            })?;
        }
        if !(0.0..=100.0).contains(&t.cpu_percent) || t.memory_percent > 100 {
            bail!("stress thresholds are percentages, 0 to 100");
        }
        Ok(t)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ModelEntry {
    pub(crate) path: PathBuf,
    pub(crate) size_bytes: u64,
    pub(crate) sha256: String,
    pub(crate) architecture: String,
    pub(crate) context_length: u64,
    /// Written by `synesis model add --tiny` (its adapters can be made with `lora add --tiny`).
    #[serde(default)]
    pub(crate) tiny: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct AdapterEntry {
    pub(crate) path: PathBuf,
    pub(crate) size_bytes: u64,
    pub(crate) sha256: String,
    pub(crate) architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) base: Option<String>,
}

impl Config {
    pub(crate) fn load(path: &Path) -> anyhow::Result<Config> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                toml::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    pub(crate) fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = toml::to_string_pretty(self)?;
        synesis_wire::files::write_secret_file(path, text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// The model to use: the one named, or the default.
    pub(crate) fn model(&self, name: Option<&str>) -> anyhow::Result<(&str, &ModelEntry)> {
        let name = match name.or(self.default_model.as_deref()) {
            Some(n) => n,
            None => bail!(
                "no model is registered; add one with `synesis model add PATH`, or try `synesis model add --tiny demo`"
            ),
        };
        match self.models.get_key_value(name) {
            Some((k, v)) => Ok((k.as_str(), v)),
            None => bail!("no model named {name:?}; `synesis model list` shows them"),
        }
    }
}

/// A name for a model or adapter: letters, digits, `-`, `_`, `.`; 1 to 64 of them.
pub(crate) fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
        && !name.starts_with(['.', ':']);
    if !ok {
        bail!(
            "{name:?} is not a usable name: use 1 to 64 letters, digits, '-', '_', '.' or ':' \
             (not first)"
        );
    }
    Ok(())
}

/// SHA-256 and size of a file, read in 1 MiB pieces.
pub(crate) fn digest(path: &Path) -> anyhow::Result<(String, u64)> {
    digest_with(path, &mut |_| {})
}

/// [`digest`], telling `on_progress` the bytes read so far after each piece.
pub(crate) fn digest_with(
    path: &Path,
    on_progress: &mut dyn FnMut(u64),
) -> anyhow::Result<(String, u64)> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
        on_progress(size);
    }
    let hex = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((hex, size))
}
