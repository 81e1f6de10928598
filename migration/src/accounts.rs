//! The upgrade's last step on PostgreSQL: dropping the previous release's
//! unique constraints on the user and on the customer alone, after which
//! the bijection holds per account (the unique indexes of
//! `m20261206_000002`) and a user can be linked in several accounts.
//!
//! Not a migration: a replica of the previous release looks mappings up by
//! user or customer alone, and once one of them has mappings in several
//! accounts it would answer with any of them. So the step runs when the
//! operator says every replica runs this release (`customer-mapping
//! migrate --enable-stripe-accounts`), or with the migrations that create
//! the schema, when no previous release can have served the database.

use sea_orm_migration::{
    prelude::*,
    sea_orm::{ConnectionTrait, DbBackend, Statement},
};

/// Whether the step has run: `true` or `false`, one row. SQLite has no
/// such constraints after its migrations (`m20261206_000003`).
pub const ENABLED_SQL: &str = "SELECT NOT EXISTS (SELECT 1 FROM pg_constraint \
     WHERE conrelid = 'stripe_customers'::regclass AND contype = 'u' \
       AND cardinality(conkey) = 1)";

/// Drops the single-column unique constraints of `stripe_customers`, in one
/// transaction under a bounded lock. Only with every migration applied:
/// the per-account indexes must be in place first.
pub const ENABLE_SQL: &str = "DO $$ DECLARE single text; BEGIN
       SET LOCAL lock_timeout = '5s';
       FOR single IN SELECT conname FROM pg_constraint
                     WHERE conrelid = 'stripe_customers'::regclass AND contype = 'u'
                       AND cardinality(conkey) = 1 LOOP
         EXECUTE format('ALTER TABLE stripe_customers DROP CONSTRAINT %I', single);
       END LOOP;
     END $$";

/// Runs [`ENABLE_SQL`] (PostgreSQL; nothing to do on SQLite).
pub async fn enable<C: ConnectionTrait>(db: &C) -> Result<(), DbErr> {
    if db.get_database_backend() == DbBackend::Postgres {
        db.execute_unprepared(ENABLE_SQL).await?;
    }
    Ok(())
}

/// Whether accounts are enabled (see [`ENABLED_SQL`]).
pub async fn enabled<C: ConnectionTrait>(db: &C) -> Result<bool, DbErr> {
    if db.get_database_backend() != DbBackend::Postgres {
        return Ok(true);
    }
    let row = db
        .query_one_raw(Statement::from_string(DbBackend::Postgres, ENABLED_SQL))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("whether accounts are enabled".into()))?;
    row.try_get_by_index::<bool>(0)
}
