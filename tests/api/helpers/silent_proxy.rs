//! A TCP proxy that can go **silent**: bytes are accepted and never
//! answered, with no RST and no FIN, which is what a hung PostgreSQL, a
//! network partition or a failed-over primary whose address vanished look
//! like to a client. After [`SilentProxy::heal`] new connections reach the
//! upstream again (possibly a new one, see [`SilentProxy::retarget`]), while
//! every connection opened before the silence stays silent forever.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::{AbortHandle, JoinSet},
};

#[derive(Debug, Clone, Copy)]
struct State {
    upstream: SocketAddr,
    /// How many silences began so far. A connection accepted during epoch
    /// `e` is silenced for good once this passes `e`.
    silences: u64,
    /// True between `silence` and `heal`: new connections are swallowed too.
    silent: bool,
    /// Go silent when a client sends these bytes; deliver them first or not.
    trigger: Option<(&'static [u8], bool)>,
    /// Whether the chunk that fired the trigger was delivered.
    trigger_delivers: bool,
}

pub struct SilentProxy {
    addr: SocketAddr,
    state: watch::Sender<State>,
    swallowed: Arc<AtomicU64>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
    accept_loop: AbortHandle,
}

impl SilentProxy {
    /// Listens on an ephemeral loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
        let addr = listener.local_addr().expect("proxy address");
        let (state, _) = watch::channel(State {
            upstream,
            silences: 0,
            silent: false,
            trigger: None,
            trigger_delivers: false,
        });
        let tasks: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let swallowed = Arc::new(AtomicU64::new(0));
        let accept_loop = tokio::spawn({
            let state = state.clone();
            let tasks = tasks.clone();
            let swallowed = swallowed.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let task = tokio::spawn(serve(client, state.clone(), swallowed.clone()));
                    tasks
                        .lock()
                        .expect("proxy task list")
                        .push(task.abort_handle());
                }
            }
        })
        .abort_handle();
        Self {
            addr,
            state,
            swallowed,
            tasks,
            accept_loop,
        }
    }

    /// Bytes from clients swallowed so far: a call's database work has
    /// begun once this grows.
    pub fn swallowed_from_clients(&self) -> u64 {
        self.swallowed.load(Ordering::Relaxed)
    }

    /// From now on nothing is answered: every open connection swallows what
    /// it gets both ways, and new connections are accepted and swallowed.
    pub fn silence(&self) {
        self.state.send_modify(|s| {
            s.silences += 1;
            s.silent = true;
        });
    }

    /// Goes silent the moment a client sends a chunk holding `bytes`: a
    /// statement caught on its way, waiting for an answer that never
    /// comes. With `deliver`, the chunk reaches the database first (the
    /// statement runs; its answer is lost); without, it is swallowed too.
    pub fn silence_when_client_sends(&self, bytes: &'static [u8], deliver: bool) {
        self.state
            .send_modify(|s| s.trigger = Some((bytes, deliver)));
    }

    /// New connections reach the upstream again; old ones stay silent.
    pub fn heal(&self) {
        self.state.send_modify(|s| s.silent = false);
    }

    /// Where new connections go from now on (a promoted standby).
    pub fn retarget(&self, upstream: SocketAddr) {
        self.state.send_modify(|s| s.upstream = upstream);
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn through(&self, url: &str) -> String {
        let mut url = url::Url::parse(url).expect("a database URL");
        url.set_ip_host(self.addr.ip())
            .expect("the URL takes a host");
        url.set_port(Some(self.addr.port()))
            .expect("the URL takes a port");
        url.to_string()
    }
}

impl Drop for SilentProxy {
    fn drop(&mut self) {
        self.accept_loop.abort();
        for task in self.tasks.lock().expect("proxy task list").drain(..) {
            task.abort();
        }
    }
}

/// One client connection: forwarded while its epoch lasts, swallowed after.
async fn serve(client: TcpStream, state: watch::Sender<State>, swallowed: Arc<AtomicU64>) {
    let accepted = *state.borrow();
    let epoch = accepted.silences;
    if accepted.silent {
        swallow(client, swallowed).await;
        return;
    }
    let Ok(server) = TcpStream::connect(accepted.upstream).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let mut pumps = JoinSet::new();
    pumps.spawn(pump(
        client_read,
        server_write,
        state.clone(),
        epoch,
        Some(swallowed),
    ));
    pumps.spawn(pump(server_read, client_write, state, epoch, None));
    // Both directions keep reading (and discarding, once silent) until
    // either side closes; aborting this task (proxy dropped) aborts both.
    while pumps.join_next().await.is_some() {}
}

/// Copies one direction until either side closes; once a silence begins
/// after `epoch`, reads and discards forever, keeping both sockets open.
/// The client-to-server direction carries the count of swallowed bytes,
/// and only it may fire the trigger.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    state: watch::Sender<State>,
    epoch: u64,
    swallowed: Option<Arc<AtomicU64>>,
) {
    let from_client = swallowed.is_some();
    let mut buffer = vec![0u8; 16 * 1024];
    let mut silenced = false;
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) if silenced => {
                // The other side hung up: stay open, say nothing.
                std::future::pending::<()>().await;
                return;
            }
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        silenced = silenced || state.borrow().silences > epoch;
        if silenced {
            if let Some(swallowed) = &swallowed {
                swallowed.fetch_add(n as u64, Ordering::Relaxed);
            }
            continue;
        }
        let chunk = &buffer[..n];
        let fired = from_client
            && state.send_if_modified(|s| match s.trigger {
                Some((bytes, deliver)) if chunk.windows(bytes.len()).any(|w| w == bytes) => {
                    s.trigger = None;
                    // Delivered chunks go out below, after the silence
                    // began: nothing the database says reaches us.
                    s.trigger_delivers = deliver;
                    s.silences += 1;
                    s.silent = true;
                    true
                }
                _ => false,
            });
        if fired {
            silenced = true;
            if !state.borrow().trigger_delivers {
                continue;
            }
        }
        if to.write_all(chunk).await.is_err() {
            return;
        }
    }
}

/// Reads and discards until the proxy is dropped.
async fn swallow(mut client: TcpStream, swallowed: Arc<AtomicU64>) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        match client.read(&mut buffer).await {
            Ok(0) | Err(_) => std::future::pending::<()>().await,
            Ok(n) => {
                swallowed.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
}
