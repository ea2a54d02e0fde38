//! What pushing an adapter costs against the transport alone (PROTOCOL.md §2 *Upload*): a
//! 64 MiB LoRA adapter pushed by the device's own client (`synesis_tunnel::upload::push`, what
//! `synesis cloud push` runs, on a connection of its own) to the cloud's upload stream
//! (`UploadBegin` → `UploadResume` → 1 MiB `UploadChunk`s, pipelined → `UploadDone` →
//! `UploadComplete`: the chunks written at their offsets and synced, hashed as they come, the
//! GGUF verified, the content named) against the **anchor**, the same 64 MiB written in the same
//! 1 MiB slices over one bidirectional stream of a plain quinn connection on loopback to a
//! server in the same process that reads to the end and answers one byte. The push's time is
//! the one it reports (from `UploadBegin` to `UploadComplete`); the client's hashing of the
//! file before it is not counted.
//!
//! - `upload/64MiB/ours` and `upload/64MiB/raw_quinn`: with `Throughput::Bytes`, criterion
//!   reports bytes/s; the bench also prints `upload: ours X MiB/s, raw quinn Y MiB/s, ratio Z`
//!   from the medians of the same run.
//! - `upload/ask_ttft/{no_adapter,warm_adapter,cold_adapter}`: time to the first chunk of an
//!   escalation to the tiny model (what `cloud ask --lora` sends) without an adapter, with one
//!   already loaded, and with one on its first use after its push (each iteration pushes a new
//!   small adapter first, outside the timed part).
//!
//! Every iteration uploads new content under a new name (the last 8 bytes of the padding carry
//! the iteration number), so the cloud never answers "already held"; the hashing of that
//! content by the client is outside the timed part. Run:
//! `cargo bench -p synesis-benches --bench upload`. Each iteration stores 64 MiB in the cloud's
//! data directory (in the temporary directory, removed at the end): about 2.5 GB in all; with
//! `TMPDIR=/dev/shm` the cloud's syncs and writes cost no disk, which separates the upload
//! path's own cost from the disk's. Goal: ours/raw ≥ 0.90.
#![allow(clippy::unwrap_used, clippy::expect_used)] // bench code

#[allow(dead_code)] // each bench uses part of it
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{BenchCloud, cloud_with_device, escalate, llama_settings};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use synesis_cloud::config::{AdapterSettings, ProviderConfig, Served, Serving};
use synesis_proto::message::{ChatRole, ChatTurn, Tier};
use synesis_tunnel::upload::{Route, Upload, push};

/// The adapter's size.
const SIZE: usize = 64 << 20;
/// One chunk (and one write of the anchor).
const CHUNK: u32 = 1 << 20;

/// One push of `path` with the device's own client (`synesis_tunnel::upload::push`, what
/// `synesis cloud push` runs) on its connection: the time it reports from `UploadBegin` to
/// `UploadComplete` (the client's hashing of the file comes before and is not counted).
async fn ours(route: &mut Route, path: &std::path::Path, name: String) -> Duration {
    let upload = Upload {
        path: path.to_owned(),
        name,
        base_model: "tiny".into(),
        chunk_size_bytes: CHUNK,
    };
    let (_cancel, cancel) = tokio::sync::watch::channel(false);
    let pushed = push(route, &upload, cancel, &mut |_| {}).await.unwrap();
    assert_eq!(pushed.resumed_from_bytes, 0, "new content");
    assert!(pushed.complete.serving);
    Duration::from_secs_f64(pushed.seconds)
}

/// An answer of the tiny model through the cloud, with `adapter` if any: the time to the first
/// chunk (the whole answer is read before returning).
async fn ttft(conn: &quinn::Connection, adapter: Option<&str>) -> Duration {
    let turns = vec![ChatTurn {
        role: ChatRole::User,
        content: "hello".into(),
    }];
    escalate(conn, "tiny", adapter, turns, 16).await.0
}

/// Iteration `n`'s adapter: `bytes` with `n` in its last 8 bytes (new content each time),
/// written to a file in `dir`, pushed as `bench-{n}`. Its name and the push's time.
async fn push_new(
    route: &mut Route,
    dir: &std::path::Path,
    bytes: &mut [u8],
    n: u64,
) -> (String, Duration) {
    let len = bytes.len();
    bytes[len - 8..].copy_from_slice(&n.to_be_bytes());
    let path = dir.join(format!("adapter-{}.gguf", n % 2));
    std::fs::write(&path, &*bytes).unwrap();
    let name = format!("bench-{n}");
    let took = ours(route, &path, name.clone()).await;
    (name, took)
}

/// The same bytes over one plain quinn stream, in the same slices; the time until the server's
/// one-byte answer.
async fn raw(conn: &quinn::Connection, bytes: &[u8]) -> Duration {
    let started = Instant::now();
    let (mut tx, mut rx) = conn.open_bi().await.unwrap();
    for piece in bytes.chunks(CHUNK as usize) {
        tx.write_all(piece).await.unwrap();
    }
    tx.finish().unwrap();
    let mut done = [0u8; 1];
    rx.read_exact(&mut done).await.unwrap();
    started.elapsed()
}

/// A plain quinn server on loopback (ring, TLS 1.3, the project's ALPN, a self-signed
/// certificate; the connection window the cloud gives a device) that reads each stream to the
/// end and answers one byte, and a client connection to it.
async fn plain_quinn() -> (quinn::Endpoint, quinn::Endpoint, quinn::Connection) {
    let name = synesis_wire::tls::SERVER_NAME.to_owned();
    let certified = rcgen::generate_simple_self_signed(vec![name.clone()]).unwrap();
    let cert = certified.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let provider = synesis_wire::tls::provider();

    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    tls.alpn_protocols = synesis_wire::tls::alpn();
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap(),
    ));
    let mut transport = quinn::TransportConfig::default();
    transport.receive_window(synesis_cloud::endpoint::DEVICE_RECEIVE_WINDOW.into());
    server.transport_config(Arc::new(transport));
    let server = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
    let accepting = server.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            tokio::spawn(async move {
                let conn = incoming.await.unwrap();
                while let Ok((mut tx, mut rx)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        while rx.read_chunk(usize::MAX, true).await.unwrap().is_some() {}
                        tx.write_all(&[1]).await.unwrap();
                        tx.finish().unwrap();
                    });
                }
            });
        }
    });

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = synesis_wire::tls::alpn();
    let client_config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(client_config);
    let conn = client
        .connect(server.local_addr().unwrap(), &name)
        .unwrap()
        .await
        .unwrap();
    (server, client, conn)
}

/// An embedded cloud serving the tiny model (and room for every upload), and a device.
async fn cloud(dir: &std::path::Path, model: &std::path::Path) -> BenchCloud {
    let mut serving = Serving {
        adapters: AdapterSettings {
            storage_per_account: 1 << 40,
            ..AdapterSettings::default()
        },
        ..Serving::default()
    };
    serving.models.insert(
        "tiny".into(),
        Served {
            provider: ProviderConfig::Llama(llama_settings(model)),
            tiers: vec![Tier::Free, Tier::Managed],
        },
    );
    cloud_with_device(dir, serving).await
}

/// The median of `times`, as MiB/s for `SIZE` bytes each.
fn mib_per_s(times: &mut [Duration]) -> f64 {
    times.sort();
    let median = times[times.len() / 2];
    (SIZE as f64 / f64::from(1u32 << 20)) / median.as_secs_f64()
}

fn upload(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    synesis_infer::tiny::write_model(&model, synesis_infer::tiny::TinySpec::TINY).unwrap();
    // A valid LoRA for the tiny model, padded to 64 MiB (llama.cpp and the verifier read the
    // tensors at their offsets and ignore what follows).
    let lora = dir.path().join("adapter.gguf");
    synesis_infer::tiny::write_lora(&lora, synesis_infer::tiny::TinySpec::TINY, 7).unwrap();
    let mut base = std::fs::read(&lora).unwrap();
    assert!(base.len() + 8 <= SIZE);
    let pad = SIZE - base.len();
    base.extend((0..pad).map(|i| u8::try_from(i % 251).unwrap()));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let bench = runtime.block_on(cloud(dir.path(), &model));
    let conn = &bench.conn;
    let mut route = Route::Direct(bench.identity.clone(), None);
    let (_server, _client, plain) = runtime.block_on(plain_quinn());
    let next = AtomicU64::new(0);
    let (mut ours_times, mut raw_times) = (Vec::new(), Vec::new());

    let mut group = c.benchmark_group("upload/64MiB");
    group.throughput(Throughput::Bytes(SIZE as u64));
    group.sampling_mode(SamplingMode::Flat);
    group.bench_function("ours", |b| {
        b.iter_custom(|n| {
            let mut total = Duration::ZERO;
            for _ in 0..n {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let (_, took) = runtime.block_on(push_new(&mut route, dir.path(), &mut base, n));
                ours_times.push(took);
                total += took;
            }
            total
        });
    });
    group.bench_function("raw_quinn", |b| {
        b.iter_custom(|n| {
            let mut total = Duration::ZERO;
            for _ in 0..n {
                let took = runtime.block_on(raw(&plain, &base));
                raw_times.push(took);
                total += took;
            }
            total
        });
    });
    group.finish();

    let line = format!(
        "upload: ours {:.0} MiB/s, raw quinn {:.0} MiB/s, ratio {:.3} (goal ≥ 0.90; medians of {} and {} uploads of 64 MiB)",
        mib_per_s(&mut ours_times),
        mib_per_s(&mut raw_times),
        mib_per_s(&mut ours_times) / mib_per_s(&mut raw_times),
        ours_times.len(),
        raw_times.len()
    );
    println!("{line}");

    // Time to the first token of `cloud ask --lora`: no adapter, an adapter already loaded
    // (warm), an adapter on its first use after its push (cold: each iteration pushes a new one
    // first, outside the timed part).
    let mut small = std::fs::read(&lora).unwrap();
    small.extend([0u8; 8]);
    let (warm, _) = runtime.block_on(push_new(
        &mut route,
        dir.path(),
        &mut small,
        next.fetch_add(1, Ordering::Relaxed),
    ));
    runtime.block_on(ttft(conn, Some(&warm)));
    runtime.block_on(ttft(conn, None));
    let mut ask = c.benchmark_group("upload/ask_ttft");
    ask.sampling_mode(SamplingMode::Flat);
    ask.measurement_time(Duration::from_secs(2));
    ask.bench_function("no_adapter", |b| {
        b.iter_custom(|n| (0..n).map(|_| runtime.block_on(ttft(conn, None))).sum());
    });
    ask.bench_function("warm_adapter", |b| {
        b.iter_custom(|n| {
            (0..n)
                .map(|_| runtime.block_on(ttft(conn, Some(&warm))))
                .sum()
        });
    });
    ask.bench_function("cold_adapter", |b| {
        b.iter_custom(|n| {
            (0..n)
                .map(|_| {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let (name, _) =
                        runtime.block_on(push_new(&mut route, dir.path(), &mut small, i));
                    runtime.block_on(ttft(conn, Some(&name)))
                })
                .sum()
        });
    });
    ask.finish();

    println!("{line}");
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = upload
}
criterion_main!(benches);
