use sea_orm_migration::{
    prelude::*,
    sea_orm::{ConnectionTrait, DbBackend, Statement},
};

/// The index Watch reads the newest events by (their transaction ids),
/// built on PostgreSQL with `CONCURRENTLY`, so that writers are never
/// blocked while it is built over a long audit trail: hence outside a
/// transaction.
///
/// Replicas starting together may run this at once. A build that failed
/// half-way leaves an invalid index: it is dropped and built again, unless
/// another process is building it right now. This migration succeeds only
/// once the index is valid; while another process builds it, it fails and
/// the start-up loop tries again.
#[derive(DeriveMigrationName)]
pub struct Migration;

const NAME: &str = "idx_mapping_events_transaction_id";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        if db.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        // Dropping an index locks its table: bounded, so that writers
        // queued behind the lock wait two seconds at most.
        db.execute_unprepared(&format!(
            "DO $$ BEGIN
               SET LOCAL lock_timeout = '2s';
               IF EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                          WHERE c.relname = '{NAME}' AND NOT i.indisvalid)
                  AND NOT EXISTS (SELECT 1 FROM pg_stat_progress_create_index p
                                  JOIN pg_class c ON c.oid = p.index_relid
                                  WHERE c.relname = '{NAME}') THEN
                 EXECUTE 'DROP INDEX {NAME}';
               END IF;
             END $$"
        ))
        .await?;
        db.execute_unprepared(&format!(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {NAME} \
             ON mapping_events (transaction_id, sequence)"
        ))
        .await?;
        let valid = db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                format!(
                    "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                     WHERE c.relname = '{NAME}'"
                ),
            ))
            .await?
            .map(|row| row.try_get_by_index::<bool>(0))
            .transpose()?;
        if valid != Some(true) {
            return Err(DbErr::Migration(format!(
                "{NAME} is being built by another process; trying again later"
            )));
        }
        Ok(())
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
