//! List's read: one keyset page of the mappings, oldest first.

use chrono::{DateTime, Utc};
use sea_orm::{
    DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect, QueryTrait,
    sea_query::{Expr, ExprTrait},
};

use tokio::time::Instant;

use super::{
    Database,
    entity::{Column, Entity as StripeCustomers, Model},
};

/// Where a page starts: after the row with this `(created_at, id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct After {
    pub created_at: DateTime<Utc>,
    pub id: i64,
}

/// Up to `limit` rows after `after`, by `(created_at, id)`. The order is
/// total and a row's place in it never changes, so a row present for a
/// whole traversal is on exactly one page whatever else changes.
pub async fn page(
    db: &Database,
    after: Option<After>,
    limit: u64,
    until: Instant,
) -> Result<Vec<Model>, DbErr> {
    let select = StripeCustomers::find()
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
        .limit(limit);
    db.all(select, until).await
}
