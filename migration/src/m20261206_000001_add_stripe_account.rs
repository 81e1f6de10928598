use sea_orm_migration::{
    prelude::*,
    sea_orm::{ConnectionTrait, DbBackend},
};

/// The Stripe account of every mapping and event: existing rows, and rows
/// the previous release writes without naming the column, belong to the
/// platform's own account (`''`).
///
/// Safe while the previous release serves: a column with a constant
/// default is added without rewriting the table, under a lock held for a
/// moment (bounded: queued behind a long transaction it would hold up
/// every writer queued behind it, so it gives up and the start-up loop
/// tries again).
#[derive(DeriveMigrationName)]
pub struct Migration;

const TABLES: [&str; 2] = ["stripe_customers", "mapping_events"];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        if db.get_database_backend() == DbBackend::Postgres {
            db.execute_unprepared("SET LOCAL lock_timeout = '5s'")
                .await?;
        }
        for table in TABLES {
            if manager.has_column(table, "stripe_account").await? {
                continue;
            }
            manager
                .alter_table(
                    Table::alter()
                        .table(Alias::new(table))
                        .add_column(
                            ColumnDef::new(Alias::new("stripe_account"))
                                .string_len(255)
                                .not_null()
                                .default(""),
                        )
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in TABLES {
            manager
                .alter_table(
                    Table::alter()
                        .table(Alias::new(table))
                        .drop_column(Alias::new("stripe_account"))
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
