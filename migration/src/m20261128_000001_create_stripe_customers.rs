use sea_orm_migration::{prelude::*, schema::*};

/// The mapping table. Both unique constraints are what make `Link` race-free:
/// the database, not the service, decides which of two concurrent links wins.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(StripeCustomers::Table)
                    .if_not_exists()
                    .col(
                        big_integer(StripeCustomers::Id)
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(string_len_uniq(StripeCustomers::UserId, 255))
                    .col(string_len_uniq(StripeCustomers::StripeCustomerId, 255))
                    .col(timestamp_with_time_zone(StripeCustomers::CreatedAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(StripeCustomers::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum StripeCustomers {
    Table,
    Id,
    UserId,
    StripeCustomerId,
    CreatedAt,
}
