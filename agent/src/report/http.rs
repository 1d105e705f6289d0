//! The one HTTP layer under the live stream (unix socket, TCP) and `/metrics`, `/healthz`,
//! `/readyz`: one accept loop, whatever the listener.
//!
//! What it guards against, because any local user can connect (issue: hostile input):
//! - too many connections: at most [`Limits::max_connections`] per listener. At the limit a
//!   newcomer takes the place of the connection that has waited longest for a request
//!   head (never sent one, or idle since its last response): see [`Table`] for why. Only
//!   when every connection is inside a request is the newcomer answered `503` and closed
//!   (as many again get the 503 written, their request read and dropped within a
//!   second, so that the close is no reset; beyond those, the 503 is written if it fits
//!   and the connection closed at once);
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
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
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
    sync::{Notify, Semaphore, watch},
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
    /// Connections served at once. At the limit a newcomer evicts the connection idle the
    /// longest (waiting for a request head); if every one is inside a request, the
    /// newcomer is answered 503 and closed.
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
    let max = limits.max_connections.max(1);
    // Live connection tasks: the served ones plus those evicted but not yet gone (they
    // leave at their next poll). This, not the table, bounds the descriptors.
    let live = max + evicting(max);
    let permits = Arc::new(Semaphore::new(live));
    let table = Arc::new(Table::new(max));
    // Refusals answered properly (503, then the request read and dropped, so that the
    // close is not a reset that hides the 503); beyond these, a best-effort write and close.
    let refusals = Arc::new(Semaphore::new(max));
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
                let admitted = permits
                    .clone()
                    .try_acquire_owned()
                    .ok()
                    .and_then(|permit| Some((permit, table.admit()?)));
                match admitted {
                    Some((permit, entry)) => {
                        refusing = false;
                        let (handler, closing) = (handler.clone(), closing_rx.clone());
                        let table = table.clone();
                        tokio::spawn(async move {
                            connection(io, limits, handler, closing, &entry).await;
                            table.remove(&entry);
                            drop(permit);
                        });
                        // Single-threaded runtime: let the newcomer read its request head
                        // before the next accept, so that a burst of newcomers cannot evict
                        // it (as the idlest) before it had a chance to send its request.
                        tokio::task::yield_now().await;
                    }
                    None => {
                        if !refusing {
                            tracing::warn!(
                                listener = %name,
                                limit = limits.max_connections,
                                "connection limit reached and every connection inside a request; refusing new connections (503) until some finish"
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
    let all = u32::try_from(live).unwrap_or(u32::MAX);
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

async fn connection<I>(
    io: I,
    limits: Limits,
    handler: Handler,
    mut closing: watch::Receiver<bool>,
    entry: &Arc<Entry>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = entry.clone();
    let service = service_fn(move |req| {
        let handler = handler.clone();
        // Inside a request from its head until its response body is done (dropped by
        // hyper once written, or with the connection): not evictable meanwhile.
        let busy = Busy::new(state.clone());
        async move {
            let response = handler(req).await;
            Ok::<_, Infallible>(response.map(|body| Tracked { body, _busy: busy }))
        }
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
        () = entry.evict.notified() => {
            tracing::debug!("idle HTTP connection evicted for a newcomer");
            return;
        }
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

/// How many evicted connections may still be on their way out (holding a descriptor)
/// before newcomers are refused instead: a quarter of the limit.
fn evicting(max: usize) -> usize {
    (max / 4).max(1)
}

/// The connections of one listener, to choose whom a newcomer evicts at the limit.
///
/// Why evict rather than refuse: a limit that refuses newcomers hands the listener to
/// whoever holds it first. Any local user can open the limit's worth of connections
/// that never send a request (slowloris), and then every kubelet liveness probe meets a
/// 503 and a healthy agent is restarted (a storm measured 1 `/healthz` 200 in 598). The
/// holders cost the attacker nothing but a descriptor each; a probe sends its whole
/// request at once. So at the limit the connection that has waited longest for a
/// request head is closed and the newcomer takes its place, as nginx does with its
/// idle ("reusable") connections when it runs out of them. A holder now keeps its slot
/// only until `max` newer connections arrive, while a probe needs its slot for the
/// few milliseconds between its connect and its request, and is served. Connections
/// inside a request (a `follow` stream, a response body not yet handed to the socket)
/// are never evicted; only when all are is a newcomer refused. On the metrics listener
/// every response is a whole body handed over at once, so no client can keep its
/// connections inside a request: `/healthz` and `/readyz` are answered under any storm
/// of connections (the stream socket's `follow` clients can still fill theirs, and
/// those are then refused with 503, as before). Memory is one small entry per slot (a
/// linear scan of at most `max` to choose); descriptors stay below
/// `max + evicting(max)` served plus the refusals being drained.
///
/// Not chosen: a separate budget for `/healthz` needs the request read before
/// admission (the holders then sit in that budget instead); reserved slots for quick
/// requesters are still first-come, so the storm fills them too.
struct Table {
    max: usize,
    epoch: Instant,
    entries: Mutex<Vec<Arc<Entry>>>,
}

/// One served connection.
struct Entry {
    /// Requests in progress (a pipelined head may arrive while a body is still going).
    busy: AtomicUsize,
    /// When it last had no request in progress, in ns since [`Table::epoch`].
    idle_since_ns: AtomicU64,
    /// Told to close to make room.
    evict: Notify,
    epoch: Instant,
}

impl Entry {
    fn mark_idle(&self) {
        let ns = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.idle_since_ns.store(ns, Ordering::Relaxed);
    }
}

impl Table {
    fn new(max: usize) -> Self {
        Self {
            max,
            epoch: Instant::now(),
            entries: Mutex::new(Vec::with_capacity(max)),
        }
    }

    /// A place for a newcomer: a free one, or the one of the connection idle the longest
    /// (which is told to close). `None` when every connection is inside a request.
    fn admit(&self) -> Option<Arc<Entry>> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.max {
            let (at, _) = entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.busy.load(Ordering::Relaxed) == 0)
                .min_by_key(|(_, e)| e.idle_since_ns.load(Ordering::Relaxed))?;
            let evicted = entries.swap_remove(at);
            // A stored permit: it closes even if it is not waiting for this right now.
            evicted.evict.notify_one();
        }
        let entry = Arc::new(Entry {
            busy: AtomicUsize::new(0),
            idle_since_ns: AtomicU64::new(0),
            evict: Notify::new(),
            epoch: self.epoch,
        });
        entry.mark_idle();
        entries.push(entry.clone());
        Some(entry)
    }

    /// A connection ended (a no-op if it was evicted).
    fn remove(&self, entry: &Arc<Entry>) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = entries.iter().position(|e| Arc::ptr_eq(e, entry)) {
            entries.swap_remove(at);
        }
    }
}

/// A request in progress on a connection; when the last one is done, the connection is
/// idle from now.
struct Busy(Arc<Entry>);

impl Busy {
    fn new(entry: Arc<Entry>) -> Self {
        entry.busy.fetch_add(1, Ordering::Relaxed);
        Self(entry)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.mark_idle();
        }
    }
}

/// A response body that holds its connection's [`Busy`] until hyper drops it (written to
/// the end, or the connection gone). It forwards `size_hint` and `is_end_stream`: hyper
/// takes a body's exact size for `content-length`, and a body that hides it is sent
/// chunked (which `promtool check metrics` on a live scrape, and HTTP/1.0 clients, refuse).
struct Tracked {
    body: Body,
    _busy: Busy,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
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
