//! The `stripe_customers` table, created by `migration/`.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "stripe_customers")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    #[sea_orm(unique)]
    pub user_id: String,
    #[sea_orm(unique)]
    pub stripe_customer_id: String,
    pub created_at: DateTimeUtc,
    /// The Link call that created the row (see `store::link`); `None` for
    /// rows written otherwise.
    pub link_token: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
