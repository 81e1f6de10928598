//! A TCP proxy a test can cut and restore, to make a real database
//! unreachable without touching the database server.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

pub struct Proxy {
    addr: SocketAddr,
    open: watch::Sender<bool>,
    delay_ms: Arc<AtomicU64>,
    accept_loop: JoinHandle<()>,
}

impl Proxy {
    /// Listens on an ephemeral loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
        let addr = listener.local_addr().expect("proxy address");
        let (open, _) = watch::channel(true);
        let state = open.clone();
        let delay_ms = Arc::new(AtomicU64::new(0));
        let delay = delay_ms.clone();
        let accept_loop = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                // While cut, accept and close at once: the peer sees a reset
                // connection, as from a database that went away.
                if !*state.borrow() {
                    continue;
                }
                let mut open = state.subscribe();
                let delay = delay.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::select! {
                        () = pump(client_read, server_write, delay.clone()) => {}
                        () = pump(server_read, client_write, delay) => {}
                        _ = open.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Self {
            addr,
            open,
            delay_ms,
            accept_loop,
        }
    }

    /// Holds every chunk of data, both ways, for `delay` before passing it
    /// on: a database that answers slowly.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every proxied connection and refuses new ones.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

/// Copies one direction until either side closes, delaying each chunk.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    delay_ms: Arc<AtomicU64>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let delay = delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// The socket address of a URL's host and port.
pub async fn upstream_of(url: &str) -> SocketAddr {
    let url = url::Url::parse(url).expect("a database URL");
    let host = url.host_str().expect("the URL names a host").to_owned();
    let port = url.port().unwrap_or(5432);
    tokio::net::lookup_host((host.as_str(), port))
        .await
        .expect("the database host resolves")
        .next()
        .expect("the database host has an address")
}

/// `url` with its host and port replaced by the proxy's.
pub fn through(url: &str, proxy: &Proxy) -> String {
    let mut url = url::Url::parse(url).expect("a database URL");
    url.set_ip_host(proxy.addr().ip())
        .expect("the URL takes a host");
    url.set_port(Some(proxy.addr().port()))
        .expect("the URL takes a port");
    url.to_string()
}
