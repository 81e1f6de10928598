//! The `stripe_customers` table, created by `migration/`.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "stripe_customers")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub user_id: String,
    pub stripe_customer_id: String,
    pub created_at: DateTimeUtc,
    /// The Link call that created the row (see `store::link`); `None` for
    /// rows written otherwise.
    pub link_token: Option<i64>,
    /// Empty for the platform's own account. Unique with `user_id`, and
    /// with `stripe_customer_id`.
    pub stripe_account: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
