//! Start-up in one place: bind, serve, and bring the database up in the
//! background. Tests build the same `Application` on port 0 (see
//! `tests/common`).

use std::{future::Future, net::SocketAddr, pin::Pin, time::Duration};

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
};
use tonic::{service::interceptor::InterceptedService, transport::Server};

use crate::{
    auth::Authorizer,
    config::{DatabaseSettings, Settings},
    grpc::{
        CustomerMappingServer, CustomerMappingService, Guard, limits::request_size_layer,
        reflection_interceptor,
    },
    health::{self, Health, ProbeSettings},
    mapping::Mappings,
    proto, store,
    telemetry::metrics,
    transport::{
        self, ConnectionLimits,
        tls::{ReloadingTls, TlsFiles},
    },
};

/// How long closing the pool may take at shutdown.
const POOL_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest header block a request may send (metadata is a few hundred
/// bytes; this leaves room for tracing headers and a token).
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// A bound server that has not started serving yet.
pub struct Application {
    settings: Settings,
    listener: TcpListener,
    local_addr: SocketAddr,
    health_listener: Option<(TcpListener, SocketAddr)>,
    metrics: Option<MetricsEndpoint>,
    tls: Option<ReloadingTls>,
    authorizer: Authorizer,
}

struct MetricsEndpoint {
    listener: TcpListener,
    addr: SocketAddr,
    handle: PrometheusHandle,
}

impl Application {
    /// Binds the gRPC address (port 0 picks a free port) and, when
    /// configured, the metrics address. Does not touch the database: that
    /// happens in the background once serving, so a database that is down at
    /// start gives NOT_SERVING, not a crash loop.
    ///
    /// Bad TLS files or a bad policy file stop it here: better not to start
    /// than to serve with less protection than configured.
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        settings.check_transport()?;
        let tls = TlsFiles::from_settings(&settings.tls)
            .map(ReloadingTls::load)
            .transpose()?;
        let authorizer = match &settings.access.policy_file {
            Some(path) => Authorizer::from_file(path)
                .with_context(|| format!("loading POLICY_FILE {}", path.display()))?,
            None => Authorizer::open(),
        };
        let listener = TcpListener::bind(settings.listen_addr)
            .await
            .with_context(|| format!("binding {}", settings.listen_addr))?;
        let local_addr = listener.local_addr()?;
        let health_listener = match settings.access.health_listen_addr {
            None => None,
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the health address {addr}"))?;
                let addr = listener.local_addr()?;
                Some((listener, addr))
            }
        };
        let metrics = match settings.metrics_addr {
            None => None,
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the metrics address {addr}"))?;
                Some(MetricsEndpoint {
                    addr: listener.local_addr()?,
                    listener,
                    handle: metrics::install()?,
                })
            }
        };
        Ok(Self {
            settings: settings.clone(),
            listener,
            local_addr,
            health_listener,
            metrics,
            tls,
            authorizer,
        })
    }

    /// The plaintext health-only address actually bound, if configured.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_listener.as_ref().map(|(_, addr)| *addr)
    }

    /// How the main port is protected, for the start-up log line.
    pub fn transport_security(&self) -> &'static str {
        match &self.tls {
            None => "plaintext",
            Some(tls) if tls.mutual() => "mutual TLS",
            Some(_) => "TLS",
        }
    }

    pub fn enforces_policy(&self) -> bool {
        self.authorizer.enforcing()
    }

    /// The gRPC address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The metrics address actually bound, if metrics are on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|m| m.addr)
    }

    /// Serves until `shutdown` resolves. Then health turns NOT_SERVING at
    /// once, no new connections are accepted, in-flight RPCs get up to the
    /// drain timeout to finish, and the pool closes.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let Self {
            settings,
            listener,
            health_listener,
            metrics,
            tls,
            authorizer,
            ..
        } = self;
        let limits = settings.limits;
        let store = store::Store::default();
        let (health, health_service) = Health::new().await;
        let (stop, stopped) = watch::channel(false);

        let supervisor = tokio::spawn(health::supervise_database(
            settings.database.clone(),
            ProbeSettings {
                interval: settings.health.health_probe_interval,
                timeout: settings.health.health_probe_timeout,
            },
            store.clone(),
            health.clone(),
            stopped.clone(),
        ));
        let metrics_server =
            metrics.map(|m| tokio::spawn(metrics::serve(m.listener, m.handle, stopped.clone())));

        // Both reflection versions describe everything served, each other
        // included; grpcurl releases before 1.8.8 only speak v1alpha.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(
                    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                )
        };
        let (reflection_v1, reflection_v1alpha) = if settings.access.reflection {
            let check = reflection_interceptor(authorizer.clone());
            (
                Some(InterceptedService::new(
                    reflection()
                        .build_v1()?
                        .max_decoding_message_size(limits.max_request_bytes),
                    check.clone(),
                )),
                Some(InterceptedService::new(
                    reflection()
                        .build_v1alpha()?
                        .max_decoding_message_size(limits.max_request_bytes),
                    check,
                )),
            )
        } else {
            (None, None)
        };
        let guard = Guard::new(
            authorizer,
            limits.max_concurrent_requests,
            limits.default_deadline,
        );
        let service = CustomerMappingService::new(Mappings::new(store.clone()), guard);

        let mut stopping = stopped.clone();
        let begin_shutdown = {
            let health = health.clone();
            async move {
                shutdown.await;
                health.shut_down().await;
                let _ = stop.send(true);
            }
        };

        let connection_limits = ConnectionLimits {
            max_connections: limits.max_connections,
            handshake_timeout: limits.handshake_timeout,
        };
        // Probes stay answered (NOT_SERVING) until the main port has drained.
        let (health_done, health_stop) = oneshot::channel::<()>();
        let health_server = health_listener.map(|(listener, _)| {
            let incoming = transport::incoming(listener, connection_limits, plaintext);
            let serve = Server::builder()
                .add_service(health_service.clone())
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = health_stop.await;
                });
            tokio::spawn(serve)
        });
        if tls.is_some() && health_server.is_none() {
            tracing::warn!(
                "TLS is on and HEALTH_LISTEN_ADDR is unset: Kubernetes gRPC probes, which \
                 connect in plaintext, will fail"
            );
        }

        let router = Server::builder()
            .max_concurrent_streams(limits.max_concurrent_streams)
            .http2_keepalive_interval(Some(limits.http2_keepalive_interval))
            .http2_keepalive_timeout(Some(limits.http2_keepalive_timeout))
            .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
            .layer(request_size_layer(limits.max_request_bytes))
            .add_service(health_service)
            .add_optional_service(reflection_v1)
            .add_optional_service(reflection_v1alpha)
            .add_service(
                CustomerMappingServer::new(service)
                    .max_decoding_message_size(limits.max_request_bytes),
            );
        let serve: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
            match tls {
                None => Box::pin(router.serve_with_incoming_shutdown(
                    transport::incoming(listener, connection_limits, plaintext),
                    begin_shutdown,
                )),
                Some(tls) => Box::pin(router.serve_with_incoming_shutdown(
                    transport::incoming(listener, connection_limits, move |tcp| {
                        let tls = tls.clone();
                        async move { tls.accept(tcp).await }
                    }),
                    begin_shutdown,
                )),
            };
        let drain_deadline = async {
            let _ = stopping.wait_for(|stop| *stop).await;
            tokio::time::sleep(settings.shutdown_drain_timeout).await;
        };
        tokio::select! {
            served = serve => served.context("serving gRPC")?,
            () = drain_deadline => tracing::warn!(
                timeout = ?settings.shutdown_drain_timeout,
                "in-flight RPCs did not finish within the drain timeout; cutting them off"
            ),
        }

        let _ = health_done.send(());
        if let Some(health_server) = health_server {
            match health_server.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::warn!(error = %err, "the health listener failed"),
                Err(err) => tracing::warn!(error = %err, "the health listener panicked"),
            }
        }
        let _ = supervisor.await;
        if let Some(metrics_server) = metrics_server {
            let _ = metrics_server.await;
        }
        if let Some(db) = store.get() {
            // Connections of RPCs cut off by the drain timeout may still be
            // busy in the database; don't let them hold the exit hostage.
            // Dropping them ends their sessions, which rolls their
            // transactions back.
            match tokio::time::timeout(POOL_CLOSE_TIMEOUT, db.connection().close_by_ref()).await {
                Ok(closed) => closed.context("closing the database pool")?,
                Err(_) => tracing::warn!("database pool did not close in time; dropping it"),
            }
        }
        Ok(())
    }
}

/// A plaintext connection needs no handshake.
async fn plaintext(tcp: tokio::net::TcpStream) -> std::io::Result<tokio::net::TcpStream> {
    Ok(tcp)
}

/// Applies pending migrations and returns (the `migrate` subcommand).
pub async fn migrate(settings: &DatabaseSettings) -> anyhow::Result<()> {
    let settings = DatabaseSettings {
        migrate_on_start: true,
        ..settings.clone()
    };
    let db = health::bring_up(&settings).await?;
    db.close().await.context("closing the database pool")?;
    Ok(())
}

/// Resolves on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received, shutting down"),
        () = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}
