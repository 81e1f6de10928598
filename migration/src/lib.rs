//! Schema migrations for customer-mapping, run at start-up or by the
//! `customer-mapping migrate` subcommand (a Kubernetes Job).

pub use sea_orm_migration::prelude::*;

mod m20261128_000001_create_stripe_customers;
mod m20261201_000001_create_mapping_events;
mod m20261201_000002_add_link_token;
mod preexisting;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261128_000001_create_stripe_customers::Migration),
            Box::new(m20261201_000001_create_mapping_events::Migration),
            Box::new(m20261201_000002_add_link_token::Migration),
        ]
    }
}

/// Whether every migration has been applied, without applying any:
/// `false` when none has (no `stripe_customers` table), an error when the
/// table is someone else's or only some migrations ran.
pub async fn ready(db: &sea_orm_migration::sea_orm::DatabaseConnection) -> Result<bool, DbErr> {
    let manager = SchemaManager::new(db);
    preexisting::check(&manager).await?;
    if !manager.has_table("stripe_customers").await? {
        return Ok(false);
    }
    if manager.has_table("mapping_events").await?
        && manager.has_column("stripe_customers", "link_token").await?
    {
        return Ok(true);
    }
    Err(DbErr::Migration(
        "the database has pending migrations: run `customer-mapping migrate` first".into(),
    ))
}

/// Applies every pending migration, after checking that the database holds
/// no `stripe_customers` table of another shape (see [`preexisting`]); when
/// it does, fails with one line and changes nothing.
pub async fn up(db: &sea_orm_migration::sea_orm::DatabaseConnection) -> Result<(), DbErr> {
    preexisting::check(&SchemaManager::new(db)).await?;
    Migrator::up(db, None).await
}
