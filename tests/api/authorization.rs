//! Per-caller authorization: certificate names under mutual TLS, hashed
//! bearer tokens otherwise. Allowed calls go through, the rest get
//! PERMISSION_DENIED (known caller) or UNAUTHENTICATED (unknown one), and
//! the log line names the caller.

use crate::helpers;

use std::collections::HashMap;

use customer_mapping::proto::{
    GetRequest, LinkRequest, UnlinkRequest, get_request, unlink_request,
};
use helpers::{
    process::ServerProcess,
    tls::{Ca, Pem, Security, spawn_secure},
    watch::{Received, read_until, watch, watch_now},
};
use sha2::{Digest, Sha256};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

const WEBHOOKS: &str = "webhooks.billing.svc";
const READER: &str = "spiffe://cluster.local/ns/billing/sa/reader";
const ADMIN_TOKEN: &str = "admin-0f3c9a7e5b2d4c1e8a6b9d0f7e3c5a1b";

fn policy() -> String {
    let admin_hash = hex::encode(Sha256::digest(ADMIN_TOKEN));
    format!(
        r#"{{"callers": [
            {{"name": "billing-webhooks", "certificate_names": ["{WEBHOOKS}"], "allow": ["Link", "Get"]}},
            {{"name": "billing-reader", "certificate_names": ["{READER}"], "allow": ["Get", "Watch"]}},
            {{"name": "support-admin", "token_sha256": "{admin_hash}", "allow": ["Get", "Unlink"]}}
        ]}}"#
    )
}

fn link(n: u32) -> LinkRequest {
    LinkRequest {
        user_id: format!("user-{n}"),
        stripe_customer_id: format!("cus_{n}"),
        ..Default::default()
    }
}

fn get(n: u32) -> GetRequest {
    GetRequest {
        key: Some(get_request::Key::UserId(format!("user-{n}"))),
        ..Default::default()
    }
}

fn unlink(n: u32) -> UnlinkRequest {
    UnlinkRequest {
        key: Some(unlink_request::Key::UserId(format!("user-{n}"))),
        ..Default::default()
    }
}

fn with_token<T>(message: T, header: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", header.parse().expect("ASCII metadata"));
    request
}

fn assert_denied(status: &Status, caller: &str, method: &str) {
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let info = status
        .get_details_error_info()
        .expect("PERMISSION_DENIED carries an ErrorInfo");
    assert_eq!(info.reason, "CALLER_NOT_ALLOWED");
    assert_eq!(
        info.metadata,
        HashMap::from([
            ("caller".to_owned(), caller.to_owned()),
            ("method".to_owned(), method.to_owned()),
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_identities_may_call_what_the_policy_allows_and_nothing_else() {
    let policy = policy();
    let app = spawn_secure(Security {
        mutual: true,
        policy: Some(&policy),
        ..Security::default()
    })
    .await;
    let client = |pem: Pem| {
        let app = &app;
        async move { app.client(Some(&pem)).await.expect("connects") }
    };

    let mut webhooks = client(app.ca.client(WEBHOOKS)).await;
    webhooks.link(link(1)).await.expect("webhooks may Link");
    webhooks.get(get(1)).await.expect("webhooks may Get");
    let denied = webhooks.unlink(unlink(1)).await.expect_err("not Unlink");
    assert_denied(&denied, "billing-webhooks", "Unlink");
    webhooks
        .get(get(1))
        .await
        .expect("the denied Unlink changed nothing");

    // A URI name (SPIFFE ID) works the same way.
    let mut reader = client(app.ca.client(READER)).await;
    reader.get(get(1)).await.expect("the reader may Get");
    let denied = reader.link(link(2)).await.expect_err("not Link");
    assert_denied(&denied, "billing-reader", "Link");

    // Watch is named like every other RPC: the reader may follow changes,
    // the webhooks may not.
    let (mut changes, _) = watch_now(&mut reader).await;
    webhooks.link(link(3)).await.expect("webhooks may Link");
    let mut received = Received::default();
    read_until(&mut changes, &mut received, 1).await;
    let denied = watch(&mut webhooks, "", false)
        .await
        .expect_err("not Watch");
    assert_denied(&denied, "billing-webhooks", "Watch");

    // Signed by the CA but not in the policy: known, with no rights.
    let mut intruder = client(app.ca.client("intruder.svc")).await;
    let denied = intruder.get(get(1)).await.expect_err("not in the policy");
    assert_denied(&denied, "intruder.svc", "Get");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_are_checked_against_their_hashes() {
    let policy = policy();
    let app = spawn_secure(Security {
        policy: Some(&policy),
        ..Security::default()
    })
    .await;
    let mut client = app.client(None).await.expect("connects");
    let bearer = format!("Bearer {ADMIN_TOKEN}");

    // Allowed: Unlink reaches the domain, which finds nothing to unlink.
    let err = client
        .unlink(with_token(unlink(1), &bearer))
        .await
        .expect_err("nothing is linked");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = client
        .unlink(with_token(unlink(1), &format!("bearer {ADMIN_TOKEN}")))
        .await
        .expect_err("the scheme is case-insensitive");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    let denied = client
        .link(with_token(link(1), &bearer))
        .await
        .expect_err("the admin may not Link");
    assert_denied(&denied, "support-admin", "Link");

    for (header, why) in [
        (format!("Bearer {ADMIN_TOKEN}x"), "a wrong token"),
        ("Bearer ".to_owned(), "an empty token"),
        (format!("Basic {ADMIN_TOKEN}"), "another scheme"),
    ] {
        let err = client
            .get(with_token(get(1), &header))
            .await
            .expect_err(why);
        assert_eq!(err.code(), Code::Unauthenticated, "{why}: {err:?}");
    }
    let err = client.get(get(1)).await.expect_err("no credentials");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(app.client(None).await.is_ok(), "still serving");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_policy_reflection_needs_a_known_caller_and_can_be_turned_off() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let list = || {
        tokio_stream::iter([ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }])
    };
    let policy = policy();
    let app = spawn_secure(Security {
        mutual: true,
        policy: Some(&policy),
        ..Security::default()
    })
    .await;
    let channel = |pem: Option<Pem>| {
        let app = &app;
        async move { ServerReflectionClient::new(app.channel(pem.as_ref()).await.expect("connects")) }
    };
    let mut known = channel(Some(app.ca.client(READER))).await;
    known
        .server_reflection_info(list())
        .await
        .expect("a caller in the policy may use reflection");
    let mut unknown = channel(Some(app.ca.client("intruder.svc"))).await;
    let err = unknown
        .server_reflection_info(list())
        .await
        .expect_err("a caller not in the policy may not");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    app.stop().await;

    let app = spawn_secure(Security {
        adjust: &|settings| settings.access.reflection = false,
        ..Security::default()
    })
    .await;
    let mut client = ServerReflectionClient::new(app.channel(None).await.expect("connects"));
    let err = client
        .server_reflection_info(list())
        .await
        .expect_err("reflection is off");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_line_names_the_caller_and_never_the_token() {
    let ca = Ca::new("test CA");
    let server = ca.server();
    let files = tempfile::tempdir().expect("a temporary directory");
    let write = |name: &str, contents: &str| {
        let path = files.path().join(name);
        std::fs::write(&path, contents).expect("write");
        path.to_str().expect("a UTF-8 path").to_owned()
    };
    let cert = write("server.pem", &server.cert);
    let key = write("server.key", &server.key);
    let policy = write("policy.json", &policy());
    let database = format!(
        "sqlite://{}?mode=rwc",
        files.path().join("mapping.db").display()
    );
    let process = ServerProcess::start(&[
        ("DATABASE_URL", &database),
        ("TLS_CERT_FILE", &cert),
        ("TLS_KEY_FILE", &key),
        ("POLICY_FILE", &policy),
    ]);
    let mut client = helpers::tls::connect_tls(process.addr, &ca.pem(), None)
        .await
        .expect("connects");

    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let _ = client.link(with_token(link(1), &bearer)).await;
    let denied = process.wait_for_event(|e| e["code"] == "PermissionDenied");
    assert_eq!(denied["caller"], "support-admin", "{denied}");
    assert_eq!(denied["method"], "Link", "{denied}");

    let _ = client.get(with_token(get(1), "Bearer guess")).await;
    let unknown = process.wait_for_event(|e| e["code"] == "Unauthenticated");
    assert_eq!(unknown["caller"], "unauthenticated", "{unknown}");

    assert!(
        process.lines().iter().all(|l| !l.contains(ADMIN_TOKEN)),
        "the token was logged"
    );
}
