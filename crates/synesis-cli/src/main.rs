//! `synesis` — the device side of Synesis.
//!
//! This file is the table of contents: parse the flags once into typed settings, dispatch to a
//! command, map whatever failed to an exit code in one place ([`exit::code_for`]).
//!
//! Modules: [`cli`] (the clap definitions: every flag and its help), [`paths`] (where config,
//! data and the daemon socket live), [`secure_fs`] (those files private to their owner),
//! [`exit`] (exit codes), [`signals`] (Ctrl-C and SIGTERM),
//! [`commands`] (one module per command). The local ledger (on-device answers and mirrored cloud
//! charges) is the `synesis-ledger-local` crate; the commands only call it and render.

mod answer;
mod api;
mod cli;
mod commands;
mod exit;
mod hosted;
mod paths;
mod pull;
mod registry;
mod request;
mod secret_arg;
mod secure_fs;
mod signals;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    init_tracing(cli.global.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let code = exit::code_for(&err);
            eprintln!("synesis: {err:#}");
            ExitCode::from(code)
        }
    }
}

fn run(cli: cli::Cli) -> anyhow::Result<()> {
    let paths =
        paths::Paths::resolve(&cli.global.path_overrides(), &paths::XdgEnv::from_process())?;
    let out = commands::Output::new(cli.global.json);
    // Before any command writes: our directories private, and what an older version left
    // readable by others narrowed (`synesis paths` only looks).
    if !matches!(cli.command, cli::Command::Paths)
        && let Err(e) = secure_fs::secure_home(&paths)
    {
        eprintln!("synesis: warning: {e}");
    }
    // One thread: the CLI waits on the network and on timers; blocking work goes to the
    // blocking pool (THREAD_SAFETY_PATTERNS.md §7).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match &cli.command {
        cli::Command::Ask(args) => runtime.block_on(commands::ask::run(&out, &paths, args)),
        #[cfg(feature = "demo")]
        cli::Command::Demo(args) => runtime.block_on(commands::demo::run(&out, &paths, args)),
        #[cfg(not(feature = "demo"))]
        cli::Command::Demo(_) => Err(anyhow::anyhow!(
            "this synesis was built without the demo (its `demo` feature, on by default)"
        )),
        cli::Command::Model { command } => match command {
            cli::ModelCommand::Add(args) => commands::model::add(&out, &paths, args),
            cli::ModelCommand::Pull(args) => {
                runtime.block_on(commands::model::pull(&out, &paths, args))
            }
            cli::ModelCommand::List => commands::model::list(&out, &paths),
            cli::ModelCommand::Rm { name } => commands::model::remove(&out, &paths, name),
            cli::ModelCommand::Default { name } => commands::model::set_default(&out, &paths, name),
        },
        cli::Command::Lora { command } => match command {
            cli::LoraCommand::Add(args) => commands::model::lora_add(&out, &paths, args),
            cli::LoraCommand::List => runtime.block_on(commands::model::lora_list(&out, &paths)),
            cli::LoraCommand::Rm { name } => commands::model::lora_remove(&out, &paths, name),
        },
        cli::Command::Vitals(args) => runtime.block_on(commands::vitals::run(&out, &paths, args)),
        cli::Command::Usage(args) => commands::usage::run(&out, &paths, args),
        cli::Command::Cloud { command } => runtime.block_on(async {
            match command {
                cli::CloudCommand::Login(args) => commands::cloud::login(&out, &paths, args).await,
                cli::CloudCommand::Logout(args) => {
                    commands::cloud::logout(&out, &paths, args).await
                }
                cli::CloudCommand::Status => commands::cloud::status(&out, &paths).await,
                cli::CloudCommand::Ping(args) => commands::cloud::ping(&out, &paths, args).await,
                cli::CloudCommand::Topup { voucher } => {
                    commands::cloud::topup(&out, &paths, voucher).await
                }
                cli::CloudCommand::Usage(args) => commands::cloud::usage(&out, &paths, args).await,
                cli::CloudCommand::Sync => commands::cloud::sync(&out, &paths).await,
                cli::CloudCommand::Price => commands::cloud::price(&out, &paths).await,
                cli::CloudCommand::Models => commands::cloud::models(&out, &paths).await,
                cli::CloudCommand::Ask(args) => commands::escalate::run(&out, &paths, args).await,
                cli::CloudCommand::Push(args) => commands::push::push(&out, &paths, args).await,
                cli::CloudCommand::Adapters(args) => {
                    commands::push::adapters(&out, &paths, args).await
                }
                cli::CloudCommand::Members(args) => match &args.command {
                    None => commands::cloud::members(&out, &paths).await,
                    Some(cli::MembersCommand::Rm { name }) => {
                        commands::cloud::remove_member(&out, &paths, name).await
                    }
                },
                cli::CloudCommand::Handover(args) => match (&args.to, &args.command) {
                    (_, Some(cli::HandoverCommand::Accept)) => {
                        commands::cloud::accept_handover(&out, &paths).await
                    }
                    (Some(to), None) => commands::cloud::offer_handover(&out, &paths, to).await,
                    (None, None) => Err(crate::exit::UserError::Usage(
                        "name the member to offer the account to, or `handover accept`".into(),
                    )
                    .into()),
                },
                cli::CloudCommand::Invite(args) => {
                    commands::cloud::invite(&out, &paths, args).await
                }
                cli::CloudCommand::Invites(args) => match &args.command {
                    None => commands::cloud::invites(&out, &paths).await,
                    Some(cli::InvitesCommand::Revoke { invitee }) => {
                        commands::cloud::revoke_invites(&out, &paths, invitee).await
                    }
                },
                cli::CloudCommand::Accept(args) => {
                    commands::cloud::accept(&out, &paths, args).await
                }
                cli::CloudCommand::Accounts => commands::cloud::accounts(&out, &paths),
                cli::CloudCommand::Use { account } => {
                    commands::cloud::use_account(&out, &paths, account)
                }
            }
        }),
        cli::Command::Serve(args) => {
            let mut run = args.run.clone();
            run.http.listen.get_or_insert(api::DEFAULT_LISTEN.parse()?);
            runtime.block_on(commands::tunnel::run(&paths, &run))
        }
        cli::Command::Tunnel { command } => match command {
            cli::TunnelCommand::Run(args) => runtime.block_on(commands::tunnel::run(&paths, args)),
            cli::TunnelCommand::Start(args) => {
                runtime.block_on(commands::service::start(&out, &paths, args))
            }
            cli::TunnelCommand::Stop(args) => {
                runtime.block_on(commands::service::stop(&out, &paths, args))
            }
            cli::TunnelCommand::Status => runtime.block_on(commands::service::status(&out, &paths)),
            cli::TunnelCommand::Logs(args) => {
                runtime.block_on(commands::service::logs(&paths, args))
            }
            cli::TunnelCommand::Events => runtime.block_on(commands::service::events(&out, &paths)),
            cli::TunnelCommand::Install(args) => commands::service::install(&out, &paths, args),
            cli::TunnelCommand::Uninstall(args) => commands::service::uninstall(&out, &paths, args),
        },
        cli::Command::Paths => commands::paths::run(&out, &paths),
    }
}

/// Logs go to stderr. `RUST_LOG` wins when set; otherwise `-v` is info, `-vv` debug, `-vvv` trace.
fn init_tracing(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
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
