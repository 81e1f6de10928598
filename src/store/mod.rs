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
pub mod entity;
mod errors;
pub mod event_entity;
pub mod events;
pub mod list;
mod postgres;

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, Condition, ConnectOptions, ConnectionTrait, DatabaseConnection,
    DatabaseTransaction, DbBackend, DbErr, EntityTrait, FromQueryResult, QueryFilter, QueryResult,
    QueryTrait, Select, Set, SqliteTransactionMode, SqlxPostgresConnector, Statement,
    TransactionOptions, TransactionTrait,
    sea_query::{InsertStatement, OnConflict},
    sqlx::{self, Row, postgres::PgRow},
};
use tokio::time::Instant;

pub use batch::{Side, find_by_keys};
use entity::{ActiveModel, Column, Entity as StripeCustomers, Model};
pub use errors::{
    failure_kind, is_connection_lost, is_read_only, is_rolled_back_by_database, is_timeout,
    is_unavailable,
};
pub use events::Actor;

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
    Postgres(postgres::Pool),
    Sqlite(SqliteDb),
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
                let migrations = migration_connection(&pool, options);
                let migrated =
                    tokio::time::timeout(MIGRATION_TIMEOUT, migration::up(&migrations)).await;
                // Its pool closes every connection on release, so this has
                // nothing left to wait for; bounded all the same.
                let _ = tokio::time::timeout(options.connect_timeout, migrations.close()).await;
                migrated.map_err(|_| errors::timed_out("applying migrations"))??;
            }
            Backend::Postgres(pool)
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
            Backend::Postgres(pool) => {
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

    /// Stops reusing the connections open now: called when the database
    /// stopped answering, since connections opened before may sit on a path
    /// that went silent, and each would cost a caller its deadline.
    pub fn forget_connections(&self) {
        if let Backend::Postgres(pool) = &self.0 {
            pool.forget_connections();
        }
    }

    /// Open and idle connections.
    pub fn stats(&self) -> PoolStats {
        let (open, idle) = match &self.0 {
            Backend::Postgres(pool) => pool.stats(),
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
            Backend::Postgres(pool) => {
                pool.close(until).await;
                Ok(())
            }
            Backend::Sqlite(db) => tokio::time::timeout_at(until, db.conn.close_by_ref())
                .await
                .map_err(|_| errors::timed_out("closing the database"))?,
        }
    }

    /// The row that `select` finds, by `until`.
    async fn one(
        &self,
        select: Select<StripeCustomers>,
        until: Instant,
    ) -> Result<Option<Model>, DbErr> {
        match &self.0 {
            Backend::Postgres(pool) => {
                let mut conn = pool.acquire(until).await?;
                let row = conn
                    .fetch_optional(&select.build(DbBackend::Postgres), until)
                    .await?;
                conn.release();
                row.map(model).transpose()
            }
            Backend::Sqlite(db) => select.one(&db.conn).await,
        }
    }

    /// Every row that `select` finds, in one statement, by `until`.
    async fn all<E>(&self, select: Select<E>, until: Instant) -> Result<Vec<E::Model>, DbErr>
    where
        E: EntityTrait,
        E::Model: FromQueryResult + Send + Sync,
    {
        match &self.0 {
            Backend::Postgres(pool) => {
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
fn migration_connection(pool: &postgres::Pool, options: &PoolOptions) -> DatabaseConnection {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(options.connect_timeout)
        .test_before_acquire(false)
        .after_release(|_, _| Box::pin(async { Ok(false) }))
        .connect_lazy_with(pool.connect_options().clone());
    SqlxPostgresConnector::from_sqlx_postgres_pool(pool)
}

fn model(row: PgRow) -> Result<Model, DbErr> {
    Model::from_query_result(&QueryResult::from(row), "")
}

/// What one attempt at linking found.
#[derive(Debug)]
pub enum LinkAttempt {
    /// This attempt inserted the row.
    Created(Model),
    /// The insert conflicted; these are the committed rows holding the user
    /// or the customer when read. Empty when they were unlinked in between.
    Conflicts(Vec<Model>),
    /// The transaction was rolled back before COMMIT (deadlock, serialization
    /// failure, its connection died, or it reached a standby): nothing was
    /// written and the attempt can be repeated.
    RolledBack,
}

/// One atomic attempt to link `user_id` to `stripe_customer_id`, done or
/// failed by `until`.
///
/// Why there is no race window (the bug this service replaces did
/// "insert, ignore conflict, then look up" and trusted the look-up):
///
/// 1. `INSERT ... ON CONFLICT DO NOTHING RETURNING *` is one atomic statement
///    arbitrated by the two unique indexes. On PostgreSQL, if another
///    transaction holds an uncommitted row with either key, the insert waits
///    for it to commit or roll back, then either inserts (and we return
///    `Created`: the row is ours and nobody else can have either key) or does
///    nothing because a *committed* row holds a key. Two concurrent Links can
///    never both insert, whatever the interleaving.
/// 2. Only on conflict do we read the rows holding either key, in the same
///    transaction. Under READ COMMITTED the read takes a fresh snapshot, so it
///    sees the committed conflicting row, or nothing if a concurrent Unlink
///    committed in between: then we report `Conflicts(vec![])` and the caller
///    retries (bounded) instead of guessing. On SQLite the transaction is
///    `BEGIN IMMEDIATE`, so writers are serialized and the read sees exactly
///    what the insert conflicted with.
/// 3. The caller decides from the rows it read, never from an assumption. A
///    reply is always the state at one instant during the call (the insert's
///    commit, or the read), which is what makes the service linearizable: an
///    idempotent repeat returns the stored row, and a conflict names the row
///    that actually holds the key.
pub async fn try_link(
    db: &Database,
    user_id: &str,
    stripe_customer_id: &str,
    created_at: DateTime<Utc>,
    actor: Actor<'_>,
    until: Instant,
) -> Result<LinkAttempt, DbErr> {
    let insert = insert_unless_either_key_taken(user_id, stripe_customer_id, created_at);
    let holders = StripeCustomers::find().filter(
        Condition::any()
            .add(Column::UserId.eq(user_id))
            .add(Column::StripeCustomerId.eq(stripe_customer_id)),
    );
    let pool = match &db.0 {
        Backend::Postgres(pool) => pool,
        Backend::Sqlite(db) => {
            return try_link_sqlite(db, &insert, holders, created_at, actor).await;
        }
    };
    // The event commits iff the row does: recorded by the insert's own
    // statement (no extra round trip).
    let insert = events::with_linked_event(DbBackend::Postgres.build(&insert), created_at, actor);
    let mut conn = pool.acquire(until).await?;
    let before_commit = async {
        conn.execute("BEGIN", until).await?;
        let inserted = conn.fetch_optional(&insert, until).await?;
        Ok::<_, DbErr>(match inserted {
            Some(row) => LinkAttempt::Created(model(row)?),
            None => LinkAttempt::Conflicts(
                conn.fetch_all(&holders.build(DbBackend::Postgres), until)
                    .await?
                    .into_iter()
                    .map(model)
                    .collect::<Result<_, _>>()?,
            ),
        })
    };
    let attempt = match before_commit.await {
        Ok(attempt) => attempt,
        // Nothing was committed: COMMIT was never sent, and the connection
        // is closed, so the server rolls the transaction back (at the
        // latest after its idle-in-transaction timeout). Safe to run again
        // on another connection while there is time left; a timeout means
        // there is none.
        Err(err) if is_retryable_before_commit(&err) && Instant::now() < until => {
            tracing::debug!(error = %err, "link attempt rolled back; retrying");
            return Ok(LinkAttempt::RolledBack);
        }
        Err(err) => return Err(err),
    };
    // Not retried: once COMMIT is sent it may have taken effect, and a
    // second attempt would report `created = false` for our own insert.
    conn.execute("COMMIT", until).await?;
    conn.release();
    Ok(attempt)
}

fn is_retryable_before_commit(err: &DbErr) -> bool {
    is_rolled_back_by_database(err) || is_connection_lost(err) || is_read_only(err)
}

async fn try_link_sqlite(
    db: &SqliteDb,
    insert: &InsertStatement,
    holders: Select<StripeCustomers>,
    created_at: DateTime<Utc>,
    actor: Actor<'_>,
) -> Result<LinkAttempt, DbErr> {
    let _turn = db.writers.lock().await;
    let in_transaction = async {
        let txn = db
            .conn
            .begin_with_options(TransactionOptions {
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                ..Default::default()
            })
            .await?;
        let attempt = link_statements_sqlite(&txn, insert, holders, created_at, actor).await?;
        Ok::<_, DbErr>((txn, attempt))
    };
    let (txn, attempt) = match in_transaction.await {
        Ok(done) => done,
        Err(err) if is_rolled_back_by_database(&err) || is_connection_lost(&err) => {
            tracing::debug!(error = %err, "link attempt rolled back; retrying");
            return Ok(LinkAttempt::RolledBack);
        }
        Err(err) => return Err(err),
    };
    txn.commit().await?;
    Ok(attempt)
}

async fn link_statements_sqlite(
    txn: &DatabaseTransaction,
    insert: &InsertStatement,
    holders: Select<StripeCustomers>,
    created_at: DateTime<Utc>,
    actor: Actor<'_>,
) -> Result<LinkAttempt, DbErr> {
    let inserted = StripeCustomers::find()
        .from_raw_sql(txn.get_database_backend().build(insert))
        .one(txn)
        .await?;
    Ok(match inserted {
        Some(model) => {
            // In the insert's transaction: the event commits iff the row does.
            events::record(txn, events::KIND_LINKED, &model, created_at, actor).await?;
            LinkAttempt::Created(model)
        }
        None => LinkAttempt::Conflicts(holders.all(txn).await?),
    })
}

/// `INSERT ... ON CONFLICT DO NOTHING RETURNING *`, with no conflict target
/// so that a conflict on *either* unique index does nothing. Run by hand
/// rather than through `TryInsert`, whose `exec_with_returning` reports an
/// empty RETURNING as an error instead of a conflict.
fn insert_unless_either_key_taken(
    user_id: &str,
    stripe_customer_id: &str,
    created_at: DateTime<Utc>,
) -> InsertStatement {
    let row = ActiveModel {
        user_id: Set(user_id.to_owned()),
        stripe_customer_id: Set(stripe_customer_id.to_owned()),
        created_at: Set(created_at),
        ..Default::default()
    };
    StripeCustomers::insert(row)
        .on_conflict(OnConflict::new().do_nothing().to_owned())
        .into_query()
        .returning_all()
        .to_owned()
}

/// The row holding `user_id`, if any, read by `until`.
pub async fn find_by_user_id(
    db: &Database,
    user_id: &str,
    until: Instant,
) -> Result<Option<Model>, DbErr> {
    db.one(
        StripeCustomers::find().filter(Column::UserId.eq(user_id)),
        until,
    )
    .await
}

/// The row holding `stripe_customer_id`, if any, read by `until`.
pub async fn find_by_stripe_customer_id(
    db: &Database,
    stripe_customer_id: &str,
    until: Instant,
) -> Result<Option<Model>, DbErr> {
    db.one(
        StripeCustomers::find().filter(Column::StripeCustomerId.eq(stripe_customer_id)),
        until,
    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::DbBackend;

    #[test]
    fn link_insert_does_nothing_on_either_key_and_returns_the_row() {
        let insert = insert_unless_either_key_taken("u", "cus_1", DateTime::UNIX_EPOCH);
        for backend in [DbBackend::Postgres, DbBackend::Sqlite] {
            let sql = backend.build(&insert).sql;
            let sql = sql.split_whitespace().collect::<Vec<_>>().join(" ");
            assert!(
                sql.ends_with(") ON CONFLICT DO NOTHING RETURNING *"),
                "{backend:?}: {sql}"
            );
        }
    }
}
