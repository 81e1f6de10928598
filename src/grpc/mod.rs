//! The gRPC layer: decode and validate requests, call the domain, encode
//! replies. Status codes are chosen in `status.rs` only.

mod observe;
pub mod status;

pub use observe::REQUEST_ID;

use observe::observe;
use tonic::{Request, Response, Status};

use crate::mapping::{
    self, Error, FieldViolation, InvalidId, Key, Mappings, StripeCustomerId, UserId,
};
use crate::proto::{
    self, GetRequest, GetResponse, LinkRequest, LinkResponse, UnlinkRequest, UnlinkResponse,
    customer_mapping_server::CustomerMapping,
};

pub use proto::customer_mapping_server::CustomerMappingServer;

/// The `customermapping.v1.CustomerMapping` service.
#[derive(Debug, Clone)]
pub struct CustomerMappingService {
    mappings: Mappings,
}

impl CustomerMappingService {
    pub fn new(mappings: Mappings) -> Self {
        Self { mappings }
    }
}

#[tonic::async_trait]
impl CustomerMapping for CustomerMappingService {
    async fn link(&self, request: Request<LinkRequest>) -> Result<Response<LinkResponse>, Status> {
        observe("Link", request, |message| self.handle_link(message)).await
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        observe("Get", request, |message| self.handle_get(message)).await
    }

    async fn unlink(
        &self,
        request: Request<UnlinkRequest>,
    ) -> Result<Response<UnlinkResponse>, Status> {
        observe("Unlink", request, |message| self.handle_unlink(message)).await
    }
}

impl CustomerMappingService {
    async fn handle_link(&self, request: LinkRequest) -> Result<LinkResponse, Status> {
        // Validate both fields so the caller learns every mistake at once.
        let (user_id, stripe_customer_id) = match (
            parse("user_id", UserId::parse(request.user_id)),
            parse(
                "stripe_customer_id",
                StripeCustomerId::parse(request.stripe_customer_id),
            ),
        ) {
            (Ok(user), Ok(customer)) => (user, customer),
            (user, customer) => {
                let violations = [user.err(), customer.err()].into_iter().flatten().collect();
                return Err(Error::InvalidArgument(violations).into());
            }
        };
        let linked = self.mappings.link(user_id, stripe_customer_id).await?;
        Ok(LinkResponse {
            mapping: Some(linked.mapping.into()),
            created: linked.created,
        })
    }

    async fn handle_get(&self, request: GetRequest) -> Result<GetResponse, Status> {
        let key = match request.key {
            Some(proto::get_request::Key::UserId(id)) => user_key(id),
            Some(proto::get_request::Key::StripeCustomerId(id)) => customer_key(id),
            None => Err(missing_key()),
        }
        .map_err(|v| Error::InvalidArgument(vec![v]))?;
        let mapping = self.mappings.get(&key).await?;
        Ok(GetResponse {
            mapping: Some(mapping.into()),
        })
    }

    async fn handle_unlink(&self, request: UnlinkRequest) -> Result<UnlinkResponse, Status> {
        let key = match request.key {
            Some(proto::unlink_request::Key::UserId(id)) => user_key(id),
            Some(proto::unlink_request::Key::StripeCustomerId(id)) => customer_key(id),
            None => Err(missing_key()),
        }
        .map_err(|v| Error::InvalidArgument(vec![v]))?;
        let mapping = self.mappings.unlink(&key).await?;
        Ok(UnlinkResponse {
            mapping: Some(mapping.into()),
        })
    }
}

fn parse<T>(field: &'static str, parsed: Result<T, InvalidId>) -> Result<T, FieldViolation> {
    parsed.map_err(|e| FieldViolation {
        field,
        description: e.to_string(),
    })
}

fn user_key(raw: String) -> Result<Key, FieldViolation> {
    parse("user_id", UserId::parse(raw)).map(Key::User)
}

fn customer_key(raw: String) -> Result<Key, FieldViolation> {
    parse("stripe_customer_id", StripeCustomerId::parse(raw)).map(Key::Customer)
}

fn missing_key() -> FieldViolation {
    FieldViolation {
        field: "key",
        description: "exactly one of user_id or stripe_customer_id must be set".into(),
    }
}

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
