//! A TCP proxy that cuts a connection the moment a client sends given
//! bytes: after delivering them and letting the database answer (the
//! statement ran, its answer is lost) or without delivering them (it never
//! ran). Unlike the silent proxy, the client learns at once: the connection
//! closes, as when a connection dies right after a statement was sent.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::AbortHandle,
};

/// PostgreSQL's ReadyForQuery message: the statement's transaction ended.
const READY_FOR_QUERY: &[u8] = b"Z\0\0\0\x05";

type Trigger = Arc<Mutex<Option<(&'static [u8], bool)>>>;

pub struct CutProxy {
    addr: SocketAddr,
    trigger: Trigger,
    accept_loop: AbortHandle,
}

impl CutProxy {
    /// Listens on an ephemeral loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
        let addr = listener.local_addr().expect("proxy address");
        let trigger: Trigger = Arc::default();
        let accept_loop = tokio::spawn({
            let trigger = trigger.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    tokio::spawn(serve(client, upstream, trigger.clone()));
                }
            }
        })
        .abort_handle();
        Self {
            addr,
            trigger,
            accept_loop,
        }
    }

    /// The next client chunk holding `bytes` cuts its connection; with
    /// `deliver`, only after the database answered it.
    pub fn cut_when_client_sends(&self, bytes: &'static [u8], deliver: bool) {
        *self.trigger.lock().expect("trigger") = Some((bytes, deliver));
    }

    /// Whether the trigger fired.
    pub fn fired(&self) -> bool {
        self.trigger.lock().expect("trigger").is_none()
    }

    /// `url` with its host and port replaced by the proxy's, in plaintext
    /// (so that the proxy can see what goes by).
    pub fn through(&self, url: &str) -> String {
        let mut url = url::Url::parse(url).expect("a database URL");
        url.set_ip_host(self.addr.ip())
            .expect("the URL takes a host");
        url.set_port(Some(self.addr.port()))
            .expect("the URL takes a port");
        url.query_pairs_mut().append_pair("sslmode", "disable");
        url.to_string()
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

async fn serve(client: TcpStream, upstream: SocketAddr, trigger: Trigger) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // Set once the trigger fired with delivery: the answer is swallowed and
    // reported when complete.
    let answered: Arc<Mutex<Option<oneshot::Sender<()>>>> = Arc::default();
    let to_client = tokio::spawn({
        let answered = answered.clone();
        async move {
            let mut buffer = vec![0u8; 16 * 1024];
            loop {
                let n = match server_read.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let chunk = &buffer[..n];
                // None: forward. Some(done): swallowed; done once answered.
                let swallowed = {
                    let mut cutting = answered.lock().expect("answered");
                    cutting.take().map(|done| {
                        if chunk
                            .windows(READY_FOR_QUERY.len())
                            .any(|w| w == READY_FOR_QUERY)
                        {
                            let _ = done.send(());
                            true
                        } else {
                            *cutting = Some(done);
                            false
                        }
                    })
                };
                match swallowed {
                    Some(true) => return,
                    Some(false) => continue,
                    None => {}
                }
                if client_write.write_all(chunk).await.is_err() {
                    return;
                }
            }
        }
    });
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match client_read.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buffer[..n];
        let fired = {
            let mut trigger = trigger.lock().expect("trigger");
            match *trigger {
                Some((bytes, deliver)) if chunk.windows(bytes.len()).any(|w| w == bytes) => {
                    *trigger = None;
                    Some(deliver)
                }
                _ => None,
            }
        };
        match fired {
            Some(true) => {
                let (done, answer) = oneshot::channel();
                *answered.lock().expect("answered") = Some(done);
                if server_write.write_all(chunk).await.is_ok() {
                    let _ = answer.await;
                }
                break;
            }
            Some(false) => break,
            None => {
                if server_write.write_all(chunk).await.is_err() {
                    break;
                }
            }
        }
    }
    // Both directions end: both sockets close.
    to_client.abort();
}
