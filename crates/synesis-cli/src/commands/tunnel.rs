//! `synesis tunnel run`: keep this device connected, in the foreground, until Ctrl-C or SIGTERM.
//!
//! It runs three tasks: the tunnel driver, a vitals sampler feeding the heartbeats, and the
//! local API on the Unix socket ([`synesis_tunnel::local`]) through which other `synesis`
//! commands use the tunnel's connection. One service per runtime directory. State changes are
//! reported on stderr. A tunnel that failed for good (a revoked device, say) keeps the service
//! up, so that `synesis cloud status` can say why, and makes no further attempts.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use synesis_tunnel::local::events::{What, emit};
use synesis_tunnel::machine::Config;
use synesis_tunnel::{Identity, Options, Tunnel, TunnelState, local};
use synesis_vitals::{PrewarmConfig, PrewarmPolicy, SystemSampler, VitalsSource};
use tokio::sync::{oneshot, watch};

use crate::cli::TunnelRunArgs;
use crate::paths::Paths;
use crate::signals::Shutdown;

pub(crate) async fn run(paths: &Paths, args: &TunnelRunArgs) -> anyhow::Result<()> {
    let home = paths.identity_home()?;
    let Some(identity) = Identity::load(&home)? else {
        bail!("this device is not enrolled; run `synesis cloud login TOKEN` first");
    };
    let (listener, lock) = local::bind(&paths.runtime.path)?;
    let mut shutdown = Shutdown::listen().context("cannot listen for Ctrl-C")?;

    let sampler =
        SystemSampler::new(&paths.data.path).context("cannot read this device's vitals")?;
    let (sampler, first) = sample(sampler).await?;
    let (vitals_tx, vitals) = watch::channel(first);

    let config = Config {
        heartbeat_interval: args.heartbeat_interval,
        ..Config::default()
    };
    let (device, server) = (identity.info.device_id, identity.info.server.clone());
    let tunnel = Arc::new(Tunnel::spawn(Options {
        identity,
        config,
        vitals,
        seed: rand::random(),
        data_dir: Some(home),
    }));
    let events = local::events::channel();
    let sampling = tokio::spawn(sample_forever(
        sampler,
        args.heartbeat_interval,
        vitals_tx,
        Prewarming {
            events: events.clone(),
            policy: PrewarmPolicy::new(PrewarmConfig::default()),
            model: args.prewarm_model.clone(),
            tunnel: Arc::clone(&tunnel),
        },
    ));
    let mut status = tunnel.status();
    let (stop_api, api_stopped) = oneshot::channel::<()>();
    let mut api = tokio::spawn(local::serve(
        listener,
        Arc::clone(&tunnel),
        async {
            let _ = api_stopped.await;
        },
        local::ServeOptions {
            grace: args.grace,
            events: events.clone(),
        },
    ));
    eprintln!("synesis: tunnel for device {device} to {server}; Ctrl-C to stop");
    let mut reload = Reload::listen()?;
    let mut settings = crate::registry::Config::load(&paths.config_file())?;
    tracing::info!(models = settings.models.len(), "config loaded");

    let mut last_state = None;
    loop {
        tokio::select! {
            biased;
            () = shutdown.requested() => break,
            () = reload.requested() => {
                // The settings the service reads from config.toml; a bad edit keeps the old ones.
                match crate::registry::Config::load(&paths.config_file()) {
                    Ok(new) => {
                        settings = new;
                        tracing::info!(models = settings.models.len(), "config reloaded (SIGHUP)");
                        eprintln!("synesis: config reloaded");
                        emit(&events, What::ConfigReloaded { ok: true, error: None });
                    }
                    Err(e) => {
                        eprintln!("synesis: config not reloaded, the old one stays: {e:#}");
                        let error = Some(format!("{e:#}"));
                        emit(&events, What::ConfigReloaded { ok: false, error });
                    }
                }
            }
            changed = status.changed() => {
                if changed.is_err() {
                    break;
                }
                let s = status.borrow_and_update().clone();
                if last_state != Some(s.state) {
                    last_state = Some(s.state);
                    emit(&events, What::State {
                        state: s.state,
                        reconnects: s.reconnects,
                        reason: s.failure.clone(),
                    });
                    match (&s.failure, s.state) {
                        (Some(why), TunnelState::Failed | TunnelState::Reconnecting) => eprintln!("synesis: {} ({why})", s.state),
                        _ => eprintln!("synesis: {}", s.state),
                    }
                }
            }
        }
    }
    // The API removes its socket and drains: its clients' streams may finish within the grace
    // period (a second Ctrl-C or SIGTERM cuts them at once), then they are reset.
    let _ = stop_api.send(());
    eprintln!(
        "synesis: stopping; streams in flight may finish within {}",
        humantime::format_duration(args.grace)
    );
    tokio::select! {
        _ = &mut api => {}
        () = shutdown.requested() => {
            eprintln!("synesis: stopping now");
            api.abort();
            let _ = api.await;
        }
    }
    sampling.abort();
    if let Ok(tunnel) = Arc::try_unwrap(tunnel) {
        tunnel.shutdown().await;
    }
    // Held until the socket is gone and the connection closed: the next service finds neither.
    drop(lock);
    eprintln!("synesis: stopped");
    Ok(())
}

/// SIGHUP: reload the config.
struct Reload {
    hangup: tokio::signal::unix::Signal,
}

impl Reload {
    fn listen() -> anyhow::Result<Reload> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Reload {
            hangup: signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?,
        })
    }

    async fn requested(&mut self) {
        self.hangup.recv().await;
    }
}

async fn sample(
    mut sampler: SystemSampler,
) -> anyhow::Result<(SystemSampler, synesis_proto::Vitals)> {
    tokio::task::spawn_blocking(move || {
        let vitals = sampler.sample();
        (sampler, vitals)
    })
    .await
    .context("the sampling thread failed")
}

/// The pre-warm policy over the samples, and where its signals go.
struct Prewarming {
    events: local::events::EventSender,
    policy: PrewarmPolicy,
    model: String,
    tunnel: Arc<synesis_tunnel::TunnelHandle>,
}

async fn sample_forever(
    mut sampler: SystemSampler,
    every: Duration,
    vitals: watch::Sender<synesis_proto::Vitals>,
    mut prewarming: Prewarming,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await; // the first tick is immediate; a sample was just taken
    loop {
        ticker.tick().await;
        let Ok((s, v)) = sample(sampler).await else {
            return;
        };
        sampler = s;
        if let Some(signal) = prewarming.policy.observe(std::time::Instant::now(), &v) {
            let sent = prewarming.tunnel.prewarm(synesis_proto::message::Prewarm {
                model: Some(prewarming.model.clone()),
                reason: signal.reason.to_string(),
            });
            tracing::info!(sent, reason = %signal.reason, "pre-warm");
            emit(
                &prewarming.events,
                What::Prewarm {
                    model: prewarming.model.clone(),
                    reason: signal.reason.to_string(),
                    sent,
                },
            );
        }
        if vitals.send(v).is_err() {
            return;
        }
    }
}
