//! Schema migrations for customer-mapping, run at start-up or by the
//! `customer-mapping migrate` subcommand (a Kubernetes Job).

pub use sea_orm_migration::prelude::*;

mod m20261128_000001_create_stripe_customers;
mod m20261201_000001_add_link_token;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261128_000001_create_stripe_customers::Migration),
            Box::new(m20261201_000001_add_link_token::Migration),
        ]
    }
}
