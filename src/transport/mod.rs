//! Accepting connections before tonic sees them: a bounded number of them,
//! each given a bounded time to finish its TLS handshake (when TLS is on) and
//! send the HTTP/2 preface. A peer that dribbles bytes (slow loris), sends
//! garbage or speaks HTTP/1 is closed here and costs nothing more.

mod conn;
pub mod tls;

use std::{future::Future, io, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_stream::wrappers::ReceiverStream;

pub use conn::Conn;

use crate::telemetry::metrics;

/// How long to wait before accepting again after `accept` failed (out of
/// file descriptors, typically), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Bounds on connections, from `LimitSettings`.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
}

/// The stream of ready connections tonic serves. `handshake` turns a TCP
/// connection into the stream to speak HTTP/2 over (TLS or not). Accepting
/// stops when tonic drops the stream (at shutdown), which closes the
/// listener.
pub fn incoming<S, F, Fut>(
    listener: TcpListener,
    limits: ConnectionLimits,
    handshake: F,
) -> ReceiverStream<io::Result<Conn<S>>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<S>> + Send + 'static,
{
    let (ready, stream) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = ready.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                metrics::record_connection_refused("too_many_connections");
                tracing::debug!(%peer, "connection limit reached; closing the new connection");
                continue;
            };
            // Small request/reply messages: don't let Nagle hold them back.
            let _ = tcp.set_nodelay(true);
            let setup = handshake(tcp);
            let ready = ready.clone();
            tokio::spawn(async move {
                let setup = async { Conn::after_preface(setup.await?, slot).await };
                match tokio::time::timeout(limits.handshake_timeout, setup).await {
                    Ok(Ok(conn)) => {
                        let _ = ready.send(Ok(conn)).await;
                    }
                    Ok(Err(err)) => {
                        metrics::record_connection_refused("bad_handshake");
                        tracing::debug!(%peer, error = %err, "connection closed during set-up");
                    }
                    Err(_) => {
                        metrics::record_connection_refused("handshake_timeout");
                        tracing::debug!(%peer, "connection set-up timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(stream)
}
