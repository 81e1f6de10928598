use sea_orm_migration::{
    prelude::*,
    sea_orm::{ConnectionTrait, DbBackend},
};

use crate::concurrent_index;

/// The index Watch reads the newest events by (their transaction ids),
/// built without blocking writers over a long audit trail
/// ([`concurrent_index`]).
#[derive(DeriveMigrationName)]
pub struct Migration;

const NAME: &str = "idx_mapping_events_transaction_id";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_connection().get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        concurrent_index::create(
            manager,
            "INDEX",
            NAME,
            "mapping_events (transaction_id, sequence)",
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        if db.get_database_backend() == DbBackend::Postgres {
            db.execute_unprepared(&format!("DROP INDEX IF EXISTS {NAME}"))
                .await?;
        }
        Ok(())
    }
}
