//! `synesis demo`: the whole product on this machine, in one command.
//!
//! A cloud on loopback in this process (the `synesis-cloud` library: SQLite in a temporary
//! directory, models answered in process by llama.cpp), an account, devices in their own homes
//! under that directory, and each step run with this very binary as a person would type it
//! (`synesis --json …` in a child process), its figures printed as it ends:
//!
//! 1. the cloud and its account; a device enrolled with a setup token, credited with a voucher,
//!    its tunnel service started;
//! 2. a local answer (route, tokens/s);
//! 3. an escalated answer (the policy's reason, time to first token, cost);
//! 4. a LoRA adapter pushed and asked with (`cloud ask --lora`);
//! 5. an invitation accepted on a second device and a commenter's ask under its quota;
//! 6. `synesis usage`: local answers and the cloud cost they avoided, cloud charges;
//! 7. a clean shutdown: the service stopped, the cloud drained, nothing left running, the
//!    directory removed (`--keep DIR` keeps it and prints how to go on by hand).
//!
//! Nothing here is a stand-in: every step is the real command on the real cloud. The model is a
//! real one when this device has one (or `--model` names one: a registered name, a GGUF path,
//! or anything `synesis model pull` takes); else the tiny one, saying so. Adapters must match
//! their base model, and the only one that ships is for the tiny model: so the cloud serves the
//! tiny model too, and step 4 uses it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::{Value, json};
use synesis_infer::tiny::{TinySpec, write_lora, write_model};

use super::Output;
use crate::cli::DemoArgs;
use crate::paths::Paths;
use crate::registry::Config;

/// Where the steps' commands run: the demo's directory, one home per device.
struct Demo {
    dir: PathBuf,
    /// The real model the cloud's `house` and the device answer with (`None`: the tiny one).
    real_model: Option<PathBuf>,
    exe: PathBuf,
    json: bool,
    steps: Vec<Step>,
}

#[derive(Debug, Serialize)]
struct Step {
    step: &'static str,
    ok: bool,
    /// One line for a person.
    summary: String,
    /// The step's figures.
    figures: Value,
}

/// The model the demo runs, and why that one.
#[derive(Debug, Serialize)]
struct Chosen {
    path: PathBuf,
    /// A real model (not the tiny random one).
    real: bool,
    why: String,
}

const ACCOUNT: &str = "demo";
const OWNER_HOME: &str = "ada";
const MEMBER_HOME: &str = "carl";
const MEMBER: &str = "carl@example.com";
/// The commenter's monthly quota (tokens).
const MEMBER_QUOTA: u64 = 2_000;
const VOUCHER_MICRO_USD: i64 = 5_000_000;
/// A prompt a base model continues sensibly as well as an instruct one answers it.
const PROMPT: &str = "Here is a short explanation of why the sky is blue:";
const TOKENS: &str = "24";

pub(crate) async fn run(out: &Output, paths: &Paths, args: &DemoArgs) -> anyhow::Result<()> {
    let (dir, kept) = match &args.keep {
        Some(dir) => {
            if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
                bail!(
                    "{} is not empty: --keep takes a new or empty directory",
                    dir.display()
                );
            }
            crate::secure_fs::private_dir(dir)?;
            (std::fs::canonicalize(dir)?, true)
        }
        None => {
            let dir =
                std::env::temp_dir().join(format!("synesis-demo-{:016x}", rand::random::<u64>()));
            crate::secure_fs::private_dir(&dir)?;
            (dir, false)
        }
    };
    let mut demo = Demo {
        exe: std::env::current_exe().context("cannot find this program's own path")?,
        dir,
        real_model: None,
        json: out.json(),
        steps: Vec::new(),
    };
    let chosen = match choose_model(paths, args.model.as_deref()).await {
        Ok(c) => c,
        Err(e) => {
            if !kept {
                let _ = std::fs::remove_dir_all(&demo.dir);
            }
            return Err(e);
        }
    };
    demo.real_model = chosen.real.then(|| chosen.path.clone());
    demo.say(&format!(
        "synesis demo: {}{}; working in {}",
        if chosen.real {
            format!("{}: ", chosen.path.display())
        } else {
            String::new()
        },
        chosen.why,
        demo.dir.display()
    ));

    let started = Instant::now();
    let (cloud, result) = demo.steps_before_shutdown(&chosen).await;
    let addr = cloud.as_ref().map(synesis_cloud::endpoint::Cloud::addr);
    let stopped = demo.shutdown(cloud, kept).await;
    let failed = result.err().or(stopped.err());
    #[derive(Serialize)]
    struct Report<'a> {
        ok: bool,
        model: &'a Chosen,
        steps: &'a [Step],
        seconds: f64,
        /// The directory, when `--keep` kept it.
        kept: Option<&'a Path>,
        error: Option<String>,
    }
    let report = Report {
        ok: failed.is_none(),
        model: &chosen,
        steps: &demo.steps,
        seconds: started.elapsed().as_secs_f64(),
        kept: kept.then_some(demo.dir.as_path()),
        error: failed.as_ref().map(|e| format!("{e:#}")),
    };
    out.report(&report, || {
        let mut text = match &failed {
            None => format!(
                "synesis demo: every step held, in {:.1} s\n",
                started.elapsed().as_secs_f64()
            ),
            Some(_) => String::new(),
        };
        if kept && let Some(addr) = addr {
            text.push_str(&continue_by_hand(&demo.dir, addr));
        }
        text
    })?;
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The commands to go on by hand in a kept directory.
fn continue_by_hand(dir: &Path, addr: std::net::SocketAddr) -> String {
    let d = dir.display();
    format!(
        "\nKept in {d}. To go on by hand (the devices dial {addr}, so the cloud listens there again):\n\
         \x20 synesis-cloud serve --listen {addr} --data-dir {d}/cloud --config {d}/cloud.toml &\n\
         \x20 export SYNESIS_HOME={d}/{OWNER_HOME}\n\
         \x20 synesis tunnel start && synesis cloud status\n\
         \x20 synesis ask --explain \"{PROMPT}\"\n\
         \x20 synesis cloud usage\n\
         \x20 SYNESIS_HOME={d}/{MEMBER_HOME} synesis cloud ask \"{PROMPT}\"\n\
         \x20 synesis-cloud admin --data-dir {d}/cloud --config {d}/cloud.toml usage {ACCOUNT}\n"
    )
}

/// The demo's model: `--model` (a registered name, a GGUF file, or something to pull), else this
/// device's real default model, else any real model registered here, else the tiny one.
async fn choose_model(paths: &Paths, wanted: Option<&str>) -> anyhow::Result<Chosen> {
    let config = Config::load(&paths.config_file())?;
    if let Some(wanted) = wanted {
        if let Some(entry) = config.models.get(wanted) {
            return Ok(Chosen {
                path: entry.path.clone(),
                real: !entry.tiny,
                why: format!("--model {wanted}, registered here"),
            });
        }
        let path = Path::new(wanted);
        if path.is_file() {
            return Ok(Chosen {
                path: std::fs::canonicalize(path)?,
                real: true,
                why: "--model, a GGUF file".into(),
            });
        }
        let reference = crate::pull::Reference::parse(wanted).with_context(|| {
            format!("--model {wanted:?} is not a registered model, a file, or a model to pull")
        })?;
        eprintln!("synesis demo: pulling {wanted} first (`synesis model pull`)");
        let fetched = crate::pull::fetch(paths, &reference, crate::pull::Progress::Stderr).await?;
        return Ok(Chosen {
            path: fetched.path,
            real: true,
            why: format!("--model {wanted}, pulled (SHA-256 checked)"),
        });
    }
    let default = config
        .default_model
        .as_deref()
        .and_then(|n| config.models.get(n).map(|e| (n, e)));
    let real = default.filter(|(_, e)| !e.tiny).or_else(|| {
        config
            .models
            .iter()
            .find(|(_, e)| !e.tiny)
            .map(|(n, e)| (n.as_str(), e))
    });
    Ok(match real {
        Some((name, entry)) => Chosen {
            path: entry.path.clone(),
            real: true,
            why: format!("{name}, a real model registered on this device"),
        },
        None => Chosen {
            path: PathBuf::new(),
            real: false,
            why: "the tiny model: random weights, so its text is noise; no real model is \
                  registered here (`synesis model pull gemma3:270m`, then `synesis demo` uses it)"
                .into(),
        },
    })
}

impl Demo {
    fn say(&self, line: &str) {
        if !self.json {
            eprintln!("{line}");
        }
    }

    fn home(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `synesis --json ARGS…` in device home `home`, with `env`: its JSON output, or an error
    /// that carries its stderr.
    async fn synesis(
        &self,
        home: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Value> {
        let mut cmd = tokio::process::Command::new(&self.exe);
        for var in [
            "SYNESIS_CONFIG_DIR",
            "SYNESIS_DATA_DIR",
            "SYNESIS_RUNTIME_DIR",
            "SYNESIS_ACCOUNT",
            "SYNESIS_MIN_CONFIDENCE",
            "SYNESIS_CASCADE_TOKENS",
            "HF_ENDPOINT",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("SYNESIS_HOME", self.home(home))
            .arg("--json")
            .args(args)
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let output = cmd
            .output()
            .await
            .with_context(|| format!("cannot run {}", self.exe.display()))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            let last = stderr.trim().lines().last().unwrap_or("").trim();
            bail!("`synesis {}` failed: {last}", args.join(" "));
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout.trim().lines().last().unwrap_or("null");
        serde_json::from_str(line)
            .with_context(|| format!("`synesis {}` printed no JSON: {stdout}", args.join(" ")))
    }

    /// Records a finished step and prints its line.
    fn record(&mut self, step: &'static str, summary: String, figures: Value) {
        self.say(&format!("  ok  {step:<16} {summary}"));
        self.steps.push(Step {
            step,
            ok: true,
            summary,
            figures,
        });
    }

    fn record_failure(&mut self, step: &'static str, error: &anyhow::Error) {
        let summary = format!("{error:#}");
        self.say(&format!("  FAILED {step:<13} {summary}"));
        self.steps.push(Step {
            step,
            ok: false,
            summary,
            figures: Value::Null,
        });
    }

    /// Steps 1 to 6. Returns the cloud (for the shutdown) whatever happened.
    async fn steps_before_shutdown(
        &mut self,
        chosen: &Chosen,
    ) -> (Option<synesis_cloud::endpoint::Cloud>, anyhow::Result<()>) {
        let cloud = match self.start_cloud(chosen).await {
            Ok(c) => c,
            Err(e) => {
                self.record_failure("cloud", &e);
                return (None, Err(e.context("the demo failed at its step `cloud`")));
            }
        };
        let result = self.steps_on(&cloud).await;
        (Some(cloud), result)
    }

    async fn steps_on(&mut self, cloud: &synesis_cloud::endpoint::Cloud) -> anyhow::Result<()> {
        macro_rules! step {
            ($name:literal, $body:expr) => {
                match $body {
                    Ok((summary, figures)) => self.record($name, summary, figures),
                    Err(e) => {
                        self.record_failure($name, &e);
                        return Err(e.context(concat!(
                            "the demo failed at its step `",
                            $name,
                            "`"
                        )));
                    }
                }
            };
        }
        step!("device", self.enroll(cloud.addr()).await);
        step!("local answer", self.local_answer().await);
        step!("escalation", self.escalation().await);
        step!("adapter", self.adapter().await);
        step!("invitation", self.invitation().await);
        step!("usage", self.usage().await);
        Ok(())
    }

    /// The cloud in this process: its models and prices in `cloud.toml`, SQLite in `cloud/`.
    async fn start_cloud(
        &mut self,
        chosen: &Chosen,
    ) -> anyhow::Result<synesis_cloud::endpoint::Cloud> {
        let files = self.dir.join("files");
        crate::secure_fs::private_dir(&files)?;
        let tiny = files.join("tiny.gguf");
        write_model(&tiny, TinySpec::TINY).context("cannot write the tiny model")?;
        write_lora(&files.join("style.gguf"), TinySpec::TINY, 7)
            .context("cannot write the tiny adapter")?;
        let (house, context) = if chosen.real {
            (chosen.path.clone(), 4096)
        } else {
            (tiny.clone(), 256)
        };
        let toml = format!(
            "[escalation]\ndefault_model = \"house\"\n\n\
             [prices.house]\ninput_usd_per_mtok = \"0.50\"\noutput_usd_per_mtok = \"1.50\"\n\
             [models.house]\nprovider = \"llama\"\npath = {house:?}\ncontext = {context}\n\n\
             [prices.tiny]\ninput_usd_per_mtok = \"0.10\"\noutput_usd_per_mtok = \"0.20\"\n\
             [models.tiny]\nprovider = \"llama\"\npath = {tiny:?}\ncontext = 256\nthreads = 1\n",
            house = house.display().to_string(),
            tiny = tiny.display().to_string(),
        );
        let config_file = self.dir.join("cloud.toml");
        std::fs::write(&config_file, toml)?;
        let data_dir = self.dir.join("cloud");
        let config = synesis_cloud::config::load(Some(&config_file), &data_dir)?;
        let started = Instant::now();
        let cloud = synesis_cloud::endpoint::start(synesis_cloud::endpoint::Options {
            listen: "127.0.0.1:0".parse()?,
            data_dir,
            drain_window: Duration::from_secs(1),
            drain_grace: Duration::from_secs(2),
            billing: config.billing,
            serving: config.serving,
            cert_lifetime: Duration::from_secs(90 * 24 * 3600),
            database: None,
            metrics_listen: None,
            advertise: None,
        })
        .await
        .context("the cloud did not start")?;
        self.record(
            "cloud",
            format!(
                "listening on {} (QUIC), SQLite in {}/cloud, models house and tiny in process, \
                 started in {} ms",
                cloud.addr(),
                self.dir.display(),
                started.elapsed().as_millis()
            ),
            json!({ "addr": cloud.addr().to_string(), "models": ["house", "tiny"],
                    "start_ms": started.elapsed().as_millis() }),
        );
        Ok(cloud)
    }

    /// An account (Managed), a setup token, a voucher; a device enrolled with them and its
    /// service started.
    async fn enroll(&self, addr: std::net::SocketAddr) -> anyhow::Result<(String, Value)> {
        use synesis_proto::message::Tier;
        let data_dir = synesis_cloud::admin::Place::dir(&self.dir.join("cloud"));
        synesis_cloud::admin::account_new(&data_dir, ACCOUNT, Tier::Managed)?;
        let token = synesis_cloud::admin::token_issue(
            &data_dir,
            ACCOUNT,
            None,
            Duration::from_secs(3600),
            Some(addr.to_string()),
        )?
        .to_string();
        let voucher = synesis_cloud::admin::vouchers_new(
            &data_dir,
            synesis_proto::MicroUsd(VOUCHER_MICRO_USD),
            1,
        )?
        .remove(0);
        // The device's own model, and settings that keep the demo's routes the policy's own:
        // this machine is busy running the demo, so load does not decide them.
        let model = self.dir.join("files").join("device.gguf");
        let source = match &self.real_model {
            Some(real) => real.clone(),
            None => self.dir.join("files").join("tiny.gguf"),
        };
        std::fs::copy(&source, &model).context("cannot copy the model for the device")?;
        self.synesis(
            OWNER_HOME,
            &[
                "model",
                "add",
                &model.display().to_string(),
                "--name",
                "local",
            ],
            &[],
        )
        .await?;
        let config = self.home(OWNER_HOME).join("config").join("config.toml");
        let mut text = std::fs::read_to_string(&config)?;
        text.push_str("\n[escalation]\nstress_cpu_percent = 100.0\nstress_memory_percent = 100\n");
        std::fs::write(&config, text)?;

        let login = self
            .synesis(OWNER_HOME, &["cloud", "login", &token], &[])
            .await?;
        let topup = self
            .synesis(OWNER_HOME, &["cloud", "topup", "--voucher", &voucher], &[])
            .await?;
        let service = self.synesis(OWNER_HOME, &["tunnel", "start"], &[]).await?;
        Ok((
            format!(
                "account {ACCOUNT} (Managed), device {} enrolled with a setup token, voucher \
                 redeemed: balance {}, tunnel service {} (pid {})",
                short(&login["device_id"]),
                usd(&topup["balance_micro_usd"]),
                service["state"].as_str().unwrap_or("?"),
                service["pid"]
            ),
            json!({ "device_id": login["device_id"], "balance_micro_usd": topup["balance_micro_usd"],
                    "service_pid": service["pid"], "state": service["state"] }),
        ))
    }

    async fn local_answer(&self) -> anyhow::Result<(String, Value)> {
        let v = self
            .synesis(
                OWNER_HOME,
                &["ask", "--explain", "--max-tokens", TOKENS, PROMPT],
                &[],
            )
            .await?;
        let route = &v["route"];
        if route["decision"] != "local" {
            bail!("the policy sent it to the cloud ({})", route["code"]);
        }
        Ok((
            format!(
                "route local ({}), {} tokens at {:.1} tokens/s, first token in {:.0} ms: {:?}",
                route["code"].as_str().unwrap_or("?"),
                v["completion_tokens"],
                v["tokens_per_second"].as_f64().unwrap_or(0.0),
                v["ttft_ms"].as_f64().unwrap_or(0.0),
                clip(v["text"].as_str().unwrap_or(""))
            ),
            json!({ "route": route["decision"], "reason": route["code"],
                    "completion_tokens": v["completion_tokens"],
                    "tokens_per_second": v["tokens_per_second"], "ttft_ms": v["ttft_ms"],
                    "mean_logprob": v["mean_logprob"], "text": v["text"] }),
        ))
    }

    /// The policy escalates when the first tokens' confidence is under its threshold: the demo
    /// sets the threshold just under 0 for this one ask, so any model escalates.
    async fn escalation(&self) -> anyhow::Result<(String, Value)> {
        let v = self
            .synesis(
                OWNER_HOME,
                &["ask", "--explain", "--max-tokens", TOKENS, PROMPT],
                &[("SYNESIS_MIN_CONFIDENCE", "-0.01")],
            )
            .await?;
        let route = &v["route"];
        if route["decision"] != "cloud" {
            bail!("the policy kept it here ({})", route["code"]);
        }
        Ok((
            format!(
                "route cloud: {} (the demo's threshold -0.01; the default -3.0 keeps most \
                 answers here); {} tokens streamed from model {}, first token {:.0} ms after the \
                 {:.0} ms local check; cost {} (Managed: the model's price + 3 %)",
                route["reasons"][0].as_str().unwrap_or("?"),
                v["output_tokens"],
                v["model"].as_str().unwrap_or("?"),
                v["ttft_ms"].as_f64().unwrap_or(0.0),
                route["cascade_ms"].as_f64().unwrap_or(0.0),
                usd(&v["total_micro_usd"])
            ),
            json!({ "route": route["decision"], "reason": route["code"],
                    "cascade_ms": route["cascade_ms"], "ttft_ms": v["ttft_ms"],
                    "output_tokens": v["output_tokens"], "cost": v["cost"], "model": v["model"] }),
        ))
    }

    async fn adapter(&self) -> anyhow::Result<(String, Value)> {
        let file = self
            .dir
            .join("files")
            .join("style.gguf")
            .display()
            .to_string();
        let push = self
            .synesis(
                OWNER_HOME,
                &["cloud", "push", &file, "--name", "style", "--base", "tiny"],
                &[],
            )
            .await?;
        let asked = self
            .synesis(
                OWNER_HOME,
                &[
                    "cloud",
                    "ask",
                    "--model",
                    "tiny",
                    "--lora",
                    "style",
                    "--max-tokens",
                    "8",
                    PROMPT,
                ],
                &[],
            )
            .await?;
        Ok((
            format!(
                "pushed style ({} bytes, sha256 {}…) in {:.0} ms, serving: {}; cloud ask --lora \
                 style: {} tokens, cost {} (adapters match their base: this one is for the \
                 tiny model)",
                push["bytes"],
                push["sha256"]
                    .as_str()
                    .unwrap_or("?")
                    .get(..12)
                    .unwrap_or("?"),
                push["seconds"].as_f64().unwrap_or(0.0) * 1000.0,
                push["serving"],
                asked["output_tokens"],
                usd(&asked["total_micro_usd"])
            ),
            json!({ "push": push, "ask": { "output_tokens": asked["output_tokens"],
                    "cost": asked["cost"], "lora": "style" } }),
        ))
    }

    async fn invitation(&self) -> anyhow::Result<(String, Value)> {
        let quota = MEMBER_QUOTA.to_string();
        let invite = self
            .synesis(
                OWNER_HOME,
                &[
                    "cloud",
                    "invite",
                    MEMBER,
                    "--role",
                    "commenter",
                    "--quota",
                    &quota,
                ],
                &[],
            )
            .await?;
        let code = invite["code"]
            .as_str()
            .context("the invitation printed no code")?;
        self.synesis(MEMBER_HOME, &["cloud", "accept", code], &[])
            .await?;
        let asked = self
            .synesis(
                MEMBER_HOME,
                &["cloud", "ask", "--max-tokens", "8", PROMPT],
                &[],
            )
            .await?;
        let used = asked["input_tokens"].as_u64().unwrap_or(0)
            + asked["output_tokens"].as_u64().unwrap_or(0);
        Ok((
            format!(
                "{MEMBER} invited as commenter with a {MEMBER_QUOTA}-token quota, accepted on a \
                 second device; their ask used {used} tokens ({} left), cost {} to the account",
                MEMBER_QUOTA.saturating_sub(used),
                usd(&asked["total_micro_usd"])
            ),
            json!({ "role": "commenter", "quota_tokens": MEMBER_QUOTA, "tokens_used": used,
                    "cost": asked["cost"] }),
        ))
    }

    async fn usage(&self) -> anyhow::Result<(String, Value)> {
        let v = self.synesis(OWNER_HOME, &["usage"], &[]).await?;
        let local = &v["local"];
        let cloud = &v["cloud"];
        Ok((
            format!(
                "this device: local answers {} ({} tokens out), which would have cost {} in the \
                 cloud; cloud charges {}, {}",
                local["generations"],
                local["output_tokens"],
                usd(&local["cloud_cost_avoided_micro_usd"]),
                cloud["charges"],
                usd(&cloud["total_micro_usd"])
            ),
            v,
        ))
    }

    /// Step 7, whatever happened before: the service stopped, the cloud drained, the
    /// directory removed unless kept.
    async fn shutdown(
        &mut self,
        cloud: Option<synesis_cloud::endpoint::Cloud>,
        kept: bool,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let service = self
            .steps
            .iter()
            .find(|s| s.step == "device")
            .and_then(|s| s.figures["service_pid"].as_i64());
        let stopped = if self.home(OWNER_HOME).exists() {
            self.synesis(OWNER_HOME, &["tunnel", "stop"], &[])
                .await
                .ok()
        } else {
            None
        };
        if let Some(cloud) = cloud {
            cloud.shutdown().await;
        }
        let pid = stopped.as_ref().and_then(|s| s["pid"].as_i64()).or(service);
        // `tunnel stop` returns once the service has stopped; give the kernel a moment.
        let mut running = pid.is_some_and(alive);
        for _ in 0..20 {
            if !running {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            running = pid.is_some_and(alive);
        }
        let removed = !kept && std::fs::remove_dir_all(&self.dir).is_ok();
        let result = if running {
            Err(anyhow::anyhow!(
                "the tunnel service (pid {}) is still running",
                pid.unwrap_or_default()
            ))
        } else {
            Ok(())
        };
        match &result {
            Ok(()) => self.record(
                "shutdown",
                format!(
                    "service stopped, cloud drained in {} ms, nothing left running; {}",
                    started.elapsed().as_millis(),
                    if kept {
                        format!("kept {}", self.dir.display())
                    } else if removed {
                        format!("{} removed", self.dir.display())
                    } else {
                        format!("{} could not be removed", self.dir.display())
                    }
                ),
                json!({ "left_running": running, "removed": removed, "kept": kept,
                        "ms": started.elapsed().as_millis() }),
            ),
            Err(e) => self.record_failure("shutdown", e),
        }
        result
    }
}

/// Whether process `pid` still runs (a zombie, exited but not yet reaped by its parent, does
/// not: where no init reaps orphans, as in some containers, the service's stays one).
fn alive(pid: i64) -> bool {
    let exists = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .is_some_and(|p| rustix::process::test_kill_process(p).is_ok());
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
    });
    exists && !zombie
}

fn usd(v: &Value) -> String {
    match v.as_i64() {
        Some(micro) => format!("${}", synesis_proto::MicroUsd(micro)),
        None => "?".into(),
    }
}

fn short(v: &Value) -> String {
    v.as_str()
        .map_or("?".into(), |s| s.chars().take(13).collect())
}

/// The start of a text, on one line.
fn clip(text: &str) -> String {
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(60) {
        Some((at, _)) => format!("{}…", &one_line[..at]),
        None => one_line,
    }
}
