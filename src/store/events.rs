//! The audit trail: one row in `mapping_events` per committed change,
//! written by the same transaction as the change.

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, QueryTrait, Set, Statement, sea_query::InsertStatement,
};
use tokio::time::Instant;

use super::{
    Backend, Database, PostgresDb, Side,
    entity::{self, Entity as StripeCustomers, Model as MappingRow},
    event_entity::{ActiveModel, Column, Entity as MappingEvents, Model},
    model,
};

/// A Link created the mapping (the proto's `KIND_LINKED`).
pub const KIND_LINKED: i16 = 1;
/// An Unlink removed the mapping (the proto's `KIND_UNLINKED`).
pub const KIND_UNLINKED: i16 = 2;

/// Who made a change, as recorded with it.
#[derive(Debug, Clone, Copy)]
pub struct Actor<'a> {
    pub caller: &'a str,
    pub request_id: &'a str,
}

/// The insert of one event about `mapping`, for a change made in a
/// transaction (SQLite; PostgreSQL records in the change's own statement).
pub fn insert_event(
    kind: i16,
    mapping: &MappingRow,
    time: DateTime<Utc>,
    actor: Actor<'_>,
) -> InsertStatement {
    let row = ActiveModel {
        kind: Set(kind),
        user_id: Set(mapping.user_id.clone()),
        stripe_customer_id: Set(mapping.stripe_customer_id.clone()),
        mapping_created_at: Set(mapping.created_at),
        time: Set(time),
        caller: Set(actor.caller.to_owned()),
        request_id: Set(actor.request_id.to_owned()),
        ..Default::default()
    };
    MappingEvents::insert(row).into_query().to_owned()
}

/// Records an event in `txn`, the transaction making the change.
pub async fn record(
    txn: &impl ConnectionTrait,
    kind: i16,
    mapping: &MappingRow,
    time: DateTime<Utc>,
    actor: Actor<'_>,
) -> Result<(), DbErr> {
    let insert = insert_event(kind, mapping, time, actor);
    txn.execute(&insert).await.map(drop)
}

/// Deletes the mapping row where `column = value` and records its
/// `KIND_UNLINKED` event, atomically; returns the removed row.
///
/// On PostgreSQL this is one statement, a data-modifying CTE, so Unlink
/// stays one round trip (and holds the row lock no longer than before the
/// trail existed). SQLite has no DML in CTEs: there it is a `BEGIN
/// IMMEDIATE` transaction, whose writers this process already serializes.
pub(super) async fn delete_recording(
    db: &Database,
    column: entity::Column,
    value: &str,
    time: DateTime<Utc>,
    actor: Actor<'_>,
    until: Instant,
) -> Result<Option<MappingRow>, DbErr> {
    let sqlite = match &db.0 {
        Backend::Sqlite(sqlite) => sqlite,
        Backend::Postgres(PostgresDb { pool, .. }) => {
            let key = match column {
                entity::Column::StripeCustomerId => "stripe_customer_id",
                _ => "user_id",
            };
            let sql = format!(
                "WITH removed AS (DELETE FROM stripe_customers WHERE {key} = $1 RETURNING *), \
             recorded AS (INSERT INTO mapping_events \
               (kind, user_id, stripe_customer_id, mapping_created_at, time, caller, request_id) \
               SELECT $2, user_id, stripe_customer_id, created_at, $3, $4, $5 FROM removed) \
             SELECT * FROM removed"
            );
            let statement = Statement::from_sql_and_values(
                DbBackend::Postgres,
                sql,
                [
                    value.into(),
                    KIND_UNLINKED.into(),
                    time.into(),
                    actor.caller.into(),
                    actor.request_id.into(),
                ],
            );
            let mut conn = pool.acquire(until).await?;
            let removed = conn.fetch_optional(&statement, until).await?;
            conn.release();
            return removed.map(model).transpose();
        }
    };
    let (_turn, txn) = sqlite.begin_write().await?;
    let mut deleted = StripeCustomers::delete_many()
        .filter(column.eq(value))
        .exec_with_returning(&txn)
        .await?;
    // The column is unique, so there is at most one row.
    let removed = deleted.pop();
    if let Some(row) = &removed {
        record(&txn, KIND_UNLINKED, row, time, actor).await?;
    }
    txn.commit().await?;
    Ok(removed)
}

/// Up to `limit` events after `after` (a sequence), in sequence order;
/// only those about `side` when given.
pub async fn page(
    db: &Database,
    side: Option<Side<'_>>,
    after: Option<i64>,
    limit: u64,
    until: Instant,
) -> Result<Vec<Model>, DbErr> {
    let select = MappingEvents::find()
        .apply_if(side, |query, side| match side {
            Side::User(id) => query.filter(Column::UserId.eq(id)),
            Side::Customer(id) => query.filter(Column::StripeCustomerId.eq(id)),
        })
        .apply_if(after, |query, after| {
            query.filter(Column::Sequence.gt(after))
        })
        .order_by_asc(Column::Sequence)
        .limit(limit);
    db.all(select, until).await
}
