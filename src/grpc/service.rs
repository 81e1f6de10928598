//! The `CustomerMapping` service: each handler parses its request, calls the
//! domain and converts the reply; `observe` wraps every call.

use tonic::{Request, Response, Status};

use super::{
    bulk_request::{
        batch_get_keys, events_token, list_arguments, list_events_arguments, list_token,
    },
    guard::Guard,
    observe::{observe, observe_stream},
    request::{get_key, link_arguments, prepare_link_arguments, unlink_arguments},
    watch::{WatchStream, watch_start},
};
use crate::auth::Rpc;
use crate::mapping::Actor;
use crate::mappings::{Feed, Mappings};
use crate::proto::{
    BatchGetRequest, BatchGetResponse, BatchGetResult, GetRequest, GetResponse, LinkRequest,
    LinkResponse, ListEventsRequest, ListEventsResponse, ListRequest, ListResponse,
    PrepareLinkRequest, PrepareLinkResponse, UnlinkRequest, UnlinkResponse, WatchRequest,
    customer_mapping_server::CustomerMapping,
};

/// The `customermapping.v1.CustomerMapping` service.
#[derive(Debug, Clone)]
pub struct CustomerMappingService {
    mappings: Mappings,
    feed: Feed,
    guard: Guard,
}

impl CustomerMappingService {
    pub fn new(mappings: Mappings, feed: Feed, guard: Guard) -> Self {
        Self {
            mappings,
            feed,
            guard,
        }
    }
}

#[tonic::async_trait]
impl CustomerMapping for CustomerMappingService {
    async fn link(&self, request: Request<LinkRequest>) -> Result<Response<LinkResponse>, Status> {
        observe(&self.guard, Rpc::Link, request, |message, actor| {
            self.handle_link(message, actor)
        })
        .await
    }

    async fn prepare_link(
        &self,
        request: Request<PrepareLinkRequest>,
    ) -> Result<Response<PrepareLinkResponse>, Status> {
        observe(&self.guard, Rpc::PrepareLink, request, |message, _| {
            self.handle_prepare_link(message)
        })
        .await
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        observe(&self.guard, Rpc::Get, request, |message, _| {
            self.handle_get(message)
        })
        .await
    }

    async fn unlink(
        &self,
        request: Request<UnlinkRequest>,
    ) -> Result<Response<UnlinkResponse>, Status> {
        observe(&self.guard, Rpc::Unlink, request, |message, actor| {
            self.handle_unlink(message, actor)
        })
        .await
    }

    async fn batch_get(
        &self,
        request: Request<BatchGetRequest>,
    ) -> Result<Response<BatchGetResponse>, Status> {
        observe(&self.guard, Rpc::BatchGet, request, |message, _| {
            self.handle_batch_get(message)
        })
        .await
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        observe(&self.guard, Rpc::List, request, |message, _| {
            self.handle_list(message)
        })
        .await
    }

    async fn list_events(
        &self,
        request: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        observe(&self.guard, Rpc::ListEvents, request, |message, _| {
            self.handle_list_events(message)
        })
        .await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        observe_stream(&self.guard, Rpc::Watch, request, |message, actor| {
            self.handle_watch(message, actor)
        })
        .await
    }
}

impl CustomerMappingService {
    async fn handle_link(
        &self,
        request: LinkRequest,
        actor: Actor,
    ) -> Result<LinkResponse, Status> {
        let linked = self.mappings.link(link_arguments(request)?, actor).await?;
        Ok(LinkResponse {
            mapping: Some(linked.mapping.into()),
            created: linked.created,
        })
    }

    async fn handle_prepare_link(
        &self,
        request: PrepareLinkRequest,
    ) -> Result<PrepareLinkResponse, Status> {
        let (account, user) = prepare_link_arguments(request)?;
        Ok(self.mappings.prepare_link(account, user).await?.into())
    }

    async fn handle_get(&self, request: GetRequest) -> Result<GetResponse, Status> {
        let mapping = self.mappings.get(&get_key(request)?).await?;
        Ok(GetResponse {
            mapping: Some(mapping.into()),
        })
    }

    async fn handle_unlink(
        &self,
        request: UnlinkRequest,
        actor: Actor,
    ) -> Result<UnlinkResponse, Status> {
        let mapping = self
            .mappings
            .unlink(&unlink_arguments(request)?, actor)
            .await?;
        Ok(UnlinkResponse {
            mapping: Some(mapping.into()),
        })
    }

    async fn handle_batch_get(&self, request: BatchGetRequest) -> Result<BatchGetResponse, Status> {
        let keys = batch_get_keys(&request)?;
        let found = self.mappings.batch_get(keys).await?;
        Ok(BatchGetResponse {
            // `key` echoes the request's key, as sent.
            results: request
                .keys
                .into_iter()
                .zip(found)
                .map(|(key, mapping)| BatchGetResult {
                    key: Some(key),
                    mapping: mapping.map(Into::into),
                })
                .collect(),
        })
    }

    async fn handle_list(&self, request: ListRequest) -> Result<ListResponse, Status> {
        let query = list_arguments(&request)?;
        let page = self
            .mappings
            .list(query.account.clone(), query.after, query.page_size)
            .await?;
        Ok(ListResponse {
            mappings: page.mappings.into_iter().map(Into::into).collect(),
            next_page_token: page
                .next
                .map(|cursor| list_token(query.account.as_ref(), cursor))
                .unwrap_or_default(),
        })
    }

    async fn handle_watch(
        &self,
        request: WatchRequest,
        actor: Actor,
    ) -> Result<WatchStream, Status> {
        let deployment = self.feed.deployment().await?;
        let start = watch_start(&request, &deployment)?;
        let deliveries = self.feed.watch(start)?;
        Ok(WatchStream::new(
            deliveries,
            self.feed.stopping(),
            deployment,
            actor,
        ))
    }

    async fn handle_list_events(
        &self,
        request: ListEventsRequest,
    ) -> Result<ListEventsResponse, Status> {
        let query = list_events_arguments(&request)?;
        let page = self
            .mappings
            .list_events(query.key.clone(), query.after, query.page_size)
            .await?;
        Ok(ListEventsResponse {
            events: page.events.into_iter().map(Into::into).collect(),
            next_page_token: page
                .next
                .map(|sequence| events_token(query.key.as_ref(), sequence))
                .unwrap_or_default(),
        })
    }
}
