//! SQLite: SeaORM's pool, and one write transaction at a time.
//!
//! SQLite has one write lock per database. Pooled connections that find it
//! taken wait in SQLite's busy handler, which sleeps between tries and made
//! the tail latency of concurrent Links many times their median
//! (docs/PERFORMANCE.md). Writers of this process queue on a fair async
//! mutex instead and take the lock in turn (`BEGIN IMMEDIATE`); the busy
//! timeout still covers other processes on the same file. Writers being
//! serialized, a transaction that inserts and then reads the holders sees
//! exactly what its inserts conflicted with: Link's guarantees hold here
//! without PostgreSQL's argument (`postgres/link.rs`).

use std::{collections::HashSet, time::Duration};

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, ConnectOptions, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr,
    EntityTrait, QueryFilter, QueryTrait, SqliteTransactionMode, TransactionOptions,
    TransactionTrait, sea_query::OnConflict,
};
use tokio::sync::{Mutex, MutexGuard};

use super::{
    MIGRATION_TIMEOUT,
    entity::{Entity as StripeCustomers, Model},
    errors::timed_out,
    event_entity::{self, Entity as MappingEvents, Model as EventRow},
    queries,
    rows::{self, Found},
};
use crate::config::DatabaseSettings;
use crate::mapping::{Actor, EventKind, Generation, Key, LinkAttempt, LinkWrite, Unlink, Unlinked};

/// Rows per multi-row statement (SQLite takes at most 32,766 parameters;
/// an event row has seven). Larger statements are no faster and SQLite
/// keeps each prepared one (docs/PERFORMANCE.md, issue 15).
const ROWS_PER_STATEMENT: usize = 500;

#[derive(Debug)]
pub(super) struct Db {
    pub conn: DatabaseConnection,
    writers: Mutex<()>,
}

impl Db {
    pub async fn open(url: &str, options: &DatabaseSettings, migrate: bool) -> Result<Self, DbErr> {
        let conn = connect(url, options).await?;
        if migrate {
            tokio::time::timeout(MIGRATION_TIMEOUT, migration::up(&conn))
                .await
                .map_err(|_| timed_out("applying migrations"))??;
        }
        Ok(Self {
            conn,
            writers: Mutex::new(()),
        })
    }

    pub fn stats(&self) -> (u32, u32) {
        let pool = self.conn.get_sqlite_connection_pool();
        let idle = u32::try_from(pool.num_idle()).unwrap_or(u32::MAX);
        (pool.size(), idle)
    }

    /// A write transaction, in turn: this process's writers queue here, and
    /// `BEGIN IMMEDIATE` takes SQLite's write lock at once (a deferred
    /// transaction that reads first can fail to upgrade). Keep the turn
    /// until the transaction ends.
    async fn begin_write(&self) -> Result<(MutexGuard<'_, ()>, DatabaseTransaction), DbErr> {
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

    /// The migrations the database has applied.
    pub async fn applied_migrations(&self) -> Result<Vec<String>, DbErr> {
        use sea_orm::{ConnectionTrait, Statement};
        let statement = |sql: &str| Statement::from_string(DbBackend::Sqlite, sql);
        let tables = self
            .conn
            .query_all_raw(statement(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'seaql_migrations'",
            ))
            .await?;
        if tables.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self
            .conn
            .query_all_raw(statement("SELECT version FROM seaql_migrations"))
            .await?;
        rows.iter()
            .map(|row| row.try_get::<String>("", "version"))
            .collect()
    }

    pub async fn get(&self, key: &Key) -> Result<Option<Model>, DbErr> {
        StripeCustomers::find()
            .filter(queries::holding(key))
            .one(&self.conn)
            .await
    }

    /// The mapping holding `key` (a user's), or else the user's generation,
    /// in one read transaction (one snapshot).
    pub async fn prepare(&self, key: &Key) -> Result<Found, DbErr> {
        let txn = self.conn.begin().await?;
        let found = match StripeCustomers::find()
            .filter(queries::holding(key))
            .one(&txn)
            .await?
        {
            Some(row) => Found::Linked(row),
            None => Found::Unlinked(generation(&txn, key).await?),
        };
        txn.commit().await?;
        Ok(found)
    }

    /// Links `writes` (no two sharing a key) in one transaction: each
    /// Link's attempt, in order.
    pub async fn link(&self, writes: &[&LinkWrite]) -> Result<Vec<LinkAttempt>, DbErr> {
        let (_turn, txn) = self.begin_write().await?;
        let attempts = link_in(&txn, writes).await?;
        txn.commit().await?;
        Ok(attempts)
    }

    /// A Link after a PrepareLink at `prepared`: written only while the
    /// user is still at that generation. Writers take turns, so nothing
    /// can unlink the user between the count and the commit.
    pub async fn link_prepared(
        &self,
        write: &LinkWrite,
        prepared: Generation,
    ) -> Result<LinkAttempt, DbErr> {
        let (_turn, txn) = self.begin_write().await?;
        let key = &write.keys()[0];
        let current = rows::generation(generation(&txn, key).await?)?;
        if current != prepared {
            return Ok(LinkAttempt::Stale(current));
        }
        let attempt = link_in(&txn, &[write]).await?;
        txn.commit().await?;
        Ok(rows::only(attempt))
    }

    /// Up to `limit` events after sequence `after` (up to `up_to` when
    /// given), in sequence order: the feed's order on SQLite. A sequence is
    /// only drawn under the database's write lock, which its transaction
    /// holds until it commits, so sequences commit in order: a reader that
    /// has seen `n` will never see a smaller one appear.
    pub async fn feed(
        &self,
        after: i64,
        up_to: Option<i64>,
        limit: u64,
    ) -> Result<Vec<EventRow>, DbErr> {
        use sea_orm::{QueryOrder, QuerySelect};
        let mut select = MappingEvents::find()
            .filter(event_entity::Column::Sequence.gt(after))
            .order_by_asc(event_entity::Column::Sequence)
            .limit(limit);
        if let Some(up_to) = up_to {
            select = select.filter(event_entity::Column::Sequence.lte(up_to));
        }
        select.all(&self.conn).await
    }

    /// The deployment's id: `proposed` if it has none yet.
    pub async fn deployment(&self, proposed: &str) -> Result<String, DbErr> {
        use sea_orm::{ConnectionTrait, Statement};
        self.conn
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Sqlite,
                "INSERT INTO customer_mapping_deployment (singleton, id) VALUES (TRUE, ?) \
                 ON CONFLICT DO NOTHING",
                [proposed.into()],
            ))
            .await?;
        let row = self
            .conn
            .query_one_raw(Statement::from_string(
                DbBackend::Sqlite,
                "SELECT id FROM customer_mapping_deployment",
            ))
            .await?
            .ok_or_else(|| DbErr::RecordNotFound("the deployment's id".into()))?;
        row.try_get("", "id")
    }

    /// The newest event's sequence (0 when there is none).
    pub async fn last_sequence(&self) -> Result<i64, DbErr> {
        use sea_orm::{QueryOrder, QuerySelect};
        let last = MappingEvents::find()
            .select_only()
            .column(event_entity::Column::Sequence)
            .order_by_desc(event_entity::Column::Sequence)
            .into_tuple::<i64>()
            .one(&self.conn)
            .await?;
        Ok(last.unwrap_or(0))
    }

    /// One write transaction: nothing can change the mapping between the
    /// delete and the read of what holds the key instead.
    pub async fn unlink(
        &self,
        unlink: &Unlink,
        time: DateTime<Utc>,
        actor: &Actor,
    ) -> Result<Unlinked, DbErr> {
        let (_turn, txn) = self.begin_write().await?;
        let key = unlink.key();
        let mut only = queries::holding(key);
        if let Some(counterpart) = unlink.expected_counterpart() {
            only = only.add(queries::column(counterpart).eq(counterpart.as_str()));
        }
        let mut deleted = StripeCustomers::delete_many()
            .filter(only)
            .exec_with_returning(&txn)
            .await?;
        // The key's column is unique, so there is at most one row.
        let found = match deleted.pop() {
            Some(row) => {
                let event = rows::new_event(EventKind::Unlinked, &row, time, actor);
                MappingEvents::insert(event)
                    .exec_without_returning(&txn)
                    .await?;
                Unlinked::Removed(rows::mapping(&row)?)
            }
            None if unlink.expected_counterpart().is_some() => {
                let holder = StripeCustomers::find()
                    .filter(queries::holding(key))
                    .one(&txn)
                    .await?;
                match holder {
                    Some(row) => Unlinked::Kept(rows::mapping(&row)?),
                    None => Unlinked::Absent,
                }
            }
            None => Unlinked::Absent,
        };
        txn.commit().await?;
        Ok(found)
    }
}

/// Each Link's attempt at `writes` (no two sharing a key), inside `txn`.
async fn link_in(
    txn: &DatabaseTransaction,
    writes: &[&LinkWrite],
) -> Result<Vec<LinkAttempt>, DbErr> {
    let (mut inserted, mut holders) = (Vec::new(), Vec::new());
    for chunk in writes.chunks(ROWS_PER_STATEMENT) {
        let created = insert_with_events(txn, chunk).await?;
        let done: HashSet<(&str, &str)> = created
            .iter()
            .map(|row| (row.stripe_account.as_str(), row.user_id.as_str()))
            .collect();
        let pending: Vec<Key> = chunk
            .iter()
            .filter(|w| {
                let mapping = &w.mapping;
                !done.contains(&(mapping.stripe_account.as_str(), mapping.user_id.as_str()))
            })
            .flat_map(|w| w.keys())
            .collect();
        if !pending.is_empty() {
            holders.extend(queries::holding_any(&pending).all(txn).await?);
        }
        inserted.extend(created);
    }
    rows::attempts(writes, inserted, &holders)
}

/// How many times `key`'s user was unlinked in its account.
async fn generation(txn: &DatabaseTransaction, key: &Key) -> Result<i64, DbErr> {
    use event_entity::Column as Event;
    use sea_orm::PaginatorTrait;
    MappingEvents::find()
        .filter(Event::UserId.eq(key.side.as_str()))
        .filter(Event::StripeAccount.eq(key.account.as_str()))
        .filter(Event::Kind.eq(rows::kind_code(EventKind::Unlinked)))
        .count(txn)
        .await
        .map(|count| i64::try_from(count).unwrap_or(i64::MAX))
}

/// Inserts `writes` unless either key is taken, with the event of each row
/// inserted; the rows inserted.
///
/// `INSERT ... ON CONFLICT DO NOTHING RETURNING *` with no conflict target,
/// so that a conflict on either unique index does nothing; run by hand
/// rather than through `TryInsert`, whose `exec_with_returning` reports an
/// empty RETURNING as an error instead of a conflict.
async fn insert_with_events(
    txn: &DatabaseTransaction,
    writes: &[&LinkWrite],
) -> Result<Vec<Model>, DbErr> {
    let insert = StripeCustomers::insert_many(writes.iter().map(|w| rows::new_mapping(w)))
        .on_conflict(OnConflict::new().do_nothing().to_owned())
        .into_query()
        .returning_all()
        .to_owned();
    let inserted = StripeCustomers::find()
        .from_raw_sql(DbBackend::Sqlite.build(&insert))
        .all(txn)
        .await?;
    if inserted.is_empty() {
        return Ok(inserted);
    }
    // Each row's event carries its own Link's time and author.
    let by_user: std::collections::HashMap<(&str, &str), &LinkWrite> = writes
        .iter()
        .map(|w| {
            let mapping = &w.mapping;
            (
                (mapping.stripe_account.as_str(), mapping.user_id.as_str()),
                *w,
            )
        })
        .collect();
    let events = inserted.iter().filter_map(|row| {
        let write = by_user.get(&(row.stripe_account.as_str(), row.user_id.as_str()))?;
        Some(rows::new_event(
            EventKind::Linked,
            row,
            write.time,
            &write.actor,
        ))
    });
    MappingEvents::insert_many(events)
        .exec_without_returning(txn)
        .await?;
    Ok(inserted)
}

/// WAL mode with `synchronous = FULL` (a committed link survives a crash)
/// and a busy timeout, so that several connections can read while one
/// writes.
async fn connect(url: &str, options: &DatabaseSettings) -> Result<DatabaseConnection, DbErr> {
    use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};

    let busy_timeout = options.sqlite_busy_timeout;
    let mut opts = ConnectOptions::new(url);
    opts.max_connections(options.database_max_connections)
        .min_connections(0)
        .acquire_timeout(options.database_acquire_timeout)
        .connect_timeout(options.database_connect_timeout)
        // Statement logging would put SQL and values in the log.
        .sqlx_logging(false)
        // In-process: a ping costs no round trip, but is still pointless
        // for connections in use moments ago.
        .test_before_acquire_if_idle_for(Duration::from_secs(5))
        .map_sqlx_sqlite_opts(move |o| {
            o.journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(busy_timeout)
                // 1 MiB of page cache per connection instead of SQLite's
                // 2 MiB, for the memory budget at a million rows
                // (docs/PERFORMANCE.md); a look-up's index pages fit many
                // times over.
                .pragma("cache_size", "-1024")
        });
    sea_orm::Database::connect(opts).await
}
