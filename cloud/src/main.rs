//! `synesis-cloud` — `serve` runs the QUIC endpoint, `admin` is the operator's tool beside it
//! (same data directory). The work is in the library (`src/lib.rs`); this file parses flags
//! and dispatches.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use synesis_cloud::{admin, endpoint, storage};
use synesis_proto::DeviceId;
use synesis_proto::message::Tier;

#[derive(Debug, Parser)]
#[command(
    name = "synesis-cloud",
    version,
    about = "The Synesis cloud: devices connect here over QUIC."
)]
struct Cli {
    /// More log output on stderr (-v info, -vv debug). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the cloud: accept devices on a QUIC endpoint until SIGTERM, then drain and exit 0.
    Serve {
        /// Address to listen on (UDP). Port 0 picks a free port; the line `listening on ADDR`
        /// on stdout says which.
        #[arg(long, default_value = "0.0.0.0:4433")]
        listen: SocketAddr,
        /// Where the CA, the server certificate and the database live (created on first start).
        #[arg(long, env = "SYNESIS_CLOUD_DATA_DIR")]
        data_dir: PathBuf,
        /// On SIGTERM, devices are told to reconnect after a delay spread over this window.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        drain_window: Duration,
        /// On SIGTERM, how long in-flight work may finish before the process exits.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        drain_grace: Duration,
        /// Prices and tier rules (default: cloud.toml in the data directory, when present).
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// How long a device certificate is valid; devices renew theirs over their own
        /// connection when a third of it is left.
        #[arg(long, default_value = "90days", value_parser = parse_cert_lifetime)]
        cert_lifetime: Duration,
        /// The database: a PostgreSQL URL (postgres://USER@HOST:PORT/NAME; a password is best
        /// left to ~/.pgpass or PGPASSWORD), which several cloud processes may share. Default:
        /// `[storage] url` in the config, else SQLite in the data directory. The CA and the
        /// adapters' content stay in the data directory either way.
        #[arg(long, env = "SYNESIS_CLOUD_DATABASE", value_name = "URL")]
        database: Option<String>,
        /// Serve /metrics (Prometheus text format), /live and /ready over HTTP on this address
        /// (TCP; port 0 picks one, and the line `metrics on ADDR` on stdout says which).
        /// Ready means the database answers with this build's schema and the node is not
        /// draining. Off unless given.
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<SocketAddr>,
        /// The address devices dial to reach this node, HOST:PORT (default: the address it
        /// listens on). With several nodes on one database, each hands the others' addresses
        /// to its devices (in `Welcome` and in setup tokens), so a device whose node is gone
        /// dials another: give it whenever the listen address is not what devices dial.
        #[arg(long, value_name = "HOST:PORT")]
        advertise: Option<String>,
    },
    /// Operator commands; they work beside a running server on the same data directory.
    Admin {
        #[arg(long, env = "SYNESIS_CLOUD_DATA_DIR")]
        data_dir: PathBuf,
        /// Prices and tier rules (default: cloud.toml in the data directory, when present).
        #[arg(long, value_name = "PATH", global = true)]
        config: Option<PathBuf>,
        /// The cloud's database when it is not SQLite in the data directory: the PostgreSQL URL
        /// `serve --database` was given (default: `[storage] url` in the config).
        #[arg(
            long,
            env = "SYNESIS_CLOUD_DATABASE",
            value_name = "URL",
            global = true
        )]
        database: Option<String>,
        /// Print JSON instead of text.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: Admin,
    },
}

#[derive(Debug, Subcommand)]
enum Admin {
    /// Accounts own devices.
    Account {
        #[command(subcommand)]
        command: AccountCommand,
    },
    /// Setup tokens enroll devices.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// List devices with status (online, stale, offline, revoked), last seen, RTT and vitals.
    Devices,
    /// List the cloud's nodes (each `serve` process on this database): serving, stopped, or
    /// dead (no heartbeat for 10 s without a clean stop).
    Nodes,
    /// List adapter uploads (in progress and finished): chunks held and chunks received, so a
    /// resume that re-sent nothing can be seen.
    Uploads,
    /// Every change to an account's members (invitations, joins, roles, removals, handovers).
    Audit { account: String },
    /// The people of an account and their roles.
    Member {
        #[command(subcommand)]
        command: MemberCommand,
    },
    /// Act on one device.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Add credit to an account, in dollars (e.g. 10.00; exact to the micro-dollar).
    Credit {
        account: String,
        #[arg(value_parser = synesis_billing::parse_usd)]
        amount: synesis_proto::MicroUsd,
    },
    /// One-time voucher codes (only their hashes are stored).
    Voucher {
        #[command(subcommand)]
        command: VoucherCommand,
    },
    /// What a request would cost under a tier, with the cloud's prices (cloud.toml).
    Quote {
        #[arg(long, value_parser = parse_tier)]
        tier: Tier,
        #[arg(long)]
        model: String,
        #[arg(long)]
        input_tokens: u64,
        #[arg(long)]
        output_tokens: u64,
    },
    /// The ledger as a whole.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// An account's balance, holds, quota and charges.
    Usage { account: String },
    /// Copy this SQLite cloud into an empty PostgreSQL database, then check the copy (rows of
    /// every table, every ledger chain, every account's totals and holds). The SQLite file is
    /// only read (from a snapshot; a running cloud may go on meanwhile, but what it writes
    /// after the snapshot is not copied: stop it first for a move).
    Migrate {
        /// The target, as `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`.
        #[arg(long)]
        to: String,
    },
}

#[derive(Debug, Subcommand)]
enum VoucherCommand {
    /// Print COUNT new voucher codes worth AMOUNT dollars each.
    Create {
        #[arg(value_parser = synesis_billing::parse_usd)]
        amount: synesis_proto::MicroUsd,
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        count: u32,
    },
}

#[derive(Debug, Subcommand)]
enum LedgerCommand {
    /// Walk the hash chain: exit 0 when intact, 1 naming the first bad entry.
    Verify,
}

#[derive(Debug, Subcommand)]
enum AccountCommand {
    /// Create an account.
    Create {
        name: String,
        #[arg(long, default_value = "free", value_parser = parse_tier)]
        tier: Tier,
    },
    /// Move an account to another tier (free, managed, byok).
    SetTier {
        name: String,
        #[arg(value_parser = parse_tier)]
        tier: Tier,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print one single-use setup token for `synesis cloud login TOKEN` (and nothing else).
    Create {
        /// The account the device joins.
        #[arg(long)]
        account: String,
        /// How long the token stays usable.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// The address devices dial (default: the address the running cloud listens on).
        #[arg(long)]
        server: Option<String>,
        /// Enroll the device as this member's (default: whoever owns the account now). The token
        /// is bound to that member as it is made: a new role, a handover or removal ends it.
        #[arg(long)]
        member: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum MemberCommand {
    /// Add a person to an account with a role (editor, commenter or viewer); their devices
    /// enroll with `admin token create --account A --member NAME`.
    Add {
        account: String,
        name: String,
        #[arg(long, value_parser = parse_role)]
        role: synesis_proto::message::Role,
        /// Their monthly token quota (input and output tokens of their devices' requests).
        #[arg(long)]
        quota: Option<u64>,
    },
    /// Give a member another role (takes effect on their devices' next request).
    Role {
        account: String,
        name: String,
        #[arg(long, value_parser = parse_role)]
        role: synesis_proto::message::Role,
    },
    /// Remove a member: their devices are revoked (connections closed within seconds).
    Rm { account: String, name: String },
    /// List an account's members, their roles and devices.
    List { account: String },
}

fn parse_role(s: &str) -> Result<synesis_proto::message::Role, String> {
    storage::members::parse_role(s)
        .ok_or_else(|| format!("{s:?} is not a role: editor, commenter or viewer"))
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// Revoke a device: its live connection closes within seconds and it is refused afterwards.
    Revoke { device_id: DeviceId },
}

/// A certificate lifetime: at least 10 s (tests use seconds), at most 10 years.
fn parse_cert_lifetime(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    let (min, max) = (
        Duration::from_secs(10),
        Duration::from_secs(10 * 366 * 24 * 3_600),
    );
    if d < min || d > max {
        return Err(format!(
            "a certificate lifetime is 10s to 10 years, not {s}"
        ));
    }
    Ok(d)
}

fn parse_tier(s: &str) -> Result<Tier, String> {
    storage::parse_tier(s).ok_or_else(|| format!("{s:?} is not a tier: free, managed or byok"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("synesis-cloud: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            listen,
            data_dir,
            drain_window,
            drain_grace,
            config,
            cert_lifetime,
            database,
            metrics_listen,
            advertise,
        } => {
            let config = synesis_cloud::config::load(config.as_deref(), &data_dir)?;
            let database = database.or(config.database);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(serve(endpoint::Options {
                listen,
                data_dir,
                drain_window,
                drain_grace,
                billing: config.billing,
                serving: config.serving,
                cert_lifetime,
                database,
                metrics_listen,
                advertise,
            }))
        }
        Command::Admin {
            data_dir,
            config,
            database,
            json,
            command,
        } => {
            // `migrate` copies the data directory's SQLite file wherever the config points.
            let database = match database {
                Some(url) => Some(url),
                None if matches!(command, Admin::Migrate { .. }) => None,
                None => synesis_cloud::config::load(config.as_deref(), &data_dir)?.database,
            };
            let at = admin::Place {
                dir: data_dir.clone(),
                database,
            };
            let billing =
                || synesis_cloud::config::load(config.as_deref(), &data_dir).map(|c| c.billing);
            match command {
                Admin::Account {
                    command: AccountCommand::Create { name, tier },
                } => admin::account_create(&at, &name, tier, json),
                Admin::Token {
                    command:
                        TokenCommand::Create {
                            account,
                            ttl,
                            server,
                            member,
                        },
                } => admin::token_create(&at, &account, ttl, server, member.as_deref()),
                Admin::Audit { account } => admin::audit(&at, &account, json),
                Admin::Member { command } => match command {
                    MemberCommand::Add {
                        account,
                        name,
                        role,
                        quota,
                    } => admin::member_add(&at, &account, &name, role, quota),
                    MemberCommand::Role {
                        account,
                        name,
                        role,
                    } => admin::member_role(&at, &account, &name, role),
                    MemberCommand::Rm { account, name } => {
                        admin::member_remove(&at, &account, &name)
                    }
                    MemberCommand::List { account } => admin::members(&at, &account, json),
                },
                Admin::Devices => admin::devices(&at, json),
                Admin::Nodes => admin::nodes(&at, json),
                Admin::Uploads => admin::uploads(&at, json),
                Admin::Device {
                    command: DeviceCommand::Revoke { device_id },
                } => admin::device_revoke(&at, device_id),
                Admin::Account {
                    command: AccountCommand::SetTier { name, tier },
                } => admin::set_tier(&at, &name, tier),
                Admin::Credit { account, amount } => admin::credit(&at, &account, amount, json),
                Admin::Voucher {
                    command: VoucherCommand::Create { amount, count },
                } => admin::voucher_create(&at, amount, count),
                Admin::Quote {
                    tier,
                    model,
                    input_tokens,
                    output_tokens,
                } => admin::quote(&billing()?, tier, &model, input_tokens, output_tokens, json),
                Admin::Ledger {
                    command: LedgerCommand::Verify,
                } => admin::ledger_verify(&at, json),
                Admin::Usage { account } => admin::usage(&at, &account, &billing()?, json),
                Admin::Migrate { to } => admin::migrate(&at, &to, json),
            }
        }
    }
}

/// Runs the cloud until SIGTERM or SIGINT, then drains it.
async fn serve(options: endpoint::Options) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let cloud = endpoint::start(options).await?;
    println!("listening on {}", cloud.addr());
    if let Some(addr) = cloud.metrics_addr() {
        println!("metrics on {addr}");
    }
    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }
    cloud.shutdown().await;
    Ok(())
}

fn init_tracing(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn clap_definitions_are_consistent() {
        super::Cli::command().debug_assert();
    }
}
