//! Migrations run one process at a time per database: under a PostgreSQL
//! session advisory lock with a fixed key, taken on a connection of its own
//! before the migrator looks at what is pending and released (the session
//! closed) after it is done. Replicas or init containers starting together
//! then migrate once: the others wait for the lock, find nothing pending and
//! go on. Without it two migrators both see a migration pending, both apply
//! it, and the second fails on a duplicate key in `seaql_migrations` (or in
//! the catalog).
//!
//! Waiters poll `pg_try_advisory_lock` rather than block in
//! `pg_advisory_lock`: a session blocked in a statement holds a snapshot,
//! and `CREATE INDEX CONCURRENTLY` (a migration builds one) waits for every
//! older snapshot in the database, so the migrator would wait for its
//! waiters, which wait for it, until both time out. Between tries a waiter's
//! session is idle and holds none. The wait is bounded (the caller's
//! `wait`, the migration timeout: as long as the holder may take). If this
//! process dies holding the lock, its session ends and PostgreSQL releases
//! the lock. Advisory locks are per database, so services sharing a cluster
//! never wait for each other.

use std::time::Duration;

use sea_orm::{
    DbErr,
    sqlx::{self, ConnectOptions, Connection, PgConnection, postgres::PgConnectOptions},
};
use tokio::time::Instant;

use super::pool::sqlx_err;
use crate::store::errors::timed_out;

/// The lock's key: "cm-migr" in ASCII, the same in every release.
const KEY: i64 = 0x0063_6d2d_6d69_6772;

/// How often a waiter tries the lock again.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The lock, held by its own session until [`MigrationLock::release`] (or
/// until dropped: the connection closes and the session ends with it).
pub(super) struct MigrationLock(PgConnection);

impl MigrationLock {
    /// Connects within `connect_timeout` and waits up to `wait` for every
    /// other migrator of this database to finish.
    pub async fn acquire(
        options: &PgConnectOptions,
        connect_timeout: Duration,
        wait: Duration,
    ) -> Result<Self, DbErr> {
        let mut conn = tokio::time::timeout(connect_timeout, options.connect())
            .await
            .map_err(|_| timed_out("connecting to take the migration lock"))?
            .map_err(sqlx_err)?;
        let deadline = Instant::now() + wait;
        let mut waiting = false;
        loop {
            let taken: bool = tokio::time::timeout(
                connect_timeout,
                sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(KEY)
                    .fetch_one(&mut conn),
            )
            .await
            .map_err(|_| timed_out("taking the migration lock"))?
            .map_err(sqlx_err)?;
            if taken {
                break;
            }
            if !waiting {
                waiting = true;
                tracing::info!(
                    "another process is applying migrations to this database; waiting for it"
                );
            }
            if Instant::now() + POLL_INTERVAL > deadline {
                return Err(timed_out("waiting for another process' migrations"));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        Ok(Self(conn))
    }

    /// Unlocks and closes the session, within `timeout`; past it the
    /// connection is dropped, which ends the session and the lock as well.
    pub async fn release(self, timeout: Duration) {
        let mut conn = self.0;
        let _ = tokio::time::timeout(timeout, async move {
            sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(KEY)
                .execute(&mut conn)
                .await?;
            conn.close().await
        })
        .await;
    }
}
