//! Persistence, and the one owner of the database: connecting, migrating,
//! pinging, closing, pool statistics and the classification of database
//! errors all live here. Knows nothing of gRPC or of the domain; speaks in
//! rows and `DbErr`.
//!
//! Every interaction with PostgreSQL is bounded (see `postgres.rs`): each
//! call passes the instant by which it must be done, derived from the RPC's
//! deadline, and each step is further bounded by the configuration
//! (acquire and connect timeouts). SQLite runs in-process and cannot go
//! silent; it keeps SeaORM's pool, bounded by its busy timeout.

mod batch;
mod coalesce;
pub mod entity;
mod errors;
pub mod event_entity;
pub mod events;
mod import;
mod link;
pub mod list;
mod postgres;

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, ConnectOptions, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr,
    EntityTrait, FromQueryResult, QueryFilter, QueryResult, QueryTrait, Select,
    SqliteTransactionMode, SqlxPostgresConnector, Statement, TransactionOptions, TransactionTrait,
    sqlx::{self, Row, postgres::PgRow},
};
use tokio::time::Instant;

pub use batch::{Side, find_by_keys};
pub use coalesce::{CALLS_PER_STATEMENT, QUEUED as QUEUED_CALLS};
use entity::{Column, Entity as StripeCustomers, Model};
pub use errors::{
    failure_kind, is_connection_lost, is_read_only, is_rolled_back_by_database, is_timeout,
    is_unavailable,
};
pub use events::Actor;
pub use import::{BatchAttempt, ImportRow, Write as ImportWrite, import_batch};
pub use link::{LinkAttempt, Sharing, try_link};

/// How long applying the migrations may take at start-up. They are a few
/// DDL statements on a small schema; this only bounds a database that went
/// silent half-way, after which the start-up loop tries again.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Pool settings, taken from the configuration.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    pub connect_timeout: Duration,
    /// PostgreSQL: when a statement in flight stops holding up the calls
    /// queued behind it (`coalesce/`).
    pub stall_timeout: Duration,
    /// SQLite only: how long a writer waits for another writer's lock.
    pub sqlite_busy_timeout: Duration,
}

/// The database once it is connected and migrated, shared by the RPCs and
/// the health probe. Empty while the service starts against a database that
/// does not answer yet.
#[derive(Debug, Clone, Default)]
pub struct Store(Arc<OnceLock<Database>>);

impl Store {
    /// The database, or `None` while it is not ready.
    pub fn get(&self) -> Option<&Database> {
        self.0.get()
    }

    /// Publishes the database; only the first call has an effect.
    pub fn set(&self, db: Database) {
        let _ = self.0.set(db);
    }
}

/// A connected, migrated database.
#[derive(Debug, Clone)]
pub struct Database(Backend);

#[derive(Debug, Clone)]
enum Backend {
    Postgres(PostgresDb),
    Sqlite(SqliteDb),
}

/// The service's PostgreSQL connections, and the Gets and Links coalesced
/// over them.
#[derive(Debug, Clone)]
struct PostgresDb {
    pool: postgres::Pool,
    reads: Arc<coalesce::Reads>,
    links: Arc<coalesce::Links>,
}

/// SeaORM's pool on SQLite, and a queue for writers.
///
/// SQLite has one write lock per database. Pooled connections that find it
/// taken wait in SQLite's busy handler, which sleeps 1, 2, 5, ... up to
/// 100 ms between tries: at 32 Links in flight that made p99 85 ms and p99.9
/// half a second while p50 was 7 ms (docs/PERFORMANCE.md). Writers of this
/// process queue on a fair async mutex instead and take the lock in turn;
/// the busy timeout still covers other processes on the same file.
#[derive(Debug, Clone)]
struct SqliteDb {
    conn: DatabaseConnection,
    writers: Arc<tokio::sync::Mutex<()>>,
}

impl SqliteDb {
    /// A write transaction, in turn: this process's writers queue here, and
    /// `BEGIN IMMEDIATE` takes SQLite's write lock at once (a deferred
    /// transaction that reads first can fail to upgrade). Keep the turn
    /// until the transaction ends.
    async fn begin_write(
        &self,
    ) -> Result<(tokio::sync::MutexGuard<'_, ()>, DatabaseTransaction), DbErr> {
        let turn = self.writers.lock().await;
        let txn = self
            .conn
            .begin_with_options(TransactionOptions {
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                ..Default::default()
            })
            .await?;
        Ok((turn, txn))
    }
}

/// Open and idle connections of a pool, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub open: u32,
    pub idle: u32,
}

impl Database {
    /// Connects (refusing a standby on PostgreSQL) and, when `migrate`,
    /// applies every pending migration. Replicas starting together may race
    /// on migrations; the loser gets an error and its start-up loop simply
    /// tries again. Every step is bounded: this fails rather than hangs on a
    /// database that does not answer.
    pub async fn open(url: &str, options: &PoolOptions, migrate: bool) -> Result<Self, DbErr> {
        let db = if is_postgres(url) {
            let pool = postgres::Pool::new(
                url,
                postgres::Limits {
                    max_connections: options.max_connections,
                    acquire_timeout: options.acquire_timeout,
                    connect_timeout: options.connect_timeout,
                },
            )?;
            // Proves the database answers and is a primary, and keeps the
            // connection for the first RPC.
            pool.acquire(Instant::now() + options.connect_timeout)
                .await?
                .release();
            if migrate {
                let migrations = migration_connection(&pool, options.connect_timeout);
                let migrated =
                    tokio::time::timeout(MIGRATION_TIMEOUT, migration::up(&migrations)).await;
                // Its pool closes every connection on release, so this has
                // nothing left to wait for; bounded all the same.
                let _ = tokio::time::timeout(options.connect_timeout, migrations.close()).await;
                migrated.map_err(|_| errors::timed_out("applying migrations"))??;
            }
            Backend::Postgres(PostgresDb {
                pool,
                reads: Arc::new(coalesce::Reads::new(options.stall_timeout)),
                links: Arc::new(coalesce::Links::new(options.stall_timeout)),
            })
        } else {
            let conn = connect_sqlite(url, options).await?;
            if migrate {
                tokio::time::timeout(MIGRATION_TIMEOUT, migration::up(&conn))
                    .await
                    .map_err(|_| errors::timed_out("applying migrations"))??;
            }
            Backend::Sqlite(SqliteDb {
                conn,
                writers: Arc::new(tokio::sync::Mutex::new(())),
            })
        };
        Ok(Database(db))
    }

    /// Proves within `timeout` that the database answers and, on
    /// PostgreSQL, that it is a primary (`pg_is_in_recovery()` is false): a
    /// promoted standby's old primary coming back as a replica must not look
    /// healthy.
    pub async fn ping(&self, timeout: Duration) -> Result<(), DbErr> {
        let until = Instant::now() + timeout;
        match &self.0 {
            Backend::Postgres(PostgresDb { pool, .. }) => {
                let mut conn = pool.acquire(until).await?;
                let stmt =
                    Statement::from_string(DbBackend::Postgres, "SELECT pg_is_in_recovery()");
                let in_recovery = conn
                    .fetch_optional(&stmt, until)
                    .await?
                    .map(|row| row.try_get::<bool, _>(0))
                    .transpose()
                    .map_err(postgres::sqlx_err)?;
                conn.release();
                if in_recovery == Some(true) {
                    pool.forget_connections();
                    return Err(errors::standby());
                }
                Ok(())
            }
            Backend::Sqlite(db) => tokio::time::timeout_at(until, db.conn.ping())
                .await
                .map_err(|_| errors::timed_out("the health ping"))?,
        }
    }

    /// Whether the service's tables are there, up to date, by `timeout`:
    /// `false` for a database with none of them yet, an error for one with
    /// someone else's `stripe_customers` or only some of the migrations. A
    /// dry-run import reads a database without migrating it.
    pub async fn schema_is_ready(&self, timeout: Duration) -> Result<bool, DbErr> {
        let ready = async {
            match &self.0 {
                Backend::Postgres(pg) => {
                    let conn = migration_connection(&pg.pool, timeout);
                    let ready = migration::ready(&conn).await;
                    let _ = conn.close().await;
                    ready
                }
                Backend::Sqlite(db) => migration::ready(&db.conn).await,
            }
        };
        tokio::time::timeout(timeout, ready)
            .await
            .map_err(|_| errors::timed_out("reading the schema"))?
    }

    /// Stops reusing the connections open now: called when the database
    /// stopped answering, since connections opened before may sit on a path
    /// that went silent, and each would cost a caller its deadline.
    pub fn forget_connections(&self) {
        if let Backend::Postgres(pg) = &self.0 {
            pg.pool.forget_connections();
            pg.reads.forget(&pg.pool);
            pg.links.forget(&pg.pool);
        }
    }

    /// Open and idle connections.
    pub fn stats(&self) -> PoolStats {
        let (open, idle) = match &self.0 {
            Backend::Postgres(pg) => pg.pool.stats(),
            Backend::Sqlite(db) => {
                let pool = db.conn.get_sqlite_connection_pool();
                (
                    pool.size(),
                    u32::try_from(pool.num_idle()).unwrap_or(u32::MAX),
                )
            }
        };
        PoolStats { open, idle }
    }

    /// Closes the connections, giving up at `timeout`. Connections still in
    /// use close when their work ends (bounded by its own deadline).
    pub async fn close(&self, timeout: Duration) -> Result<(), DbErr> {
        let until = Instant::now() + timeout;
        match &self.0 {
            Backend::Postgres(pg) => {
                pg.pool.close(until).await;
                Ok(())
            }
            Backend::Sqlite(db) => tokio::time::timeout_at(until, db.conn.close_by_ref())
                .await
                .map_err(|_| errors::timed_out("closing the database"))?,
        }
    }

    /// The row holding `value` in `column`, by `until`. Concurrent Gets on
    /// PostgreSQL share statements (see `coalesce/`).
    async fn one(
        &self,
        column: Column,
        value: &str,
        until: Instant,
    ) -> Result<Option<Model>, DbErr> {
        match &self.0 {
            Backend::Postgres(pg) => pg.reads.get(&pg.pool, column, value, until).await,
            Backend::Sqlite(db) => {
                StripeCustomers::find()
                    .filter(column.eq(value))
                    .one(&db.conn)
                    .await
            }
        }
    }

    /// Every row that `select` finds, in one statement, by `until`.
    async fn all<E>(&self, select: Select<E>, until: Instant) -> Result<Vec<E::Model>, DbErr>
    where
        E: EntityTrait,
        E::Model: FromQueryResult + Send + Sync,
    {
        match &self.0 {
            Backend::Postgres(PostgresDb { pool, .. }) => {
                let mut conn = pool.acquire(until).await?;
                let rows = conn
                    .fetch_all(&select.build(DbBackend::Postgres), until)
                    .await?;
                conn.release();
                rows.into_iter()
                    .map(|row| E::Model::from_query_result(&QueryResult::from(row), ""))
                    .collect()
            }
            Backend::Sqlite(db) => select.all(&db.conn).await,
        }
    }
}

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// SQLite runs in WAL mode with `synchronous = FULL` (a committed link
/// survives a crash) and a busy timeout, so that several connections can
/// read while one writes.
async fn connect_sqlite(url: &str, options: &PoolOptions) -> Result<DatabaseConnection, DbErr> {
    use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};

    let busy_timeout = options.sqlite_busy_timeout;
    let mut opts = ConnectOptions::new(url);
    opts.max_connections(options.max_connections)
        .min_connections(0)
        .acquire_timeout(options.acquire_timeout)
        .connect_timeout(options.connect_timeout)
        // Statement logging would put SQL and values in the log.
        .sqlx_logging(false)
        // In-process: a ping costs no round trip, but is still pointless
        // for connections in use moments ago.
        .test_before_acquire_if_idle_for(Duration::from_secs(5))
        .map_sqlx_sqlite_opts(move |o| {
            o.journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(busy_timeout)
                // Page cache per connection: 1 MiB instead of SQLite's 2 MiB
                // default, so ten connections stay within the memory budget
                // at a million rows (docs/PERFORMANCE.md); the index pages a
                // look-up walks fit many times over.
                .pragma("cache_size", "-1024")
        });
    sea_orm::Database::connect(opts).await
}

/// A SeaORM connection for the migrator, on a pool of its own that never
/// pings: sqlx's release ping has no bound, so each connection is closed
/// after use instead (start-up only; a few statements).
fn migration_connection(pool: &postgres::Pool, connect_timeout: Duration) -> DatabaseConnection {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(connect_timeout)
        .test_before_acquire(false)
        .after_release(|_, _| Box::pin(async { Ok(false) }))
        .connect_lazy_with(pool.connect_options().clone());
    SqlxPostgresConnector::from_sqlx_postgres_pool(pool)
}

fn model(row: PgRow) -> Result<Model, DbErr> {
    Model::from_query_result(&QueryResult::from(row), "")
}

/// The row holding `user_id`, if any, read by `until`.
pub async fn find_by_user_id(
    db: &Database,
    user_id: &str,
    until: Instant,
) -> Result<Option<Model>, DbErr> {
    db.one(Column::UserId, user_id, until).await
}

/// The row holding `stripe_customer_id`, if any, read by `until`.
pub async fn find_by_stripe_customer_id(
    db: &Database,
    stripe_customer_id: &str,
    until: Instant,
) -> Result<Option<Model>, DbErr> {
    db.one(Column::StripeCustomerId, stripe_customer_id, until)
        .await
}

/// Deletes the row holding `user_id`, records the event, and returns it,
/// by `until`.
pub async fn delete_by_user_id(
    db: &Database,
    user_id: &str,
    time: DateTime<Utc>,
    actor: Actor<'_>,
    until: Instant,
) -> Result<Option<Model>, DbErr> {
    events::delete_recording(db, Column::UserId, user_id, time, actor, until).await
}

/// Deletes the row holding `stripe_customer_id`, records the event, and
/// returns it, by `until`.
pub async fn delete_by_stripe_customer_id(
    db: &Database,
    stripe_customer_id: &str,
    time: DateTime<Utc>,
    actor: Actor<'_>,
    until: Instant,
) -> Result<Option<Model>, DbErr> {
    events::delete_recording(
        db,
        Column::StripeCustomerId,
        stripe_customer_id,
        time,
        actor,
        until,
    )
    .await
}
