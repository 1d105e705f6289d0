//! The one HTTP layer under the live stream (unix socket, TCP) and `/metrics`, `/healthz`,
//! `/readyz`: one accept loop, whatever the listener.
//!
//! What it guards against, because any local user can connect (issue: hostile input):
//! - too many connections: at most [`Limits::max_connections`] per listener; the excess is
//!   answered `503` and closed (as many again get the 503 written, their request read
//!   and dropped within a second, so that the close is no reset; beyond those, the 503
//!   is written if it fits and the connection closed at once);
//! - a client that never finishes its request head (slowloris) or sits idle between
//!   requests: hyper's header read timeout closes it;
//! - a client that stops reading: a write that makes no progress for
//!   [`Limits::write_stall`] ends the connection (the stream's own queue bounds memory);
//! - `accept` failing (EMFILE when the descriptors run out): back off, say it once, say
//!   when it works again, instead of spinning on the error at 100 % CPU;
//! - shutdown: stop accepting, let every connection finish its response (a following
//!   stream ends on its own when the hub closes), give up after [`Limits::grace`].
use std::{
    convert::Infallible,
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::{Semaphore, watch},
    time::{Instant, Sleep},
};

/// Every response body the layer serves.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A request handler: the stream or the metrics.
pub type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync,
>;

/// What one listener allows.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// The whole request head must arrive within this, and an idle keep-alive connection
    /// is closed after it.
    pub header_read_timeout: Duration,
    /// A response write that makes no progress for this long ends the connection.
    pub write_stall: Duration,
    /// At shutdown, how long connections get to finish.
    pub grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            header_read_timeout: Duration::from_secs(10),
            write_stall: Duration::from_secs(60),
            grace: Duration::from_secs(2),
        }
    }
}

/// Answered, without reading the request, to a connection over the limit.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 38\r\nconnection: close\r\n\r\ntoo many connections; try again later\n";

/// A listening socket the layer can accept on.
pub trait Listen: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Io>>;
    /// Writes what fits of `msg` without waiting (the 503 to a connection over the limit).
    fn try_write(io: &Self::Io, msg: &[u8]);
}

impl Listen for TcpListener {
    type Io = TcpStream;
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<TcpStream>> {
        TcpListener::poll_accept(self, cx).map_ok(|(s, _)| s)
    }
    fn try_write(io: &TcpStream, msg: &[u8]) {
        let _ = io.try_write(msg);
    }
}

impl Listen for UnixListener {
    type Io = UnixStream;
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<UnixStream>> {
        UnixListener::poll_accept(self, cx).map_ok(|(s, _)| s)
    }
    fn try_write(io: &UnixStream, msg: &[u8]) {
        let _ = io.try_write(msg);
    }
}

/// Errors of `accept` that concern one connection only (it went away before it was taken):
/// take the next one at once.
fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || e.raw_os_error() == Some(libc::EPROTO)
}

const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Serves `listener` until `shutdown` says true (or its sender goes away), then lets the
/// connections finish for up to `limits.grace`. `name` names the listener in diagnostics.
pub async fn serve<L: Listen>(
    mut listener: L,
    name: String,
    limits: Limits,
    handler: Handler,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Refusals answered properly (503, then the request read and dropped, so that the
    // close is not a reset that hides the 503); beyond these, a best-effort write and close.
    let refusals = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Connections watch this to shut down gracefully.
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut backoff = BACKOFF_MIN;
    let mut failing = false;
    let mut refusing = false;
    loop {
        let accepted = tokio::select! {
            r = std::future::poll_fn(|cx| listener.poll_accept(cx)) => r,
            () = stopping(&mut shutdown) => break,
        };
        match accepted {
            Ok(io) => {
                if failing {
                    tracing::info!(listener = %name, "accepting connections again");
                    failing = false;
                }
                backoff = BACKOFF_MIN;
                match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        refusing = false;
                        let (handler, closing) = (handler.clone(), closing_rx.clone());
                        tokio::spawn(async move {
                            connection(io, limits, handler, closing).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        if !refusing {
                            tracing::warn!(
                                listener = %name,
                                limit = limits.max_connections,
                                "connection limit reached; refusing new connections (503) until some close"
                            );
                            refusing = true;
                        }
                        match refusals.clone().try_acquire_owned() {
                            Ok(permit) => {
                                tokio::spawn(async move {
                                    refuse(io).await;
                                    drop(permit);
                                });
                            }
                            Err(_) => L::try_write(&io, BUSY),
                        }
                    }
                }
            }
            Err(e) if per_connection(&e) => {}
            Err(e) => {
                if !failing {
                    tracing::warn!(
                        listener = %name,
                        error = %e,
                        "accept failed; backing off (said once until it works again)"
                    );
                    failing = true;
                }
                // Sleep, but leave at once for a shutdown.
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stopping(&mut shutdown) => break,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    drop(listener);
    let _ = closing_tx.send(true);
    // Every permit back: every connection has ended.
    let all = u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(limits.grace, permits.acquire_many(all)).await;
}

/// Answers 503 to a connection over the limit, within a second at most.
async fn refuse<I: AsyncRead + AsyncWrite + Unpin>(mut io: I) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        io.write_all(BUSY).await?;
        io.shutdown().await?;
        let mut sink = [0u8; 1024];
        while io.read(&mut sink).await? > 0 {}
        Ok::<_, io::Error>(())
    })
    .await;
}

/// Completes when `shutdown` says true; never, if its sender is gone without saying it.
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    if shutdown.wait_for(|&s| s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn connection<I>(io: I, limits: Limits, handler: Handler, mut closing: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(handler(req).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(64 * 1024);
    let conn = builder.serve_connection(TokioIo::new(Stalls::new(io, limits.write_stall)), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = stopping(&mut closing) => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(limits.grace, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTP connection ended");
    }
}

/// An I/O whose writes fail with `TimedOut` once they made no progress for a while: a
/// client that stops reading holds its connection (and a descriptor) only that long.
struct Stalls<I> {
    io: I,
    limit: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<I> Stalls<I> {
    fn new(io: I, limit: Duration) -> Self {
        Self {
            io,
            limit,
            stalled: None,
        }
    }

    /// After a write attempt: progress clears the clock, waiting starts (or checks) it.
    fn check<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + limit)));
        ready!(sleep.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client read nothing for too long",
        )))
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Stalls<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Stalls<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.check(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.check(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.check(cx, r)
    }
}

/// A plain response.
pub fn text(status: u16, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    use http_body_util::BodyExt;
    let mut r = Response::new(http_body_util::Full::new(body.into()).boxed_unsync());
    *r.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}
