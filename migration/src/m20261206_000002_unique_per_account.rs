use sea_orm_migration::{
    prelude::*,
    sea_orm::{ConnectionTrait, DbBackend},
};

use crate::concurrent_index;

/// On PostgreSQL, the bijection within an account: unique (user, account)
/// and (customer, account), built without blocking writers
/// ([`concurrent_index`]). The id comes first, so that a look-up by id
/// alone (the previous release's) still walks them.
///
/// The previous release's unique constraints on the user and on the
/// customer alone stay until [`crate::accounts::enable`]: while they
/// stand, a replica of the previous release still serves correctly
/// (README, "Upgrading").
#[derive(DeriveMigrationName)]
pub struct Migration;

pub(crate) const INDEXES: [(&str, &str); 2] = [
    (
        "idx_stripe_customers_user_account",
        "(user_id, stripe_account)",
    ),
    (
        "idx_stripe_customers_customer_account",
        "(stripe_customer_id, stripe_account)",
    ),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_connection().get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        for (name, columns) in INDEXES {
            concurrent_index::create(
                manager,
                "UNIQUE INDEX",
                name,
                &format!("stripe_customers {columns}"),
            )
            .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        if db.get_database_backend() == DbBackend::Postgres {
            for (name, _) in INDEXES {
                db.execute_unprepared(&format!("DROP INDEX IF EXISTS {name}"))
                    .await?;
            }
        }
        Ok(())
    }
}
