//! The signals that stop the process.

use std::future::Future;

/// Listens for SIGTERM (Kubernetes) and SIGINT (Ctrl-C) from this call on;
/// the future resolves on the first of them.
///
/// The listeners are installed here, not when the future is first polled:
/// the server is built (and answers health) before it waits for a signal,
/// and a signal in between would otherwise take the default action and
/// kill the process instead of draining it.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    let (sigterm, sigint) = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let received =
                |name: &'static str, listener: std::io::Result<tokio::signal::unix::Signal>| async move {
                    match listener {
                        Ok(mut listener) => {
                            listener.recv().await;
                            name
                        }
                        Err(err) => {
                            tracing::error!(error = %err, signal = name, "cannot listen for the signal");
                            std::future::pending().await
                        }
                    }
                };
            let name = tokio::select! {
                name = received("SIGTERM", sigterm) => name,
                name = received("SIGINT", sigint) => name,
            };
            tracing::info!(signal = name, "{name} received, shutting down");
        }
        #[cfg(not(unix))]
        {
            if let Err(err) = tokio::signal::ctrl_c().await {
                tracing::error!(error = %err, "cannot listen for Ctrl-C");
                std::future::pending::<()>().await;
            }
            tracing::info!("Ctrl-C received, shutting down");
        }
    }
}
