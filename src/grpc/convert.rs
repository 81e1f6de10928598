//! Domain values to proto messages.

use crate::{
    mapping::{self, EventKind},
    proto::{self, mapping_event},
};

impl From<mapping::Mapping> for proto::Mapping {
    fn from(m: mapping::Mapping) -> Self {
        proto::Mapping {
            user_id: m.user_id.into(),
            stripe_customer_id: m.stripe_customer_id.into(),
            create_time: Some(timestamp(m.created_at)),
            stripe_account: m.stripe_account.into(),
        }
    }
}

impl From<mapping::PrepareOutcome> for proto::PrepareLinkResponse {
    fn from(outcome: mapping::PrepareOutcome) -> Self {
        use proto::prepare_link_response::Outcome;
        let outcome = match outcome {
            mapping::PrepareOutcome::Linked(mapping) => Outcome::Mapping(mapping.into()),
            mapping::PrepareOutcome::Create(creation) => {
                Outcome::Creation(proto::CustomerCreation {
                    idempotency_key: creation.idempotency_key,
                    metadata: creation.metadata.into_iter().collect(),
                    generation: creation.generation.count(),
                })
            }
        };
        proto::PrepareLinkResponse {
            outcome: Some(outcome),
        }
    }
}

impl From<mapping::Event> for proto::MappingEvent {
    fn from(event: mapping::Event) -> Self {
        let kind = match event.kind {
            EventKind::Linked => mapping_event::Kind::Linked,
            EventKind::Unlinked => mapping_event::Kind::Unlinked,
        };
        proto::MappingEvent {
            sequence: event.sequence,
            kind: kind.into(),
            time: Some(timestamp(event.time)),
            mapping: Some(event.mapping.into()),
            caller: event.caller,
            request_id: event.request_id,
        }
    }
}

fn timestamp(time: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        // chrono encodes a leap second as nanos >= 1e9; protobuf does not.
        nanos: i32::try_from(time.timestamp_subsec_nanos().min(999_999_999)).unwrap_or(0),
    }
}
