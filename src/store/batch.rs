//! BatchGet's read: every row holding any of many keys, in one statement.

use sea_orm::{ColumnTrait, Condition, DbErr, EntityTrait, QueryFilter};

use tokio::time::Instant;

use super::{
    Database,
    entity::{Column, Entity as StripeCustomers, Model},
};

/// One side of a mapping, to look rows up by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side<'a> {
    User(&'a str),
    Customer(&'a str),
}

/// The rows holding any of `users` or `customers`. One statement, so one
/// snapshot on both databases: every row is as it was at the same instant.
pub async fn find_by_keys(
    db: &Database,
    users: &[&str],
    customers: &[&str],
    until: Instant,
) -> Result<Vec<Model>, DbErr> {
    let mut any = Condition::any();
    if !users.is_empty() {
        any = any.add(Column::UserId.is_in(users.iter().copied()));
    }
    if !customers.is_empty() {
        any = any.add(Column::StripeCustomerId.is_in(customers.iter().copied()));
    }
    db.all(StripeCustomers::find().filter(any), until).await
}
