//! Gets: one lane per side (user, customer). A shared read is one
//! statement, `WHERE key = ANY($1)`, for every Get queued while the lane
//! was busy. A Get's answer is whatever its statement's snapshot held for
//! its key, so the lane's argument (`lane.rs`) is all there is to it.

use std::{collections::HashMap, sync::Arc, time::Duration};

use sea_orm::{
    ColumnTrait, DbBackend, DbErr, EntityTrait, QueryFilter, QueryTrait,
    sea_query::{Expr, ExprTrait, extension::postgres::PgFunc},
};
use tokio::time::Instant;

use super::{
    lane::{Call, Lane, Work},
    model,
    pool::Pool,
};
use crate::{
    mapping::Key,
    store::{
        entity::{Column, Entity as StripeCustomers, Model},
        queries,
    },
};

/// The lanes, one per side.
#[derive(Debug)]
pub(super) struct Gets {
    by_user: Arc<Lane<Get>>,
    by_customer: Arc<Lane<Get>>,
}

impl Gets {
    pub fn new(pool: &Pool, stall_timeout: Duration) -> Self {
        let lane = |side| Lane::new(side, pool.clone(), stall_timeout);
        Self {
            by_user: lane(Get::ByUser),
            by_customer: lane(Get::ByCustomer),
        }
    }

    /// The row holding `key`.
    pub async fn get(&self, key: &Key, until: Instant) -> Result<Option<Model>, DbErr> {
        let lane = match key {
            Key::User(_) => &self.by_user,
            Key::Customer(_) => &self.by_customer,
        };
        lane.call(queries::value(key).to_owned(), until).await
    }

    /// See [`Lane::kick`].
    pub fn kick(&self) {
        self.by_user.kick();
        self.by_customer.kick();
    }
}

/// Reads by one side.
#[derive(Debug, Clone, Copy)]
enum Get {
    ByUser,
    ByCustomer,
}

impl Get {
    fn column(self) -> Column {
        match self {
            Get::ByUser => Column::UserId,
            Get::ByCustomer => Column::StripeCustomerId,
        }
    }

    fn value_of(self, row: &Model) -> &str {
        match self {
            Get::ByUser => &row.user_id,
            Get::ByCustomer => &row.stripe_customer_id,
        }
    }
}

impl Work for Get {
    type Request = String;
    type Answer = Option<Model>;

    /// Every queued Get of the side: a read takes no lock.
    const MAX_CALLS_PER_STATEMENT: usize = usize::MAX;

    fn name(&self) -> &'static str {
        match self {
            Get::ByUser => "get_by_user",
            Get::ByCustomer => "get_by_customer",
        }
    }

    fn keys(_: &String) -> Option<(&str, &str)> {
        None
    }

    async fn run(&self, pool: &Pool, batch: Vec<Call<Self>>) {
        let Some(until) = batch.iter().map(|call| call.until).max() else {
            return;
        };
        let mut values: Vec<&str> = batch.iter().map(|call| call.request.as_str()).collect();
        values.sort_unstable();
        values.dedup();
        let filter = if let [value] = values.as_slice() {
            // A lone Get's statement, prepared once per connection.
            self.column().eq(*value)
        } else {
            let values: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
            Expr::col((StripeCustomers, self.column())).eq(PgFunc::any(Expr::val(values)))
        };
        let stmt = StripeCustomers::find()
            .filter(filter)
            .build(DbBackend::Postgres);
        let rows = async {
            let mut conn = pool.acquire(until).await?;
            let rows = conn.fetch_all(&stmt, until).await?;
            conn.release();
            rows.into_iter().map(model).collect::<Result<Vec<_>, _>>()
        }
        .await;
        match rows {
            Ok(rows) => {
                let by_value: HashMap<&str, &Model> =
                    rows.iter().map(|row| (self.value_of(row), row)).collect();
                for call in batch {
                    let row = by_value.get(call.request.as_str()).map(|&row| row.clone());
                    call.answer(Ok(row));
                }
            }
            Err(err) => {
                for call in batch {
                    call.answer(Err(err.clone()));
                }
            }
        }
    }
}
