//! The gRPC layer: decode and validate requests, call the domain, encode
//! replies. Status codes are chosen in `status.rs` only.

pub mod codec;
pub mod limits;
mod observe;
pub mod status;

pub use observe::{Guard, REQUEST_ID, reflection_interceptor};

use observe::observe;
use tonic::{Request, Response, Status};

use crate::auth::Rpc;
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
    guard: Guard,
}

impl CustomerMappingService {
    pub fn new(mappings: Mappings, guard: Guard) -> Self {
        Self { mappings, guard }
    }
}

#[tonic::async_trait]
impl CustomerMapping for CustomerMappingService {
    async fn link(&self, request: Request<LinkRequest>) -> Result<Response<LinkResponse>, Status> {
        observe(&self.guard, Rpc::Link, request, |message| {
            self.handle_link(message)
        })
        .await
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        observe(&self.guard, Rpc::Get, request, |message| {
            self.handle_get(message)
        })
        .await
    }

    async fn unlink(
        &self,
        request: Request<UnlinkRequest>,
    ) -> Result<Response<UnlinkResponse>, Status> {
        observe(&self.guard, Rpc::Unlink, request, |message| {
            self.handle_unlink(message)
        })
        .await
    }
}

impl CustomerMappingService {
    async fn handle_link(&self, request: LinkRequest) -> Result<LinkResponse, Status> {
        let (user_id, stripe_customer_id) = link_arguments(request)?;
        let linked = self.mappings.link(user_id, stripe_customer_id).await?;
        Ok(LinkResponse {
            mapping: Some(linked.mapping.into()),
            created: linked.created,
        })
    }

    async fn handle_get(&self, request: GetRequest) -> Result<GetResponse, Status> {
        let mapping = self.mappings.get(&get_key(request)?).await?;
        Ok(GetResponse {
            mapping: Some(mapping.into()),
        })
    }

    async fn handle_unlink(&self, request: UnlinkRequest) -> Result<UnlinkResponse, Status> {
        let mapping = self.mappings.unlink(&unlink_key(request)?).await?;
        Ok(UnlinkResponse {
            mapping: Some(mapping.into()),
        })
    }
}

/// Validates both fields so the caller learns every mistake at once.
fn link_arguments(request: LinkRequest) -> Result<(UserId, StripeCustomerId), Error> {
    match (
        parse("user_id", UserId::parse(request.user_id)),
        parse(
            "stripe_customer_id",
            StripeCustomerId::parse(request.stripe_customer_id),
        ),
    ) {
        (Ok(user), Ok(customer)) => Ok((user, customer)),
        (user, customer) => Err(Error::InvalidArgument(
            [user.err(), customer.err()].into_iter().flatten().collect(),
        )),
    }
}

fn get_key(request: GetRequest) -> Result<Key, Error> {
    match request.key {
        Some(proto::get_request::Key::UserId(id)) => user_key(id),
        Some(proto::get_request::Key::StripeCustomerId(id)) => customer_key(id),
        None => Err(missing_key()),
    }
    .map_err(|v| Error::InvalidArgument(vec![v]))
}

fn unlink_key(request: UnlinkRequest) -> Result<Key, Error> {
    match request.key {
        Some(proto::unlink_request::Key::UserId(id)) => user_key(id),
        Some(proto::unlink_request::Key::StripeCustomerId(id)) => customer_key(id),
        None => Err(missing_key()),
    }
    .map_err(|v| Error::InvalidArgument(vec![v]))
}

/// Everything the server does with a request's bytes before the database:
/// decode as the method's message, then validate. For the fuzz harness
/// (`tests/hostile_input.rs`), which checks that no input panics it and that
/// every refusal is INVALID_ARGUMENT.
pub fn decode_and_validate(method: Rpc, bytes: &[u8]) -> Result<(), Status> {
    match method {
        Rpc::Link => link_arguments(codec::decode_request(bytes)?).map(drop),
        Rpc::Get => get_key(codec::decode_request(bytes)?).map(drop),
        Rpc::Unlink => unlink_key(codec::decode_request(bytes)?).map(drop),
    }
    .map_err(Status::from)
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

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// `Rpc::ALL` is the service's method list, in the proto's order.
    #[test]
    fn every_rpc_of_the_proto_is_in_rpc_all() {
        let files = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set decodes");
        let methods: Vec<String> = files
            .file
            .iter()
            .filter(|f| f.package() == "customermapping.v1")
            .flat_map(|f| &f.service)
            .filter(|s| format!("customermapping.v1.{}", s.name()) == proto::SERVICE_NAME)
            .flat_map(|s| &s.method)
            .map(|m| m.name().to_owned())
            .collect();
        let listed: Vec<&str> = Rpc::ALL.iter().map(|rpc| rpc.name()).collect();
        assert_eq!(methods, listed);
    }
}
