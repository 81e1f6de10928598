//! What callers see when the database fails: UNAVAILABLE when it is
//! unreachable or saturated, INTERNAL otherwise, and never SQL, URLs or
//! passwords.

use crate::helpers;

use std::time::Duration;

use helpers::{Backend, TestApp, TestDatabase, process::ServerProcess, proxy::Proxy};
use sea_orm::ConnectionTrait;
use tonic::Code;

/// Postgres behind a proxy the test can cut, with short timeouts.
async fn spawn_behind_proxy() -> (TestApp, Proxy) {
    let (database, proxy, settings) = helpers::postgres_behind_proxy().await;
    (
        helpers::spawn_on(Backend::Postgres, database, settings).await,
        proxy,
    )
}

fn assert_leaks_nothing(status: &tonic::Status) {
    let message = status.message().to_lowercase();
    for secret in [
        "select",
        "insert",
        "delete",
        "stripe_customers",
        "postgres",
        "sqlite",
        "127.0.0.1",
    ] {
        assert!(!message.contains(secret), "{secret:?} leaked in {status:?}");
    }
    assert!(status.details().is_empty() || status.code() != Code::Internal);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_postgres_is_unavailable_and_service_recovers_when_it_returns() {
    let (app, proxy) = spawn_behind_proxy().await;
    app.link("user-1", "cus_A1").await.expect("Link while up");

    proxy.cut();
    for status in [
        app.link("user-2", "cus_B2").await.expect_err("down"),
        app.get_by_user("user-1").await.expect_err("down"),
        app.unlink_by_customer("cus_A1").await.expect_err("down"),
    ] {
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_leaks_nothing(&status);
    }

    proxy.restore();
    // The pool replaces its broken connections by itself: no restart.
    let reply = app
        .link("user-2", "cus_B2")
        .await
        .expect("Link after recovery");
    assert!(reply.created);
    assert_eq!(
        app.get_by_user("user-1")
            .await
            .expect("Get")
            .stripe_customer_id,
        "cus_A1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_postgres_pool_is_unavailable() {
    let app = helpers::spawn_app_with(Backend::Postgres, |s| {
        s.database.database_max_connections = 1;
        s.database.database_acquire_timeout = Duration::from_millis(300);
    })
    .await;
    app.link("user-0", "cus_00").await.expect("warm-up Link");

    // Hold the table lock from outside so that the one pooled connection is
    // stuck in the first Link...
    let outside = app.db().await;
    let lock = helpers::pg::lock_table(&outside).await;
    let stuck = tokio::spawn({
        let mut client = app.new_client().await;
        async move { helpers::link(&mut client, "user-1", "cus_A1").await }
    });
    helpers::pg::wait_until_sessions_wait_on_a_lock(&outside, 1).await;

    // ...and a second call finds no connection to acquire.
    let status = app.get_by_user("user-0").await.expect_err("pool exhausted");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_leaks_nothing(&status);

    lock.rollback().await.expect("unlock");
    let reply = stuck
        .await
        .expect("no panic")
        .expect("the stuck Link completes");
    assert!(reply.created);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_locked_longer_than_the_busy_timeout_is_unavailable() {
    let app = helpers::spawn_app_with(Backend::Sqlite, |s| {
        s.database.sqlite_busy_timeout = Duration::from_millis(200);
    })
    .await;
    app.link("user-0", "cus_00").await.expect("warm-up Link");

    // Another process holding the write lock, as a stuck writer would.
    let outside = app.db().await;
    outside
        .execute_unprepared("BEGIN IMMEDIATE")
        .await
        .expect("lock");

    let status = app
        .link("user-1", "cus_A1")
        .await
        .expect_err("database is locked");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_leaks_nothing(&status);

    outside
        .execute_unprepared("ROLLBACK")
        .await
        .expect("unlock");
    app.link("user-1", "cus_A1")
        .await
        .expect("Link after the lock is gone");
}

async fn other_database_errors_are_internal_with_a_generic_message(app: TestApp) {
    app.link("user-1", "cus_A1").await.expect("Link");
    let db = app.db().await;
    db.execute_unprepared("DROP TABLE stripe_customers")
        .await
        .expect("drop");

    for status in [
        app.link("user-2", "cus_B2").await.expect_err("no table"),
        app.get_by_user("user-1").await.expect_err("no table"),
        app.unlink_by_user("user-1").await.expect_err("no table"),
    ] {
        assert_eq!(status.code(), Code::Internal, "{status:?}");
        assert_eq!(status.message(), "internal error");
        assert_leaks_nothing(&status);
    }
}

async fn a_corrupt_stored_row_is_internal_not_returned(app: TestApp) {
    let db = app.db().await;
    db.execute_unprepared(
        "INSERT INTO stripe_customers (user_id, stripe_customer_id, created_at) \
         VALUES ('user 1', 'cus_A1', CURRENT_TIMESTAMP)",
    )
    .await
    .expect("insert by hand");

    let status = app
        .get_by_customer("cus_A1")
        .await
        .expect_err("corrupt row");
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert_eq!(status.message(), "internal error");
}

on_both_databases!(
    other_database_errors_are_internal_with_a_generic_message,
    a_corrupt_stored_row_is_internal_not_returned,
);

/// The operator's log line names the database's cause once, with its
/// SQLSTATE, and not the driver's wrappers or PostgreSQL's C source line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_error_is_logged_as_one_cause() {
    let database = TestDatabase::create(Backend::Postgres).await;
    let server = ServerProcess::start(&[("DATABASE_URL", database.url.as_str())]);
    helpers::wait_for_health(
        server.addr,
        "",
        tonic_health::pb::health_check_response::ServingStatus::Serving,
    )
    .await;
    let db = sea_orm::Database::connect(&database.url)
        .await
        .expect("connect");
    db.execute_unprepared("ALTER TABLE stripe_customers RENAME TO elsewhere")
        .await
        .expect("rename");
    let mut client = helpers::connect(server.addr).await;
    let status = helpers::get(
        &mut client,
        customer_mapping::proto::get_request::Key::UserId("user-1".into()),
    )
    .await
    .expect_err("no table");
    assert_eq!(status.code(), Code::Internal, "{status:?}");

    let logged = server.wait_for_event(|e| e["message"] == "internal error");
    let error = logged["error"].as_str().expect("an error field");
    let cause = r#"relation "stripe_customers" does not exist"#;
    assert_eq!(error, format!("{cause} (SQLSTATE 42P01)"), "{logged}");
    db.close().await.expect("closes");
}
