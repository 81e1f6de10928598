//! The audit trail: one row in `mapping_events` per committed change,
//! written by the same transaction as the change.

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    QueryTrait, Set, sea_query::InsertStatement,
};

use super::{
    DatabaseHandle, Side,
    entity::Model as MappingRow,
    event_entity::{ActiveModel, Column, Entity as MappingEvents, Model},
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

/// The insert of one event about `mapping`. A plain statement rather than an
/// `ActiveModel::insert` so that it can be run in the change's transaction,
/// or later become one more step of a data-modifying CTE with the change.
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

/// Up to `limit` events after `after` (a sequence), in sequence order;
/// only those about `side` when given.
pub async fn page(
    db: &DatabaseHandle,
    side: Option<Side<'_>>,
    after: Option<i64>,
    limit: u64,
) -> Result<Vec<Model>, DbErr> {
    MappingEvents::find()
        .apply_if(side, |query, side| match side {
            Side::User(id) => query.filter(Column::UserId.eq(id)),
            Side::Customer(id) => query.filter(Column::StripeCustomerId.eq(id)),
        })
        .apply_if(after, |query, after| {
            query.filter(Column::Sequence.gt(after))
        })
        .order_by_asc(Column::Sequence)
        .limit(limit)
        .all(db.connection())
        .await
}
