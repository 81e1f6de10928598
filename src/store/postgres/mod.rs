//! PostgreSQL: the service's own connections (`pool.rs`), Gets and Links
//! coalesced over them (`lane.rs`, `gets.rs`, `links.rs`), and the write
//! statements (`link.rs`). Every interaction is bounded: each call passes
//! the instant by which it must be done, and each step is further bounded
//! by the configuration (acquire and connect timeouts).

pub(super) mod feed;
mod gets;
mod lane;
mod link;
mod links;
mod migration_lock;
mod pool;
mod prepares;

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{
    DatabaseConnection, DbBackend, DbErr, EntityTrait, FromQueryResult, QueryResult, QueryTrait,
    Select, SqlxPostgresConnector, Statement,
    sqlx::{self, Row, postgres::PgRow},
};
use tokio::time::Instant;

use super::{
    MIGRATION_TIMEOUT,
    entity::Model,
    errors::{attempt_after, attempts_after, standby, timed_out},
    event_entity::Model as EventRow,
};
use crate::config::DatabaseSettings;
use crate::mapping::{Actor, Generation, Key, LinkAttempt, LinkWrite, Unlink, Unlinked};
use gets::Gets;
use links::Links;
use pool::Pool;
use prepares::Prepares;

/// The service's PostgreSQL connections, and the Gets and Links coalesced
/// over them.
#[derive(Debug)]
pub(super) struct Db {
    pool: Pool,
    gets: Gets,
    links: Links,
    prepares: Prepares,
}

impl Db {
    /// Connects, refusing a standby, and migrates when asked.
    pub async fn open(url: &str, options: &DatabaseSettings, migrate: bool) -> Result<Self, DbErr> {
        let pool = Pool::new(
            url,
            pool::Limits {
                max_connections: options.database_max_connections,
                acquire_timeout: options.database_acquire_timeout,
                connect_timeout: options.database_connect_timeout,
            },
        )?;
        // Proves the database answers and is a primary, and keeps the
        // connection for the first call.
        pool.acquire(Instant::now() + options.database_connect_timeout)
            .await?
            .release();
        if migrate {
            // One migrator at a time per database (migration_lock.rs): the
            // others wait, then find nothing pending.
            let lock = migration_lock::MigrationLock::acquire(
                pool.connect_options(),
                options.database_connect_timeout,
                MIGRATION_TIMEOUT,
            )
            .await?;
            let migrations = migration_connection(&pool, options.database_connect_timeout);
            let migrated =
                tokio::time::timeout(MIGRATION_TIMEOUT, migration::up(&migrations)).await;
            // Its pool closes every connection on release, so this has
            // nothing left to wait for; bounded all the same.
            let _ =
                tokio::time::timeout(options.database_connect_timeout, migrations.close()).await;
            lock.release(options.database_connect_timeout).await;
            migrated.map_err(|_| timed_out("applying migrations"))??;
        }
        Ok(Self {
            gets: Gets::new(&pool, options.database_stall_timeout),
            links: Links::new(&pool, options.database_stall_timeout),
            prepares: Prepares::new(&pool, options.database_stall_timeout),
            pool,
        })
    }

    /// Proves by `until` that the database answers and is a primary (a
    /// promoted standby's old primary coming back as a replica must not
    /// look healthy).
    pub async fn ping(&self, until: Instant) -> Result<(), DbErr> {
        let mut conn = self.pool.acquire(until).await?;
        let stmt = Statement::from_string(DbBackend::Postgres, "SELECT pg_is_in_recovery()");
        let in_recovery = conn
            .fetch_optional(&stmt, until)
            .await?
            .map(|row| row.try_get::<bool, _>(0))
            .transpose()
            .map_err(pool::sqlx_err)?;
        conn.release();
        if in_recovery == Some(true) {
            self.forget_connections();
            return Err(standby());
        }
        Ok(())
    }

    pub async fn schema_is_ready(&self, timeout: Duration) -> Result<bool, DbErr> {
        let conn = migration_connection(&self.pool, timeout);
        let ready = migration::ready(&conn).await;
        let _ = conn.close().await;
        ready
    }

    /// The migrations the database has applied, on the service's own
    /// connections (a probe must be cheap and bounded).
    pub async fn applied_migrations(&self, until: Instant) -> Result<Vec<String>, DbErr> {
        let mut conn = self.pool.acquire(until).await?;
        let applied = conn
            .bounded(until, "reading the schema", async |conn| {
                let exists: bool =
                    sqlx::query_scalar("SELECT to_regclass('seaql_migrations') IS NOT NULL")
                        .fetch_one(&mut *conn)
                        .await?;
                if !exists {
                    return Ok(Vec::new());
                }
                sqlx::query_scalar("SELECT version FROM seaql_migrations")
                    .fetch_all(&mut *conn)
                    .await
            })
            .await?;
        conn.release();
        Ok(applied)
    }

    /// Stops reusing the connections open now, and stops holding calls
    /// behind the statements in flight on them.
    pub fn forget_connections(&self) {
        self.pool.forget_connections();
        self.gets.kick();
        self.links.kick();
        self.prepares.kick();
    }

    pub fn stats(&self) -> (u32, u32) {
        self.pool.stats()
    }

    pub async fn close(&self, until: Instant) {
        self.pool.close(until).await;
    }

    pub async fn get(&self, key: &Key, until: Instant) -> Result<Option<Model>, DbErr> {
        self.gets.get(key, until).await
    }

    pub async fn link(&self, write: LinkWrite, until: Instant) -> Result<LinkAttempt, DbErr> {
        self.links.link(write, until).await
    }

    pub async fn link_alone(&self, write: LinkWrite, until: Instant) -> Result<LinkAttempt, DbErr> {
        self.links.link_alone(write, until).await
    }

    /// A Link after a PrepareLink at `prepared`, alone in its transaction.
    pub async fn link_prepared(
        &self,
        write: &LinkWrite,
        prepared: Generation,
        until: Instant,
    ) -> Result<LinkAttempt, DbErr> {
        let conn = self.pool.acquire(until).await?;
        link::link_prepared(conn, write, prepared, until)
            .await
            .or_else(|err| attempt_after(err, until))
    }

    pub async fn prepare(&self, key: &Key, until: Instant) -> Result<super::rows::Found, DbErr> {
        self.prepares
            .prepare(key.side.as_str(), key.account.as_str(), until)
            .await
    }

    /// Whether the upgrade's last step has run (`migration::accounts`).
    pub async fn accounts_enabled(&self, until: Instant) -> Result<bool, DbErr> {
        self.scalar(
            migration::accounts::ENABLED_SQL,
            "reading the schema",
            until,
        )
        .await
    }

    /// Runs the upgrade's last step (`migration::accounts`).
    pub async fn enable_accounts(&self, until: Instant) -> Result<(), DbErr> {
        let mut conn = self.pool.acquire(until).await?;
        conn.bounded(until, "enabling Stripe accounts", async |conn| {
            sqlx::raw_sql(migration::accounts::ENABLE_SQL)
                .execute(conn)
                .await
        })
        .await?;
        conn.release();
        Ok(())
    }

    async fn scalar(
        &self,
        sql: &'static str,
        what: &'static str,
        until: Instant,
    ) -> Result<bool, DbErr> {
        let mut conn = self.pool.acquire(until).await?;
        let value = conn
            .bounded(until, what, async |conn| {
                sqlx::query_scalar(sql).fetch_one(conn).await
            })
            .await?;
        conn.release();
        Ok(value)
    }

    /// Links `writes` (no two sharing a key) in one statement: an import's
    /// batch.
    pub async fn link_batch(
        &self,
        writes: &[&LinkWrite],
        until: Instant,
    ) -> Result<Vec<LinkAttempt>, DbErr> {
        let conn = self.pool.acquire(until).await?;
        link::link(conn, writes, "an import batch", until)
            .await
            .or_else(|err| attempts_after(err, writes.len(), until))
    }

    pub async fn unlink(
        &self,
        unlink: &Unlink,
        time: DateTime<Utc>,
        actor: &Actor,
        until: Instant,
    ) -> Result<Unlinked, DbErr> {
        link::unlink(&self.pool, unlink, time, actor, until).await
    }

    pub async fn feed_present(&self, until: Instant) -> Result<feed::Position, DbErr> {
        feed::present(&self.pool, until).await
    }

    pub async fn feed(
        &self,
        from: &feed::Position,
        up_to: Option<&feed::Position>,
        limit: u64,
        until: Instant,
    ) -> Result<(Vec<EventRow>, feed::Position, bool), DbErr> {
        feed::read(&self.pool, from, up_to, limit, until).await
    }

    /// The deployment's id: `proposed` if it has none yet.
    pub async fn deployment(&self, proposed: &str, until: Instant) -> Result<String, DbErr> {
        let mut conn = self.pool.acquire(until).await?;
        let id = conn
            .bounded(until, "reading the deployment", async |conn| {
                sqlx::query(DEPLOYMENT_SQL)
                    .bind(proposed)
                    .execute(&mut *conn)
                    .await?;
                sqlx::query_scalar("SELECT id FROM customer_mapping_deployment")
                    .fetch_one(&mut *conn)
                    .await
            })
            .await?;
        conn.release();
        Ok(id)
    }

    /// Every row that `select` finds, in one statement, by `until`.
    pub async fn all<E>(&self, select: Select<E>, until: Instant) -> Result<Vec<E::Model>, DbErr>
    where
        E: EntityTrait,
        E::Model: FromQueryResult,
    {
        let mut conn = self.pool.acquire(until).await?;
        let rows = conn
            .fetch_all(&select.build(DbBackend::Postgres), until)
            .await?;
        conn.release();
        rows.into_iter()
            .map(|row| E::Model::from_query_result(&QueryResult::from(row), ""))
            .collect()
    }
}

/// Gives the deployment its id, unless another replica did first.
pub(super) const DEPLOYMENT_SQL: &str = "INSERT INTO customer_mapping_deployment (singleton, id) VALUES (TRUE, $1) \
     ON CONFLICT DO NOTHING";

fn model(row: PgRow) -> Result<Model, DbErr> {
    Model::from_query_result(&QueryResult::from(row), "")
}

/// A SeaORM connection for the migrator, on a pool of its own that never
/// pings: sqlx's release ping has no bound, so each connection is closed
/// after use instead (start-up only; a few statements).
fn migration_connection(pool: &Pool, connect_timeout: Duration) -> DatabaseConnection {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(connect_timeout)
        .test_before_acquire(false)
        .after_release(|_, _| Box::pin(async { Ok(false) }))
        .connect_lazy_with(pool.connect_options().clone());
    SqlxPostgresConnector::from_sqlx_postgres_pool(pool)
}
