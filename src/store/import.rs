//! `customer-mapping import`: many rows per statement.
//!
//! # PostgreSQL: one statement per batch
//!
//! Link's statement (`link.rs`, `LINK_SQL`) for the batch's pairs, with the
//! same argument for why each row's answer is true at one instant: the
//! unique indexes arbitrate every insert against committed rows, the
//! holders come from the statement's snapshot, and a row that conflicted
//! with something the snapshot cannot see comes back with neither (the
//! caller runs it again). The caller guarantees that no two rows of a
//! batch share a user or a customer, so every conflict is with a row
//! outside the batch. The events are a data-modifying CTE of the same
//! autocommit statement: they exist if and only if their rows were
//! inserted.
//!
//! Arrays (`unnest`) keep the statement at eight parameters whatever the
//! batch size, and `= ANY (ARRAY(...))` lets the holder look-up probe the
//! two unique indexes instead of scanning the table.
//!
//! # SQLite
//!
//! One `BEGIN IMMEDIATE` transaction per batch (multi-row inserts with
//! `RETURNING`, then the holders): SQLite's writers are serialized, so the
//! transaction sees exactly what its inserts conflicted with.

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, Condition, DbBackend, DbErr, EntityTrait, FromQueryResult, QueryFilter,
    QueryResult, QueryTrait, Set, sea_query::OnConflict, sqlx,
};
use tokio::time::Instant;

use super::{
    Backend, Database, SqliteDb,
    entity::{ActiveModel, Column, Entity as StripeCustomers, Model},
    event_entity::{ActiveModel as EventModel, Entity as MappingEvents},
    events::{Actor, KIND_LINKED},
    link::{Pair, is_worth_repeating, link_pairs},
    postgres::Pool,
};

/// One row to import, already validated.
#[derive(Debug, Clone, Copy)]
pub struct ImportRow<'a> {
    pub user_id: &'a str,
    pub stripe_customer_id: &'a str,
    pub created_at: DateTime<Utc>,
}

/// How the rows of a batch that are created get written: the token their
/// rows carry (so that a batch run again after a lost answer recognises its
/// own rows) and the audit event's time and author.
#[derive(Debug, Clone, Copy)]
pub struct Write<'a> {
    pub token: i64,
    pub time: DateTime<Utc>,
    pub actor: Actor<'a>,
}

/// What one attempt at a batch found.
#[derive(Debug)]
pub enum BatchAttempt {
    /// `created`: the rows this attempt inserted. `holders`: rows that held
    /// the user or the customer of a row it did not insert, at one instant
    /// during the attempt (a row inserted by an earlier attempt of the same
    /// batch carries its token).
    Done {
        created: Vec<Model>,
        holders: Vec<Model>,
    },
    /// Nothing is known to have been written (aborted by the database), or
    /// the answer was lost: run the batch again with the same token.
    Again,
}

/// A dry run's statement: the holders only.
const HOLDERS_SQL: &str = "\
SELECT id, user_id, stripe_customer_id, created_at, link_token
FROM stripe_customers
WHERE user_id = ANY ($1::text[]) OR stripe_customer_id = ANY ($2::text[])";

/// Rows per multi-row statement on SQLite (which takes at most 32,766
/// parameters; an event row has seven). Larger statements are no faster
/// and SQLite keeps each prepared one: 2,000 rows peaked at 73 MiB over a
/// million-row import, 500 at 55 MiB (docs/PERFORMANCE.md).
const SQLITE_ROWS_PER_STATEMENT: usize = 500;

/// One attempt at importing `rows` (no two sharing a user or a customer),
/// done or failed by `until`. Without `write`, nothing is written and every
/// row's holders are returned (a dry run).
pub async fn import_batch(
    db: &Database,
    rows: &[ImportRow<'_>],
    write: Option<Write<'_>>,
    until: Instant,
) -> Result<BatchAttempt, DbErr> {
    let result = match &db.0 {
        Backend::Postgres(pg) => match write {
            Some(write) => {
                let pairs: Vec<Pair<'_>> = rows
                    .iter()
                    .map(|row| Pair {
                        user_id: row.user_id,
                        stripe_customer_id: row.stripe_customer_id,
                        created_at: row.created_at,
                        token: write.token,
                        time: write.time,
                        actor: write.actor,
                    })
                    .collect();
                match pg.pool.acquire(until).await {
                    Ok(conn) => link_pairs(conn, &pairs, "an import batch", until)
                        .await
                        .map(|linked| BatchAttempt::Done {
                            created: linked.created,
                            holders: linked.holders,
                        }),
                    Err(err) => Err(err),
                }
            }
            None => holders(&pg.pool, rows, until).await,
        },
        Backend::Sqlite(sqlite) => import_sqlite(sqlite, rows, write).await,
    };
    match result {
        Ok(attempt) => Ok(attempt),
        // The connection was closed (never reused); the batch's token tells
        // the next attempt which rows this one inserted, if it did.
        Err(err) if is_worth_repeating(&err) && Instant::now() < until => {
            tracing::debug!(error = %err, "import batch failed; repeating");
            Ok(BatchAttempt::Again)
        }
        Err(err) => Err(err),
    }
}

/// A dry run on PostgreSQL: the rows holding any user or customer of
/// `rows`, in one statement.
async fn holders(
    pool: &Pool,
    rows: &[ImportRow<'_>],
    until: Instant,
) -> Result<BatchAttempt, DbErr> {
    let users: Vec<&str> = rows.iter().map(|r| r.user_id).collect();
    let customers: Vec<&str> = rows.iter().map(|r| r.stripe_customer_id).collect();
    let mut conn = pool.acquire(until).await?;
    let fetched = conn
        .bounded(until, "an import batch", async |conn| {
            sqlx::query(HOLDERS_SQL)
                .bind(&users)
                .bind(&customers)
                .fetch_all(conn)
                .await
        })
        .await?;
    conn.release();
    let holders = fetched
        .into_iter()
        .map(|row| Model::from_query_result(&QueryResult::from(row), ""))
        .collect::<Result<_, _>>()?;
    Ok(BatchAttempt::Done {
        created: Vec::new(),
        holders,
    })
}

async fn import_sqlite(
    db: &SqliteDb,
    rows: &[ImportRow<'_>],
    write: Option<Write<'_>>,
) -> Result<BatchAttempt, DbErr> {
    let (_turn, txn) = db.begin_write().await?;
    let mut created = Vec::new();
    let mut holders = Vec::new();
    for chunk in rows.chunks(SQLITE_ROWS_PER_STATEMENT) {
        let mut inserted = Vec::new();
        if let Some(write) = write {
            let insert = StripeCustomers::insert_many(chunk.iter().map(|row| ActiveModel {
                user_id: Set(row.user_id.to_owned()),
                stripe_customer_id: Set(row.stripe_customer_id.to_owned()),
                created_at: Set(row.created_at),
                link_token: Set(Some(write.token)),
                ..Default::default()
            }))
            .on_conflict(OnConflict::new().do_nothing().to_owned())
            .into_query()
            .returning_all()
            .to_owned();
            inserted = StripeCustomers::find()
                .from_raw_sql(DbBackend::Sqlite.build(&insert))
                .all(&txn)
                .await?;
            if !inserted.is_empty() {
                MappingEvents::insert_many(inserted.iter().map(|row| EventModel {
                    kind: Set(KIND_LINKED),
                    user_id: Set(row.user_id.clone()),
                    stripe_customer_id: Set(row.stripe_customer_id.clone()),
                    mapping_created_at: Set(row.created_at),
                    time: Set(write.time),
                    caller: Set(write.actor.caller.to_owned()),
                    request_id: Set(write.actor.request_id.to_owned()),
                    ..Default::default()
                }))
                .exec_without_returning(&txn)
                .await?;
            }
        }
        let done: std::collections::HashSet<&str> =
            inserted.iter().map(|row| row.user_id.as_str()).collect();
        let pending: Vec<&ImportRow<'_>> = chunk
            .iter()
            .filter(|row| !done.contains(row.user_id))
            .collect();
        if !pending.is_empty() {
            holders.extend(
                StripeCustomers::find()
                    .filter(
                        Condition::any()
                            .add(Column::UserId.is_in(pending.iter().map(|r| r.user_id)))
                            .add(
                                Column::StripeCustomerId
                                    .is_in(pending.iter().map(|r| r.stripe_customer_id)),
                            ),
                    )
                    .all(&txn)
                    .await?,
            );
        }
        created.extend(inserted);
    }
    txn.commit().await?;
    Ok(BatchAttempt::Done { created, holders })
}
