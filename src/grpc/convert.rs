//! Domain values to proto messages.

use crate::{mapping, proto};

impl From<mapping::Mapping> for proto::Mapping {
    fn from(m: mapping::Mapping) -> Self {
        proto::Mapping {
            user_id: m.user_id.into(),
            stripe_customer_id: m.stripe_customer_id.into(),
            create_time: Some(prost_types::Timestamp {
                seconds: m.created_at.timestamp(),
                // chrono encodes a leap second as nanos >= 1e9; protobuf does not.
                nanos: i32::try_from(m.created_at.timestamp_subsec_nanos().min(999_999_999))
                    .unwrap_or(0),
            }),
        }
    }
}
