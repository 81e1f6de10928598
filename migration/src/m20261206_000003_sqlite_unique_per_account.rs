use sea_orm_migration::{
    prelude::*,
    sea_orm::{ConnectionTrait, DbBackend},
};

use crate::m20261206_000002_unique_per_account::INDEXES;

/// On SQLite, the bijection within an account. SQLite cannot drop a
/// column's UNIQUE constraint, so the table is rebuilt with the unique
/// indexes of (user, account) and (customer, account) instead, ids and
/// AUTOINCREMENT counter kept, in one transaction. SQLite is embedded:
/// no previous release serves the file meanwhile, so accounts are usable
/// at once.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        if db.get_database_backend() != DbBackend::Sqlite {
            return Ok(());
        }
        let columns = "id, user_id, stripe_customer_id, created_at, link_token, stripe_account";
        for statement in [
            "CREATE TABLE stripe_customers_by_account ( \
               id integer NOT NULL PRIMARY KEY AUTOINCREMENT, \
               user_id varchar(255) NOT NULL, \
               stripe_customer_id varchar(255) NOT NULL, \
               created_at timestamp_with_timezone_text NOT NULL, \
               link_token bigint NULL, \
               stripe_account varchar(255) NOT NULL DEFAULT '')",
            &format!(
                "INSERT INTO stripe_customers_by_account ({columns}) \
                 SELECT {columns} FROM stripe_customers"
            ),
            "INSERT INTO sqlite_sequence (name, seq) \
             SELECT 'stripe_customers_by_account', seq FROM sqlite_sequence \
             WHERE name = 'stripe_customers'",
            "DROP TABLE stripe_customers",
            "ALTER TABLE stripe_customers_by_account RENAME TO stripe_customers",
            "DELETE FROM sqlite_sequence WHERE rowid NOT IN \
             (SELECT max(rowid) FROM sqlite_sequence GROUP BY name)",
            "CREATE INDEX idx_stripe_customers_created_at_id ON stripe_customers (created_at, id)",
        ] {
            db.execute_unprepared(statement).await?;
        }
        for (name, columns) in INDEXES {
            db.execute_unprepared(&format!(
                "CREATE UNIQUE INDEX {name} ON stripe_customers {columns}"
            ))
            .await?;
        }
        Ok(())
    }

    async fn down(&self, _manager: &SchemaManager) -> Result<(), DbErr> {
        Err(DbErr::Migration(
            "mappings of several accounts cannot be made globally unique again".into(),
        ))
    }
}
