//! The one decision path of `synesis ask` and the HTTP API's chat completions: what the
//! local-first policy (`synesis-route`) reads is gathered here ([`gather`]), the cloud model is
//! chosen here ([`cloud_model`]), and whether a refused escalation falls back to this device is
//! decided here ([`fall_back`]).
//!
//! What the device knows of its cloud account — the models the cloud serves to it, its default,
//! the balance, holds and quota — is [`CloudFacts`]: the tunnel service asks the cloud for it
//! when it connects and every [`FACTS_REFRESH_EVERY`] on its connection, and keeps it in
//! `$RUNTIME/cloud.json`, which every command reads. So a request's policy knows the account's
//! standing without a round trip of its own; facts older than [`FACTS_FRESH_FOR`] are not used
//! for it (without a service, the standing is unknown and the cloud's own refusal decides).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use serde::{Deserialize, Serialize};
use synesis_proto::message::{
    PriceReply, PriceRequest, ServedModel, Tier, UsageReply, UsageRequest,
};
use synesis_proto::{DeviceId, Message, MicroUsd, UnixMillis};
use synesis_route::{CloudReach, Inputs, LocalModel, Mode, Standing};
use synesis_tunnel::clock::{new_request_id, unix_now};
use synesis_tunnel::local::LocalClient;
use synesis_tunnel::{Identity, RequestError, TunnelState};

use crate::paths::Paths;
use crate::registry::Config;

/// Where the policy reads how stressed this device is: one vitals sampler, made on first use
/// and kept. A CPU usage figure needs two readings of the counters some time apart
/// ([`synesis_vitals::CPU_READING_INTERVAL_MIN`], 200 ms): a kept sampler pays that wait once
/// (a service warms it when it starts, [`StressGauge::warm`]), and every later reading covers
/// the time since the one before, with no wait. Made for one command (`synesis ask`), it waits
/// once.
#[derive(Debug)]
pub(crate) struct StressGauge {
    data_dir: PathBuf,
    /// `None` until first used, and when the vitals cannot be read.
    sampler: std::sync::Mutex<Option<synesis_vitals::SystemSampler>>,
}

impl StressGauge {
    pub(crate) fn new(paths: &Paths) -> std::sync::Arc<StressGauge> {
        std::sync::Arc::new(StressGauge {
            data_dir: paths.data.path.clone(),
            sampler: std::sync::Mutex::new(None),
        })
    }

    /// Takes the first reading now, off the caller's path (a service, as it starts).
    pub(crate) fn warm(self: &std::sync::Arc<Self>, config: &Config) {
        let (gauge, config) = (std::sync::Arc::clone(self), config.clone());
        tokio::task::spawn_blocking(move || gauge.reasons(&config));
    }

    /// The device's stress now, by the config's thresholds (none when the vitals cannot be
    /// read). Blocks: the first reading waits for the CPU counters.
    pub(crate) fn reasons(
        &self,
        config: &Config,
    ) -> anyhow::Result<Vec<synesis_vitals::StressReason>> {
        use synesis_vitals::VitalsSource;
        let limits = config.escalation.stress()?;
        let mut sampler = self
            .sampler
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if sampler.is_none() {
            match synesis_vitals::SystemSampler::new(&self.data_dir) {
                Ok(made) => *sampler = Some(made),
                Err(e) => tracing::warn!("vitals cannot be read: {e}"),
            }
        }
        Ok(sampler.as_mut().map_or_else(Vec::new, |s| {
            synesis_vitals::assess(&s.sample(), &limits).reasons
        }))
    }
}

/// The file, in the runtime directory, where the service keeps what it last heard.
pub(crate) const FACTS_FILE: &str = "cloud.json";
/// How often the service asks the cloud again while connected.
pub(crate) const FACTS_REFRESH_EVERY: Duration = Duration::from_secs(15);
/// Facts older than this are not used for the account's standing (a service that lost its
/// connection stops refreshing them).
pub(crate) const FACTS_FRESH_FOR: Duration = Duration::from_secs(60);
const _: () = assert!(FACTS_FRESH_FOR.as_millis() >= 2 * FACTS_REFRESH_EVERY.as_millis());

/// What the cloud last said about this device's account: one price reply and one usage reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct CloudFacts {
    /// The identity the facts were asked with (a device in two accounts has two).
    pub(crate) device_id: DeviceId,
    pub(crate) fetched_at: UnixMillis,
    pub(crate) tier: Tier,
    pub(crate) markup_bps: u32,
    pub(crate) served: Vec<ServedModel>,
    pub(crate) default_model: Option<String>,
    pub(crate) balance: MicroUsd,
    pub(crate) held: MicroUsd,
    pub(crate) quota_tokens: u64,
    pub(crate) quota_tokens_used: u64,
}

impl CloudFacts {
    pub(crate) fn of(
        device_id: DeviceId,
        fetched_at: UnixMillis,
        price: PriceReply,
        usage: &UsageReply,
    ) -> CloudFacts {
        CloudFacts {
            device_id,
            fetched_at,
            tier: price.tier,
            markup_bps: price.markup_bps,
            served: price.served,
            default_model: price.default_model,
            balance: usage.balance,
            held: usage.held,
            quota_tokens: usage.quota_tokens,
            quota_tokens_used: usage.quota_tokens_used,
        }
    }

    /// The account's standing for a request of `prompt_tokens` plus up to `max_tokens` to
    /// `model`, as of `now`: `None` when these facts are too old to go by. The hold is the
    /// cloud's own arithmetic (`synesis_billing::quote`) on the prices it sent.
    pub(crate) fn standing(
        &self,
        now: UnixMillis,
        model: Option<&str>,
        prompt_tokens: u64,
        max_tokens: u32,
    ) -> Option<Standing> {
        let age_ms = now.0.saturating_sub(self.fetched_at.0);
        let fresh_ms = i64::try_from(FACTS_FRESH_FOR.as_millis()).unwrap_or(i64::MAX);
        if !(0..=fresh_ms).contains(&age_ms) {
            return None;
        }
        if self.tier == Tier::Free {
            return Some(Standing {
                quota_tokens_left: Some(self.quota_tokens.saturating_sub(self.quota_tokens_used)),
                ..Standing::default()
            });
        }
        let hold = model
            .and_then(|m| self.served.iter().find(|s| s.model == m))
            .and_then(|s| {
                let mut prices = synesis_billing::PriceTable::empty();
                prices.set(
                    &s.model,
                    synesis_billing::ModelPrice {
                        input_per_mtok: s.input_per_mtok,
                        output_per_mtok: s.output_per_mtok,
                    },
                );
                let rules = synesis_billing::TierRules {
                    managed_markup_bps: self.markup_bps,
                    byok_fee_bps: self.markup_bps,
                    ..synesis_billing::TierRules::default()
                };
                let usage = synesis_billing::Usage {
                    input_tokens: prompt_tokens,
                    output_tokens: u64::from(max_tokens),
                };
                synesis_billing::quote(self.tier, &s.model, usage, &prices, &rules).ok()
            })
            .map(|q| q.total.0);
        Some(Standing {
            quota_tokens_left: None,
            available_micro_usd: Some(self.balance.0.saturating_sub(self.held.0)),
            hold_micro_usd: hold,
        })
    }
}

pub(crate) fn facts_file(paths: &Paths) -> PathBuf {
    paths.runtime.path.join(FACTS_FILE)
}

/// The facts the service keeps, when they are `device`'s (absent, unreadable or another
/// identity's: `None`).
pub(crate) fn load_facts(paths: &Paths, device: DeviceId) -> Option<CloudFacts> {
    let text = std::fs::read(facts_file(paths)).ok()?;
    serde_json::from_slice::<CloudFacts>(&text)
        .ok()
        .filter(|f| f.device_id == device)
}

/// Replaces the facts file whole (written aside, then renamed: a reader never sees half). It
/// holds the account's balance, so it is its owner's alone (0600), whatever the umask.
pub(crate) fn save_facts(path: &Path, facts: &CloudFacts) -> std::io::Result<()> {
    use std::io::Write as _;
    let aside = path.with_extension("json.new");
    let _ = std::fs::remove_file(&aside);
    let mut file = crate::secure_fs::private_file_options()
        .write(true)
        .create_new(true)
        .open(&aside)?;
    file.write_all(&serde_json::to_vec(facts)?)?;
    drop(file);
    std::fs::rename(&aside, path)
}

/// Asks the cloud for the facts: a price request, then a usage request listing no charges
/// (`since` now). `ask` sends one request and returns the cloud's reply.
pub(crate) async fn fetch_facts<F, Fut>(device_id: DeviceId, ask: F) -> anyhow::Result<CloudFacts>
where
    F: Fn(Message) -> Fut,
    Fut: Future<Output = anyhow::Result<Message>>,
{
    let price = ask(PriceRequest {
        request_id: new_request_id(),
    }
    .into())
    .await?;
    let Message::PriceReply(price) = price else {
        bail!("the cloud answered a price request with {price:?}");
    };
    let now = unix_now();
    let usage = ask(UsageRequest {
        request_id: new_request_id(),
        since: Some(now),
        group_by: None,
        after: None,
    }
    .into())
    .await?;
    let Message::UsageReply(usage) = usage else {
        bail!("the cloud answered a usage request with {usage:?}");
    };
    Ok(CloudFacts::of(device_id, now, price, &usage))
}

/// The cloud model a request goes to: the one named for it, else `[escalation] cloud_model`,
/// else the cloud's default for this account (from `facts`). `None`: none is known yet.
pub(crate) fn cloud_model(
    named: Option<&str>,
    config: &Config,
    facts: Option<&CloudFacts>,
) -> Option<String> {
    named
        .map(str::to_owned)
        .or_else(|| config.escalation.cloud_model.clone())
        .or_else(|| facts.and_then(|f| f.default_model.clone()))
}

/// [`cloud_model`], asking the cloud for its default (one price request, through the service
/// when it runs) when nothing names one and the service keeps no facts.
pub(crate) async fn cloud_model_or_ask(
    paths: &Paths,
    identity: &Identity,
    named: Option<&str>,
    config: &Config,
) -> anyhow::Result<String> {
    let facts = load_facts(paths, identity.info.device_id);
    if let Some(model) = cloud_model(named, config, facts.as_ref()) {
        return Ok(model);
    }
    let asked = PriceRequest {
        request_id: new_request_id(),
    };
    let reply = crate::commands::cloud::account_request(paths, asked.into()).await?;
    let Message::PriceReply(price) = reply else {
        bail!("the cloud answered a price request with {reply:?}");
    };
    match price.default_model {
        Some(model) => Ok(model),
        None => bail!(
            "the cloud serves no model to this account (tier {}); ask its operator",
            price.tier.as_str()
        ),
    }
}

/// The local model that would answer, measured: its context and the prompt's tokens on it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Measured {
    pub(crate) context_tokens: u32,
    pub(crate) prompt_tokens: u64,
}

/// The policy's inputs, and what they were gathered from.
pub(crate) struct Gathered {
    pub(crate) inputs: Inputs,
    /// This device's identity in the account commands act in, when it is enrolled.
    pub(crate) identity: Option<Identity>,
    /// The cloud model the request would go to, when known without asking.
    pub(crate) cloud_model: Option<String>,
}

/// Gathers what the policy reads, for `synesis ask` and the HTTP API alike: the local model
/// (measured by the caller, who loads it its own way), the vitals' stress verdict, whether the
/// cloud can be asked (enrolled; the service connected, or on its way to when this device has
/// no model to answer with), and the account's standing from the
/// service's facts.
pub(crate) async fn gather(
    paths: &Paths,
    config: &Config,
    stress: &std::sync::Arc<StressGauge>,
    mode: Mode,
    local: Option<Measured>,
    max_tokens: u32,
    named_cloud_model: Option<&str>,
) -> anyhow::Result<Gathered> {
    let identity = match paths.identity_home().and_then(|home| Identity::load(&home)) {
        Ok(identity) => identity,
        Err(e) => {
            tracing::warn!("the device identity cannot be read ({e}); staying local");
            None
        }
    };
    let cloud = match &identity {
        None => CloudReach::NotEnrolled,
        Some(me) => match LocalClient::new(&paths.runtime.path).status().await {
            // The service of another account of this device's: a connection of its own.
            Ok(s) if s.device_id != me.info.device_id => CloudReach::Reachable,
            Ok(s) => match s.state {
                TunnelState::Connected => CloudReach::Reachable,
                // A tunnel on its way back: with a model here, local first answers here now
                // (and says why); with none, the cloud is the only way to answer, so it is
                // waited for, up to the service's bound (`--reconnect-wait`), as `cloud ask`
                // waits.
                TunnelState::Connecting | TunnelState::Reconnecting if local.is_none() => {
                    CloudReach::Reachable
                }
                _ => CloudReach::Unreachable,
            },
            // No service: a connection of its own will be tried.
            Err(_) => CloudReach::Reachable,
        },
    };
    let facts = identity
        .as_ref()
        .and_then(|me| load_facts(paths, me.info.device_id));
    let cloud_model = cloud_model(named_cloud_model, config, facts.as_ref());
    let prompt_tokens = local.map_or(0, |m| m.prompt_tokens);
    let standing = facts.as_ref().and_then(|f| {
        f.standing(
            unix_now(),
            cloud_model.as_deref(),
            prompt_tokens,
            max_tokens,
        )
    });
    let stress = {
        let (gauge, config) = (std::sync::Arc::clone(stress), config.clone());
        tokio::task::spawn_blocking(move || gauge.reasons(&config)).await??
    };
    Ok(Gathered {
        inputs: Inputs {
            mode,
            local: local.map(|m| LocalModel {
                context_tokens: m.context_tokens,
            }),
            prompt_tokens,
            max_tokens,
            stress,
            cloud,
            standing,
            confidence: None,
        },
        identity,
        cloud_model,
    })
}

/// Whether a cloud that failed before any output leaves the answer to this device, and why:
/// only when the policy chose (`auto`) and a local model is there.
pub(crate) fn fall_back(mode: Mode, local_ready: bool, failure: &RequestError) -> Option<String> {
    (mode == Mode::Auto && local_ready).then(|| format!("the cloud could not answer ({failure})"))
}

/// How an HTTP request names its model: `auto`; `local/NAME` or `cloud/NAME`, which say where;
/// or a bare `NAME`, this device's model of that name when it has one, else the cloud's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ModelName<'a> {
    Auto,
    Local(&'a str),
    Cloud(&'a str),
    Either(&'a str),
}

/// The prefix that names the cloud's model where this device has one of the same name.
pub(crate) const CLOUD_PREFIX: &str = "cloud/";
pub(crate) const LOCAL_PREFIX: &str = "local/";

impl<'a> ModelName<'a> {
    pub(crate) fn parse(name: &'a str) -> ModelName<'a> {
        if name == "auto" {
            ModelName::Auto
        } else if let Some(cloud) = name.strip_prefix(CLOUD_PREFIX) {
            ModelName::Cloud(cloud)
        } else if let Some(local) = name.strip_prefix(LOCAL_PREFIX) {
            ModelName::Local(local)
        } else {
            ModelName::Either(name)
        }
    }
}

/// The names `/v1/models` lists for the cloud's models: each bare, unless this device has a
/// model of that name (which a bare name reaches), then `cloud/NAME`.
pub(crate) fn cloud_names<'a>(
    served: impl IntoIterator<Item = &'a str>,
    local: &'a Config,
) -> Vec<String> {
    served
        .into_iter()
        .map(|m| {
            if local.models.contains_key(m) || m == "auto" {
                format!("{CLOUD_PREFIX}{m}")
            } else {
                m.to_owned()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use super::*;

    fn facts(tier: Tier) -> CloudFacts {
        CloudFacts {
            device_id: "0190f3a2-7c1e-7b3d-9f00-000000000001".parse().unwrap(),
            fetched_at: UnixMillis(1_000_000),
            tier,
            markup_bps: 300,
            served: vec![ServedModel {
                model: "house".into(),
                input_per_mtok: MicroUsd(1_000_000),
                output_per_mtok: MicroUsd(2_000_000),
                context_tokens: Some(4_096),
            }],
            default_model: Some("house".into()),
            balance: MicroUsd(1_000),
            held: MicroUsd(400),
            quota_tokens: 100,
            quota_tokens_used: 70,
        }
    }

    #[test]
    fn the_standing_comes_from_fresh_facts_only() {
        let f = facts(Tier::Managed);
        let now = UnixMillis(1_000_000 + 1_000);
        // 100 in × $1 + 200 out × $2 per million = 500 µUSD, plus 3 % = 515.
        assert_eq!(
            f.standing(now, Some("house"), 100, 200),
            Some(Standing {
                quota_tokens_left: None,
                available_micro_usd: Some(600),
                hold_micro_usd: Some(515),
            })
        );
        assert_eq!(
            f.standing(now, Some("other"), 100, 200)
                .unwrap()
                .hold_micro_usd,
            None,
            "a model the cloud does not serve has no price here"
        );
        let stale = UnixMillis(1_000_000 + 61_000);
        assert_eq!(f.standing(stale, Some("house"), 100, 200), None);
        let free = facts(Tier::Free)
            .standing(now, Some("house"), 1, 1)
            .unwrap();
        assert_eq!(free.quota_tokens_left, Some(30));
        assert_eq!(free.hold_micro_usd, None);
    }

    /// The facts hold the account's balance: the file is its owner's alone, even where the
    /// umask would let others read it, and a reader finds it whole.
    #[test]
    fn the_facts_file_is_its_owners_alone() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FACTS_FILE);
        std::fs::write(path.with_extension("json.new"), b"half").unwrap();
        save_facts(&path, &facts(Tier::Managed)).unwrap();
        save_facts(&path, &facts(Tier::Managed)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back: CloudFacts = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back.device_id, facts(Tier::Managed).device_id);
    }

    #[test]
    fn a_cloud_model_named_like_a_local_one_is_listed_with_its_prefix() {
        let mut config = Config::default();
        config.models.insert(
            "tiny".into(),
            toml::from_str(
                "path = \"/m/tiny.gguf\"\nsize_bytes = 1\nsha256 = \"\"\narchitecture = \"llama\"\ncontext_length = 256",
            )
            .unwrap(),
        );
        assert_eq!(
            cloud_names(["tiny", "house"], &config),
            vec!["cloud/tiny".to_owned(), "house".to_owned()]
        );
        assert_eq!(ModelName::parse("cloud/tiny"), ModelName::Cloud("tiny"));
        assert_eq!(ModelName::parse("local/tiny"), ModelName::Local("tiny"));
        assert_eq!(ModelName::parse("tiny"), ModelName::Either("tiny"));
        assert_eq!(ModelName::parse("auto"), ModelName::Auto);
    }

    #[test]
    fn a_named_model_then_the_config_then_the_clouds_default() {
        let mut config = Config::default();
        let f = facts(Tier::Managed);
        assert_eq!(cloud_model(None, &config, None), None);
        assert_eq!(
            cloud_model(None, &config, Some(&f)).as_deref(),
            Some("house")
        );
        config.escalation.cloud_model = Some("mine".into());
        assert_eq!(
            cloud_model(None, &config, Some(&f)).as_deref(),
            Some("mine")
        );
        assert_eq!(
            cloud_model(Some("asked"), &config, Some(&f)).as_deref(),
            Some("asked")
        );
    }
}
