//! Direct PostgreSQL helpers for tests that reach around the service:
//! counting, locking, and waiting for sessions to block.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction, TransactionTrait};

/// Runs `sql`, which selects one `bigint` column named `n`.
pub async fn count(db: &DatabaseConnection, sql: &str) -> i64 {
    db.query_one_raw(sea_orm::Statement::from_string(
        db.get_database_backend(),
        sql,
    ))
    .await
    .expect("the query runs")
    .expect("one row")
    .try_get::<i64>("", "n")
    .expect("a count named n")
}

/// Rows in the mapping table.
pub async fn rows_in_table(db: &DatabaseConnection) -> i64 {
    count(db, "SELECT count(*) AS n FROM stripe_customers").await
}

/// Locks the mapping table until the returned transaction ends, so that
/// RPCs touching it wait inside the database.
pub async fn lock_table(db: &DatabaseConnection) -> DatabaseTransaction {
    let lock = db.begin().await.expect("begin");
    lock.execute_unprepared("LOCK TABLE stripe_customers IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    lock
}

/// Waits (polling, bounded) until at least `n` sessions of this database
/// wait on a lock: the RPCs under test have reached the database.
pub async fn wait_until_sessions_wait_on_a_lock(db: &DatabaseConnection, n: i64) {
    let query = "SELECT count(*) AS n FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'";
    for _ in 0..1000 {
        if count(db, query).await >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{n} sessions never reached the lock");
}
