//! The accept loop: serves the warp filter tree over HTTP/1.1 with hyper, with
//! the protections warp's own server lacks.
//!
//! - `http.header_read_timeout_ms`: a client that does not finish its request
//!   head in time is disconnected (slowloris);
//! - `http.max_header_bytes`: a larger request head gets 431, and so does a
//!   request with more than [`MAX_HEADERS`] headers;
//! - the first request of a connection is read here: a stream request is
//!   served straight on the socket ([`direct`], no hyper buffers kept for the
//!   stream's life), anything else goes to hyper;
//! - every connection carries a [`Kill`] switch in its request extensions: the
//!   registry uses it to close a slow client's socket even while nothing can be
//!   written to it;
//! - shutdown: stop accepting, let streams end themselves (they watch the same
//!   token and send a `retry:` hint), wait up to `http.shutdown_grace_ms`, then
//!   cut what is left.

use std::net::SocketAddr;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warp::Filter;

use super::direct::{self, FirstRequest};
use crate::registry::Kill;

/// Most request headers accepted; more get 431.
pub(crate) const MAX_HEADERS: usize = 64;

/// Limits applied to every HTTP connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ServerLimits {
    /// Time allowed for a complete request head.
    pub(crate) header_read_timeout: Duration,
    /// Largest request head, bytes.
    pub(crate) max_header_bytes: usize,
    /// How long open connections may take to finish on shutdown.
    pub(crate) shutdown_grace: Duration,
}

/// The filter tree a node serves (warp's bounds for a served filter).
pub(crate) trait Routes:
    Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static
{
}

impl<F> Routes for F where
    F: Filter<Extract = (warp::reply::Response,), Error = warp::Rejection>
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// Serves `routes` on `listener` until `shutdown` is cancelled, then drains.
pub(crate) async fn serve<F: Routes>(
    listener: TcpListener,
    routes: F,
    limits: ServerLimits,
    shutdown: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let connections = TaskTracker::new();
    // Cancelled when the grace period is over: ends every connection left.
    let cut = CancellationToken::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .max_headers(MAX_HEADERS)
        .keep_alive(true);

    loop {
        let (socket, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = socket.set_nodelay(true);
        connections.spawn(serve_connection(
            socket,
            peer,
            routes.clone(),
            builder.clone(),
            graceful.watcher(),
            limits,
            cut.clone(),
        ));
    }

    drop(listener);
    shut_down(graceful, connections, limits.shutdown_grace, cut).await;
}

/// Serves one accepted connection: a stream request straight on the socket,
/// anything else through hyper, until it ends, is killed, or `cut`.
async fn serve_connection<F: Routes>(
    mut socket: TcpStream,
    peer: SocketAddr,
    routes: F,
    builder: http1::Builder,
    watcher: Watcher,
    limits: ServerLimits,
    cut: CancellationToken,
) {
    let kill = Kill::new();
    let service = {
        let kill = kill.clone();
        let routes = warp::service(routes.clone());
        hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(kill.clone());
            let mut routes = routes.clone();
            async move { tower_service::Service::call(&mut routes, request).await }
        })
    };
    let first = direct::read_first_request(
        &mut socket,
        limits.max_header_bytes,
        limits.header_read_timeout,
    )
    .await;
    let prefix = match first {
        FirstRequest::Gone => return,
        FirstRequest::Stream(request) => {
            direct::serve_stream(socket, request, warp::service(routes), kill, cut).await;
            return;
        }
        FirstRequest::Other(prefix) => prefix,
    };
    // Boxed: hyper's connection state is large, and a stream's task
    // (the common, long-lived case) should not carry its size.
    Box::pin(async move {
        let io = TokioIo::new(direct::Rewind::new(prefix, socket));
        let connection = watcher.watch(builder.serve_connection(io, service));
        tokio::select! {
            _ = cut.cancelled() => {}
            result = connection => {
                if let Err(err) = result {
                    tracing::debug!(%peer, error = %err, "connection ended with an error");
                }
            }
            _ = kill.killed() => {
                tracing::debug!(%peer, reason = ?kill.reason(), "connection killed");
            }
        }
    })
    .await;
}

/// After the listener closed: waits for open connections to finish, at most
/// `grace`, then cuts what is left.
async fn shut_down(
    graceful: GracefulShutdown,
    connections: TaskTracker,
    grace: Duration,
    cut: CancellationToken,
) {
    connections.close();
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                open = connections.len(),
                "shutdown grace period over; cutting remaining connections"
            );
            cut.cancel();
        }
    }
    connections.wait().await;
}
