//! Pointing the service at the replaced application's own database, where a
//! `stripe_customers` table of another shape already exists: `migrate`
//! fails with one clear line and changes nothing.

use crate::helpers;

use std::process::Command;

use helpers::{Backend, TestDatabase};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};

const BINARY: &str = env!("CARGO_BIN_EXE_customer-mapping");

/// The tables of the database, by name.
async fn tables(db: &DatabaseConnection, backend: Backend) -> Vec<String> {
    let sql = match backend {
        Backend::Postgres => {
            "SELECT table_name AS name FROM information_schema.tables \
             WHERE table_schema = 'public' ORDER BY 1"
        }
        Backend::Sqlite => "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY 1",
    };
    db.query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .expect("the catalog is readable")
        .into_iter()
        .map(|row| row.try_get::<String>("", "name").expect("a name"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_refuses_a_foreign_stripe_customers_table_and_changes_nothing() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let database = TestDatabase::create(backend).await;
        let db = Database::connect(&database.url).await.expect("connects");
        // The seed application's table.
        db.execute_unprepared(
            "CREATE TABLE stripe_customers (user_id TEXT PRIMARY KEY, stripe_customer_id TEXT)",
        )
        .await
        .expect("create the old table");
        db.execute_unprepared("INSERT INTO stripe_customers VALUES ('user-1', 'cus_A1')")
            .await
            .expect("an old row");
        let before = tables(&db, backend).await;

        let output = Command::new(BINARY)
            .arg("migrate")
            .env("DATABASE_URL", &database.url)
            .env("LOG_FORMAT", "text")
            .output()
            .expect("the binary runs");

        assert!(!output.status.success(), "{backend:?}: migrate must fail");
        let printed = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        let errors: Vec<&str> = printed.lines().filter(|l| l.contains("ERROR")).collect();
        assert_eq!(errors.len(), 1, "{backend:?}: one error line in {printed}");
        assert!(
            errors[0].contains("stripe_customers")
                && errors[0].contains("not this service's")
                && errors[0].contains("nothing was changed"),
            "{backend:?}: {}",
            errors[0]
        );
        assert_eq!(tables(&db, backend).await, before, "{backend:?}");
        let rows = db
            .query_all_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT user_id FROM stripe_customers",
            ))
            .await
            .expect("the old table is still readable");
        assert_eq!(rows.len(), 1, "{backend:?}");
        db.close().await.expect("closes");
    }
}
