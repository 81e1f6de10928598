//! The `CustomerMapping` service: each handler parses its request, calls the
//! domain and converts the reply; `observe` wraps every call.

use tonic::{Request, Response, Status};

use super::{
    observe::{Guard, observe},
    request::{get_key, link_arguments, unlink_key},
};
use crate::auth::Rpc;
use crate::mapping::Mappings;
use crate::proto::{
    GetRequest, GetResponse, LinkRequest, LinkResponse, UnlinkRequest, UnlinkResponse,
    customer_mapping_server::CustomerMapping,
};

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
