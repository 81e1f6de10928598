//! Gets: one lane per side (user, customer). A shared read is one
//! statement, `WHERE side = ANY($1) AND stripe_account = $2` (`= ANY($2)`
//! when the Gets span accounts), for every Get queued while the lane was
//! busy; each takes the row of its own key from what it finds. A Get's
//! answer is whatever its statement's snapshot held for its key, so the
//! lane's argument (`lane.rs`) is all there is to it.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use sea_orm::{
    Condition, DbBackend, DbErr, EntityTrait, QueryFilter, QueryTrait,
    sea_query::{Expr, ExprTrait, extension::postgres::PgFunc},
};
use tokio::time::Instant;

use super::{
    lane::{Call, Lane, Work},
    model,
    pool::Pool,
};
use crate::{
    mapping::{Key, Side},
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
        let lane = match key.side {
            Side::User(_) => &self.by_user,
            Side::Customer(_) => &self.by_customer,
        };
        lane.call(key.clone(), until).await
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

    /// The row's key on this side: (account, id).
    fn key_of(self, row: &Model) -> (&str, &str) {
        let id = match self {
            Get::ByUser => &row.user_id,
            Get::ByCustomer => &row.stripe_customer_id,
        };
        (&row.stripe_account, id)
    }
}

impl Work for Get {
    type Request = Key;
    type Answer = Option<Model>;

    /// Every queued Get of the side: a read takes no lock.
    const MAX_CALLS_PER_STATEMENT: usize = usize::MAX;

    fn name(&self) -> &'static str {
        match self {
            Get::ByUser => "get_by_user",
            Get::ByCustomer => "get_by_customer",
        }
    }

    fn keys(_: &Key) -> Option<(&str, &str, &str)> {
        None
    }

    async fn run(&self, pool: &Pool, batch: Vec<Call<Self>>) {
        let Some(until) = batch.iter().map(|call| call.until).max() else {
            return;
        };
        let filter = if let [call] = batch.as_slice() {
            // A lone Get's statement, prepared once per connection.
            queries::holding(&call.request)
        } else {
            let any = |values: BTreeSet<&str>| {
                let values: Vec<String> = values.into_iter().map(str::to_owned).collect();
                PgFunc::any(Expr::val(values))
            };
            let ids: BTreeSet<&str> = batch.iter().map(|c| c.request.side.as_str()).collect();
            let accounts: BTreeSet<&str> =
                batch.iter().map(|c| c.request.account.as_str()).collect();
            let account = Expr::col((StripeCustomers, Column::StripeAccount));
            // Every row of these ids in these accounts: each Get picks its
            // own below. One account (the usual case) is an equality, which
            // the index scans more cheaply than a second array.
            let in_accounts = match accounts.first() {
                Some(only) if accounts.len() == 1 => account.eq(*only),
                _ => account.eq(any(accounts)),
            };
            Condition::all()
                .add(Expr::col((StripeCustomers, self.column())).eq(any(ids)))
                .add(in_accounts)
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
                let by_key: HashMap<(&str, &str), &Model> =
                    rows.iter().map(|row| (self.key_of(row), row)).collect();
                for call in batch {
                    let key = &call.request;
                    let wanted = (key.account.as_str(), key.side.as_str());
                    let row = by_key.get(&wanted).map(|&row| row.clone());
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
