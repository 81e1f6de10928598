//! Hostile input, as property tests: arbitrary strings (quotes, SQL
//! fragments, control characters, very long values) and arbitrary bytes
//! either validate and round-trip byte for byte, or are refused with
//! INVALID_ARGUMENT. Never a panic, never INTERNAL, and the table holds
//! exactly what was acknowledged.
//!
//! `decode_and_validate_never_panics` is the quick, in-`cargo test` cousin of
//! the libFuzzer target in `fuzz/`: the server's own decode-then-validate
//! path fed arbitrary bytes in process.

use crate::helpers;

use bytes::{Buf, BufMut};
use customer_mapping::{
    auth::Rpc,
    grpc::decode_and_validate,
    mapping::{StripeCustomerId, UserId},
};
use helpers::{Backend, TestApp, spawn_app};
use proptest::{
    collection::vec,
    prelude::*,
    test_runner::{Config, TestRunner},
};
use tonic::{
    Code, Request, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};

/// Strings an attacker (or a buggy caller) might send.
fn hostile_string() -> impl Strategy<Value = String> {
    let fragment = prop_oneof![
        Just("'".to_owned()),
        Just("\"".to_owned()),
        Just("' OR '1'='1".to_owned()),
        Just("'); DROP TABLE stripe_customers; --".to_owned()),
        Just("\\".to_owned()),
        Just("%_".to_owned()),
        Just("\0".to_owned()),
        Just("cus_".to_owned()),
        Just("😀".to_owned()),
        Just("\u{202e}".to_owned()),
        any::<char>().prop_map(String::from),
        "[a-zA-Z0-9]{1,8}",
    ];
    prop_oneof![
        4 => vec(fragment, 0..12).prop_map(|parts| parts.concat()),
        1 => any::<String>(),
        1 => (200usize..400).prop_map(|n| "x".repeat(n)),
        1 => (1usize..64).prop_map(|n| format!("cus_{}", "A".repeat(n))),
    ]
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

/// Link, then read back and unlink: what was accepted comes back byte for
/// byte from both keys; what was refused was refused for the reasons the
/// validators give, with INVALID_ARGUMENT.
async fn round_trip(app: &TestApp, user: &str, customer: &str) -> Result<(), TestCaseError> {
    let valid = UserId::parse(user).is_ok() && StripeCustomerId::parse(customer).is_ok();
    match app.link(user, customer).await {
        Ok(linked) => {
            prop_assert!(valid, "accepted an invalid pair");
            let mapping = linked.mapping.expect("a mapping");
            prop_assert_eq!(&mapping.user_id, user);
            prop_assert_eq!(&mapping.stripe_customer_id, customer);
            let by_user = app.get_by_user(user).await.expect("Get by user");
            let by_customer = app
                .get_by_customer(customer)
                .await
                .expect("Get by customer");
            prop_assert_eq!(&by_user, &by_customer);
            prop_assert_eq!(by_user.user_id.as_bytes(), user.as_bytes());
            prop_assert_eq!(by_user.stripe_customer_id.as_bytes(), customer.as_bytes());
            let unlinked = app.unlink_by_user(user).await.expect("Unlink");
            prop_assert_eq!(unlinked.user_id.as_bytes(), user.as_bytes());
        }
        Err(status) => {
            prop_assert_eq!(status.code(), Code::InvalidArgument, "{:?}", status);
            prop_assert!(!valid, "refused a valid pair: {:?}", status);
        }
    }
    Ok(())
}

async fn strings_round_trip_or_are_invalid_argument(backend: Backend) {
    let app = spawn_app(backend).await;
    let handle = tokio::runtime::Handle::current();
    let app_ref = &app;
    tokio::task::block_in_place(|| {
        runner(128)
            .run(&(hostile_string(), hostile_string()), |(user, customer)| {
                handle.block_on(round_trip(app_ref, &user, &customer))
            })
            .expect("the property holds");
        // Valid customers with hostile users, so the user side is exercised
        // through to the database and back.
        runner(128)
            .run(
                &(hostile_string(), "[a-zA-Z0-9]{1,40}"),
                |(user, suffix)| {
                    handle.block_on(round_trip(app_ref, &user, &format!("cus_{suffix}")))
                },
            )
            .expect("the property holds");
    });
    assert!(
        app.rows().await.is_empty(),
        "every accepted link was unlinked"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strings_round_trip_or_are_invalid_argument_on_sqlite() {
    strings_round_trip_or_are_invalid_argument(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strings_round_trip_or_are_invalid_argument_on_postgres() {
    strings_round_trip_or_are_invalid_argument(Backend::Postgres).await;
}

/// Sends bytes as they are, as the body of a gRPC call.
#[derive(Debug, Clone, Default)]
struct RawBytes;

impl Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;

    fn encoder(&mut self) -> Self::Encoder {
        RawBytes
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawBytes
    }
}

impl Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

async fn call_raw(channel: Channel, method: Rpc, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = format!("/customermapping.v1.CustomerMapping/{}", method.name());
    let path = path.parse().expect("a valid path");
    if method != Rpc::Watch {
        return grpc
            .unary(Request::new(body), path, RawBytes)
            .await
            .map(tonic::Response::into_inner);
    }
    // A stream that starts goes on: its first response is the answer.
    let mut stream = grpc
        .server_streaming(Request::new(body), path, RawBytes)
        .await?
        .into_inner();
    let first = tokio::time::timeout(std::time::Duration::from_secs(30), stream.message()).await;
    match first.expect("a Watch answers within 30 s") {
        Ok(message) => Ok(message.expect("a response before the stream ends")),
        Err(status) => Err(status),
    }
}

/// A field-1 string whose bytes are `bytes`, UTF-8 or not.
fn string_field(bytes: &[u8]) -> Vec<u8> {
    let mut message = vec![0x0a, u8::try_from(bytes.len()).expect("short")];
    message.extend_from_slice(bytes);
    message
}

#[test]
fn decode_and_validate_never_panics() {
    let method = prop::sample::select(Rpc::ALL.to_vec());
    let bytes = prop_oneof![
        vec(any::<u8>(), 0..256),
        // Well-formed tags with arbitrary contents get further.
        (1u8..=2, vec(any::<u8>(), 0..64)).prop_map(|(field, body)| {
            let mut m = vec![field << 3 | 2, u8::try_from(body.len()).expect("short")];
            m.extend(body);
            m
        }),
    ];
    runner(20_000)
        .run(&(method, bytes), |(method, bytes)| {
            if let Err(status) = decode_and_validate(method, &bytes) {
                prop_assert_eq!(status.code(), Code::InvalidArgument, "{:?}", status);
            }
            Ok(())
        })
        .expect("the property holds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_is_invalid_argument_in_process_and_over_the_wire() {
    let app = spawn_app(Backend::Sqlite).await;
    let channel = helpers::channel(app.addr).await;
    for bytes in [&b"\xff\xfe"[..], b"user\xc3", b"\xed\xa0\x80"] {
        let body = string_field(bytes);
        for method in Rpc::ALL {
            let err = decode_and_validate(method, &body).expect_err("not UTF-8");
            assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
            let err = call_raw(channel.clone(), method, body.clone())
                .await
                .expect_err("not UTF-8");
            assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        }
    }
    app.link("user-1", "cus_1").await.expect("still serving");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_request_bytes_over_the_wire_never_get_internal() {
    let app = spawn_app(Backend::Sqlite).await;
    let channel = helpers::channel(app.addr).await;
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        runner(256)
            .run(
                &(
                    prop::sample::select(Rpc::ALL.to_vec()),
                    vec(any::<u8>(), 0..128),
                ),
                |(method, body)| {
                    let answer = handle.block_on(call_raw(channel.clone(), method, body));
                    if let Err(status) = answer {
                        prop_assert!(
                            matches!(
                                status.code(),
                                Code::InvalidArgument | Code::NotFound | Code::AlreadyExists
                            ),
                            "{:?}",
                            status
                        );
                    }
                    Ok(())
                },
            )
            .expect("the property holds");
    });
    app.link("user-1", "cus_1").await.expect("still serving");
    app.stop().await;
}
