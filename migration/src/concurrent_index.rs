//! Indexes built on PostgreSQL with `CREATE INDEX CONCURRENTLY`, so that
//! writers are never blocked while one is built over a large table: hence
//! outside a transaction (a migration using this sets `use_transaction` to
//! `Some(false)`).
//!
//! Replicas starting together may build one at once. A build that failed
//! half-way leaves an invalid index: it is dropped and built again, unless
//! another process is building it right now. This succeeds only once the
//! index is valid; while another process builds it, it fails and the
//! start-up loop tries again.

use sea_orm_migration::{
    prelude::*,
    sea_orm::{ConnectionTrait, DbBackend, Statement},
};

/// Builds the index `name` as `definition` says (`UNIQUE INDEX` or `INDEX`)
/// `ON` `target` (`table (columns)`).
pub async fn create(
    manager: &SchemaManager<'_>,
    definition: &str,
    name: &str,
    target: &str,
) -> Result<(), DbErr> {
    let db = manager.get_connection();
    // Dropping an index locks its table: bounded, so that writers queued
    // behind the lock wait two seconds at most.
    db.execute_unprepared(&format!(
        "DO $$ BEGIN
           SET LOCAL lock_timeout = '2s';
           IF EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                      WHERE c.relname = '{name}' AND NOT i.indisvalid)
              AND NOT EXISTS (SELECT 1 FROM pg_stat_progress_create_index p
                              JOIN pg_class c ON c.oid = p.index_relid
                              WHERE c.relname = '{name}') THEN
             EXECUTE 'DROP INDEX {name}';
           END IF;
         END $$"
    ))
    .await?;
    db.execute_unprepared(&format!(
        "CREATE {definition} CONCURRENTLY IF NOT EXISTS {name} ON {target}"
    ))
    .await?;
    let valid = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            format!(
                "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                 WHERE c.relname = '{name}'"
            ),
        ))
        .await?
        .map(|row| row.try_get_by_index::<bool>(0))
        .transpose()?;
    if valid != Some(true) {
        return Err(DbErr::Migration(format!(
            "{name} is being built by another process; trying again later"
        )));
    }
    Ok(())
}
