use std::collections::HashMap;

use super::{Error, Key, Mapping, Mappings, run_to_completion};
use crate::store;

/// Most keys one BatchGet may ask for.
pub const MAX_BATCH_KEYS: usize = 1000;

impl Mappings {
    /// The mapping holding each of `keys` (`None` where none does), in the
    /// order asked, all as they were at one instant.
    pub async fn batch_get(&self, keys: Vec<Key>) -> Result<Vec<Option<Mapping>>, Error> {
        let (db, until) = (self.db()?.clone(), super::work_until());
        run_to_completion(async move {
            let (mut users, mut customers) = (Vec::new(), Vec::new());
            for key in &keys {
                match key {
                    Key::User(id) => users.push(id.as_str()),
                    Key::Customer(id) => customers.push(id.as_str()),
                }
            }
            for ids in [&mut users, &mut customers] {
                ids.sort_unstable();
                ids.dedup();
            }
            let rows = store::find_by_keys(&db, &users, &customers, until).await?;
            let mut by_user = HashMap::with_capacity(rows.len());
            let mut by_customer = HashMap::with_capacity(rows.len());
            for row in rows {
                let mapping: Mapping = row.try_into()?;
                by_user.insert(mapping.user_id.clone(), mapping.clone());
                by_customer.insert(mapping.stripe_customer_id.clone(), mapping);
            }
            Ok(keys
                .iter()
                .map(|key| match key {
                    Key::User(id) => by_user.get(id).cloned(),
                    Key::Customer(id) => by_customer.get(id).cloned(),
                })
                .collect())
        })
        .await
    }
}
