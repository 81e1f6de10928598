//! The built binary: the `migrate` subcommand, and no password in its output.

mod common;

use std::process::Command;

use common::{Backend, TestDatabase};

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
        let mut settings = common::test_settings(database.url.clone());
        settings.database.migrate_on_start = false;
        let app = common::spawn_on(backend, database, settings).await;
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
    assert!(
        printed.contains("app:***@127.0.0.1:1"),
        "the error names the database: {printed}"
    );
    assert!(!printed.contains("hunter2"), "password leaked: {printed}");
}
