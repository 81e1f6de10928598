//! The reads both databases run as they are: built once with SeaORM, run by
//! whichever backend serves (`Database::all`).

use sea_orm::{
    ColumnTrait, Condition, EntityTrait, QueryFilter, QueryOrder, QuerySelect, QueryTrait, Select,
    sea_query::{Expr, ExprTrait},
};

use super::{
    entity::{Column, Entity as StripeCustomers},
    event_entity::{self, Entity as MappingEvents},
};
use crate::mapping::{Key, ListCursor};

/// The column holding `key`'s side.
pub(super) fn column(key: &Key) -> Column {
    match key {
        Key::User(_) => Column::UserId,
        Key::Customer(_) => Column::StripeCustomerId,
    }
}

pub(super) fn value(key: &Key) -> &str {
    match key {
        Key::User(id) => id.as_str(),
        Key::Customer(id) => id.as_str(),
    }
}

/// The mappings holding any of `keys`, in one statement (so one snapshot:
/// every row as it was at the same instant).
pub(super) fn holding_any<'a>(keys: impl IntoIterator<Item = &'a Key>) -> Select<StripeCustomers> {
    let (mut users, mut customers) = (Vec::new(), Vec::new());
    for key in keys {
        match key {
            Key::User(id) => users.push(id.as_str()),
            Key::Customer(id) => customers.push(id.as_str()),
        }
    }
    for ids in [&mut users, &mut customers] {
        ids.sort_unstable();
        ids.dedup();
    }
    let mut any = Condition::any();
    if !users.is_empty() {
        any = any.add(Column::UserId.is_in(users));
    }
    if !customers.is_empty() {
        any = any.add(Column::StripeCustomerId.is_in(customers));
    }
    StripeCustomers::find().filter(any)
}

/// Up to `limit` mappings after `after`, by `(created_at, id)`.
pub(super) fn list_page(after: Option<ListCursor>, limit: u64) -> Select<StripeCustomers> {
    StripeCustomers::find()
        .apply_if(after, |query, after| {
            // A row value comparison: PostgreSQL walks the (created_at, id)
            // index straight from the cursor.
            query.filter(
                Expr::tuple([Expr::col(Column::CreatedAt), Expr::col(Column::Id)]).gt(Expr::tuple(
                    [Expr::value(after.created_at), Expr::value(after.id)],
                )),
            )
        })
        .order_by_asc(Column::CreatedAt)
        .order_by_asc(Column::Id)
        .limit(limit)
}

/// Up to `limit` events after sequence `after`, in sequence order; only
/// those about `key` when given.
pub(super) fn events_page(
    key: Option<&Key>,
    after: Option<i64>,
    limit: u64,
) -> Select<MappingEvents> {
    use event_entity::Column as Event;
    MappingEvents::find()
        .apply_if(key, |query, key| match key {
            Key::User(id) => query.filter(Event::UserId.eq(id.as_str())),
            Key::Customer(id) => query.filter(Event::StripeCustomerId.eq(id.as_str())),
        })
        .apply_if(after, |query, after| {
            query.filter(Event::Sequence.gt(after))
        })
        .order_by_asc(Event::Sequence)
        .limit(limit)
}
