//! The connection to PostgreSQL can be encrypted: `sslmode=require` (or
//! `verify-full` with `sslrootcert=`) in DATABASE_URL.

use crate::helpers;

use helpers::{Backend, TestDatabase, pg, spawn_on, test_settings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_talks_to_postgres_over_tls_when_the_url_asks() {
    let database = TestDatabase::create(Backend::Postgres).await;
    let url = format!("{}?sslmode=require", database.url);
    let app = spawn_on(Backend::Postgres, database, test_settings(url)).await;
    app.link("user-1", "cus_1")
        .await
        .expect("Link over an encrypted pool");

    // Every session of the service in this database is encrypted. One
    // connection for ourselves, so that `pg_backend_pid()` excludes all of
    // ours.
    let mut options = sea_orm::ConnectOptions::new(app.database.url.clone());
    options.max_connections(1);
    let outside = sea_orm::Database::connect(options).await.expect("connects");
    let query = "SELECT count(*) AS n FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()";
    let sessions = pg::count(&outside, query).await;
    let encrypted = pg::count(&outside, &format!("{query} AND s.ssl")).await;
    assert!(sessions >= 1, "the service holds a connection");
    assert_eq!(encrypted, sessions, "every service connection uses TLS");
    outside.close().await.expect("closes");
    app.stop().await;
}
