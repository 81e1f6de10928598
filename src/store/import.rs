//! `customer-mapping import`: many rows per statement.
//!
//! # PostgreSQL: one statement per batch
//!
//! ```sql
//! WITH input AS (SELECT * FROM unnest($users, $customers, $created_ats)),
//!      ins AS (INSERT INTO stripe_customers ... SELECT ... FROM input
//!              ON CONFLICT DO NOTHING RETURNING ...),
//!      ev AS (INSERT INTO mapping_events ... SELECT ... FROM ins),
//!      pending AS (input rows whose user ins did not insert)
//! SELECT TRUE, ins.* FROM ins
//! UNION ALL
//! SELECT FALSE, rows holding a pending row's user or customer
//! ```
//!
//! It is Link's statement (`link.rs`) for many pairs at once, with the same
//! argument for why each row's answer is true at one instant: the unique
//! indexes arbitrate every insert against committed rows, the holders come
//! from the statement's snapshot, and a row that conflicted with something
//! the snapshot cannot see comes back with neither (the caller runs it
//! again). The caller guarantees that no two rows of a batch share a user
//! or a customer, so every conflict is with a row outside the batch. The
//! events are a data-modifying CTE of the same autocommit statement: they
//! exist if and only if their rows were inserted.
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
    QueryResult, QueryTrait, Set,
    sea_query::OnConflict,
    sqlx::{self, Row, postgres::PgRow},
};
use tokio::time::Instant;

use super::{
    Backend, Database, SqliteDb,
    entity::{ActiveModel, Column, Entity as StripeCustomers, Model},
    errors::{is_connection_lost, is_read_only, is_rolled_back_by_database},
    event_entity::{ActiveModel as EventModel, Entity as MappingEvents},
    events::{Actor, KIND_LINKED},
    postgres::sqlx_err,
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

/// The PostgreSQL statement of a batch that writes (see the module comment).
const IMPORT_SQL: &str = "\
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[])
        WITH ORDINALITY AS t (user_id, stripe_customer_id, created_at, n)
), ins AS (
    INSERT INTO stripe_customers (user_id, stripe_customer_id, created_at, link_token)
    SELECT user_id, stripe_customer_id, created_at, $4 FROM input ORDER BY n
    ON CONFLICT DO NOTHING
    RETURNING id, user_id, stripe_customer_id, created_at, link_token
), ev AS (
    INSERT INTO mapping_events
        (kind, user_id, stripe_customer_id, mapping_created_at, time, caller, request_id)
    SELECT $5::smallint, user_id, stripe_customer_id, created_at, $6, $7, $8 FROM ins
), pending AS (
    SELECT user_id, stripe_customer_id FROM input
    WHERE user_id NOT IN (SELECT user_id FROM ins)
)
SELECT TRUE AS inserted, id, user_id, stripe_customer_id, created_at, link_token FROM ins
UNION ALL
SELECT FALSE, id, user_id, stripe_customer_id, created_at, link_token FROM stripe_customers
WHERE user_id = ANY (ARRAY(SELECT user_id FROM pending))
   OR stripe_customer_id = ANY (ARRAY(SELECT stripe_customer_id FROM pending))";

/// A dry run's statement: the holders only.
const HOLDERS_SQL: &str = "\
SELECT FALSE AS inserted, id, user_id, stripe_customer_id, created_at, link_token
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
        Backend::Postgres(pg) => {
            let users: Vec<&str> = rows.iter().map(|r| r.user_id).collect();
            let customers: Vec<&str> = rows.iter().map(|r| r.stripe_customer_id).collect();
            let created_ats: Vec<DateTime<Utc>> = rows.iter().map(|r| r.created_at).collect();
            let mut conn = pg.pool.acquire(until).await?;
            let fetched = conn
                .bounded(until, "an import batch", async |conn| match write {
                    Some(write) => {
                        sqlx::query(IMPORT_SQL)
                            .bind(&users)
                            .bind(&customers)
                            .bind(&created_ats)
                            .bind(write.token)
                            .bind(KIND_LINKED)
                            .bind(write.time)
                            .bind(write.actor.caller)
                            .bind(write.actor.request_id)
                            .fetch_all(conn)
                            .await
                    }
                    None => {
                        sqlx::query(HOLDERS_SQL)
                            .bind(&users)
                            .bind(&customers)
                            .fetch_all(conn)
                            .await
                    }
                })
                .await;
            match fetched {
                Ok(rows) => {
                    conn.release();
                    split(rows)
                }
                Err(err) => Err(err),
            }
        }
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

fn is_worth_repeating(err: &DbErr) -> bool {
    is_rolled_back_by_database(err) || is_connection_lost(err) || is_read_only(err)
}

fn split(rows: Vec<PgRow>) -> Result<BatchAttempt, DbErr> {
    let mut created = Vec::new();
    let mut holders = Vec::new();
    for row in rows {
        let inserted: bool = row.try_get("inserted").map_err(sqlx_err)?;
        let model = Model::from_query_result(&QueryResult::from(row), "")?;
        if inserted {
            created.push(model);
        } else {
            holders.push(model);
        }
    }
    Ok(BatchAttempt::Done { created, holders })
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
