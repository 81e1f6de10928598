//! Schema migrations for customer-mapping, run at start-up or by the
//! `customer-mapping migrate` subcommand (a Kubernetes Job).

pub use sea_orm_migration::prelude::*;

mod m20261128_000001_create_stripe_customers;
mod m20261201_000001_create_mapping_events;
mod m20261201_000002_add_link_token;
mod m20261205_000001_add_feed_position;
mod m20261205_000002_index_feed_position;
mod m20261206_000001_add_stripe_account;
mod m20261206_000002_unique_per_account;
mod m20261206_000003_sqlite_unique_per_account;
mod preexisting;

pub mod accounts;
mod concurrent_index;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261128_000001_create_stripe_customers::Migration),
            Box::new(m20261201_000001_create_mapping_events::Migration),
            Box::new(m20261201_000002_add_link_token::Migration),
            Box::new(m20261205_000001_add_feed_position::Migration),
            Box::new(m20261205_000002_index_feed_position::Migration),
            Box::new(m20261206_000001_add_stripe_account::Migration),
            Box::new(m20261206_000002_unique_per_account::Migration),
            Box::new(m20261206_000003_sqlite_unique_per_account::Migration),
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
        && manager.has_table("customer_mapping_deployment").await?
        && manager
            .has_column("stripe_customers", "stripe_account")
            .await?
        && manager
            .has_column("mapping_events", "stripe_account")
            .await?
    {
        return Ok(true);
    }
    Err(DbErr::Migration(
        "the database has pending migrations: run `customer-mapping migrate` first".into(),
    ))
}

/// The names of every migration of this release, in order.
pub fn names() -> Vec<String> {
    Migrator::migrations()
        .into_iter()
        .map(|m| m.name().to_owned())
        .collect()
}

/// The migrations this release needs that the database has not applied,
/// in order; empty when its schema is at least this release's. Migrations
/// the database has and this release does not know (a newer release's) are
/// fine: every migration keeps the previous release working.
pub async fn missing(
    db: &sea_orm_migration::sea_orm::DatabaseConnection,
) -> Result<Vec<String>, DbErr> {
    use sea_orm_migration::sea_orm::{ConnectionTrait, Statement};
    let manager = SchemaManager::new(db);
    preexisting::check(&manager).await?;
    let needed = Migrator::migrations()
        .into_iter()
        .map(|m| m.name().to_owned());
    let table = "seaql_migrations";
    if !manager.has_table(table).await? {
        return Ok(needed.collect());
    }
    let backend = db.get_database_backend();
    let rows = db
        .query_all_raw(Statement::from_string(
            backend,
            format!("SELECT version FROM {table}"),
        ))
        .await?;
    let applied: Vec<String> = rows
        .iter()
        .map(|row| row.try_get::<String>("", "version"))
        .collect::<Result<_, _>>()?;
    Ok(needed.filter(|name| !applied.contains(name)).collect())
}

/// Applies every pending migration, after checking that the database holds
/// no `stripe_customers` table of another shape (see [`preexisting`]); when
/// it does, fails with one line and changes nothing.
///
/// A database that already has every migration of this release is left
/// alone, even when it has a newer release's too (which the migrator
/// itself refuses as "applied but its file is missing"): the previous
/// release must keep starting during a rolling upgrade.
///
/// A database created here (none of the migrations applied before) gets
/// Stripe accounts at once: no previous release has served it.
pub async fn up(db: &sea_orm_migration::sea_orm::DatabaseConnection) -> Result<(), DbErr> {
    let missing = missing(db).await?;
    if missing.is_empty() {
        return Ok(());
    }
    let created = missing.len() == Migrator::migrations().len();
    Migrator::up(db, None).await?;
    if created {
        accounts::enable(db).await?;
    }
    Ok(())
}
