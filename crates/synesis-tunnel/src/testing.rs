//! Test harness shared by the crate's tests: a QUIC server on loopback playing the cloud, a
//! client connection to it, and the local API's service in front of that connection.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use synesis_proto::DeviceId;
use tokio::sync::oneshot;

use crate::local::{Backend, LocalClient, bind, serve};
use crate::{OpenError, PingError, TunnelState, TunnelStatus};

/// A loopback "cloud" that hands every stream the client opens to a handler, and the client's
/// connection to it.
pub(crate) struct Loopback {
    pub(crate) conn: quinn::Connection,
    pub(crate) client: quinn::Endpoint,
    pub(crate) server: quinn::Endpoint,
}

impl Loopback {
    pub(crate) async fn start<F, Fut>(handler: F) -> Loopback
    where
        F: Fn(quinn::SendStream, quinn::RecvStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let provider = synesis_wire::tls::provider();
        let name = synesis_wire::tls::SERVER_NAME.to_owned();
        let certified = rcgen::generate_simple_self_signed(vec![name]).unwrap();
        let cert = certified.cert.der().clone();
        let key =
            rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
        let mut server_tls = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        server_tls.alpn_protocols = synesis_wire::tls::alpn();
        let server_config = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(server_tls).unwrap(),
        ));
        let server =
            quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();

        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client_tls.alpn_protocols = synesis_wire::tls::alpn();
        let client_config = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).unwrap(),
        ));
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();

        let accepting = server.clone();
        tokio::spawn(async move {
            let incoming = accepting.accept().await.unwrap();
            let conn = incoming.await.unwrap();
            while let Ok((tx, rx)) = conn.accept_bi().await {
                tokio::spawn(handler(tx, rx));
            }
        });
        let conn = client
            .connect_with(
                client_config,
                server.local_addr().unwrap(),
                synesis_wire::tls::SERVER_NAME,
            )
            .unwrap()
            .await
            .unwrap();
        Loopback {
            conn,
            client,
            server,
        }
    }
}

/// The tunnel as the local API sees it: streams open on a loopback connection.
pub(crate) struct FakeTunnel {
    pub(crate) conn: quinn::Connection,
}

impl Backend for FakeTunnel {
    fn current_status(&self) -> TunnelStatus {
        TunnelStatus {
            state: TunnelState::Connected,
            device_id: DeviceId::try_from_uuid(uuid::Uuid::from_u128(7)).unwrap(),
            account: "acme".into(),
            server: "127.0.0.1:1".into(),
            rtt_ms: Some(0.25),
            last_heartbeat_ack_at: None,
            connected_since: None,
            reconnects: 2,
            failure: None,
            next_attempt_at: None,
        }
    }

    async fn measure_ping(&self) -> Result<Duration, PingError> {
        Ok(Duration::from_micros(1234))
    }

    async fn open_cloud_stream(&self) -> Result<(quinn::SendStream, quinn::RecvStream), OpenError> {
        Ok(self.conn.open_bi().await?)
    }
}

/// The local API's service on a fresh runtime directory, in front of `backend`.
pub(crate) struct Service {
    pub(crate) client: LocalClient,
    pub(crate) stop: Option<oneshot::Sender<()>>,
    pub(crate) task: tokio::task::JoinHandle<()>,
    pub(crate) dir: tempfile::TempDir,
}

impl Service {
    pub(crate) fn start<B: Backend>(backend: Arc<B>) -> Service {
        Service::start_with(backend, None)
    }

    /// [`Service::start`], doing `work` for its clients.
    pub(crate) fn start_with<B: Backend>(
        backend: Arc<B>,
        work: Option<Arc<dyn crate::local::LocalWork>>,
    ) -> Service {
        Service::start_waiting(backend, work, Duration::ZERO)
    }

    /// [`Service::start_with`], its clients' streams waiting `reconnect_wait` for a tunnel
    /// that is not connected.
    pub(crate) fn start_waiting<B: Backend>(
        backend: Arc<B>,
        work: Option<Arc<dyn crate::local::LocalWork>>,
        reconnect_wait: Duration,
    ) -> Service {
        let dir = tempfile::tempdir().unwrap();
        let (listener, lock) = bind(dir.path()).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(
            listener,
            backend,
            async move {
                let _ = stopped.await;
                drop(lock);
            },
            crate::local::ServeOptions {
                grace: Duration::ZERO,
                events: crate::local::events::channel(),
                work,
                reconnect_wait,
            },
        ));
        Service {
            client: LocalClient::new(dir.path()),
            stop: Some(stop),
            task,
            dir,
        }
    }
}
