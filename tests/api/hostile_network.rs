//! Raw bytes on the port: garbage, HTTP/1, truncated and malformed HTTP/2
//! frames, and slow-loris connections are closed, and never stop the server
//! from serving others.

use crate::helpers;

use std::time::Duration;

use helpers::{
    Backend, TestApp,
    raw::{EMPTY_SETTINGS, PREFACE, closed_by_server},
    tls::{Security, spawn_secure},
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::{io::AsyncWriteExt, net::TcpStream};

async fn serves(app: &TestApp, n: u32) {
    app.link(&format!("user-{n}"), &format!("cus_{n}"))
        .await
        .expect("the server still serves");
}

fn payloads() -> Vec<(&'static str, Vec<u8>)> {
    let mut rng = StdRng::seed_from_u64(7);
    let random: Vec<u8> = (0..4096).map(|_| rng.random()).collect();
    let frame = |length: u32, kind: u8, flags: u8, stream: u32| {
        let mut f = length.to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f
    };
    vec![
        ("random bytes", random.clone()),
        ("HTTP/1.1", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("half a preface", PREFACE[..10].to_vec()),
        ("a preface then random bytes", [PREFACE, &random].concat()),
        (
            "a truncated frame header",
            [PREFACE, EMPTY_SETTINGS, &[0, 0, 5, 1]].concat(),
        ),
        (
            "HEADERS claiming 16 MB",
            [PREFACE, EMPTY_SETTINGS, &frame(0xff_ffff, 1, 4, 1), b"abc"].concat(),
        ),
        (
            "DATA on an unopened stream",
            [PREFACE, EMPTY_SETTINGS, &frame(4, 0, 1, 1), b"abcd"].concat(),
        ),
        (
            "HEADERS with a garbage header block",
            [PREFACE, EMPTY_SETTINGS, &frame(16, 1, 5, 1), &random[..16]].concat(),
        ),
        (
            "SETTINGS of a bad length",
            [PREFACE, &frame(5, 4, 0, 0), b"12345"].concat(),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_malformed_frames_are_closed_and_others_are_served() {
    let app = helpers::spawn_app(Backend::Sqlite).await;
    for (n, (what, bytes)) in (0u32..).zip(payloads()) {
        let mut tcp = TcpStream::connect(app.addr).await.expect("connects");
        // The server may close before reading everything.
        let _ = tcp.write_all(&bytes).await;
        let _ = tcp.shutdown().await;
        closed_by_server(&mut tcp, Duration::from_secs(10)).await;
        serves(&app, n).await;
        eprintln!("closed and still serving after: {what}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_connections_are_cut_and_do_not_starve_others() {
    let app = helpers::spawn_app_with(Backend::Sqlite, |s| {
        s.limits.handshake_timeout = Duration::from_millis(500);
    })
    .await;
    // 100 connections that send a byte of the preface and then dawdle.
    let mut slow = Vec::new();
    for _ in 0..100 {
        let mut tcp = TcpStream::connect(app.addr).await.expect("connects");
        tcp.write_all(&PREFACE[..1]).await.expect("one byte");
        slow.push(tcp);
    }
    for n in 0..20 {
        serves(&app, n).await;
    }
    for tcp in &mut slow {
        closed_by_server(tcp, Duration::from_secs(10)).await;
    }
    serves(&app, 100).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_that_never_comes_is_cut() {
    let app = spawn_secure(Security {
        adjust: &|s| s.limits.handshake_timeout = Duration::from_millis(500),
        ..Security::default()
    })
    .await;
    let mut silent = TcpStream::connect(app.addr).await.expect("connects");
    let mut garbage = TcpStream::connect(app.addr).await.expect("connects");
    garbage
        .write_all(b"\x16\x03\x01\xff\xffnot really TLS")
        .await
        .expect("write");
    closed_by_server(&mut garbage, Duration::from_secs(10)).await;
    closed_by_server(&mut silent, Duration::from_secs(10)).await;
    let mut client = app.client(None).await.expect("TLS still accepted");
    client
        .link(customer_mapping::proto::LinkRequest {
            user_id: "user-1".into(),
            stripe_customer_id: "cus_1".into(),
            ..Default::default()
        })
        .await
        .expect("Link over TLS");
    app.stop().await;
}
