//! Every command and flag of `synesis`, with the help text a person reads.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::paths::PathOverrides;

const ABOUT: &str = "Local-first AI: answers on this device, escalates to the Synesis cloud when \
the device cannot answer well.";

const AFTER_HELP: &str = "\
Files:
  Config   $XDG_CONFIG_HOME/synesis/config.toml  (~/.config/synesis)
  Data     $XDG_DATA_HOME/synesis/               (~/.local/share/synesis)
  Socket   $XDG_RUNTIME_DIR/synesis/
  SYNESIS_HOME=DIR moves all three under DIR (config/, data/, run/); `synesis paths` shows
  where they are now.

Exit codes: 0 success, 1 failure, 2 bad usage, 3 the tunnel service is not running,
130 stopped by Ctrl-C before the end (`cloud push`: run it again to resume).
Logs: -v, -vv, -vvv, or RUST_LOG (e.g. RUST_LOG=synesis=debug).";

#[derive(Debug, Parser)]
#[command(name = "synesis", version, about = ABOUT, after_help = AFTER_HELP)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: GlobalArgs,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Args)]
pub(crate) struct GlobalArgs {
    /// Print machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    pub(crate) json: bool,

    /// More log output on stderr (-v info, -vv debug, -vvv trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub(crate) verbose: u8,

    /// Keep config, data and the runtime socket under DIR (as DIR/config, DIR/data, DIR/run).
    #[arg(long, env = "SYNESIS_HOME", value_name = "DIR", global = true)]
    pub(crate) home: Option<PathBuf>,

    /// Config directory (overrides SYNESIS_HOME and XDG_CONFIG_HOME).
    #[arg(long, env = "SYNESIS_CONFIG_DIR", value_name = "DIR", global = true)]
    pub(crate) config_dir: Option<PathBuf>,

    /// Data directory: identity, local ledger, models, adapters.
    #[arg(long, env = "SYNESIS_DATA_DIR", value_name = "DIR", global = true)]
    pub(crate) data_dir: Option<PathBuf>,

    /// Runtime directory: the tunnel service's socket.
    #[arg(long, env = "SYNESIS_RUNTIME_DIR", value_name = "DIR", global = true)]
    pub(crate) runtime_dir: Option<PathBuf>,

    /// Act in this account (its name or id) when the device is in more than one
    /// (`synesis cloud accounts`); default: the one `synesis cloud use` chose, else the first.
    #[arg(long, env = "SYNESIS_ACCOUNT", value_name = "ACCOUNT", global = true)]
    pub(crate) account: Option<String>,
}

impl GlobalArgs {
    pub(crate) fn path_overrides(&self) -> PathOverrides {
        PathOverrides {
            home: self.home.clone(),
            config_dir: self.config_dir.clone(),
            data_dir: self.data_dir.clone(),
            runtime_dir: self.runtime_dir.clone(),
            account: self.account.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Ask a question: this device answers when it can, the cloud when it cannot (--explain says why).
    Ask(AskArgs),
    /// The GGUF models this device can run.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// LoRA adapters for those models.
    Lora {
        #[command(subcommand)]
        command: LoraCommand,
    },
    /// Show this device's vitals: CPU, memory, the data disk, temperatures, NVIDIA GPUs.
    Vitals(VitalsArgs),
    /// What AI cost here: answers made on this device, the cloud cost they avoided, cloud charges.
    Usage(UsageArgs),
    /// Enroll this device with a Synesis cloud and ask the running tunnel about it.
    Cloud {
        #[command(subcommand)]
        command: CloudCommand,
    },
    /// Serve the OpenAI-compatible API (and, on an enrolled device, the tunnel service) in the
    /// foreground: `synesis tunnel run --listen 127.0.0.1:11435`.
    Serve(ServeArgs),
    /// Run the tunnel service: keep this device connected to its cloud.
    Tunnel {
        #[command(subcommand)]
        command: TunnelCommand,
    },
    /// Show where Synesis keeps its config, data and runtime files, and why.
    Paths,
    /// The whole product on this machine in one command: a cloud on loopback, an account, a
    /// device, a local answer, an escalation, an adapter push, an invitation, usage, shutdown.
    #[command(after_help = DEMO_HELP)]
    Demo(DemoArgs),
}

const DEMO_HELP: &str = "\
Everything runs here and goes away at the end: the cloud (in this process, SQLite in a temporary
directory, models answered by llama.cpp in process), two devices in their own homes under that
directory (this device's own files are not touched), each step run as the real `synesis`
command. Nothing is downloaded unless --model names something to pull.

The model: --model, else a real model registered on this device (`synesis model pull
gemma3:270m` gets one), else the built-in tiny model (random weights: its text is noise).

Exit status: 0 when every step held; 1 naming the step that failed.

Examples:
  synesis demo
  synesis demo --model gemma3:270m          pulls it first when it is not here yet
  synesis demo --keep /tmp/synesis-demo     keep the cloud's and devices' files to explore
  synesis demo --json | jq '.steps[] | {step, figures}'";

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// The model: a registered name, a GGUF file, or anything `synesis model pull` takes.
    #[arg(long, value_name = "NAME|PATH|REF")]
    pub(crate) model: Option<String>,
    /// Keep the demo's files in DIR (new or empty) and print how to go on by hand.
    #[arg(long, value_name = "DIR")]
    pub(crate) keep: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  synesis model pull gemma3:270m && synesis ask \"Why is the sky blue?\"
  synesis ask \"hello\"                          this device if it can, else the cloud
  synesis ask --explain \"hello\"                the same, and why (on stderr)
  synesis model add --tiny demo && synesis ask --local \"hello\"
  echo \"summarise this\" | synesis ask --local -
  synesis ask --local --lora legal:0.5 --max-tokens 64 --json \"hello\"

The policy: the cloud when there is no local model, the prompt and --max-tokens do not fit the
local context, the device is stressed (CPU, memory, GPU), or the first 16 tokens' mean
log-probability is under -3.0 (generated here, not shown, then the answer goes on here or in the
cloud); this device when the cloud is not enrolled or unreachable, or refuses (quota, balance).
Thresholds: config.toml [escalation] min_confidence, cascade_tokens, cloud_model,
stress_cpu_percent, stress_memory_percent; the variables SYNESIS_MIN_CONFIDENCE,
SYNESIS_CASCADE_TOKENS, SYNESIS_STRESS_CPU_PERCENT and SYNESIS_STRESS_MEMORY_PERCENT override them
for one run.
Ctrl-C stops the answer where it is (finish_reason \"cancelled\").")]
pub(crate) struct AskArgs {
    /// The prompt; `-` reads it from stdin.
    pub(crate) prompt: String,
    /// Answer on this device only (an error when it cannot).
    #[arg(long, conflicts_with = "cloud")]
    pub(crate) local: bool,
    /// Ask the cloud, whatever this device could do.
    #[arg(long)]
    pub(crate) cloud: bool,
    /// Say on stderr which way the answer goes and why, with the figures behind it.
    #[arg(long)]
    pub(crate) explain: bool,
    /// The cloud model to escalate to (default: config.toml [escalation] cloud_model, else tiny).
    #[arg(long)]
    pub(crate) cloud_model: Option<String>,
    /// A registered model (default: the default model).
    #[arg(long)]
    pub(crate) model: Option<String>,
    /// A registered adapter to attach, with an optional scale: NAME or NAME:SCALE.
    #[arg(long, value_parser = crate::commands::ask::parse_lora)]
    pub(crate) lora: Option<(String, f32)>,
    /// The most tokens to generate.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub(crate) max_tokens: u32,
    /// Sampling temperature; 0 is greedy (deterministic).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) temperature: f32,
    /// Seed for sampling (with a temperature above 0).
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u32,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ModelCommand {
    /// Register a GGUF model (it is loaded once to check it), or write a tiny one with --tiny.
    Add(ModelAddArgs),
    /// Download a model by name from Hugging Face (or any https:// URL), verify it, register it.
    #[command(after_help = PULL_HELP)]
    Pull(ModelPullArgs),
    /// The registered models; `*` marks the default.
    List,
    /// Forget a model (a file Synesis wrote or pulled is deleted once no name points to it).
    Rm { name: String },
    /// Make a registered model the default for `synesis ask`.
    Default { name: String },
}

const PULL_HELP: &str = "\
REF is one of:
  a short name     gemma3:270m, …  (`synesis model pull --list` shows them: pinned files,
                   size and SHA-256 checked)
  OWNER/REPO:QUANT a Hugging Face repository and a quantisation, as llama.cpp's -hf takes it
                   (hf.co/OWNER/REPO:QUANT as Ollama does; QUANT defaults to Q4_K_M)
  hf:OWNER/REPO/FILE.gguf   one file of a repository
  https://…        any URL of a GGUF file

The file's SHA-256 is checked against the one the Hub publishes (X-Linked-Etag) before the model
is registered. Ctrl-C or a cut connection keeps what arrived: the same command again resumes it.
Files are stored once by content under the data directory (models/blobs/); `synesis model rm`
deletes one when no name points to it.

Environment:
  HF_TOKEN     an access token, for gated or private repositories
  HF_ENDPOINT  another Hub (a mirror); default https://huggingface.co

Examples:
  synesis model pull gemma3:270m
  synesis model pull ggml-org/gemma-3-270m-it-GGUF:Q8_0 --name gemma
  synesis ask --model gemma \"Why is the sky blue?\"";

#[derive(Debug, Args)]
pub(crate) struct ModelPullArgs {
    /// What to pull (see below).
    #[arg(required_unless_present = "list")]
    pub(crate) reference: Option<String>,
    /// The name to register it under (default: the short name, else the file name).
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// List the short names and what each pulls, and exit.
    #[arg(long, conflicts_with_all = ["reference", "name"])]
    pub(crate) list: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ModelAddArgs {
    /// The GGUF file.
    #[arg(required_unless_present = "tiny", conflicts_with = "tiny")]
    pub(crate) path: Option<PathBuf>,
    /// The name to use (default: the file name without .gguf).
    #[arg(long, conflicts_with = "tiny")]
    pub(crate) name: Option<String>,
    /// Write a tiny random llama model (0.5 MB) into the data directory under NAME: no download.
    #[arg(long, value_name = "NAME")]
    pub(crate) tiny: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum LoraCommand {
    /// Register a LoRA adapter (GGUF, general.type=adapter), or write a tiny one with --tiny.
    Add(LoraAddArgs),
    /// The registered adapters, and whether the cloud holds the same content (asked for 2 s at
    /// most: `?` when it cannot say).
    List,
    /// Forget an adapter.
    Rm { name: String },
}

#[derive(Debug, Args)]
pub(crate) struct LoraAddArgs {
    /// The adapter file (GGUF).
    #[arg(required_unless_present = "tiny", conflicts_with = "tiny")]
    pub(crate) path: Option<PathBuf>,
    /// The name requests attach it by.
    #[arg(long)]
    pub(crate) name: String,
    /// The model it was trained for (checked: same architecture). Default: the default model.
    #[arg(long)]
    pub(crate) base: Option<String>,
    /// Write a tiny adapter matching a tiny base model.
    #[arg(long)]
    pub(crate) tiny: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum CloudCommand {
    /// Enroll this device with the setup token an account owner gave you.
    Login(LoginArgs),
    /// Revoke this device on the cloud and delete its identity here.
    Logout(LogoutArgs),
    /// The tunnel's state, as the running service sees it (exit code 3 when none runs).
    Status,
    /// Measure the round trip to the cloud through the running tunnel.
    Ping(PingArgs),
    /// Redeem a voucher code as credit on this device's account.
    Topup {
        /// The code (VCH-…), from the account's operator. `--voucher -` reads it from standard
        /// input, which keeps it out of the process list every user of this machine can read:
        /// paste it, or `synesis cloud topup --voucher - < voucher.txt`.
        #[arg(long, value_name = "CODE|-")]
        voucher: String,
    },
    /// The account's balance, holds, quota and charges, from the cloud's ledger.
    Usage(CloudUsageArgs),
    /// Reconcile this device's local ledger with the cloud's, charge by charge (request id):
    /// the charges of this device, and of its earlier identities the local ledger already holds.
    Sync,
    /// The account's tier and the price table.
    Price,
    /// The models the cloud serves to this account (price, context) and its default, the one
    /// `cloud ask` and `ask` use unless told otherwise.
    Models,
    /// Ask the cloud: the answer streams back through the tunnel, charged once.
    Ask(CloudAskArgs),
    /// Upload a LoRA adapter (GGUF) to the cloud, which then serves it: `cloud ask --lora NAME`.
    Push(CloudPushArgs),
    /// The account's adapters on the cloud; `adapters rm NAME` removes one.
    Adapters(CloudAdaptersArgs),
    /// The account's members and their roles (owner, editor, commenter, viewer); `members rm
    /// NAME` removes one (the owner's; their devices are revoked).
    Members(MembersArgs),
    /// Offer the account to a member (the owner's; they accept within 7 days with `synesis
    /// cloud handover accept`, and you become an editor); `handover accept` takes an offer.
    Handover(HandoverArgs),
    /// Invite someone to this account with a role (the owner's): prints a one-time code they
    /// pass to `synesis cloud accept` on their device.
    Invite(InviteArgs),
    /// Invitations not yet accepted (the owner's); `invites revoke INVITEE` withdraws them.
    Invites(InvitesArgs),
    /// Join an account with the code an owner's `synesis cloud invite` printed, with the role
    /// the invitation gave. A device not enrolled yet is enrolled in it; an enrolled one joins it
    /// as well, and goes on acting in its own until `synesis cloud use` (or `--account`).
    Accept(LoginArgs),
    /// The accounts this device is in (`*`: the one commands act in).
    Accounts,
    /// Act in ACCOUNT (its name or id) from now on; `--account` does it for one command.
    Use { account: String },
}

#[derive(Debug, Args)]
pub(crate) struct InvitesArgs {
    #[command(subcommand)]
    pub(crate) command: Option<InvitesCommand>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum InvitesCommand {
    /// Withdraw the invitee's pending invitations (their codes stop working).
    Revoke { invitee: String },
}

#[derive(Debug, Args)]
pub(crate) struct MembersArgs {
    #[command(subcommand)]
    pub(crate) command: Option<MembersCommand>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum MembersCommand {
    /// Remove a member: their devices are revoked (connections closed within seconds).
    Rm { name: String },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct HandoverArgs {
    /// The member to offer the account to.
    pub(crate) to: Option<String>,
    #[command(subcommand)]
    pub(crate) command: Option<HandoverCommand>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum HandoverCommand {
    /// Take over the account offered to you (within 7 days of the offer).
    Accept,
}

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  synesis cloud invite ada@example.com --role editor        may ask, push and remove adapters
  synesis cloud invite bob@example.com --role commenter --expires 2h

Roles: editor (ask, push and remove adapters, read usage), commenter (ask, read usage), viewer
(read usage and adapters). The code works once, until it expires (24h by default); the invitee
runs `synesis cloud accept CODE` on their device (enrolled in an account of its own or not).")]
pub(crate) struct InviteArgs {
    /// Who the invitation is for, as people know them (an e-mail address, a name).
    pub(crate) invitee: String,
    /// editor, commenter or viewer.
    #[arg(long, value_parser = parse_role)]
    pub(crate) role: synesis_proto::message::Role,
    /// How long the code stays usable (1m to 30d).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub(crate) expires: std::time::Duration,
    /// Their monthly token quota: the input and output tokens of their devices' requests (a
    /// request that would cross it is refused before it runs).
    #[arg(long)]
    pub(crate) quota: Option<u64>,
}

fn parse_role(s: &str) -> Result<synesis_proto::message::Role, String> {
    use synesis_proto::message::Role;
    match s {
        "editor" => Ok(Role::Editor),
        "commenter" => Ok(Role::Commenter),
        "viewer" => Ok(Role::Viewer),
        _ => Err(format!(
            "{s:?} is not a role to invite with: editor, commenter or viewer"
        )),
    }
}

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  synesis cloud push ./legal.gguf                     the name is the file's: legal
  synesis cloud push legal                            an adapter registered with `synesis lora add`
  synesis cloud push ./out/adapter.gguf --name legal-v2 --base llama-3-8b
  synesis cloud push legal --json                     one object at the end, nothing else on stdout

The file is checked here first (a GGUF with general.type = adapter), hashed, then sent in chunks;
the cloud verifies the whole (its SHA-256, and that it is a LoRA adapter for --base) before the
name points to it. Only what the cloud lacks is sent: a push that broke off, or was stopped with
Ctrl-C (exit code 130), goes on where it was when the same command runs again, and content the
account already holds is not sent at all. A broken connection is resumed on its own.
The upload goes through `synesis tunnel run` when it runs, else on a connection of its own.
Progress goes to stderr: a bar on a terminal, otherwise a line per tenth (or every 2 s).
With --json: {name, sha256, bytes, resumed_from_bytes, sent_bytes, seconds, throughput_mib_s, …}
(throughput over the bytes this run sent).")]
pub(crate) struct CloudPushArgs {
    /// The adapter: a GGUF LoRA file, or the name of one registered with `synesis lora add` (a
    /// registered name wins over a file of the same name in this directory; write ./NAME for
    /// the file).
    #[arg(value_name = "PATH|NAME")]
    pub(crate) adapter: String,
    /// Its name on the cloud, what `cloud ask --lora` names (default: the registered name, else
    /// the file name without .gguf). 1 to 64 letters, digits, '-', '_' or '.'.
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// The cloud model it attaches to (default: config.toml [escalation] cloud_model, else tiny:
    /// the model `synesis ask` escalates to).
    #[arg(long, value_name = "MODEL")]
    pub(crate) base: Option<String>,
    /// Bytes per chunk: 64KiB to 8MiB (a number of bytes, or with KiB/MiB). Another chunk size
    /// starts the upload over rather than resuming it.
    #[arg(long, value_name = "BYTES", default_value = "1MiB", value_parser = crate::commands::push::parse_chunk_size)]
    pub(crate) chunk_size: u32,
}

#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "\
Examples:
  synesis cloud adapters                 name, digest, size, base model, when and from which device
  synesis cloud adapters --json
  synesis cloud adapters rm legal        the name goes; escalations already running finish on it

`synesis lora list` marks the local adapters whose content is on the cloud."
)]
pub(crate) struct CloudAdaptersArgs {
    #[command(subcommand)]
    pub(crate) command: Option<AdaptersCommand>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum AdaptersCommand {
    /// Remove an adapter from the cloud, by name.
    Rm {
        /// The adapter's name on the cloud.
        name: String,
    },
}

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  synesis cloud ask \"explain QUIC in one line\"
  echo \"summarise this\" | synesis cloud ask --model claude-sonnet --max-cost 0.05
  synesis cloud ask --byok --model gpt-4o-mini --json \"hello\"

The answer streams to stdout; a line on stderr then gives the model, tokens, time to first token,
tokens/s and the cost. With --json, one object at the end (money in integer micro-USD).
Ctrl-C cancels: the cloud stops generating and charges only what it produced.
The request goes through `synesis tunnel run` when it runs, else on a connection of its own; a
broken connection is resumed where the answer was, without a gap or a repeat.
BYOK: your provider key comes from $SYNESIS_BYOK_KEY, or from the file `byok.key` (mode 0600)
in the config directory; it travels with this request only and is never stored by the cloud.")]
pub(crate) struct CloudAskArgs {
    /// The prompt; read from stdin when absent or `-`.
    pub(crate) prompt: Option<String>,
    /// A model the cloud serves (`synesis cloud models` lists them); default: `[escalation]
    /// cloud_model` in config.toml, else the cloud's default for this account.
    #[arg(long)]
    pub(crate) model: Option<String>,
    /// An adapter the cloud serves with the model, by name.
    #[arg(long)]
    pub(crate) lora: Option<String>,
    /// A system prompt, before your question.
    #[arg(long)]
    pub(crate) system: Option<String>,
    /// The most tokens to generate (the hold is sized for them).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub(crate) max_tokens: u32,
    /// Sampling temperature; 0 is greedy (deterministic).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) temperature: f32,
    /// Seed for sampling.
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Stop before this text (repeatable).
    #[arg(long)]
    pub(crate) stop: Vec<String>,
    /// Refuse to run when the request could cost more than this (dollars, e.g. 0.05).
    #[arg(long, value_name = "USD", value_parser = synesis_billing::parse_usd)]
    pub(crate) max_cost: Option<synesis_proto::MicroUsd>,
    /// Use your own provider key (see below): you pay the provider, the account the fee.
    #[arg(long)]
    pub(crate) byok: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  synesis cloud usage                          balance, holds, quota and every charge
  synesis cloud usage --since 2026-11-01 --by model
  synesis cloud usage --json --by day

With --json, money is integer micro-USD (1 USD = 1,000,000); with --by, `groups` holds one total
per model, device, UTC day or member, largest first.")]
pub(crate) struct CloudUsageArgs {
    /// Only charges from DATE on: YYYY-MM-DD (midnight UTC) or an RFC 3339 time.
    #[arg(long, value_name = "DATE", value_parser = crate::commands::usage::parse_since)]
    pub(crate) since: Option<synesis_proto::UnixMillis>,
    /// Total the charges per model, per device, per UTC day or per member.
    #[arg(long, value_enum)]
    pub(crate) by: Option<Grouping>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum Grouping {
    Model,
    Device,
    Day,
    /// The member each charge's device belongs to.
    Member,
}

impl From<Grouping> for synesis_proto::message::UsageGrouping {
    fn from(g: Grouping) -> Self {
        match g {
            Grouping::Model => Self::Model,
            Grouping::Device => Self::Device,
            Grouping::Day => Self::Day,
            Grouping::Member => Self::Member,
        }
    }
}

#[derive(Debug, Args)]
#[command(after_help = "The token comes from the cloud's operator: \
`synesis-cloud admin token create --account NAME`. It names the cloud, pins its certificate \
authority and works once. The device makes its key here; only a signing request leaves it.")]
pub(crate) struct LoginArgs {
    /// The setup token or invitation code (SYN1:…). `-` reads it from standard input, which
    /// keeps it out of the process list every user of this machine can read: paste it, or
    /// `synesis cloud login - < token.txt`.
    #[arg(value_name = "TOKEN|-")]
    pub(crate) token: String,
    /// A name for this device on the cloud (default: the host name).
    #[arg(long)]
    pub(crate) name: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct LogoutArgs {
    /// Delete the local identity even when the cloud cannot be reached to revoke it.
    #[arg(long)]
    pub(crate) force: bool,
}

#[derive(Debug, Args)]
pub(crate) struct PingArgs {
    /// How many heartbeats to time.
    #[arg(long, short = 'c', default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) count: u32,
    /// Time between pings.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub(crate) interval: std::time::Duration,
}

#[derive(Debug, Subcommand)]
pub(crate) enum TunnelCommand {
    /// Run the service in the foreground: the device's one connection to the cloud, which every
    /// other `synesis` command on this machine uses while it runs. Ctrl-C or SIGTERM drains it
    /// (streams in flight finish within --grace); SIGHUP reloads config.toml.
    Run(TunnelRunArgs),
    /// Start the service in the background; returns once it is connected, or has said why not.
    Start(TunnelStartArgs),
    /// Stop the running service: streams in flight finish first (within its --grace).
    Stop(TunnelStopArgs),
    /// Whether the service runs (exit 3 if not), its pid, log and connection.
    Status,
    /// The service's log (`-f` follows it).
    Logs(LogsArgs),
    /// A live feed of what the service does: state changes and reconnects with their reason,
    /// pre-warm signals, escalations (with their cost) and uploads, config reloads, the drain.
    /// With --json, one JSON object per line. Ctrl-C ends it.
    Events,
    /// Write and enable a systemd unit that runs the service at boot (`--user`: at login, as
    /// you). Without systemd it says so and prints the unit.
    Install(InstallArgs),
    /// Stop, disable and remove the unit `install` wrote.
    Uninstall(InstallArgs),
}

#[derive(Debug, Args, Clone)]
pub(crate) struct TunnelRunArgs {
    /// Time between heartbeats; the cloud marks the device stale after three missed ones.
    #[arg(long, default_value = "5s", value_parser = parse_heartbeat_interval)]
    pub(crate) heartbeat_interval: std::time::Duration,
    /// The cloud model this device escalates to: when the local GPU is under stress (the
    /// pre-warm policy, at most once a minute), the cloud is told to get it ready. Default:
    /// `[escalation] cloud_model` in config.toml, else the cloud's default for this account.
    #[arg(long)]
    pub(crate) prewarm_model: Option<String>,
    /// On stop, how long streams in flight (an answer being written, an upload) may take to
    /// finish before they are cut.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) grace: std::time::Duration,
    /// While the tunnel reconnects, how long a command's cloud request waits for it (at most
    /// 14s) before it goes on a connection of its own.
    #[arg(long, default_value = "10s", value_parser = parse_reconnect_wait)]
    pub(crate) reconnect_wait: std::time::Duration,
    #[command(flatten)]
    pub(crate) http: HttpArgs,
}

fn parse_reconnect_wait(text: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    let max = synesis_tunnel::local::RECONNECT_WAIT_MAX;
    if d > max {
        return Err(format!("at most {}", humantime::format_duration(max)));
    }
    Ok(d)
}

/// The OpenAI-compatible HTTP API the service may serve.
#[derive(Debug, Args, Clone)]
pub(crate) struct HttpArgs {
    /// Serve the OpenAI-compatible API on ADDR (`synesis serve`: 127.0.0.1:11435 by default).
    /// An address off this machine also needs --allow-remote and an API key.
    #[arg(long, value_name = "ADDR")]
    pub(crate) listen: Option<std::net::SocketAddr>,
    /// Allow --listen on an address other machines can reach (requests then need the key).
    #[arg(long)]
    pub(crate) allow_remote: bool,
    /// A file holding the API key requests must carry (`Authorization: Bearer KEY`); the
    /// variable SYNESIS_API_KEY does the same. Without either, the key is the device's own:
    /// `api-key` in the config directory, made on the first start (0600; `synesis paths` shows
    /// where), needed on every request once the device is in an account (a device in none may
    /// be used without it on loopback).
    #[arg(long, value_name = "PATH")]
    pub(crate) api_key_file: Option<std::path::PathBuf>,
    /// How long a local model stays loaded after its last answer (0s: unloaded at once).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub(crate) keep_alive: std::time::Duration,
    /// Requests answered at once; more are refused with 429.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub(crate) max_concurrent: u16,
    /// The longest one request may take (then 504, and the answer is cancelled).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub(crate) request_timeout: std::time::Duration,
    /// The largest request body, in bytes (413 above it).
    #[arg(long, default_value_t = 1024 * 1024)]
    pub(crate) max_body_bytes: usize,
}

impl HttpArgs {
    /// The API key: the file's first line, else SYNESIS_API_KEY (read here, at the edge).
    pub(crate) fn api_key(&self) -> anyhow::Result<Option<String>> {
        use anyhow::Context;
        if let Some(path) = &self.api_key_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the API key from {}", path.display()))?;
            let key = text.lines().next().unwrap_or_default().trim().to_owned();
            anyhow::ensure!(!key.is_empty(), "{} holds no API key", path.display());
            return Ok(Some(key));
        }
        Ok(std::env::var("SYNESIS_API_KEY")
            .ok()
            .filter(|k| !k.trim().is_empty()))
    }
}

impl TunnelRunArgs {
    /// The same settings as `tunnel run` flags (for a service started in the background).
    pub(crate) fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--heartbeat-interval".into(),
            humantime::format_duration(self.heartbeat_interval).to_string(),
            "--grace".into(),
            humantime::format_duration(self.grace).to_string(),
            "--reconnect-wait".into(),
            humantime::format_duration(self.reconnect_wait).to_string(),
        ];
        if let Some(model) = &self.prewarm_model {
            args.extend(["--prewarm-model".into(), model.clone()]);
        }
        let h = &self.http;
        if let Some(listen) = h.listen {
            args.extend(["--listen".into(), listen.to_string()]);
            if h.allow_remote {
                args.push("--allow-remote".into());
            }
            if let Some(file) = &h.api_key_file {
                args.extend(["--api-key-file".into(), file.display().to_string()]);
            }
            args.extend([
                "--keep-alive".into(),
                humantime::format_duration(h.keep_alive).to_string(),
                "--max-concurrent".into(),
                h.max_concurrent.to_string(),
                "--request-timeout".into(),
                humantime::format_duration(h.request_timeout).to_string(),
                "--max-body-bytes".into(),
                h.max_body_bytes.to_string(),
            ]);
        }
        args
    }
}

#[derive(Debug, Args)]
#[command(after_help = "\
Any OpenAI client library works against it:

  from openai import OpenAI
  key = open(\"/home/you/.config/synesis/api-key\").read().strip()  # `synesis paths`
  client = OpenAI(base_url=\"http://127.0.0.1:11435/v1\", api_key=key)
  client.chat.completions.create(model=\"auto\", messages=[{\"role\": \"user\", \"content\": \"hi\"}])

On a device in an account, every request but /health carries the API key (Authorization:
Bearer KEY): the device's own is in `api-key` in the config directory (`synesis paths`), made
on the first start and readable by you alone; other users of this machine cannot spend your
account through the port. A device in no account answers loopback requests without it.
Connections that send no request within 10 s (or sit idle that long) are closed, and at most
256 are open at once (more are answered 503).

`model` names a local model (`synesis model list`), a cloud model, or `auto` (the local-first
policy of `synesis ask`). Responses say the route, request id and cost in x-synesis-* headers.
`synesis tunnel start --listen 127.0.0.1:11435` runs the same in the background.")]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    pub(crate) run: TunnelRunArgs,
}

#[derive(Debug, Args)]
#[command(after_help = "\
The service's output goes to service.log in the data directory (`synesis tunnel logs -f`).
`synesis tunnel install` runs it under systemd instead.")]
pub(crate) struct TunnelStartArgs {
    #[command(flatten)]
    pub(crate) run: TunnelRunArgs,
    /// How long to wait for the connection before returning anyway (the service keeps trying).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub(crate) wait: std::time::Duration,
}

#[derive(Debug, Args)]
pub(crate) struct TunnelStopArgs {
    /// How long to wait for the service to finish its streams and exit.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) timeout: std::time::Duration,
}

#[derive(Debug, Args)]
pub(crate) struct LogsArgs {
    /// Keep printing what the service writes (Ctrl-C ends).
    #[arg(short, long)]
    pub(crate) follow: bool,
    /// How many of the last lines to print first.
    #[arg(short = 'n', long, default_value_t = 50)]
    pub(crate) lines: usize,
}

#[derive(Debug, Args)]
pub(crate) struct InstallArgs {
    /// A user unit (`systemctl --user`, in ~/.config/systemd/user), started at login; without
    /// it, a system unit in /etc/systemd/system (needs root).
    #[arg(long)]
    pub(crate) user: bool,
    #[command(flatten)]
    pub(crate) run: TunnelRunArgs,
}

fn parse_heartbeat_interval(text: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if !(std::time::Duration::from_millis(100)..=std::time::Duration::from_secs(15)).contains(&d) {
        return Err("must be between 100ms and 15s".into());
    }
    Ok(d)
}

#[derive(Debug, Args)]
#[command(after_help = "\
Every `synesis ask --local` that finishes is recorded in the local ledger (ledger.db in the data
directory; `synesis paths` shows where) with its token counts and the cloud cost it avoided: what
the same tokens would have cost in the cloud, at the Managed tier's price for claude-sonnet, the
model an escalation goes to. Cloud charges appear once `synesis cloud sync` has mirrored them
from the cloud, whose ledger is the authority; `synesis cloud usage` asks the cloud itself.

Examples:
  synesis usage                                  a table
  synesis usage --since 2026-01-01               from midnight UTC that day
  synesis usage --json --since 2026-01-31T08:00:00+01:00

With --json, money is integer micro-USD (1 USD = 1,000,000): local.cloud_cost_avoided_micro_usd,
cloud.total_micro_usd, by_model[].micro_usd (local: avoided; cloud: charged).")]
pub(crate) struct UsageArgs {
    /// Count only what happened from DATE on: YYYY-MM-DD (midnight UTC) or an RFC 3339 time.
    #[arg(long, value_name = "DATE", value_parser = crate::commands::usage::parse_since)]
    pub(crate) since: Option<synesis_proto::UnixMillis>,
    /// Also total per UTC day, per model, or per route reason (why `synesis ask` answered
    /// where it did), local answers and cloud charges apart.
    #[arg(long, value_enum)]
    pub(crate) by: Option<LocalGrouping>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum LocalGrouping {
    Day,
    Model,
    Route,
}

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  synesis vitals                          one table
  synesis vitals --json                   one JSON object
  synesis vitals --watch                  a live table, refreshed every second
  synesis vitals --watch --json --interval 500ms >> vitals.jsonl

GPUs are read through NVIDIA's NVML; without the NVIDIA driver the GPU list is empty and
`gpu_unavailable_reason` says why.")]
pub(crate) struct VitalsArgs {
    /// Keep sampling until Ctrl-C: a live table on a terminal, one JSON object per line with --json.
    #[arg(long)]
    pub(crate) watch: bool,

    /// Time between samples with --watch (e.g. 500ms, 2s; at least 200ms).
    #[arg(long, default_value = "1s", value_parser = crate::commands::vitals::parse_interval, requires = "watch")]
    pub(crate) interval: std::time::Duration,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn clap_definitions_are_consistent() {
        super::Cli::command().debug_assert();
    }

    #[test]
    fn usage_help_names_the_reference_model() {
        let mut cmd = super::Cli::command();
        let help = cmd
            .find_subcommand_mut("usage")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(
            help.contains(synesis_ledger_local::REFERENCE_MODEL),
            "{help}"
        );
        assert!(help.contains("avoided"), "{help}");
    }
}
