//! Shared test harness: a real server on an ephemeral port, a real tonic
//! client, and a fresh database per test (a temporary SQLite file, or a new
//! PostgreSQL database that is dropped when the test ends).

pub mod bulk;
pub mod cut_proxy;
pub mod history;
pub mod import;
pub mod pg;
pub mod pg_cluster;
pub mod process;
pub mod proxy;
pub mod raw;
pub mod silent_proxy;
pub mod tls;
pub mod tools;
pub mod watch;

use std::{net::SocketAddr, time::Duration};

use customer_mapping::{
    config::{DatabaseUrl, HealthSettings, Settings},
    proto::{
        GetRequest, LinkRequest, LinkResponse, Mapping, UnlinkRequest,
        customer_mapping_client::CustomerMappingClient, get_request, unlink_request,
    },
    startup::Application,
};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{Code, Status, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_types::StatusExt;

pub type Client = CustomerMappingClient<Channel>;

/// Where the fault scenarios' reports (operations checked, indeterminate,
/// recovery times) are collected: `cargo test` hides a passing test's
/// output, and `.ci/run` prints this file after the run.
pub const REPORT_FILE: &str = concat!(env!("CARGO_TARGET_TMPDIR"), "/fault-reports.log");

/// Prints one line of a scenario's report and appends it to [`REPORT_FILE`].
pub fn report(line: &str) {
    use std::io::Write;
    eprintln!("{line}");
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(REPORT_FILE)
        .and_then(|mut file| writeln!(file, "{line}"));
    if let Err(err) = appended {
        eprintln!("could not append to {REPORT_FILE}: {err}");
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Generates, for each `async fn name(app: TestApp)` given, a module `name`
/// with one test per database: `name::sqlite` and `name::postgres`.
#[macro_export]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::helpers::spawn_app($crate::helpers::Backend::Sqlite).await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::helpers::spawn_app($crate::helpers::Backend::Postgres).await).await
            }
        }
    )*};
}

/// A running server and what a test needs to talk to it.
pub struct TestApp {
    pub addr: SocketAddr,
    pub client: Client,
    pub backend: Backend,
    pub database: TestDatabase,
    server: RunningServer,
}

/// An `Application` serving in this process until stopped.
pub struct RunningServer {
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl RunningServer {
    pub fn spawn(app: Application) -> Self {
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async {
            let _ = rx.await;
        }));
        Self {
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the server gracefully and waits for it to finish.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("the server task did not panic")
                .expect("the server stopped cleanly");
        }
    }

    /// Stops serving at once (when a test ends without `stop`, before its
    /// database goes away).
    pub fn abort(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, |_| {}).await
}

/// Like [`spawn_app`], letting the test adjust the settings first.
pub async fn spawn_app_with(backend: Backend, adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let database = TestDatabase::create(backend).await;
    let mut settings = test_settings(database.url.clone());
    adjust(&mut settings);
    spawn_on(backend, database, settings).await
}

/// A fresh PostgreSQL database reached through a proxy the test can cut or
/// slow down, with short pool timeouts so that an outage shows at once.
pub async fn postgres_behind_proxy() -> (TestDatabase, proxy::Proxy, Settings) {
    let database = TestDatabase::create(Backend::Postgres).await;
    let proxy = proxy::Proxy::start(proxy::upstream_of(&database.url).await).await;
    let mut settings = test_settings(proxy::through(&database.url, &proxy));
    settings.database.database_acquire_timeout = Duration::from_millis(500);
    settings.database.database_connect_timeout = Duration::from_millis(500);
    (database, proxy, settings)
}

/// Settings for tests: the defaults, on port 0, with a small pool
/// (PostgreSQL allows 100 connections across all the tests running in
/// parallel) and a fast health probe.
pub fn test_settings(database_url: String) -> Settings {
    let mut settings = Settings::defaults();
    settings.listen_addr = "127.0.0.1:0".parse().expect("valid address");
    settings.database.database_url =
        DatabaseUrl::parse(&database_url).expect("a usable test database URL");
    settings.database.database_max_connections = 4;
    // Built here, not parsed, so not held to the probe timeout being below
    // the interval: a loaded test machine gets a generous timeout.
    settings.health = HealthSettings {
        health_probe_interval: Duration::from_millis(100),
        health_probe_timeout: Duration::from_millis(500),
    };
    settings.shutdown_drain_timeout = Duration::from_secs(5);
    settings
}

/// Starts the server and returns once health reports SERVING, i.e. the
/// database is connected and migrated.
pub async fn spawn_on(backend: Backend, database: TestDatabase, settings: Settings) -> TestApp {
    let app = spawn_unready(backend, database, settings).await;
    wait_for_health(app.addr, "", ServingStatus::Serving).await;
    app
}

/// Starts the server without waiting for its database.
pub async fn spawn_unready(
    backend: Backend,
    database: TestDatabase,
    settings: Settings,
) -> TestApp {
    let app = Application::build(&settings)
        .await
        .expect("the application builds");
    let addr = app.local_addr();
    let server = RunningServer::spawn(app);
    TestApp {
        addr,
        client: connect(addr).await,
        backend,
        database,
        server,
    }
}

/// Watches `service`'s health until it reports `wanted` (bounded: a server
/// that never gets there fails the test instead of hanging it).
pub async fn wait_for_health(addr: SocketAddr, service: &str, wanted: ServingStatus) {
    let mut health = HealthClient::new(channel(addr).await);
    let watched = async {
        let mut updates = health
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("Watch starts")
            .into_inner();
        while let Some(update) = updates.message().await.expect("Watch streams") {
            if update.status == wanted as i32 {
                return;
            }
        }
        panic!("the Watch stream ended before {wanted:?}");
    };
    tokio::time::timeout(Duration::from_secs(20), watched)
        .await
        .unwrap_or_else(|_| panic!("health of {service:?} never became {wanted:?}"));
}

pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("a valid URI")
        .connect()
        .await
        .expect("the client connects")
}

/// A new client with its own HTTP/2 connection.
pub async fn connect(addr: SocketAddr) -> Client {
    CustomerMappingClient::new(channel(addr).await)
}

impl TestApp {
    /// A new client with its own HTTP/2 connection.
    pub async fn new_client(&self) -> Client {
        connect(self.addr).await
    }

    /// Stops the server gracefully and waits for it to finish.
    pub async fn stop(mut self) {
        self.server.stop().await;
    }

    pub async fn link(
        &self,
        user_id: &str,
        stripe_customer_id: &str,
    ) -> Result<LinkResponse, Status> {
        link(&mut self.client.clone(), user_id, stripe_customer_id).await
    }

    /// Link in a Stripe account.
    pub async fn link_in(
        &self,
        stripe_account: &str,
        user_id: &str,
        stripe_customer_id: &str,
    ) -> Result<LinkResponse, Status> {
        self.client
            .clone()
            .link(LinkRequest {
                user_id: user_id.into(),
                stripe_customer_id: stripe_customer_id.into(),
                stripe_account: stripe_account.into(),
                prepared_generation: None,
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Get in a Stripe account.
    pub async fn get_in(
        &self,
        stripe_account: &str,
        key: get_request::Key,
    ) -> Result<Mapping, Status> {
        let reply = self
            .client
            .clone()
            .get(GetRequest {
                key: Some(key),
                stripe_account: stripe_account.into(),
            })
            .await?
            .into_inner();
        Ok(reply.mapping.expect("Get returns a mapping"))
    }

    /// Unlink in a Stripe account.
    pub async fn unlink_in(
        &self,
        stripe_account: &str,
        key: unlink_request::Key,
    ) -> Result<Mapping, Status> {
        let reply = self
            .client
            .clone()
            .unlink(UnlinkRequest {
                key: Some(key),
                stripe_account: stripe_account.into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok(reply.mapping.expect("Unlink returns a mapping"))
    }

    pub async fn get_by_user(&self, user_id: &str) -> Result<Mapping, Status> {
        get(
            &mut self.client.clone(),
            get_request::Key::UserId(user_id.into()),
        )
        .await
    }

    pub async fn get_by_customer(&self, stripe_customer_id: &str) -> Result<Mapping, Status> {
        get(
            &mut self.client.clone(),
            get_request::Key::StripeCustomerId(stripe_customer_id.into()),
        )
        .await
    }

    pub async fn unlink_by_user(&self, user_id: &str) -> Result<Mapping, Status> {
        unlink(
            &mut self.client.clone(),
            unlink_request::Key::UserId(user_id.into()),
        )
        .await
    }

    pub async fn unlink_by_customer(&self, stripe_customer_id: &str) -> Result<Mapping, Status> {
        unlink(
            &mut self.client.clone(),
            unlink_request::Key::StripeCustomerId(stripe_customer_id.into()),
        )
        .await
    }

    /// A direct connection to the test's database, bypassing the service.
    pub async fn db(&self) -> DatabaseConnection {
        Database::connect(&self.database.url)
            .await
            .expect("the test connects to its database")
    }

    /// Every row of the table, read directly: `(user_id, stripe_customer_id)`.
    pub async fn rows(&self) -> Vec<(String, String)> {
        let db = self.db().await;
        let rows = read_rows(&db).await;
        db.close().await.expect("the connection closes");
        rows
    }
}

/// Every row of the table: `(user_id, stripe_customer_id)`, by user.
pub async fn read_rows(db: &DatabaseConnection) -> Vec<(String, String)> {
    use customer_mapping::store::entity::{Column, Entity};
    use sea_orm::{EntityTrait, QueryOrder};
    Entity::find()
        .order_by_asc(Column::UserId)
        .all(db)
        .await
        .expect("the table is readable")
        .into_iter()
        .map(|r| (r.user_id, r.stripe_customer_id))
        .collect()
}

/// Every row of the table: `(user_id, stripe_customer_id, stripe_account)`.
pub async fn read_mappings(db: &DatabaseConnection) -> Vec<(String, String, String)> {
    use customer_mapping::store::entity::{Column, Entity};
    use sea_orm::{EntityTrait, QueryOrder};
    Entity::find()
        .order_by_asc(Column::Id)
        .all(db)
        .await
        .expect("the table is readable")
        .into_iter()
        .map(|r| (r.user_id, r.stripe_customer_id, r.stripe_account))
        .collect()
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

pub async fn link(
    client: &mut Client,
    user_id: &str,
    stripe_customer_id: &str,
) -> Result<LinkResponse, Status> {
    client
        .link(LinkRequest {
            user_id: user_id.into(),
            stripe_customer_id: stripe_customer_id.into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

pub async fn get(client: &mut Client, key: get_request::Key) -> Result<Mapping, Status> {
    let reply = client
        .get(GetRequest {
            key: Some(key),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(reply.mapping.expect("Get returns a mapping"))
}

/// Unlink of `key` only while it is linked to `expected_counterpart`.
pub async fn unlink_expecting(
    client: &mut Client,
    key: unlink_request::Key,
    expected_counterpart: &str,
) -> Result<Mapping, Status> {
    let reply = client
        .unlink(UnlinkRequest {
            key: Some(key),
            expected_counterpart: expected_counterpart.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(reply.mapping.expect("Unlink returns a mapping"))
}

pub async fn unlink(client: &mut Client, key: unlink_request::Key) -> Result<Mapping, Status> {
    let reply = client
        .unlink(UnlinkRequest {
            key: Some(key),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(reply.mapping.expect("Unlink returns a mapping"))
}

/// Asserts `status` is ALREADY_EXISTS with the given ErrorInfo reason and
/// existing mapping.
pub fn assert_already_linked(
    status: &Status,
    reason: &str,
    user_id: &str,
    stripe_customer_id: &str,
) {
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    let info = status
        .get_details_error_info()
        .expect("ALREADY_EXISTS carries an ErrorInfo");
    assert_eq!(info.reason, reason);
    assert_eq!(info.domain, "customermapping.v1");
    assert_eq!(
        info.metadata.get("userId").map(String::as_str),
        Some(user_id)
    );
    assert_eq!(
        info.metadata.get("stripeCustomerId").map(String::as_str),
        Some(stripe_customer_id)
    );
    assert_eq!(
        info.metadata.len(),
        2,
        "a caller naming no account gets the metadata it got before accounts: {:?}",
        info.metadata
    );
}

/// Asserts `status` is NOT_FOUND with reason MAPPING_NOT_FOUND.
pub fn assert_not_found(status: &Status) {
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let info = status
        .get_details_error_info()
        .expect("NOT_FOUND carries an ErrorInfo");
    assert_eq!(info.reason, "MAPPING_NOT_FOUND");
    assert_eq!(info.domain, "customermapping.v1");
}

/// Asserts `status` is INVALID_ARGUMENT whose BadRequest names exactly
/// `fields`, in order.
pub fn assert_invalid(status: &Status, fields: &[&str]) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let bad_request = status
        .get_details_bad_request()
        .expect("INVALID_ARGUMENT carries a BadRequest");
    let named: Vec<&str> = bad_request
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert_eq!(named, fields, "{status:?}");
    assert!(
        bad_request
            .field_violations
            .iter()
            .all(|v| !v.description.is_empty()),
        "every violation says what is wrong"
    );
}

/// A database that exists for one test.
pub struct TestDatabase {
    pub url: String,
    kind: DatabaseKind,
}

enum DatabaseKind {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Postgres { admin_url: String, name: String },
    External,
}

/// Where the PostgreSQL server for tests is: `TEST_DATABASE_URL`, or the
/// local server this project's machines run.
pub fn postgres_admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

impl TestDatabase {
    /// A database the test does not own (e.g. in a private cluster).
    pub fn external(url: String) -> Self {
        Self {
            url,
            kind: DatabaseKind::External,
        }
    }

    pub async fn create(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("a temporary directory");
                let url = format!("sqlite://{}?mode=rwc", dir.path().join("test.db").display());
                Self {
                    url,
                    kind: DatabaseKind::Sqlite(dir),
                }
            }
            Backend::Postgres => {
                let admin_url = postgres_admin_url();
                let name = format!("cm_test_{}", uuid::Uuid::new_v4().simple());
                let admin = connect_admin(&admin_url).await;
                admin
                    .execute_unprepared(&format!(r#"CREATE DATABASE "{name}""#))
                    .await
                    .expect("the test user may CREATE DATABASE");
                admin.close().await.expect("the admin connection closes");
                Self {
                    url: with_database(&admin_url, &name),
                    kind: DatabaseKind::Postgres { admin_url, name },
                }
            }
        }
    }
}

async fn connect_admin(admin_url: &str) -> DatabaseConnection {
    let mut opts = sea_orm::ConnectOptions::new(admin_url);
    opts.max_connections(1)
        .connect_timeout(Duration::from_secs(5))
        .sqlx_logging(false);
    match Database::connect(opts).await {
        Ok(db) => db,
        Err(err) => panic!(
            "PostgreSQL tests need a server: none answered at {} ({err}). \
             Start one on 127.0.0.1:5432 (user postgres, trust auth) or set TEST_DATABASE_URL \
             to a URL whose user may CREATE DATABASE.",
            customer_mapping::config::redact_url(admin_url)
        ),
    }
}

/// `admin_url` pointing at database `name` instead.
fn with_database(admin_url: &str, name: &str) -> String {
    let mut url = url::Url::parse(admin_url).expect("TEST_DATABASE_URL is a URL");
    url.set_path(name);
    url.to_string()
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let DatabaseKind::Postgres { admin_url, name } = &self.kind else {
            return;
        };
        // Drop runs inside the test's runtime, which can't block on async
        // work: do it on a thread with a runtime of its own. FORCE ends the
        // server's pool connections if they are still open.
        let (admin_url, database) = (admin_url.clone(), name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async {
                let admin = connect_admin(&admin_url).await;
                admin
                    .execute_unprepared(&format!(
                        r#"DROP DATABASE IF EXISTS "{database}" WITH (FORCE)"#
                    ))
                    .await
                    .map(|_| ())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) && !std::thread::panicking() {
            panic!("could not drop test database {name}");
        }
    }
}
