//! Refuses a database where a `stripe_customers` table of another shape
//! already exists: typically the replaced application's own table. The first
//! migration creates the table `IF NOT EXISTS`, so without this check the
//! service would adopt that table and fail on its first query instead.

use sea_orm_migration::prelude::*;

/// The columns the service's `stripe_customers` table has.
const COLUMNS: [&str; 4] = ["id", "user_id", "stripe_customer_id", "created_at"];

/// Fails, before anything is written (not even the migrations table), when
/// `stripe_customers` exists without the service's columns.
pub async fn check(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    if !manager.has_table("stripe_customers").await? {
        return Ok(());
    }
    let mut missing = Vec::new();
    for column in COLUMNS {
        if !manager.has_column("stripe_customers", column).await? {
            missing.push(column);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(DbErr::Migration(format!(
        "this database already has a table stripe_customers that is not this service's \
         (it lacks the columns {}); nothing was changed. Give the service a database of its own \
         and bring the old rows in with `customer-mapping import`",
        missing.join(", ")
    )))
}
