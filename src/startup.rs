//! Start-up in one place: connect, migrate, bind, serve. Tests build the same
//! `Application` on port 0 (see `tests/common`).

use std::{future::Future, net::SocketAddr};

use anyhow::Context;
use sea_orm::DatabaseConnection;
use tokio::net::TcpListener;
use tonic::transport::{Server, server::TcpIncoming};

use crate::{
    config::{DatabaseSettings, Settings},
    grpc::{CustomerMappingServer, CustomerMappingService},
    mapping::Mappings,
    store,
};

/// A bound, connected server that has not started serving yet.
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    db: DatabaseConnection,
}

impl Application {
    /// Connects to the database, applies migrations when configured, and
    /// binds the listen address (port 0 picks a free port).
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        let db = connect(&settings.database).await?;
        if settings.database.migrate_on_start {
            store::migrate(&db)
                .await
                .context("applying database migrations")?;
        }
        let listener = TcpListener::bind(settings.listen_addr)
            .await
            .with_context(|| format!("binding {}", settings.listen_addr))?;
        let local_addr = listener.local_addr()?;
        Ok(Self {
            listener,
            local_addr,
            db,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` resolves, lets in-flight calls finish, then
    /// closes the pool.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let service = CustomerMappingService::new(Mappings::new(self.db.clone()));
        // Small request/reply messages: don't let Nagle hold them back.
        let incoming = TcpIncoming::from(self.listener).with_nodelay(Some(true));
        Server::builder()
            .add_service(CustomerMappingServer::new(service))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .context("serving gRPC")?;
        self.db.close().await.context("closing the database pool")?;
        Ok(())
    }
}

/// Applies pending migrations and returns (the `migrate` subcommand).
pub async fn migrate(settings: &DatabaseSettings) -> anyhow::Result<()> {
    let db = connect(settings).await?;
    store::migrate(&db)
        .await
        .context("applying database migrations")?;
    db.close().await.context("closing the database pool")?;
    Ok(())
}

async fn connect(settings: &DatabaseSettings) -> anyhow::Result<DatabaseConnection> {
    store::connect(&settings.database_url, &settings.pool_options())
        .await
        .with_context(|| format!("connecting to {}", settings.redacted_url()))
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
