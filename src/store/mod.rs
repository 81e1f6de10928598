//! Persistence: the SeaORM entity, the connection pool and the queries.
//! Knows nothing of gRPC; speaks in rows and `DbErr`.

mod batch;
pub mod entity;
mod errors;
pub mod event_entity;
pub mod events;
pub mod list;

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, Condition, ConnectOptions, ConnectionTrait, Database, DatabaseConnection,
    DatabaseTransaction, DbErr, EntityTrait, QueryFilter, QueryTrait, Set, SqliteTransactionMode,
    TransactionOptions, TransactionTrait,
    sea_query::{InsertStatement, OnConflict},
};

pub use batch::{Side, find_by_keys};
use entity::{ActiveModel, Column, Entity as StripeCustomers, Model};
pub use errors::{is_connection_lost, is_rolled_back_by_database};
pub use events::Actor;

/// Pool settings, taken from the configuration.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    pub connect_timeout: Duration,
    /// SQLite only: how long a writer waits for another writer's lock.
    pub sqlite_busy_timeout: Duration,
}

/// Opens the pool. SQLite runs in WAL mode with `synchronous = FULL` (a
/// committed link survives a crash) and a busy timeout, so that several
/// connections can read while one writes.
pub async fn connect(url: &str, options: &PoolOptions) -> Result<DatabaseConnection, DbErr> {
    use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};

    let busy_timeout = options.sqlite_busy_timeout;
    let mut opts = ConnectOptions::new(url);
    opts.max_connections(options.max_connections)
        .min_connections(0)
        .acquire_timeout(options.acquire_timeout)
        .connect_timeout(options.connect_timeout)
        // Statement logging would put SQL and values in the log.
        .sqlx_logging(false)
        // sqlx pings every connection it hands out by default: one extra
        // round trip per query. Only connections idle for a while are
        // checked now; one that broke since its last use fails its query
        // instead, which Link retries and Get/Unlink report as UNAVAILABLE.
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
    Database::connect(opts).await
}

/// Applies every pending migration. Replicas starting together may race;
/// the loser gets an error and its start-up loop simply tries again.
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbErr> {
    migration::up(db).await
}

/// The database once it is connected and migrated, shared by the RPCs and
/// the health probe. Empty while the service starts against a database that
/// does not answer yet.
#[derive(Debug, Clone, Default)]
pub struct Store(Arc<OnceLock<DatabaseHandle>>);

impl Store {
    /// The database, or `None` while it is not ready.
    pub fn get(&self) -> Option<&DatabaseHandle> {
        self.0.get()
    }

    /// Publishes the pool; only the first call has an effect.
    pub fn set(&self, db: DatabaseConnection) {
        let _ = self.0.set(DatabaseHandle::new(db));
    }
}

/// The pool and, on SQLite, a queue for writers.
///
/// SQLite has one write lock per database. Pooled connections that find it
/// taken wait in SQLite's busy handler, which sleeps 1, 2, 5, ... up to
/// 100 ms between tries: at 32 Links in flight that made p99 85 ms and p99.9
/// half a second while p50 was 7 ms (docs/PERFORMANCE.md). Writers of this
/// process queue on a fair async mutex instead and take the lock in turn;
/// the busy timeout still covers other processes on the same file.
#[derive(Debug, Clone)]
pub struct DatabaseHandle {
    conn: DatabaseConnection,
    writers: Option<Arc<tokio::sync::Mutex<()>>>,
}

impl DatabaseHandle {
    fn new(conn: DatabaseConnection) -> Self {
        let writers = (conn.get_database_backend() == sea_orm::DbBackend::Sqlite)
            .then(|| Arc::new(tokio::sync::Mutex::new(())));
        Self { conn, writers }
    }

    pub fn connection(&self) -> &DatabaseConnection {
        &self.conn
    }

    /// Waits for this process' turn to write (SQLite only).
    async fn write_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.writers {
            Some(writers) => Some(writers.lock().await),
            None => None,
        }
    }
}

/// Open and idle connections of a pool, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub open: u32,
    pub idle: u32,
}

pub fn pool_stats(db: &DatabaseConnection) -> PoolStats {
    let (open, idle) = match db.get_database_backend() {
        sea_orm::DbBackend::Postgres => {
            let pool = db.get_postgres_connection_pool();
            (pool.size(), pool.num_idle())
        }
        _ => {
            let pool = db.get_sqlite_connection_pool();
            (pool.size(), pool.num_idle())
        }
    };
    PoolStats {
        open,
        idle: u32::try_from(idle).unwrap_or(u32::MAX),
    }
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
    /// failure, or its connection died): nothing was written and the attempt
    /// can be repeated.
    RolledBack,
}

/// One atomic attempt to link `user_id` to `stripe_customer_id`.
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
    db: &DatabaseHandle,
    user_id: &str,
    stripe_customer_id: &str,
    created_at: DateTime<Utc>,
    actor: Actor<'_>,
) -> Result<LinkAttempt, DbErr> {
    let _turn = db.write_turn().await;
    let db = db.connection();
    let in_transaction = async {
        let txn = db
            .begin_with_options(TransactionOptions {
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                ..Default::default()
            })
            .await?;
        let attempt = link_statements(&txn, user_id, stripe_customer_id, created_at, actor).await?;
        Ok::<_, DbErr>((txn, attempt))
    };
    let (txn, attempt) = match in_transaction.await {
        Ok(done) => done,
        // Nothing was committed: the database rolled back (contention) or
        // the session died with its transaction. Safe to run again.
        Err(err) if is_rolled_back_by_database(&err) || is_connection_lost(&err) => {
            tracing::debug!(error = %err, "link attempt rolled back; retrying");
            return Ok(LinkAttempt::RolledBack);
        }
        Err(err) => return Err(err),
    };
    // Not retried: once COMMIT is sent it may have taken effect, and a
    // second attempt would report `created = false` for our own insert.
    txn.commit().await?;
    Ok(attempt)
}

async fn link_statements(
    txn: &DatabaseTransaction,
    user_id: &str,
    stripe_customer_id: &str,
    created_at: DateTime<Utc>,
    actor: Actor<'_>,
) -> Result<LinkAttempt, DbErr> {
    let insert = insert_unless_either_key_taken(user_id, stripe_customer_id, created_at);
    let backend = txn.get_database_backend();
    // The event commits iff the row does: on PostgreSQL in the insert's own
    // statement (no extra round trip), on SQLite in its transaction.
    let event_in_insert = backend == sea_orm::DbBackend::Postgres;
    let mut statement = backend.build(&insert);
    if event_in_insert {
        statement = events::with_linked_event(statement, created_at, actor);
    }
    let inserted = StripeCustomers::find()
        .from_raw_sql(statement)
        .one(txn)
        .await?;
    Ok(match inserted {
        Some(model) => {
            if !event_in_insert {
                events::record(txn, events::KIND_LINKED, &model, created_at, actor).await?;
            }
            LinkAttempt::Created(model)
        }
        None => LinkAttempt::Conflicts(
            StripeCustomers::find()
                .filter(
                    Condition::any()
                        .add(Column::UserId.eq(user_id))
                        .add(Column::StripeCustomerId.eq(stripe_customer_id)),
                )
                .all(txn)
                .await?,
        ),
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

/// The row holding `user_id`, if any.
pub async fn find_by_user_id(db: &DatabaseHandle, user_id: &str) -> Result<Option<Model>, DbErr> {
    StripeCustomers::find()
        .filter(Column::UserId.eq(user_id))
        .one(db.connection())
        .await
}

/// The row holding `stripe_customer_id`, if any.
pub async fn find_by_stripe_customer_id(
    db: &DatabaseHandle,
    stripe_customer_id: &str,
) -> Result<Option<Model>, DbErr> {
    StripeCustomers::find()
        .filter(Column::StripeCustomerId.eq(stripe_customer_id))
        .one(db.connection())
        .await
}

/// Deletes the row holding `user_id`, records the event, and returns it.
pub async fn delete_by_user_id(
    db: &DatabaseHandle,
    user_id: &str,
    time: DateTime<Utc>,
    actor: Actor<'_>,
) -> Result<Option<Model>, DbErr> {
    delete_returning(db, Column::UserId, user_id, time, actor).await
}

/// Deletes the row holding `stripe_customer_id`, records the event, and
/// returns it.
pub async fn delete_by_stripe_customer_id(
    db: &DatabaseHandle,
    stripe_customer_id: &str,
    time: DateTime<Utc>,
    actor: Actor<'_>,
) -> Result<Option<Model>, DbErr> {
    delete_returning(
        db,
        Column::StripeCustomerId,
        stripe_customer_id,
        time,
        actor,
    )
    .await
}

async fn delete_returning(
    db: &DatabaseHandle,
    column: Column,
    value: &str,
    time: DateTime<Utc>,
    actor: Actor<'_>,
) -> Result<Option<Model>, DbErr> {
    let _turn = db.write_turn().await;
    // `DELETE ... RETURNING` is atomic: of two concurrent Unlinks of the same
    // row exactly one gets it back, the other finds nothing.
    events::delete_recording(db.connection(), column, value, time, actor).await
}

/// Cheapest round trip that proves the database answers.
pub async fn ping(db: &DatabaseConnection) -> Result<(), DbErr> {
    db.ping().await
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
