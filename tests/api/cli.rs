//! The built binary: the `migrate` subcommand, and no password in its output.

use crate::helpers;

use std::process::Command;

use helpers::{Backend, TestDatabase};

const BINARY: &str = env!("CARGO_BIN_EXE_customer-mapping");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_subcommand_creates_the_schema_and_is_repeatable() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let database = TestDatabase::create(backend).await;
        for run in ["first", "second"] {
            let output = Command::new(BINARY)
                .arg("migrate")
                .env("DATABASE_URL", &database.url)
                .output()
                .expect("the binary runs");
            assert!(
                output.status.success(),
                "{backend:?} {run} migrate failed: {}",
                String::from_utf8_lossy(&output.stdout)
            );
        }

        // A server that does not migrate by itself can now serve.
        let mut settings = helpers::test_settings(database.url.clone());
        settings.database.migrate_on_start = false;
        let app = helpers::spawn_on(backend, database, settings).await;
        assert!(app.link("user-1", "cus_A1").await.expect("Link").created);
    }
}

#[test]
fn a_database_password_never_reaches_the_output() {
    // Nothing listens on port 1: connecting fails at once.
    let output = Command::new(BINARY)
        .arg("migrate")
        .env(
            "DATABASE_URL",
            "postgres://app:hunter2-secret@127.0.0.1:1/mapping",
        )
        .env("DATABASE_CONNECT_TIMEOUT", "2s")
        .env("DATABASE_ACQUIRE_TIMEOUT", "2s")
        .output()
        .expect("the binary runs");

    assert!(
        !output.status.success(),
        "migrate against nothing must fail"
    );
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // Written to a pipe, not a terminal: plain text, no colour codes.
    assert!(!printed.contains('\x1b'), "{printed}");
    assert!(
        printed.contains("app:***@127.0.0.1:1"),
        "the error names the database: {printed}"
    );
    assert!(!printed.contains("hunter2"), "password leaked: {printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_url_can_come_from_a_mounted_secret_file() {
    let database = TestDatabase::create(Backend::Postgres).await;
    // PostgreSQL here trusts local connections, so any password works; it
    // must still never be printed.
    let mut url = url::Url::parse(&database.url).expect("a URL");
    url.set_password(Some("file-secret-pw"))
        .expect("a password fits");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let secret = dir.path().join("database-url");
    // Secrets written by hand usually end in a newline.
    std::fs::write(&secret, format!("{url}\n")).expect("write the secret");

    let output = Command::new(BINARY)
        .arg("migrate")
        .env_remove("DATABASE_URL")
        .env("DATABASE_URL_FILE", &secret)
        .output()
        .expect("the binary runs");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "migrate failed: {printed}");
    assert!(
        !printed.contains("file-secret-pw"),
        "password leaked: {printed}"
    );

    let db = sea_orm::Database::connect(&database.url)
        .await
        .expect("connects");
    assert_eq!(
        helpers::pg::rows_in_table(&db).await,
        0,
        "the schema exists"
    );
    db.close().await.expect("closes");

    let both = Command::new(BINARY)
        .arg("migrate")
        .env("DATABASE_URL", &database.url)
        .env("DATABASE_URL_FILE", &secret)
        .output()
        .expect("the binary runs");
    assert!(
        !both.status.success(),
        "two sources for the URL are refused"
    );

    let missing = Command::new(BINARY)
        .arg("migrate")
        .env_remove("DATABASE_URL")
        .env("DATABASE_URL_FILE", dir.path().join("absent"))
        .output()
        .expect("the binary runs");
    assert!(
        !missing.status.success(),
        "a missing secret file is an error"
    );
}

#[test]
fn plaintext_on_a_public_address_needs_explicit_consent() {
    let output = Command::new(BINARY)
        .arg("serve")
        .env("LISTEN_ADDR", "0.0.0.0:0")
        .env("DATABASE_URL", "sqlite::memory:")
        .env_remove("ALLOW_INSECURE_PLAINTEXT")
        .env_remove("TLS_CERT_FILE")
        .output()
        .expect("the binary runs");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "must refuse: {printed}");
    assert!(printed.contains("ALLOW_INSECURE_PLAINTEXT"), "{printed}");
}
