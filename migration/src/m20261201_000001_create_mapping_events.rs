use sea_orm_migration::{prelude::*, schema::*};

/// The audit trail, and the index List pages through.
///
/// An event copies the mapping it is about instead of referencing its row:
/// an Unlink deletes the row, and the trail must outlive it.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(MappingEvents::Table)
                    .if_not_exists()
                    .col(
                        big_integer(MappingEvents::Sequence)
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(small_integer(MappingEvents::Kind))
                    .col(string_len(MappingEvents::UserId, 255))
                    .col(string_len(MappingEvents::StripeCustomerId, 255))
                    .col(timestamp_with_time_zone(MappingEvents::MappingCreatedAt))
                    .col(timestamp_with_time_zone(MappingEvents::Time))
                    // Unbounded: a certificate's URI name can be longer than
                    // any limit chosen here, and a change must never fail for
                    // the length of its record.
                    .col(text(MappingEvents::Caller))
                    .col(text(MappingEvents::RequestId))
                    .to_owned(),
            )
            .await?;
        // ListEvents by key walks these, in sequence order.
        for (name, column) in [
            ("idx_mapping_events_user_id", MappingEvents::UserId),
            (
                "idx_mapping_events_stripe_customer_id",
                MappingEvents::StripeCustomerId,
            ),
        ] {
            manager
                .create_index(
                    Index::create()
                        .if_not_exists()
                        .name(name)
                        .table(MappingEvents::Table)
                        .col(column)
                        .col(MappingEvents::Sequence)
                        .to_owned(),
                )
                .await?;
        }
        // List's keyset: oldest first, ties by id.
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("idx_stripe_customers_created_at_id")
                    .table(StripeCustomers::Table)
                    .col(StripeCustomers::CreatedAt)
                    .col(StripeCustomers::Id)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("idx_stripe_customers_created_at_id")
                    .table(StripeCustomers::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_table(Table::drop().table(MappingEvents::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum MappingEvents {
    Table,
    Sequence,
    Kind,
    UserId,
    StripeCustomerId,
    MappingCreatedAt,
    Time,
    Caller,
    RequestId,
}

#[derive(DeriveIden)]
enum StripeCustomers {
    Table,
    Id,
    CreatedAt,
}
