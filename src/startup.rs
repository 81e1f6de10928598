//! Start-up in one place: bind, serve, and bring the database up in the
//! background. Tests build the same `Application` on port 0 (see
//! `tests/common`).

use std::{future::Future, net::SocketAddr, time::Duration};

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::{net::TcpListener, sync::watch};
use tonic::transport::{Server, server::TcpIncoming};

use crate::{
    config::{DatabaseSettings, Settings},
    grpc::{CustomerMappingServer, CustomerMappingService},
    health::{self, Health, ProbeSettings},
    mapping::Mappings,
    proto, store,
    telemetry::metrics,
};

/// How long closing the pool may take at shutdown.
const POOL_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A bound server that has not started serving yet.
pub struct Application {
    settings: Settings,
    listener: TcpListener,
    local_addr: SocketAddr,
    metrics: Option<MetricsEndpoint>,
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
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(settings.listen_addr)
            .await
            .with_context(|| format!("binding {}", settings.listen_addr))?;
        let local_addr = listener.local_addr()?;
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
            metrics,
        })
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
            metrics,
            ..
        } = self;
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
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;
        let service = CustomerMappingService::new(Mappings::new(store.clone()));

        let mut stopping = stopped.clone();
        let begin_shutdown = {
            let health = health.clone();
            async move {
                shutdown.await;
                health.shut_down().await;
                let _ = stop.send(true);
            }
        };
        // Small request/reply messages: don't let Nagle hold them back.
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let serve = Server::builder()
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(CustomerMappingServer::new(service))
            .serve_with_incoming_shutdown(incoming, begin_shutdown);
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
