//! Gets: one lane per key (user, customer). A shared read is one statement,
//! `WHERE key = ANY($1)`, for every Get queued while the lane was busy.
//!
//! A Get's answer is whatever its statement's snapshot held for its key, so
//! the argument of the module above is all there is to it: the snapshot is
//! taken after the Get arrived and read before it returns.

use std::collections::{HashMap, VecDeque};
use std::{sync::Arc, time::Duration};

use sea_orm::{
    ColumnTrait, DbBackend, DbErr, EntityTrait, QueryFilter, QueryTrait,
    sea_query::{Expr, ExprTrait, extension::postgres::PgFunc},
};
use tokio::time::Instant;

use super::{Call, Lane, Work};
use crate::store::{
    entity::{Column, Entity as StripeCustomers, Model},
    model,
    postgres::Pool,
};

/// The lanes, one per key.
#[derive(Debug)]
pub(in crate::store) struct Reads {
    by_user: Arc<Lane<Read>>,
    by_customer: Arc<Lane<Read>>,
}

impl Reads {
    pub fn new(stall_timeout: Duration) -> Self {
        Self {
            by_user: Arc::new(Lane::new(Read(Column::UserId), stall_timeout)),
            by_customer: Arc::new(Lane::new(Read(Column::StripeCustomerId), stall_timeout)),
        }
    }

    /// The row holding `value` in `column` (user_id or stripe_customer_id).
    pub async fn get(
        &self,
        pool: &Pool,
        column: Column,
        value: &str,
        until: Instant,
    ) -> Result<Option<Model>, DbErr> {
        let lane = match column {
            Column::StripeCustomerId => &self.by_customer,
            _ => &self.by_user,
        };
        lane.call(pool, value.to_owned(), until).await
    }

    /// See [`Lane::forget`].
    pub fn forget(&self, pool: &Pool) {
        self.by_user.forget(pool);
        self.by_customer.forget(pool);
    }
}

/// Reads by one key column.
struct Read(Column);

impl Read {
    fn value_of<'a>(&self, row: &'a Model) -> &'a str {
        match self.0 {
            Column::StripeCustomerId => &row.stripe_customer_id,
            _ => &row.user_id,
        }
    }
}

impl Work for Read {
    type Request = String;
    type Answer = Option<Model>;
    /// Reads take no locks: any number may share a key.
    type Claim = ();

    /// One, as for Links. Measured against two on this machine
    /// (docs/PERFORMANCE.md): the Gets that queue behind one read make
    /// bigger batches (get at 32 in flight: 13,793 and 18,104 Gets/s
    /// against 11,297 and 10,533, PostgreSQL's CPU per Get 20-25 us against
    /// 37-41). Reads wait on no lock; a read the database is slow to answer
    /// stops holding up the queue after the stall timeout.
    const IN_FLIGHT: usize = 1;

    fn name(&self) -> &'static str {
        match self.0 {
            Column::StripeCustomerId => "get_by_customer",
            _ => "get_by_user",
        }
    }

    fn next_batch(&self, queue: &mut VecDeque<Call<Self>>) -> Option<(Vec<Call<Self>>, ())> {
        Some((queue.drain(..).collect(), ()))
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
            self.0.eq(*value)
        } else {
            Expr::col((StripeCustomers, self.0)).eq(PgFunc::any(Expr::val(
                values
                    .iter()
                    .map(|v| (*v).to_owned())
                    .collect::<Vec<String>>(),
            )))
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
