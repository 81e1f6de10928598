//! Raw bytes on a server's port: what an HTTP/2 client sends first, and
//! waiting for the server to hang up.

use std::time::Duration;

use tokio::{io::AsyncReadExt, net::TcpStream};

/// What every HTTP/2 client sends first (RFC 9113, section 3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
pub const EMPTY_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// Reads whatever the server sends until it closes the connection; fails
/// the test if that takes longer than `within`.
pub async fn closed_by_server(tcp: &mut TcpStream, within: Duration) {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server closes the connection");
}
