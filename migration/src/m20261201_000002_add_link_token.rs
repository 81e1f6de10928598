use sea_orm_migration::{prelude::*, schema::*};

/// The Link that created a row, as a random token the row carries: a Link
/// retried after an unknown outcome (its connection was lost after the
/// statement was sent) reads the row back and knows whether its own earlier
/// attempt inserted it (`created = true`) or another call did. Nullable:
/// rows created before, or by other writers, have none.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(StripeCustomers::Table)
                    .add_column(big_integer_null(StripeCustomers::LinkToken))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(StripeCustomers::Table)
                    .drop_column(StripeCustomers::LinkToken)
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum StripeCustomers {
    Table,
    LinkToken,
}
