//! Start-up in one place, in two steps: [`Application::build`] assembles
//! everything that can fail (listeners, TLS, policy, reflection, services)
//! and [`Application::run_until`] only serves and shuts down, bringing the
//! database up in the background. Tests build the same `Application` on
//! port 0 (see `tests/api/helpers`).

use std::{collections::HashMap, future::Future, net::SocketAddr, pin::Pin, time::Duration};

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tonic::{
    service::{Routes, RoutesBuilder, interceptor::InterceptedService},
    transport::Server,
};

use crate::{
    auth::Authorizer,
    config::{DatabaseSettings, MigrateArgs, Settings},
    grpc::{
        CustomerMappingServer, CustomerMappingService, Guard, limits::request_size_layer,
        reflection_interceptor,
    },
    health::{self, Health, ProbeSettings},
    mappings::{Changes, Feed, Mappings},
    proto,
    store::{self, Database, Migrations},
    telemetry::metrics,
    transport::{
        self, ConnectionLimits,
        tls::{ReloadingTls, TlsFiles},
    },
};

/// How long the background tasks may take to stop once shutdown begins
/// (each only has to notice the token; a database check in progress is
/// raced against it).
const TASKS_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// How long closing the pool may take at shutdown.
const POOL_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the upgrade's last step may take besides connecting: dropping
/// two constraints, whose lock waits 5 s at most.
const ENABLE_ACCOUNTS_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest header block a request may send (metadata is a few hundred
/// bytes; this leaves room for tracing headers and a token).
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// A bound server, with every part assembled, that has not started serving.
pub struct Application {
    settings: Settings,
    listener: TcpListener,
    local_addr: SocketAddr,
    health_listener: Option<(TcpListener, SocketAddr)>,
    metrics: Option<MetricsEndpoint>,
    tls: Option<ReloadingTls>,
    enforces_policy: bool,
    store: store::Store,
    health: Health,
    stopping: CancellationToken,
    feed: Feed,
    services: Services,
}

struct MetricsEndpoint {
    listener: TcpListener,
    addr: SocketAddr,
    handle: PrometheusHandle,
}

/// The gRPC services each port serves, assembled and type-erased.
struct Services {
    /// Health, reflection (when on) and CustomerMapping.
    main: Routes,
    /// Health alone, for the plaintext probe port.
    health_only: Routes,
}

impl Application {
    /// Binds the gRPC address (port 0 picks a free port) and, when
    /// configured, the health and metrics addresses, and assembles the
    /// services. Does not touch the database: that happens in the background
    /// once serving, so a database that is down at start gives NOT_SERVING,
    /// not a crash loop.
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

        let limits = settings.limits;
        let store = store::Store::default();
        // Cancelled when shutdown begins; every background task and every
        // Watch stream stops on it.
        let stopping = CancellationToken::new();
        let changes = Changes::default();
        let feed = Feed::new(
            store.clone(),
            changes.clone(),
            settings.watch,
            stopping.clone(),
        );
        let (health, health_service) = Health::new().await;
        let mut main = RoutesBuilder::default();
        main.add_service(health_service.clone());
        if settings.access.reflection {
            add_reflection(&mut main, &authorizer, limits.max_request_bytes)?;
        }
        let enforces_policy = authorizer.enforcing();
        let guard = Guard::new(
            authorizer,
            limits.max_concurrent_requests,
            limits.default_deadline,
        );
        main.add_service(
            CustomerMappingServer::new(CustomerMappingService::new(
                Mappings::new(
                    store.clone(),
                    changes,
                    settings.stripe_idempotency_namespace.clone(),
                ),
                feed.clone(),
                guard,
            ))
            .max_decoding_message_size(limits.max_request_bytes),
        );
        Ok(Self {
            settings: settings.clone(),
            listener,
            local_addr,
            health_listener,
            metrics,
            tls,
            enforces_policy,
            store,
            health,
            stopping,
            feed,
            services: Services {
                main: main.routes(),
                health_only: Routes::new(health_service),
            },
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
        self.enforces_policy
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
    ///
    /// A long-lived task that panics or stops on its own (the database
    /// supervisor, the health or metrics listener, the gRPC server) ends
    /// this with an error naming it, so the process exits non-zero and the
    /// orchestrator restarts it rather than keeping a half-alive server.
    pub async fn run_until(
        mut self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let stopping = self.stopping.clone();
        // Cancelled once the main port has drained: probes stay answered
        // (NOT_SERVING) until then.
        let drained = CancellationToken::new();
        let mut tasks = self.spawn_background(&stopping, &drained);
        let Self {
            settings,
            listener,
            tls,
            store,
            health,
            services,
            ..
        } = self;
        let begin_shutdown = {
            let (health, stopping) = (health.clone(), stopping.clone());
            async move {
                tokio::select! {
                    () = shutdown => {}
                    // A failed task (below) stops the server too.
                    () = stopping.cancelled() => {}
                }
                health.shut_down().await;
                stopping.cancel();
            }
        };
        let serve = serve_main(&settings, services.main, listener, tls, begin_shutdown);
        let failed = drain(serve, &settings, &stopping, &mut tasks, &health).await?;
        drained.cancel();
        stopping.cancel();
        tasks.stop(TASKS_STOP_TIMEOUT).await;
        close_database(&store).await;
        match failed {
            None => Ok(()),
            Some(task) => anyhow::bail!("the {task} task failed; exiting so that it is restarted"),
        }
    }

    /// Starts the tasks that run beside the gRPC server: the database
    /// supervisor, and the metrics and health listeners when configured.
    fn spawn_background(
        &mut self,
        stopping: &CancellationToken,
        drained: &CancellationToken,
    ) -> LongLived {
        let settings = &self.settings;
        let mut tasks = LongLived::default();
        tasks.spawn(
            "database supervisor",
            health::supervise_database(
                settings.database.clone(),
                ProbeSettings {
                    interval: settings.health.health_probe_interval,
                    timeout: settings.health.health_probe_timeout,
                },
                self.store.clone(),
                self.health.clone(),
                stopping.clone(),
            ),
        );
        tasks.spawn("change feed", self.feed.clone().poll());
        if let Some(m) = self.metrics.take() {
            tasks.spawn(
                "metrics listener",
                metrics::serve(m.listener, m.handle, stopping.clone()),
            );
        }
        if let Some((listener, _)) = self.health_listener.take() {
            let incoming = transport::incoming(listener, connection_limits(settings), plaintext);
            let routes = std::mem::take(&mut self.services.health_only);
            let serve = Server::builder()
                .add_routes(routes)
                .serve_with_incoming_shutdown(incoming, drained.clone().cancelled_owned());
            tasks.spawn("health listener", async move {
                if let Err(err) = serve.await {
                    tracing::error!(error = %err, "the health listener failed");
                }
            });
        } else if self.tls.is_some() {
            tracing::warn!(
                "TLS is on and HEALTH_LISTEN_ADDR is unset: Kubernetes gRPC probes, which \
                 connect in plaintext, will fail"
            );
        }
        tasks
    }
}

type Serving<'a> = Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send + 'a>>;

/// The main port's server, plaintext or TLS, until `shutdown` resolves and
/// its calls have drained.
fn serve_main<'a>(
    settings: &Settings,
    routes: Routes,
    listener: TcpListener,
    tls: Option<ReloadingTls>,
    shutdown: impl Future<Output = ()> + Send + 'a,
) -> Serving<'a> {
    let limits = settings.limits;
    let router = Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_keepalive_interval(Some(limits.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(limits.http2_keepalive_timeout))
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .layer(request_size_layer(limits.max_request_bytes))
        .add_routes(routes);
    let connection_limits = connection_limits(settings);
    match tls {
        None => Box::pin(router.serve_with_incoming_shutdown(
            transport::incoming(listener, connection_limits, plaintext),
            shutdown,
        )),
        Some(tls) => Box::pin(router.serve_with_incoming_shutdown(
            transport::incoming(listener, connection_limits, move |tcp| {
                let tls = tls.clone();
                async move { tls.accept(tcp).await }
            }),
            shutdown,
        )),
    }
}

/// Waits for the server to end (after shutdown, when its calls have
/// drained), for the drain timeout to cut it off, or for a long-lived task
/// to fail; the name of what failed, if anything did.
async fn drain(
    serve: Serving<'_>,
    settings: &Settings,
    stopping: &CancellationToken,
    tasks: &mut LongLived,
    health: &Health,
) -> anyhow::Result<Option<&'static str>> {
    let drain_deadline = async {
        stopping.cancelled().await;
        tokio::time::sleep(settings.shutdown_drain_timeout).await;
    };
    tokio::select! {
        served = serve => {
            served.context("serving gRPC")?;
            Ok((!stopping.is_cancelled()).then_some("gRPC server"))
        }
        () = drain_deadline => {
            tracing::warn!(
                timeout = ?settings.shutdown_drain_timeout,
                "in-flight RPCs did not finish within the drain timeout; cutting them off"
            );
            Ok(None)
        }
        name = tasks.first_to_end(stopping) => {
            // Stop serving too, within the drain timeout, before exiting.
            health.shut_down().await;
            Ok(Some(name))
        }
    }
}

/// Closes the database, if it was ever opened. Connections of RPCs cut off
/// by the drain timeout may still be busy in the database; they must not
/// hold the exit hostage: dropping them ends their sessions, which rolls
/// their transactions back.
async fn close_database(store: &store::Store) {
    if let Some(db) = store.get()
        && let Err(err) = db.close(POOL_CLOSE_TIMEOUT).await
    {
        tracing::warn!(error = %err, "database pool did not close cleanly; dropping it");
    }
}

fn connection_limits(settings: &Settings) -> ConnectionLimits {
    ConnectionLimits {
        max_connections: settings.limits.max_connections,
        handshake_timeout: settings.limits.handshake_timeout,
    }
}

/// Adds reflection v1 and v1alpha to `routes`, both describing everything
/// served (each other included): grpcurl releases before 1.8.8 only speak
/// v1alpha. Under a policy, only callers it knows may read the schema.
fn add_reflection(
    routes: &mut RoutesBuilder,
    authorizer: &Authorizer,
    max_request_bytes: usize,
) -> anyhow::Result<()> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    let check = reflection_interceptor(authorizer.clone());
    routes
        .add_service(InterceptedService::new(
            builder()
                .build_v1()
                .context("building reflection v1")?
                .max_decoding_message_size(max_request_bytes),
            check.clone(),
        ))
        .add_service(InterceptedService::new(
            builder()
                .build_v1alpha()
                .context("building reflection v1alpha")?
                .max_decoding_message_size(max_request_bytes),
            check,
        ));
    Ok(())
}

/// The tasks that should run as long as the server does, by name.
#[derive(Default)]
struct LongLived {
    tasks: JoinSet<()>,
    names: HashMap<tokio::task::Id, &'static str>,
}

impl LongLived {
    /// Spawns `task` as the long-lived task `name`.
    ///
    /// Debug builds honour `CUSTOMER_MAPPING_TEST_PANIC_TASK=<name>`, which
    /// makes that task panic as it starts: the tests prove with it that such
    /// a panic ends the process. Release builds have no such switch.
    fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        #[cfg(debug_assertions)]
        let task = async move {
            if std::env::var("CUSTOMER_MAPPING_TEST_PANIC_TASK").is_ok_and(|wanted| wanted == name)
            {
                panic!("CUSTOMER_MAPPING_TEST_PANIC_TASK: panicking in the {name} task, as asked");
            }
            task.await
        };
        let id = self.tasks.spawn(task).id();
        self.names.insert(id, name);
    }

    /// Resolves with the name of the first task to end, by a panic or by
    /// returning, before `stopping` is cancelled, and logs it; never
    /// resolves while all of them run, nor once stopping (when they end on
    /// purpose).
    async fn first_to_end(&mut self, stopping: &CancellationToken) -> &'static str {
        let ended = tokio::select! {
            ended = self.tasks.join_next_with_id() => ended,
            () = stopping.cancelled() => None,
        };
        let (id, panicked) = match ended {
            Some(_) if stopping.is_cancelled() => return std::future::pending().await,
            Some(Ok((id, ()))) => (id, false),
            Some(Err(err)) => (err.id(), err.is_panic()),
            None => return std::future::pending().await,
        };
        let name = self.names.get(&id).copied().unwrap_or("unnamed");
        if panicked {
            tracing::error!(task = name, "a long-lived task panicked; shutting down");
        } else {
            tracing::error!(
                task = name,
                "a long-lived task stopped on its own; shutting down"
            );
        }
        name
    }

    /// Waits, at most `limit`, for every task to stop (each stops on the
    /// shutdown token); the ones still running then are aborted.
    async fn stop(mut self, limit: Duration) {
        let all_stopped = async {
            while let Some(ended) = self.tasks.join_next_with_id().await {
                if let Err(err) = ended {
                    let name = self.names.get(&err.id()).copied().unwrap_or("unnamed");
                    tracing::warn!(task = name, error = %err, "task ended badly while stopping");
                }
            }
        };
        if tokio::time::timeout(limit, all_stopped).await.is_err() {
            tracing::warn!(
                ?limit,
                "background tasks did not stop in time; aborting them"
            );
        }
    }
}

/// A plaintext connection needs no handshake.
async fn plaintext(tcp: tokio::net::TcpStream) -> std::io::Result<tokio::net::TcpStream> {
    Ok(tcp)
}

/// Applies pending migrations and returns (the `migrate` subcommand).
pub async fn migrate(settings: &DatabaseSettings, args: &MigrateArgs) -> anyhow::Result<()> {
    let db = Database::open(settings, Migrations::Apply).await?;
    if args.enable_stripe_accounts {
        db.enable_accounts(settings.database_connect_timeout + ENABLE_ACCOUNTS_TIMEOUT)
            .await?;
        tracing::info!("Stripe accounts are enabled");
    }
    db.close(POOL_CLOSE_TIMEOUT)
        .await
        .context("closing the database pool")?;
    Ok(())
}
