//! A flood of connections without a certificate, from one process (on another address of this
//! machine), does not keep an enrolled device out, and the cloud's memory stays bounded while
//! it lasts.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use synesis_e2e::{Cloud, Device, rss_kib, wait_for};

/// Connection attempts in the flood, and how many are in flight at once.
const ATTEMPTS: usize = 2_000;
const IN_FLIGHT: usize = 200;
/// How long the test waits for the device to connect (it returns as soon as it has). The
/// promise, its own first attempt plus one backoff step, is checked on the attempts the
/// tunnel counts, not on this clock.
const DEVICE_CONNECT_LIMIT: Duration = Duration::from_secs(60);
/// Failed attempts the device may have before it connects: one backoff step.
const DEVICE_FAILED_ATTEMPTS_MAX: u64 = 1;
/// The cloud's resident memory may not grow past this during the flood.
const CLOUD_RSS_GROWTH_MAX_KIB: u64 = 128 * 1024;

#[derive(Default)]
struct Outcomes {
    established: AtomicU64,
    failed: AtomicU64,
    limited: AtomicU64,
}

#[test]
fn a_flood_of_certificateless_connections_does_not_keep_a_device_out() {
    let cloud = Cloud::start();
    let device = Device::new();
    device.login(&cloud.account_and_token("acme"));
    let ca = std::fs::read(cloud.dir().join("ca.crt.der")).unwrap();
    let pin = synesis_wire::tls::fingerprint(&ca.into());
    let pid = cloud.process.pid();
    let rss_before = rss_kib(pid);

    // The cloud's memory, sampled while the flood lasts.
    let flooding = Arc::new(AtomicBool::new(true));
    let peak = Arc::new(AtomicU64::new(rss_before));
    let sampler = {
        let (flooding, peak) = (Arc::clone(&flooding), Arc::clone(&peak));
        std::thread::spawn(move || {
            while flooding.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let outcomes = Arc::new(Outcomes::default());
    let addr = cloud.addr;
    let flood = {
        let outcomes = Arc::clone(&outcomes);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                // From another address than the device's (127.0.0.1): the cloud's handshake
                // budget per source (64) is the flood's own to fill, as another host's would be.
                let endpoint = quinn::Endpoint::client("127.0.0.2:0".parse().unwrap()).unwrap();
                let config = synesis_tunnel::tls::enrollment_client_config(pin).unwrap();
                let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
                let mut tasks = Vec::with_capacity(ATTEMPTS);
                for _ in 0..ATTEMPTS {
                    let permit = Arc::clone(&slots).acquire_owned().await.unwrap();
                    let (endpoint, config, outcomes) =
                        (endpoint.clone(), config.clone(), Arc::clone(&outcomes));
                    tasks.push(tokio::spawn(async move {
                        let connecting =
                            endpoint.connect_with(config, addr, synesis_wire::tls::SERVER_NAME);
                        let conn = match connecting {
                            Ok(c) => tokio::time::timeout(Duration::from_secs(5), c).await,
                            Err(_) => {
                                outcomes.failed.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                        };
                        match conn {
                            Ok(Ok(conn)) => {
                                outcomes.established.fetch_add(1, Ordering::Relaxed);
                                // Hold it, saying nothing, as long as the cloud lets it live.
                                let closed =
                                    tokio::time::timeout(Duration::from_secs(2), conn.closed())
                                        .await;
                                if let Ok(reason) = closed
                                    && synesis_wire::error_code_of(&reason)
                                        == Some(synesis_proto::ErrorCode::LIMIT_EXCEEDED)
                                {
                                    outcomes.limited.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            _ => {
                                outcomes.failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        drop(permit);
                    }));
                }
                for task in tasks {
                    let _ = task.await;
                }
                endpoint.close(0u32.into(), b"done");
            });
        })
    };

    // Let the flood fill the door (its first answers are the evidence), then the device
    // connects through it.
    assert!(wait_for(Duration::from_secs(60), || {
        outcomes.established.load(Ordering::Relaxed) + outcomes.failed.load(Ordering::Relaxed)
            >= IN_FLIGHT as u64
    }));
    let started = Instant::now();
    let _tunnel = device.tunnel("1s");
    // The status that first said connected: how many attempts failed before.
    let mut status = None;
    let connected = wait_for(DEVICE_CONNECT_LIMIT, || {
        status = device.status();
        status.as_ref().is_some_and(|s| s["state"] == "connected")
    });
    let took = started.elapsed();
    let failed_attempts = status
        .as_ref()
        .and_then(|s| s["reconnects"].as_u64())
        .unwrap_or(u64::MAX);
    let still_flooding = !flood.is_finished();
    flood.join().unwrap();
    flooding.store(false, Ordering::Relaxed);
    sampler.join().unwrap();

    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "flood: {ATTEMPTS} attempts ({} established, {} closed with LIMIT_EXCEEDED, {} failed); \
         device connected in {:.2} s after {failed_attempts} failed attempts (flood still \
         running then: {still_flooding}); \
         cloud RSS {} KiB before, {} KiB at peak",
        outcomes.established.load(Ordering::Relaxed),
        outcomes.limited.load(Ordering::Relaxed),
        outcomes.failed.load(Ordering::Relaxed),
        took.as_secs_f64(),
        rss_before,
        peak
    );
    assert!(
        connected,
        "the device did not connect within {DEVICE_CONNECT_LIMIT:?}:\n{}",
        device.tunnel_log()
    );
    assert!(
        failed_attempts <= DEVICE_FAILED_ATTEMPTS_MAX,
        "the device connected after {failed_attempts} failed attempts: {status:?}\n{}",
        device.tunnel_log()
    );
    assert!(
        peak.saturating_sub(rss_before) < CLOUD_RSS_GROWTH_MAX_KIB,
        "the cloud grew from {rss_before} KiB to {peak} KiB"
    );
    // The cloud serves on after the flood.
    assert!(wait_for(Duration::from_secs(20), || device
        .state()
        .as_deref()
        == Some("connected")));
}
