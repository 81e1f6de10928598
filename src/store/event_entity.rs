//! The `mapping_events` table (the audit trail), created by `migration/`.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "mapping_events")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub sequence: i64,
    /// [`super::events::KIND_LINKED`] or [`super::events::KIND_UNLINKED`].
    pub kind: i16,
    pub user_id: String,
    pub stripe_customer_id: String,
    pub mapping_created_at: DateTimeUtc,
    pub time: DateTimeUtc,
    pub caller: String,
    pub request_id: String,
    pub stripe_account: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
