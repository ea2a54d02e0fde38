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

use crate::api::host::ModelHost;
use crate::cli::TunnelRunArgs;
use crate::hosted::Hosted;
use crate::paths::Paths;
use crate::signals::Shutdown;

pub(crate) async fn run(paths: &Paths, args: &TunnelRunArgs) -> anyhow::Result<()> {
    let mut shutdown = Shutdown::listen().context("cannot listen for Ctrl-C")?;
    let mut reload = Reload::listen()?;
    // The HTTP API reads it, and replaces it when it registers a model it pulled.
    let config_tx =
        Arc::new(watch::channel(crate::registry::Config::load(&paths.config_file())?).0);
    let events = local::events::channel();
    // The local models, kept loaded between answers for the local API's clients (`synesis
    // ask`) and the HTTP API alike.
    let host = ModelHost::new(args.http.keep_alive);
    let unloading = tokio::spawn(Arc::clone(&host).unload_forever());
    let home = paths.identity_home()?;
    let identity = Identity::load(&home)?;
    let mut connected = match identity {
        Some(identity) => {
            let work = Arc::new(Hosted {
                host: Arc::clone(&host),
            });
            Some(Connected::start(paths, args, identity, home, &events, work).await?)
        }
        None if args.http.listen.is_some() => {
            eprintln!(
                "synesis: this device is not enrolled: the HTTP API answers with local models only"
            );
            None
        }
        None => bail!("this device is not enrolled; run `synesis cloud login TOKEN` first"),
    };
    let http = match args.http.listen {
        Some(addr) => {
            Some(Http::start(paths, args, addr, Arc::clone(&config_tx), Arc::clone(&host)).await?)
        }
        None => None,
    };
    tracing::info!(models = config_tx.borrow().models.len(), "config loaded");

    let mut status = connected.as_ref().map(|c| c.tunnel.status());
    let mut last_state = None;
    loop {
        let changed = async {
            match status.as_mut() {
                Some(s) => s.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = shutdown.requested() => break,
            () = reload.requested() => {
                // The settings the service reads from config.toml; a bad edit keeps the old ones.
                match crate::registry::Config::load(&paths.config_file()) {
                    Ok(new) => {
                        tracing::info!(models = new.models.len(), "config reloaded (SIGHUP)");
                        config_tx.send_replace(new);
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
            alive = changed => {
                let Some(status) = status.as_mut().filter(|_| alive) else {
                    break;
                };
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
    // The local API removes its socket and the HTTP API stops taking connections; what they
    // serve may finish within the grace period (a second Ctrl-C or SIGTERM cuts it at once).
    eprintln!(
        "synesis: stopping; streams in flight may finish within {}",
        humantime::format_duration(args.grace)
    );
    let grace = args.grace;
    let draining = async {
        let http = async {
            if let Some(http) = http {
                http.stop(grace).await;
            }
        };
        let api = async {
            if let Some(c) = connected.as_mut() {
                c.drain().await;
            }
        };
        tokio::join!(http, api);
    };
    tokio::select! {
        () = draining => {}
        () = shutdown.requested() => eprintln!("synesis: stopping now"),
    }
    if let Some(c) = connected {
        c.stop().await;
    }
    unloading.abort();
    eprintln!("synesis: stopped");
    Ok(())
}

/// The tunnel, the vitals feeding its heartbeats, and the local API over its connection.
struct Connected {
    tunnel: Arc<synesis_tunnel::TunnelHandle>,
    sampling: tokio::task::JoinHandle<()>,
    /// Keeps `$RUNTIME/cloud.json` fresh ([`crate::answer`]).
    facts: tokio::task::JoinHandle<()>,
    api: Option<tokio::task::JoinHandle<()>>,
    stop_api: Option<oneshot::Sender<()>>,
    lock: local::ServiceLock,
}

impl Connected {
    async fn start(
        paths: &Paths,
        args: &TunnelRunArgs,
        identity: Identity,
        home: std::path::PathBuf,
        events: &local::events::EventSender,
        work: Arc<Hosted>,
    ) -> anyhow::Result<Connected> {
        let (listener, lock) = local::bind(&paths.runtime.path)?;
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
        let sampling = tokio::spawn(sample_forever(
            sampler,
            args.heartbeat_interval,
            vitals_tx,
            Prewarming {
                events: events.clone(),
                policy: PrewarmPolicy::new(PrewarmConfig::default()),
                model: args.prewarm_model.clone(),
                paths: paths.clone(),
                device,
                tunnel: Arc::clone(&tunnel),
            },
        ));
        let facts = tokio::spawn(keep_facts(
            Arc::clone(&tunnel),
            device,
            crate::answer::facts_file(paths),
        ));
        let (stop_api, api_stopped) = oneshot::channel::<()>();
        let api = tokio::spawn(local::serve(
            listener,
            Arc::clone(&tunnel),
            async {
                let _ = api_stopped.await;
            },
            local::ServeOptions {
                grace: args.grace,
                events: events.clone(),
                work: Some(work),
                reconnect_wait: args.reconnect_wait,
            },
        ));
        eprintln!("synesis: tunnel for device {device} to {server}; Ctrl-C to stop");
        Ok(Connected {
            tunnel,
            sampling,
            facts,
            api: Some(api),
            stop_api: Some(stop_api),
            lock,
        })
    }

    /// The local API drains (within its grace period).
    async fn drain(&mut self) {
        if let Some(stop) = self.stop_api.take() {
            let _ = stop.send(());
        }
        if let Some(api) = self.api.as_mut() {
            let _ = api.await;
            self.api = None;
        }
    }

    /// Everything stops (streams still open are cut), the connection closes, and only then is
    /// the lock let go: the next service finds neither socket nor connection.
    async fn stop(mut self) {
        if let Some(api) = self.api.take() {
            api.abort();
            let _ = api.await;
        }
        // Awaited: they hold the tunnel's handle, which must be the last one to shut it down.
        self.sampling.abort();
        let _ = self.sampling.await;
        self.facts.abort();
        let _ = self.facts.await;
        match Arc::try_unwrap(self.tunnel) {
            Ok(tunnel) => tunnel.shutdown().await,
            Err(_) => tracing::warn!("the tunnel is still shared; its connection closes on exit"),
        }
        drop(self.lock);
    }
}

/// Asks the cloud for the account's facts (served models, default, standing) on the tunnel's
/// connection each time it connects and every [`crate::answer::FACTS_REFRESH_EVERY`] while it
/// is, and keeps them in `file` for every command to read (`crate::answer`).
async fn keep_facts(
    tunnel: Arc<synesis_tunnel::TunnelHandle>,
    device: synesis_proto::DeviceId,
    file: std::path::PathBuf,
) {
    let mut status = tunnel.status();
    loop {
        if status
            .wait_for(|s| s.state == TunnelState::Connected)
            .await
            .is_err()
        {
            return; // the tunnel stopped
        }
        let ask = |m: synesis_proto::Message| {
            let tunnel = Arc::clone(&tunnel);
            async move {
                let reply = synesis_tunnel::request::answer(tunnel.request(m).await?)?;
                Ok::<_, anyhow::Error>(reply)
            }
        };
        match crate::answer::fetch_facts(device, ask).await {
            Ok(facts) => {
                if let Err(e) = crate::answer::save_facts(&file, &facts) {
                    tracing::warn!(file = %file.display(), "the cloud's facts cannot be kept: {e}");
                }
            }
            Err(e) => tracing::info!("the cloud's facts are not refreshed: {e:#}"),
        }
        // Again after a while, or at once after a reconnect.
        let reconnected = async {
            let _ = status.wait_for(|s| s.state != TunnelState::Connected).await;
        };
        let _ = tokio::time::timeout(crate::answer::FACTS_REFRESH_EVERY, reconnected).await;
    }
}

/// The OpenAI-compatible HTTP API ([`crate::openai`]).
struct Http {
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    stop: oneshot::Sender<()>,
}

impl Http {
    async fn start(
        paths: &Paths,
        args: &TunnelRunArgs,
        addr: std::net::SocketAddr,
        config: Arc<watch::Sender<crate::registry::Config>>,
        host: Arc<ModelHost>,
    ) -> anyhow::Result<Http> {
        use crate::api::auth::{self, KeyRequired};
        let given = args.http.api_key()?;
        crate::api::check_listen(addr, args.http.allow_remote, given.as_deref())
            .map_err(crate::exit::UserError::Usage)?;
        // The key given, else the device's own (made on the first start): needed on every
        // request once the device is in an account, whose money the API spends.
        let (api_key, key_required) = match given {
            Some(key) => (key, KeyRequired::Always),
            None => {
                let file = paths.api_key_file();
                let key = auth::load_or_create(&file)?;
                let required = if synesis_tunnel::Identity::all(&paths.data.path)?.is_empty() {
                    eprintln!(
                        "synesis: this device is in no account, so loopback requests need no key; once it is, they need the key in {}",
                        file.display()
                    );
                    KeyRequired::WhenEnrolled
                } else {
                    eprintln!(
                        "synesis: requests need the key in {} (Authorization: Bearer KEY)",
                        file.display()
                    );
                    KeyRequired::Always
                };
                (key, required)
            }
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let bound = listener.local_addr()?;
        let api = crate::api::Api::new(
            paths.clone(),
            config,
            host,
            crate::api::ApiOptions {
                api_key: Some(api_key),
                key_required,
                max_body_bytes: args.http.max_body_bytes,
                max_concurrent: usize::from(args.http.max_concurrent),
                request_timeout: args.http.request_timeout,
                loopback_only: addr.ip().is_loopback(),
            },
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(crate::api::serve(listener, api, async {
            let _ = stopped.await;
        }));
        // A line scripts can wait for (the port, when 0 was asked for).
        println!("listening on http://{bound}");
        eprintln!("synesis: OpenAI-compatible API on http://{bound}/v1");
        Ok(Http { task, stop })
    }

    /// Stops taking connections; requests being answered may finish within `grace`.
    async fn stop(mut self, grace: Duration) {
        let _ = self.stop.send(());
        if tokio::time::timeout(grace, &mut self.task).await.is_err() {
            tracing::warn!("HTTP requests still running after the grace period; cut");
            self.task.abort();
        }
    }
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
    /// `--prewarm-model`; else the config's cloud model, else the cloud's default.
    model: Option<String>,
    paths: Paths,
    device: synesis_proto::DeviceId,
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
            let p = &prewarming;
            let config = crate::registry::Config::load(&p.paths.config_file()).unwrap_or_default();
            let facts = crate::answer::load_facts(&p.paths, p.device);
            let model = crate::answer::cloud_model(p.model.as_deref(), &config, facts.as_ref());
            let sent = prewarming.tunnel.prewarm(synesis_proto::message::Prewarm {
                model: model.clone(),
                reason: signal.reason.to_string(),
            });
            tracing::info!(sent, reason = %signal.reason, "pre-warm");
            emit(
                &prewarming.events,
                What::Prewarm {
                    model: model.unwrap_or_default(),
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
