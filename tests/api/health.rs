//! gRPC health follows the database: NOT_SERVING until it first answers,
//! flipping both ways while the server keeps running.

use crate::helpers;

use std::time::Duration;

use helpers::Backend;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const SERVICE: &str = "customermapping.v1.CustomerMapping";
/// Upper bound for a flip: a few probe intervals (100 ms in tests) plus the
/// probe timeout (500 ms) plus the pool's connect timeout.
const FLIP_WITHIN: Duration = Duration::from_secs(5);

async fn check(addr: std::net::SocketAddr, service: &str) -> Result<ServingStatus, tonic::Status> {
    let mut health = HealthClient::new(helpers::channel(addr).await);
    let reply = health
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?
        .into_inner();
    Ok(ServingStatus::try_from(reply.status).expect("a known status"))
}

/// Next status from a Watch stream, within `FLIP_WITHIN`.
async fn next_status(
    updates: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
) -> ServingStatus {
    let update = tokio::time::timeout(FLIP_WITHIN, updates.message())
        .await
        .expect("health changed within the bound")
        .expect("the Watch stream is healthy")
        .expect("the Watch stream is open");
    ServingStatus::try_from(update.status).expect("a known status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_database_from_start_through_outages() {
    // The database is unreachable before the server even starts.
    let (database, proxy, settings) = helpers::postgres_behind_proxy().await;
    proxy.cut();
    let app = helpers::spawn_unready(Backend::Postgres, database, settings).await;

    // It serves anyway: health NOT_SERVING for both names, RPCs UNAVAILABLE.
    for service in ["", SERVICE] {
        assert_eq!(
            check(app.addr, service).await.expect("Check"),
            ServingStatus::NotServing
        );
    }
    let status = app
        .link("user-1", "cus_A1")
        .await
        .expect_err("no database yet");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    let mut health = HealthClient::new(helpers::channel(app.addr).await);
    let mut updates = health
        .watch(HealthCheckRequest {
            service: SERVICE.into(),
        })
        .await
        .expect("Watch")
        .into_inner();
    assert_eq!(next_status(&mut updates).await, ServingStatus::NotServing);

    // The database arrives: connected and migrated in the background.
    proxy.restore();
    assert_eq!(next_status(&mut updates).await, ServingStatus::Serving);
    assert_eq!(
        check(app.addr, "").await.expect("Check"),
        ServingStatus::Serving
    );
    assert!(app.link("user-1", "cus_A1").await.expect("Link").created);

    // It goes away, and comes back: same server process throughout.
    proxy.cut();
    assert_eq!(next_status(&mut updates).await, ServingStatus::NotServing);
    assert_eq!(
        check(app.addr, "").await.expect("Check"),
        ServingStatus::NotServing
    );
    proxy.restore();
    assert_eq!(next_status(&mut updates).await, ServingStatus::Serving);
    assert_eq!(
        app.get_by_user("user-1")
            .await
            .expect("Get")
            .stripe_customer_id,
        "cus_A1"
    );
}

async fn both_names_are_serving_and_unknown_names_are_not_found(app: helpers::TestApp) {
    for service in ["", SERVICE] {
        assert_eq!(
            check(app.addr, service).await.expect("Check"),
            ServingStatus::Serving
        );
    }
    let status = check(app.addr, "customermapping.v1.Nope")
        .await
        .expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
}

on_both_databases!(both_names_are_serving_and_unknown_names_are_not_found);

/// How long a server whose database lacks the schema is watched: ten probe
/// intervals (100 ms in tests), every one of which finds the schema behind.
const WATCHED: Duration = Duration::from_secs(1);

/// A server that does not migrate, started on a database the migration has
/// not reached yet (a first install, a release whose migration Job is still
/// running or failed): NOT_SERVING and every call UNAVAILABLE, never
/// INTERNAL, until the schema is there; then SERVING by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_only_once_the_schema_is_there() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let database = helpers::TestDatabase::create(backend).await;
        let mut settings = helpers::test_settings(database.url.clone());
        settings.database.migrate_on_start = false;
        let app = helpers::spawn_unready(backend, database, settings.clone()).await;
        let watching = tokio::time::Instant::now();
        while watching.elapsed() < WATCHED {
            assert_eq!(
                check(app.addr, "").await.expect("Check"),
                ServingStatus::NotServing
            );
            let refused = app
                .link("user-1", "cus_A1")
                .await
                .expect_err("no schema yet");
            assert_eq!(
                refused.code(),
                Code::Unavailable,
                "{backend:?}: {refused:?}"
            );
        }

        customer_mapping::startup::migrate(&settings.database, &Default::default())
            .await
            .expect("the migration runs");
        let migrated = tokio::time::Instant::now();
        helpers::wait_for_health(app.addr, "", ServingStatus::Serving).await;
        helpers::report(&format!(
            "{backend:?}: SERVING {} ms after the migration ended (probe interval {} ms)",
            migrated.elapsed().as_millis(),
            settings.health.health_probe_interval.as_millis()
        ));
        assert!(app.link("user-1", "cus_A1").await.expect("Link").created);
    }
}

/// During a rolling upgrade the next release migrates first: this release
/// keeps serving and keeps starting, migrating on start or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_serves_this_release() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let database = helpers::TestDatabase::create(backend).await;
        let settings = helpers::test_settings(database.url.clone());
        customer_mapping::startup::migrate(&settings.database, &Default::default())
            .await
            .expect("the migration runs");
        let db = database_connection(&database.url).await;
        use sea_orm::ConnectionTrait;
        db.execute_unprepared(
            "INSERT INTO seaql_migrations (version, applied_at) \
             VALUES ('m20991231_000001_from_the_next_release', 0)",
        )
        .await
        .expect("the next release's migration is recorded");
        for migrate_on_start in [true, false] {
            let mut settings = settings.clone();
            settings.database.migrate_on_start = migrate_on_start;
            let app = helpers::spawn_on(
                backend,
                helpers::TestDatabase::external(database.url.clone()),
                settings,
            )
            .await;
            let user = format!("user-{migrate_on_start}");
            assert!(
                app.link(&user, &format!("cus_{migrate_on_start}"))
                    .await
                    .expect("Link")
                    .created
            );
            app.stop().await;
        }
    }
}

async fn database_connection(url: &str) -> sea_orm::DatabaseConnection {
    sea_orm::Database::connect(url)
        .await
        .expect("the test connects to its database")
}
