//! TLS on the main port: plaintext refused, mutual TLS enforced, rotated
//! certificates picked up without a restart, and plaintext health kept for
//! Kubernetes probes.

use crate::helpers;

use customer_mapping::{proto::LinkRequest, startup::Application};
use helpers::tls::{Ca, Security, connect_tls, spawn_secure};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

fn link_request(n: u32) -> LinkRequest {
    LinkRequest {
        user_id: format!("user-{n}"),
        stripe_customer_id: format!("cus_{n}"),
        ..Default::default()
    }
}

/// A connection that must not get as far as a handler: either it does not
/// connect, or its first call fails at the transport (the client reports a
/// connection closed mid-handshake as UNAVAILABLE, UNKNOWN or CANCELLED).
/// Tests then check that its Link left no row.
async fn assert_refused(client: Result<helpers::Client, tonic::transport::Error>, why: &str) {
    if let Ok(mut client) = client {
        let err = client.link(link_request(999)).await.expect_err(why);
        assert!(
            matches!(
                err.code(),
                Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
            ),
            "{why}: got {err:?}"
        );
    }
}

/// The refused clients' Link (user-999) never reached the database.
async fn assert_no_refused_link(client: &mut helpers::Client) {
    let err = client
        .get(customer_mapping::proto::GetRequest {
            key: Some(customer_mapping::proto::get_request::Key::UserId(
                "user-999".into(),
            )),
            ..Default::default()
        })
        .await
        .expect_err("no refused call was served");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_and_plaintext_clients_are_refused() {
    let app = spawn_secure(Security::default()).await;
    let mut client = app.client(None).await.expect("a TLS client connects");
    let linked = client.link(link_request(1)).await.expect("Link over TLS");
    assert!(linked.into_inner().created);

    let plaintext = match Channel::from_shared(format!("http://{}", app.addr))
        .expect("a valid URI")
        .connect()
        .await
    {
        Ok(channel) => Ok(helpers::Client::new(channel)),
        Err(err) => Err(err),
    };
    assert_refused(plaintext, "a plaintext client must be refused").await;

    // The refused connection cost the server nothing it needed.
    client
        .link(link_request(2))
        .await
        .expect("still serving TLS");
    assert_no_refused_link(&mut client).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_certificate_from_the_client_ca() {
    let app = spawn_secure(Security {
        mutual: true,
        ..Security::default()
    })
    .await;

    assert_refused(app.client(None).await, "no client certificate").await;
    let stranger = Ca::new("some other CA").client("webhooks.billing.svc");
    assert_refused(
        app.client(Some(&stranger)).await,
        "a client certificate from another CA",
    )
    .await;

    let trusted = app.ca.client("webhooks.billing.svc");
    let mut client = app
        .client(Some(&trusted))
        .await
        .expect("a client with a trusted certificate connects");
    client
        .link(link_request(1))
        .await
        .expect("Link with a trusted client certificate");
    assert_no_refused_link(&mut client).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_to_new_connections_without_a_restart() {
    let app = spawn_secure(Security::default()).await;
    let mut before = app.client(None).await.expect("connects before rotation");
    before.link(link_request(1)).await.expect("Link");

    let next_ca = Ca::new("next CA");
    assert_refused(
        connect_tls(app.addr, &next_ca.pem(), None).await,
        "the new CA is not served yet",
    )
    .await;

    // What Kubernetes does when the secret changes: new files in place.
    let next = next_ca.server();
    std::fs::write(&app.key_file, &next.key).expect("write the new key");
    std::fs::write(&app.cert_file, &next.cert).expect("write the new certificate");

    let mut after = connect_tls(app.addr, &next_ca.pem(), None)
        .await
        .expect("a client trusting the new CA connects");
    after
        .link(link_request(2))
        .await
        .expect("Link after rotation");
    assert_refused(
        connect_tls(app.addr, &app.ca.pem(), None).await,
        "new connections no longer get the old certificate",
    )
    .await;
    // A connection made before the rotation keeps working.
    before.link(link_request(3)).await.expect("old connection");
    assert_no_refused_link(&mut before).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_written_rotation_keeps_the_previous_certificate() {
    let app = spawn_secure(Security::default()).await;
    std::fs::write(&app.cert_file, "-----BEGIN CERTIFICATE-----\ntrunc").expect("write");
    let mut client = app
        .client(None)
        .await
        .expect("still served the last good certificate");
    client.link(link_request(1)).await.expect("Link");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_health_listener_serves_health_and_nothing_else() {
    let app = spawn_secure(Security {
        mutual: true,
        ..Security::default()
    })
    .await;
    let channel = Channel::from_shared(format!("http://{}", app.health_addr))
        .expect("a valid URI")
        .connect()
        .await
        .expect("plaintext connects to the health listener");
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "customermapping.v1.CustomerMapping".into(),
        })
        .await
        .expect("Check answers")
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);

    let err = helpers::Client::new(channel)
        .link(link_request(1))
        .await
        .expect_err("the health listener serves no CustomerMapping");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    app.stop().await;
}

#[tokio::test]
async fn unusable_tls_files_stop_the_server_from_starting() {
    let ca = Ca::new("test CA");
    let other = ca.server();
    let files = tempfile::tempdir().expect("a temporary directory");
    let cert = files.path().join("cert.pem");
    let key = files.path().join("key.pem");
    std::fs::write(&cert, ca.server().cert).expect("write");
    std::fs::write(&key, other.key).expect("write");

    let mut settings = helpers::test_settings("sqlite::memory:".into());
    settings.tls.tls_cert_file = Some(cert);
    settings.tls.tls_key_file = Some(key.clone());
    let err = Application::build(&settings)
        .await
        .err()
        .expect("a key that does not fit the certificate is refused");
    assert!(format!("{err:#}").contains("TLS"), "{err:#}");

    settings.tls.tls_key_file = Some(files.path().join("missing.pem"));
    let err = Application::build(&settings)
        .await
        .err()
        .expect("a missing key file is refused");
    assert!(format!("{err:#}").contains("missing.pem"), "{err:#}");
}
