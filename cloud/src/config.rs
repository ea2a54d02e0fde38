//! The operator's billing settings: `cloud.toml` in the data directory (or `--config PATH`),
//! over the plan's defaults. Every key is optional; an unknown key is an error, so a typo never
//! silently leaves a default in place.
//!
//! ```toml
//! [tiers]
//! free_quota_tokens = 100000     # per account per UTC calendar month
//! managed_markup_bps = 300       # 3 %
//! byok_fee_bps = 3000            # 30 % of the provider price
//!
//! [prices.claude-sonnet]         # adds a model or overrides one, dollars per 1M tokens
//! input_usd_per_mtok = "3.00"    # a string: exact to the micro-dollar, never a float
//! output_usd_per_mtok = "15.00"
//!
//! [ledger]
//! hold_ttl = "10m"               # an unsettled hold expires after this
//!
//! [models.tiny]                  # a model the cloud answers with (it needs a price too)
//! provider = "llama"             # in this process: llama.cpp on a GGUF file
//! path = "models/tiny.gguf"      # relative paths are from this file's directory
//! sequences = 2                  # generations at once on the one load
//! queue = 16                     # requests that may wait; past that: UNAVAILABLE
//! threads = 2                    # CPU threads a sequence decodes with; sequences take turns
//!                                # on the cores (never more threads than cores at once)
//! context = 4096                 # tokens per sequence (default: the model's own)
//! adapters = { legal = "adapters/legal.gguf" }
//! pause_while = "hold"           # tests only: while this file exists, generations wait
//!                                # after each piece (an answer held mid-way on any machine)
//! tiers = ["free", "managed"]    # who may use it (default: free and managed; BYOK asks go
//!                                # only to an HTTP model whose list names "byok")
//!
//! [models.gpt-4o-mini]
//! provider = "openai"            # any OpenAI-compatible server: vLLM, llama.cpp, Ollama, OpenAI
//! base_url = "https://api.openai.com/v1"
//! api_key_env = "OPENAI_API_KEY" # the operator's key, read from the environment at start
//! upstream_model = "gpt-4o-mini" # the upstream's name for it (default: the same)
//! adapters = ["legal"]           # LoRA adapters the server serves by name (vLLM --lora-modules)
//! connect_timeout = "5s"
//! first_byte_timeout = "60s"     # until the response headers
//! idle_timeout = "30s"           # between two events of the stream
//!
//! [models.claude-sonnet]
//! provider = "anthropic"         # the Messages API; same keys as "openai"
//! base_url = "https://api.anthropic.com"
//! api_key_env = "ANTHROPIC_API_KEY"
//! upstream_model = "claude-sonnet-4-5"
//!
//! [escalation]
//! idle_timeout = "30s"           # no output for this long ends a request (charged what it made)
//! resume_window = "60s"          # a request whose device went away keeps running this long
//! max_output_tokens = 4096       # the most a request may ask for
//! retries = 2                    # an upstream that fails before its first output is retried
//! per_account_max = 16           # requests one account may have running at once
//!
//! [adapters]
//! max_size = "2GiB"              # the largest adapter one upload may declare
//! storage_per_account = "10GiB"  # content held plus uploads in progress (declared sizes)
//! uploads_per_account = 4        # uploads in progress at once
//! abandon_after = "24h"          # a partial upload with no chunk for this long is removed
//! record_when_quiet = "500ms"    # an upload stream this quiet has the chunks it wrote recorded
//! loaded_per_model = 8           # adapters kept loaded per llama model (least recently used out)
//! verify_pause_while = "hold"    # tests only: while this file exists, a sealed upload waits
//!                                # before it is verified (PROTOCOL.md §2's BUSY window, held open)
//! ```
//!
//! BYOK asks go only to `openai` and `anthropic` models (the user's key is for the upstream);
//! a `llama` model never takes one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use synesis_billing::ledger::HOLD_TTL_DEFAULT_MS;
use synesis_billing::{ModelPrice, PriceTable, Tier, TierRules, parse_usd};

/// The file's name in the data directory.
pub const CONFIG_FILE: &str = "cloud.toml";

/// The most a markup or fee may be: 1,000 % (the range the cost arithmetic is tested over).
const MAX_BPS: u32 = 100_000;

/// Prices and rules the cloud bills by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Billing {
    pub prices: PriceTable,
    pub rules: TierRules,
    pub hold_ttl_ms: i64,
}

impl Default for Billing {
    fn default() -> Self {
        Billing {
            prices: PriceTable::default(),
            rules: TierRules::default(),
            hold_ttl_ms: HOLD_TTL_DEFAULT_MS,
        }
    }
}

/// Everything `cloud.toml` sets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    pub billing: Billing,
    pub serving: Serving,
    /// `[storage] url`: the database (`postgres://…`); `None`, SQLite in the data directory.
    /// `--database` overrides it.
    pub database: Option<String>,
}

/// The models the cloud answers with, and how escalations run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Serving {
    pub models: BTreeMap<String, Served>,
    /// `[escalation] default_model`: a served model (checked at load).
    pub default_model: Option<String>,
    pub escalation: EscalationSettings,
    pub adapters: AdapterSettings,
}

/// Accounts' LoRA adapters: upload limits and how many stay loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSettings {
    pub max_size: u64,
    pub storage_per_account: u64,
    pub uploads_per_account: usize,
    /// A partial upload that received no chunk for this long is removed.
    pub abandon_after: Duration,
    /// An upload stream that sends nothing for this long has the chunks it wrote recorded (a
    /// device cut off resumes from them).
    pub record_when_quiet: Duration,
    pub loaded_per_model: usize,
    /// For tests: while this file exists, an upload sealed by its `UploadDone` waits before it
    /// is verified, so a test can act inside that window on any machine.
    pub verify_pause_while: Option<PathBuf>,
}

impl Default for AdapterSettings {
    fn default() -> Self {
        AdapterSettings {
            max_size: 2 << 30,
            storage_per_account: 10 << 30,
            uploads_per_account: 4,
            abandon_after: Duration::from_secs(24 * 3_600),
            record_when_quiet: Duration::from_millis(500),
            loaded_per_model: 8,
            verify_pause_while: None,
        }
    }
}

/// One served model.
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    pub provider: ProviderConfig,
    /// The tiers allowed to use it.
    pub tiers: Vec<Tier>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ProviderConfig {
    Llama(crate::provider::local::LocalSettings),
    OpenAi(Upstream),
    Anthropic(Upstream),
}

/// An HTTP upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub base_url: String,
    /// The environment variable holding the operator's key (`None`: no key, e.g. a local
    /// server; BYOK asks bring their own).
    pub api_key_env: Option<String>,
    pub upstream_model: String,
    /// LoRA adapters an OpenAI-compatible server serves by name (vLLM `--lora-modules`).
    pub adapters: Vec<String>,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
}

/// How escalations run, whatever the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EscalationSettings {
    /// A request that produces nothing for this long ends (charged what it made).
    pub idle_timeout: Duration,
    /// A request whose device went away keeps running, and its answer stays resumable, this
    /// long.
    pub resume_window: Duration,
    pub max_output_tokens: u32,
    /// Upstream retries before the first output.
    pub retries: u32,
    /// Requests one account may have running at once (more: `LIMIT_EXCEEDED`), so that one
    /// account cannot take every sequence and upstream connection.
    pub per_account_max: usize,
}

impl Default for EscalationSettings {
    fn default() -> Self {
        EscalationSettings {
            idle_timeout: Duration::from_secs(30),
            resume_window: Duration::from_secs(60),
            max_output_tokens: 4_096,
            retries: 2,
            per_account_max: 16,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tiers: Tiers,
    #[serde(default)]
    prices: BTreeMap<String, Price>,
    #[serde(default)]
    ledger: Ledger,
    #[serde(default)]
    models: BTreeMap<String, ModelFile>,
    #[serde(default)]
    escalation: EscalationFile,
    #[serde(default)]
    adapters: AdaptersFile,
    #[serde(default)]
    storage: StorageFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StorageFile {
    url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdaptersFile {
    max_size: Option<String>,
    storage_per_account: Option<String>,
    uploads_per_account: Option<usize>,
    abandon_after: Option<String>,
    record_when_quiet: Option<String>,
    loaded_per_model: Option<usize>,
    verify_pause_while: Option<PathBuf>,
}

/// A size such as `2GiB`, `512MiB`, `64KiB` or a number of bytes.
fn size(text: &Option<String>, what: &str, default: u64) -> anyhow::Result<u64> {
    let Some(text) = text else {
        return Ok(default);
    };
    let t = text.trim();
    let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        _ => bail!("{what} = {text:?}: a number of bytes, or with KiB, MiB, GiB or TiB"),
    };
    let n: u64 = digits.parse().map_err(|_| {
        anyhow::anyhow!("{what} = {text:?}: a number of bytes, or with KiB, MiB, GiB or TiB")
    })?;
    n.checked_mul(1u64 << shift)
        .filter(|n| *n > 0)
        .ok_or_else(|| anyhow::anyhow!("{what} = {text:?}: above zero and below 16 EiB"))
}

#[derive(Debug, Deserialize)]
#[serde(tag = "provider", rename_all = "lowercase")]
enum ModelFile {
    Llama(LlamaFile),
    Openai(UpstreamFile),
    Anthropic(UpstreamFile),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LlamaFile {
    path: PathBuf,
    sequences: Option<usize>,
    queue: Option<usize>,
    threads: Option<u32>,
    context: Option<u32>,
    #[serde(default)]
    adapters: BTreeMap<String, PathBuf>,
    pause_while: Option<PathBuf>,
    tiers: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamFile {
    base_url: String,
    api_key_env: Option<String>,
    upstream_model: Option<String>,
    #[serde(default)]
    adapters: Vec<String>,
    connect_timeout: Option<String>,
    first_byte_timeout: Option<String>,
    idle_timeout: Option<String>,
    tiers: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EscalationFile {
    idle_timeout: Option<String>,
    resume_window: Option<String>,
    max_output_tokens: Option<u32>,
    retries: Option<u32>,
    per_account_max: Option<usize>,
    default_model: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Tiers {
    free_quota_tokens: Option<u64>,
    managed_markup_bps: Option<u32>,
    byok_fee_bps: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Price {
    input_usd_per_mtok: String,
    output_usd_per_mtok: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Ledger {
    hold_ttl: Option<String>,
}

/// Where the settings come from: `explicit` (which must exist), else the data directory's
/// `cloud.toml` when there is one.
pub fn path(explicit: Option<&Path>, data_dir: &Path) -> Option<PathBuf> {
    match explicit {
        Some(p) => Some(p.to_owned()),
        None => Some(data_dir.join(CONFIG_FILE)).filter(|p| p.exists()),
    }
}

/// The settings: the defaults with the file's values over them.
pub fn load(explicit: Option<&Path>, data_dir: &Path) -> anyhow::Result<Config> {
    let Some(path) = path(explicit, data_dir) else {
        return Ok(Config::default());
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the config {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse_all(&text, base).with_context(|| format!("in the config {}", path.display()))
}

fn duration(text: &Option<String>, what: &str, default: Duration) -> anyhow::Result<Duration> {
    let Some(text) = text else {
        return Ok(default);
    };
    let d = humantime::parse_duration(text).map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    if d < Duration::from_millis(100) || d > Duration::from_secs(24 * 3_600) {
        bail!("{what} = {text:?}: between 100ms and 24h");
    }
    Ok(d)
}

/// The whole file; relative paths are taken from `base`.
fn parse_all(text: &str, base: &Path) -> anyhow::Result<Config> {
    let billing = parse(text)?;
    let file: File = toml::from_str(text)?;
    let e = &file.escalation;
    let defaults = EscalationSettings::default();
    let escalation = EscalationSettings {
        idle_timeout: duration(
            &e.idle_timeout,
            "escalation.idle_timeout",
            defaults.idle_timeout,
        )?,
        resume_window: duration(
            &e.resume_window,
            "escalation.resume_window",
            defaults.resume_window,
        )?,
        max_output_tokens: match e.max_output_tokens {
            Some(0) => bail!("escalation.max_output_tokens must be at least 1"),
            Some(n) => n,
            None => defaults.max_output_tokens,
        },
        retries: e.retries.unwrap_or(defaults.retries).min(10),
        per_account_max: match e.per_account_max {
            Some(0) => bail!("escalation.per_account_max must be at least 1"),
            Some(n) => n.min(10_000),
            None => defaults.per_account_max,
        },
    };
    let a = &file.adapters;
    let ad = AdapterSettings::default();
    let adapters = AdapterSettings {
        max_size: size(&a.max_size, "adapters.max_size", ad.max_size)?,
        storage_per_account: size(
            &a.storage_per_account,
            "adapters.storage_per_account",
            ad.storage_per_account,
        )?,
        uploads_per_account: match a.uploads_per_account {
            Some(0) => bail!("adapters.uploads_per_account must be at least 1"),
            Some(n) => n.min(1_000),
            None => ad.uploads_per_account,
        },
        abandon_after: duration(&a.abandon_after, "adapters.abandon_after", ad.abandon_after)?,
        record_when_quiet: duration(
            &a.record_when_quiet,
            "adapters.record_when_quiet",
            ad.record_when_quiet,
        )?,
        loaded_per_model: a
            .loaded_per_model
            .unwrap_or(ad.loaded_per_model)
            .clamp(1, 1_000),
        verify_pause_while: a.verify_pause_while.as_ref().map(|p| base.join(p)),
    };
    let mut models = BTreeMap::new();
    for (name, m) in file.models {
        if billing.prices.get(&name).is_none() {
            bail!("models.{name}: no price; add [prices.{name}]");
        }
        let all = vec![Tier::Free, Tier::Managed, Tier::Byok];
        let served = match m {
            ModelFile::Llama(l) => {
                let tiers = match &l.tiers {
                    Some(list) => tiers(&name, list)?,
                    None => all,
                };
                if l.tiers.is_some() && tiers.contains(&Tier::Byok) {
                    bail!("models.{name}: a llama model cannot take BYOK keys (no \"byok\" tier)");
                }
                let at = |p: &Path| {
                    if p.is_absolute() {
                        p.to_owned()
                    } else {
                        base.join(p)
                    }
                };
                Served {
                    provider: ProviderConfig::Llama(crate::provider::local::LocalSettings {
                        path: at(&l.path),
                        sequences: l.sequences.unwrap_or(2).clamp(1, 64),
                        queue: l.queue.unwrap_or(16).min(4_096),
                        adapters: l.adapters.iter().map(|(n, p)| (n.clone(), at(p))).collect(),
                        n_ctx: l.context.unwrap_or(0),
                        threads: l.threads.unwrap_or(2).clamp(1, 256),
                        adapters_loaded: adapters.loaded_per_model,
                        pause_while: l.pause_while.as_deref().map(at),
                    }),
                    tiers: tiers.into_iter().filter(|t| *t != Tier::Byok).collect(),
                }
            }
            ModelFile::Openai(u) | ModelFile::Anthropic(u)
                if !(u.base_url.starts_with("http://") || u.base_url.starts_with("https://")) =>
            {
                bail!(
                    "models.{name}.base_url = {:?}: an http:// or https:// URL",
                    u.base_url
                )
            }
            ModelFile::Openai(u) => upstream(&name, u, ProviderConfig::OpenAi)?,
            ModelFile::Anthropic(u) if !u.adapters.is_empty() => {
                bail!("models.{name}.adapters: Anthropic's API serves no LoRA adapters")
            }
            ModelFile::Anthropic(u) => upstream(&name, u, ProviderConfig::Anthropic)?,
        };
        models.insert(name, served);
    }
    if let Some(default) = &e.default_model
        && !models.contains_key(default)
    {
        bail!(
            "escalation.default_model = {default:?}: not a served model (served: {})",
            models.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(Config {
        billing,
        serving: Serving {
            default_model: file.escalation.default_model,
            models,
            escalation,
            adapters,
        },
        database: file.storage.url,
    })
}

fn tiers(model: &str, names: &[String]) -> anyhow::Result<Vec<Tier>> {
    names
        .iter()
        .map(|n| match n.as_str() {
            "free" => Ok(Tier::Free),
            "managed" => Ok(Tier::Managed),
            "byok" => Ok(Tier::Byok),
            other => bail!("models.{model}.tiers: {other:?} is not free, managed or byok"),
        })
        .collect()
}

fn upstream(
    name: &str,
    u: UpstreamFile,
    kind: fn(Upstream) -> ProviderConfig,
) -> anyhow::Result<Served> {
    let what = |key: &str| format!("models.{name}.{key}");
    Ok(Served {
        provider: kind(Upstream {
            base_url: u.base_url.trim_end_matches('/').to_owned(),
            api_key_env: u.api_key_env,
            upstream_model: u.upstream_model.unwrap_or_else(|| name.to_owned()),
            adapters: u.adapters,
            connect_timeout: duration(
                &u.connect_timeout,
                &what("connect_timeout"),
                Duration::from_secs(5),
            )?,
            first_byte_timeout: duration(
                &u.first_byte_timeout,
                &what("first_byte_timeout"),
                Duration::from_secs(60),
            )?,
            idle_timeout: duration(
                &u.idle_timeout,
                &what("idle_timeout"),
                Duration::from_secs(30),
            )?,
        }),
        // BYOK only where the operator says so: an upstream that ignores keys (a local vLLM,
        // llama.cpp or Ollama) would otherwise sell the operator's compute at the BYOK fee.
        tiers: match &u.tiers {
            Some(list) => tiers(name, list)?,
            None => vec![Tier::Free, Tier::Managed],
        },
    })
}

fn parse(text: &str) -> anyhow::Result<Billing> {
    let file: File = toml::from_str(text)?;
    let mut billing = Billing::default();
    let rules = &mut billing.rules;
    if let Some(q) = file.tiers.free_quota_tokens {
        rules.free_quota_tokens = q;
    }
    for (value, field, name) in [
        (
            file.tiers.managed_markup_bps,
            &mut rules.managed_markup_bps,
            "managed_markup_bps",
        ),
        (
            file.tiers.byok_fee_bps,
            &mut rules.byok_fee_bps,
            "byok_fee_bps",
        ),
    ] {
        if let Some(bps) = value {
            if bps > MAX_BPS {
                bail!("tiers.{name} = {bps}: at most {MAX_BPS} (1,000 %)");
            }
            *field = bps;
        }
    }
    for (model, p) in &file.prices {
        if model.trim().is_empty() {
            bail!("a price needs a model name");
        }
        let usd = |text: &str, what: &str| {
            parse_usd(text).map_err(|e| anyhow::anyhow!("prices.{model}.{what}: {e}"))
        };
        billing.prices.set(
            model,
            ModelPrice {
                input_per_mtok: usd(&p.input_usd_per_mtok, "input_usd_per_mtok")?,
                output_per_mtok: usd(&p.output_usd_per_mtok, "output_usd_per_mtok")?,
            },
        );
    }
    if let Some(ttl) = &file.ledger.hold_ttl {
        let d =
            humantime::parse_duration(ttl).map_err(|e| anyhow::anyhow!("ledger.hold_ttl: {e}"))?;
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        if !(1_000..=7 * 24 * 3_600 * 1_000).contains(&ms) {
            bail!("ledger.hold_ttl = {ttl:?}: between 1s and 7 days");
        }
        billing.hold_ttl_ms = ms;
    }
    Ok(billing)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use synesis_proto::MicroUsd;

    use super::*;

    #[test]
    fn an_empty_file_is_the_plan() {
        assert_eq!(parse("").unwrap(), Billing::default());
    }

    #[test]
    fn values_override_and_add() {
        let b = parse(
            r#"
            [tiers]
            free_quota_tokens = 250000
            managed_markup_bps = 500
            [prices.claude-sonnet]
            input_usd_per_mtok = "2.50"
            output_usd_per_mtok = "12.000001"
            [prices.house-model]
            input_usd_per_mtok = "0"
            output_usd_per_mtok = "$0.50"
            [ledger]
            hold_ttl = "2m"
            "#,
        )
        .unwrap();
        assert_eq!(b.rules.free_quota_tokens, 250_000);
        assert_eq!(b.rules.managed_markup_bps, 500);
        assert_eq!(b.rules.byok_fee_bps, 3_000, "untouched keys keep the plan");
        let sonnet = b.prices.get("claude-sonnet").unwrap();
        assert_eq!(sonnet.input_per_mtok, MicroUsd(2_500_000));
        assert_eq!(sonnet.output_per_mtok, MicroUsd(12_000_001));
        assert_eq!(
            b.prices.get("house-model").unwrap().output_per_mtok,
            MicroUsd(500_000)
        );
        assert!(b.prices.get("claude-opus").is_some());
        assert_eq!(b.hold_ttl_ms, 120_000);
    }

    #[test]
    fn mistakes_are_named() {
        for (text, says) in [
            ("[tiers]\nmanaged_markup = 5", "unknown field"),
            ("[tiers]\nbyok_fee_bps = 100001", "byok_fee_bps"),
            (
                "[prices.x]\ninput_usd_per_mtok = 3.0\noutput_usd_per_mtok = \"1\"",
                "string",
            ),
            (
                "[prices.x]\ninput_usd_per_mtok = \"-1\"\noutput_usd_per_mtok = \"1\"",
                "prices.x.input_usd_per_mtok",
            ),
            (
                "[prices.x]\ninput_usd_per_mtok = \"0.0000001\"\noutput_usd_per_mtok = \"1\"",
                "prices.x.input_usd_per_mtok",
            ),
            ("[ledger]\nhold_ttl = \"0s\"", "hold_ttl"),
        ] {
            let err = format!("{:#}", parse(text).unwrap_err());
            assert!(err.contains(says), "{text:?}: {err}");
        }
    }

    #[test]
    fn the_default_model_must_be_served() {
        let served = "[prices.house]\ninput_usd_per_mtok = \"1\"\noutput_usd_per_mtok = \"1\"\n\
                      [models.house]\nprovider = \"openai\"\nbase_url = \"http://127.0.0.1:9\"\n";
        let config = parse_all(
            &format!("{served}[escalation]\ndefault_model = \"house\"\n"),
            Path::new("."),
        )
        .unwrap();
        assert_eq!(config.serving.default_model.as_deref(), Some("house"));
        assert_eq!(
            parse_all(served, Path::new("."))
                .unwrap()
                .serving
                .default_model,
            None
        );
        let err = format!(
            "{:#}",
            parse_all(
                &format!("{served}[escalation]\ndefault_model = \"tiny\"\n"),
                Path::new(".")
            )
            .unwrap_err()
        );
        assert!(err.contains("escalation.default_model"), "{err}");
    }

    #[test]
    fn an_upload_stream_is_recorded_after_the_quiet_it_sets() {
        let quiet = |text: &str| {
            parse_all(text, Path::new("."))
                .map(|c| c.serving.adapters.record_when_quiet)
                .map_err(|e| format!("{e:#}"))
        };
        assert_eq!(quiet(""), Ok(Duration::from_millis(500)));
        assert_eq!(
            quiet("[adapters]\nrecord_when_quiet = \"60s\""),
            Ok(Duration::from_secs(60))
        );
        let err = quiet("[adapters]\nrecord_when_quiet = \"0s\"").unwrap_err();
        assert!(err.contains("adapters.record_when_quiet"), "{err}");
    }
}
