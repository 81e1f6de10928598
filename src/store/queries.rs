//! The reads both databases run as they are: built once with SeaORM, run by
//! whichever backend serves (`Database::all`).

use std::collections::BTreeMap;

use sea_orm::{
    ColumnTrait, Condition, EntityTrait, QueryFilter, QueryOrder, QuerySelect, QueryTrait, Select,
    sea_query::{Expr, ExprTrait},
};

use super::{
    entity::{Column, Entity as StripeCustomers},
    event_entity::{self, Entity as MappingEvents},
};
use crate::mapping::{Key, ListCursor, Side, StripeAccount};

/// The column holding `side`.
pub(super) fn column(side: &Side) -> Column {
    match side {
        Side::User(_) => Column::UserId,
        Side::Customer(_) => Column::StripeCustomerId,
    }
}

/// The row holding `key`: its side's id in its account.
pub(super) fn holding(key: &Key) -> Condition {
    Condition::all()
        .add(column(&key.side).eq(key.side.as_str()))
        .add(Column::StripeAccount.eq(key.account.as_str()))
}

/// The mappings holding any of `keys`, in one statement (so one snapshot:
/// every row as it was at the same instant).
pub(super) fn holding_any<'a>(keys: impl IntoIterator<Item = &'a Key>) -> Select<StripeCustomers> {
    // Per account, its users and its customers.
    let mut by_account: BTreeMap<&str, (Vec<&str>, Vec<&str>)> = BTreeMap::new();
    for key in keys {
        let (users, customers) = by_account.entry(key.account.as_str()).or_default();
        match &key.side {
            Side::User(id) => users.push(id.as_str()),
            Side::Customer(id) => customers.push(id.as_str()),
        }
    }
    let mut any = Condition::any();
    for (account, (mut users, mut customers)) in by_account {
        let mut sides = Condition::any();
        for (column, ids) in [
            (Column::UserId, &mut users),
            (Column::StripeCustomerId, &mut customers),
        ] {
            ids.sort_unstable();
            ids.dedup();
            if !ids.is_empty() {
                sides = sides.add(column.is_in(ids.iter().copied()));
            }
        }
        any = any.add(
            Condition::all()
                .add(Column::StripeAccount.eq(account))
                .add(sides),
        );
    }
    StripeCustomers::find().filter(any)
}

/// Up to `limit` mappings after `after`, by `(created_at, id)`; only those
/// of `account` when given.
pub(super) fn list_page(
    account: Option<&StripeAccount>,
    after: Option<ListCursor>,
    limit: u64,
) -> Select<StripeCustomers> {
    StripeCustomers::find()
        .apply_if(account, |query, account| {
            query.filter(Column::StripeAccount.eq(account.as_str()))
        })
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
        .apply_if(key, |query, key| {
            let side = match &key.side {
                Side::User(id) => Event::UserId.eq(id.as_str()),
                Side::Customer(id) => Event::StripeCustomerId.eq(id.as_str()),
            };
            query
                .filter(side)
                .filter(Event::StripeAccount.eq(key.account.as_str()))
        })
        .apply_if(after, |query, after| {
            query.filter(Event::Sequence.gt(after))
        })
        .order_by_asc(Event::Sequence)
        .limit(limit)
}
