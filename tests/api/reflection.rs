//! Server reflection, v1 and v1alpha, so grpcurl needs no proto files.

use crate::helpers;

use helpers::Backend;
use prost::Message;
use prost_types::FileDescriptorProto;

/// The same test for each reflection version: their generated types differ,
/// the protocol does not.
macro_rules! reflection_test {
    ($version:ident) => {
        mod $version {
            use tonic_reflection::pb::$version::{
                ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse,
            };

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn lists_services_and_describes_link() {
                let app = crate::helpers::spawn_app(super::Backend::Sqlite).await;
                let mut client =
                    ServerReflectionClient::new(crate::helpers::channel(app.addr).await);
                let requests = [
                    MessageRequest::ListServices(String::new()),
                    MessageRequest::FileContainingSymbol(
                        "customermapping.v1.CustomerMapping.Link".into(),
                    ),
                ]
                .map(|message_request| ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(message_request),
                });
                let mut replies = client
                    .server_reflection_info(tokio_stream::iter(requests))
                    .await
                    .expect("reflection answers")
                    .into_inner();

                let Some(MessageResponse::ListServicesResponse(list)) = replies
                    .message()
                    .await
                    .expect("a reply")
                    .and_then(|r| r.message_response)
                else {
                    panic!("expected a service list");
                };
                let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
                super::assert_services(&names);

                let Some(MessageResponse::FileDescriptorResponse(files)) = replies
                    .message()
                    .await
                    .expect("a reply")
                    .and_then(|r| r.message_response)
                else {
                    panic!("expected file descriptors");
                };
                super::assert_link_is_described(&files.file_descriptor_proto);
            }
        }
    };
}

reflection_test!(v1);
reflection_test!(v1alpha);

fn assert_services(names: &[String]) {
    for expected in [
        "customermapping.v1.CustomerMapping",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
}

fn assert_link_is_described(encoded_files: &[Vec<u8>]) {
    let files: Vec<FileDescriptorProto> = encoded_files
        .iter()
        .map(|bytes| FileDescriptorProto::decode(bytes.as_slice()).expect("a file descriptor"))
        .collect();
    let ours = files
        .iter()
        .find(|f| f.package() == "customermapping.v1")
        .expect("the customermapping.v1 file");
    let service = ours
        .service
        .iter()
        .find(|s| s.name() == "CustomerMapping")
        .expect("the service");
    let link = service
        .method
        .iter()
        .find(|m| m.name() == "Link")
        .expect("the Link method");
    assert_eq!(link.input_type(), ".customermapping.v1.LinkRequest");
    assert_eq!(link.output_type(), ".customermapping.v1.LinkResponse");
    // Its imports come along, so a client can resolve create_time.
    assert!(
        ours.dependency
            .iter()
            .any(|d| d == "google/protobuf/timestamp.proto"),
        "{:?}",
        ours.dependency
    );
}
