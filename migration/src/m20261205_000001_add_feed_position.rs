use sea_orm_migration::{
    prelude::*,
    sea_orm::{ConnectionTrait, DbBackend},
};

/// Where each event stands in Watch's feed (see `src/store/postgres/feed.rs`
/// for why): on PostgreSQL, the id of the transaction that wrote it, filled
/// by a column default so that every writer records it without naming it,
/// the previous release and `import` included. And the deployment's id,
/// which Watch's cursors carry so that a cursor is refused by another
/// deployment's database.
///
/// Safe while the previous release serves: the column is added without a
/// default (no rewrite) and gets its default in the same transaction, whose
/// `ACCESS EXCLUSIVE` lock waits for every transaction writing events to
/// end and holds new ones for a moment. So once this commits, every event
/// row without a transaction id belongs to a transaction that ended before
/// it, and every later row has one. The index is built concurrently by the
/// next migration, without blocking writes.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        if db.get_database_backend() == DbBackend::Postgres {
            // Queued behind a long transaction, the lock would hold up every
            // writer queued behind it: give up instead, and the start-up
            // loop tries again.
            db.execute_unprepared("SET LOCAL lock_timeout = '5s'")
                .await?;
            db.execute_unprepared(
                "ALTER TABLE mapping_events ADD COLUMN IF NOT EXISTS transaction_id xid8",
            )
            .await?;
            db.execute_unprepared(
                "ALTER TABLE mapping_events \
                 ALTER COLUMN transaction_id SET DEFAULT pg_current_xact_id()",
            )
            .await?;
        }
        manager
            .create_table(
                Table::create()
                    .table(Deployment::Table)
                    .if_not_exists()
                    // One row at most: the key can only be TRUE.
                    .col(
                        ColumnDef::new(Deployment::Singleton)
                            .boolean()
                            .not_null()
                            .default(true)
                            .primary_key()
                            .check(Expr::col(Deployment::Singleton).eq(true)),
                    )
                    .col(ColumnDef::new(Deployment::Id).text().not_null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Deployment::Table).to_owned())
            .await?;
        let db = manager.get_connection();
        if db.get_database_backend() == DbBackend::Postgres {
            db.execute_unprepared(
                "ALTER TABLE mapping_events DROP COLUMN IF EXISTS transaction_id",
            )
            .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum Deployment {
    #[sea_orm(iden = "customer_mapping_deployment")]
    Table,
    Singleton,
    Id,
}
