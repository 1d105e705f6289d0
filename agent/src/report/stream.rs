//! The live stream: every record, as NDJSON over HTTP, to any number of local clients.
//!
//! `GET /events?replay=N&follow=1&kind=cpu,memory&since=RFC3339` answers with the last N
//! records still held (`replay=all` for all of them), then, with `follow=1`, every new one
//! as it is made. Publishing never waits for a client: each client reads from a bounded
//! broadcast queue, and one that falls behind by more than the queue is cut off with a final
//! `{"kind":"agent","action":"cut_off","missed":N}` record. Replay and subscription are
//! taken under one lock, so a reconnecting client sees every record exactly once.
//!
//! Served through the one HTTP layer ([`super::http`]: connection limit, timeouts, accept
//! back-off, graceful shutdown). A following client that hangs up is noticed at once, even
//! when its filter matches nothing (hyper watches the connection for EOF while the response
//! is in flight). [`Hub::close`] ends every stream after the records already published (the
//! `stopped` record among them).
use std::{
    collections::VecDeque,
    fs::File,
    io::{Read as _, Seek as _, Write as _},
    os::{
        fd::AsRawFd,
        unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::{Request, Response, body::Frame};
use tokio::{
    net::{TcpListener, UnixListener},
    sync::{broadcast, watch},
};

use super::http::{self, Body, Handler, Limits};
use crate::record::{Record, now_rfc3339};

pub const DEFAULT_SOCKET: &str = "/run/hotplug-agent/events.sock";
/// Records kept for replay.
pub const DEFAULT_REPLAY: usize = 4096;
/// How far a client may fall behind before it is cut off.
pub const DEFAULT_CLIENT_QUEUE: usize = 8192;

/// One serialised record, shared by every client.
#[derive(Clone, Debug)]
pub struct Line {
    pub seq: u64,
    pub kind: Arc<str>,
    pub time: Arc<str>,
    /// `time` parsed, for `since`; `None` for a time that does not parse (kept by `since`:
    /// a record is never hidden for its own time being odd).
    pub at: Option<jiff::Timestamp>,
    pub json: Bytes,
}

struct Held {
    seq: u64,
    lines: VecDeque<Line>,
    bytes: usize,
}

pub struct Hub {
    held: Mutex<Held>,
    capacity: usize,
    tx: broadcast::Sender<Line>,
    /// True once the agent is stopping: servers stop accepting, streams end after what was
    /// published. Every server and stream holds a receiver, so `closed()` on the sender
    /// says when they are all gone.
    closing: watch::Sender<bool>,
}

/// How many held records a client asks for first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Replay {
    #[default]
    None,
    Last(usize),
    All,
}

/// What a client asks for, parsed from the query string.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    pub replay: Replay,
    /// Keep the connection open for new records; default on.
    pub follow: bool,
    /// Only these `kind`s (empty: all).
    pub kinds: Vec<String>,
    /// Only records made at or after this instant.
    pub since: Option<jiff::Timestamp>,
}

impl Default for Query {
    fn default() -> Self {
        Self {
            replay: Replay::None,
            follow: true,
            kinds: Vec::new(),
            since: None,
        }
    }
}

/// A query the stream does not understand: answered 400 with this text.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueryError {
    #[error("unknown parameter {0:?}; known: replay, follow, kind, since")]
    Unknown(String),
    #[error("replay={0:?}: expected a number of records or `all`")]
    Replay(String),
    #[error("follow={0:?}: expected 1/true/yes or 0/false/no")]
    Follow(String),
    #[error(
        "since={value:?}: expected an RFC 3339 time such as 2026-01-02T03:04:05.5Z or 2026-01-02T08:04:05+05:00 ({why})"
    )]
    Since { value: String, why: String },
}

impl Query {
    /// Parses `replay=N|all&follow=0|1&kind=K,K&since=RFC3339` (percent-encoded, `+` as
    /// space, as a form would send it).
    pub fn parse(query: &str) -> Result<Self, QueryError> {
        let mut q = Self::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "replay" => {
                    q.replay = match &*v {
                        "all" => Replay::All,
                        n => {
                            Replay::Last(n.parse().map_err(|_| QueryError::Replay(v.to_string()))?)
                        }
                    }
                }
                "follow" => {
                    q.follow = match &*v {
                        "1" | "true" | "yes" | "" => true,
                        "0" | "false" | "no" => false,
                        _ => return Err(QueryError::Follow(v.to_string())),
                    }
                }
                "kind" => q.kinds.extend(
                    v.split(',')
                        .map(str::trim)
                        .filter(|k| !k.is_empty())
                        .map(String::from),
                ),
                "since" => {
                    q.since = Some(v.trim().parse::<jiff::Timestamp>().map_err(|e| {
                        QueryError::Since {
                            value: v.to_string(),
                            why: e.to_string(),
                        }
                    })?)
                }
                _ => return Err(QueryError::Unknown(k.into_owned())),
            }
        }
        Ok(q)
    }

    fn replay(&self, held: usize) -> usize {
        match self.replay {
            Replay::All => held,
            Replay::Last(n) => n.min(held),
            Replay::None => 0,
        }
    }

    fn keeps(&self, line: &Line) -> bool {
        let kind_ok = self.kinds.is_empty() || self.kinds.iter().any(|k| **k == *line.kind);
        let time_ok = match (self.since, line.at) {
            (Some(since), Some(at)) => at >= since,
            _ => true,
        };
        kind_ok && time_ok
    }
}

impl Hub {
    pub fn new(replay: usize, client_queue: usize) -> Arc<Self> {
        let (tx, _) = broadcast::channel(client_queue.max(1));
        Arc::new(Self {
            held: Mutex::new(Held {
                seq: 0,
                lines: VecDeque::new(),
                bytes: 0,
            }),
            capacity: replay,
            tx,
            closing: watch::Sender::new(false),
        })
    }

    /// Serialises once, keeps it for replay, hands it to every client. Never blocks.
    pub fn publish(&self, record: &Record) {
        let (kind, time) = match record {
            Record::Event(e) => (e.kind.as_str(), e.time.as_str()),
            Record::Agent(a) => (a.kind.as_str(), a.time.as_str()),
            Record::Decision(d) => (d.kind.as_str(), d.time.as_str()),
        };
        let mut json = match serde_json::to_vec(record) {
            Ok(j) => j,
            Err(_) => return,
        };
        json.push(b'\n');
        let at = time.parse().ok();
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.seq += 1;
        let line = Line {
            seq: held.seq,
            kind: kind.into(),
            time: time.into(),
            at,
            json: json.into(),
        };
        held.bytes += line.json.len();
        held.lines.push_back(line.clone());
        while held.lines.len() > self.capacity {
            if let Some(old) = held.lines.pop_front() {
                held.bytes -= old.json.len();
            }
        }
        let _ = self.tx.send(line);
    }

    /// The held records a client asked for, and its subscription, taken atomically.
    pub fn subscribe(&self, query: &Query) -> (Vec<Line>, broadcast::Receiver<Line>) {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = query.replay(held.lines.len());
        let backlog = held
            .lines
            .iter()
            .skip(held.lines.len() - n)
            .filter(|l| query.keeps(l))
            .cloned()
            .collect();
        (backlog, self.tx.subscribe())
    }

    /// Bytes of serialised records held for replay.
    pub fn held_bytes(&self) -> usize {
        self.held.lock().map(|h| h.bytes).unwrap_or(0)
    }

    /// Following clients connected now.
    pub fn clients(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Stops the servers and ends every stream once it has sent what was published before.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// After [`Hub::close`]: waits (at most `limit`) until every server has let go of its
    /// socket and every stream has ended. True when they all did.
    pub async fn closed(&self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.closing.closed())
            .await
            .is_ok()
    }

    fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }
}

fn cut_off(missed: u64) -> Bytes {
    let rec = serde_json::json!({
        "v": crate::record::SCHEMA_VERSION,
        "time": now_rfc3339(),
        "kind": "agent",
        "action": "cut_off",
        "missed": missed,
        "message": "this client fell behind the live stream; reconnect with ?replay=all to catch up on what is still held",
    });
    Bytes::from(format!("{rec}\n"))
}

const USAGE: &str = "GET /events?replay=N|all&follow=0|1&kind=K,K&since=RFC3339\n";

/// One following client: its backlog, then every new record it keeps, until the hub
/// closes (after sending what was published before), it falls behind (a `cut_off`
/// record), or it hangs up (hyper drops the body).
struct Stream {
    backlog: VecDeque<Line>,
    rx: Option<broadcast::Receiver<Line>>,
    query: Query,
    closing: watch::Receiver<bool>,
}

impl Stream {
    async fn next(&mut self) -> Option<Bytes> {
        if let Some(line) = self.backlog.pop_front() {
            return Some(line.json);
        }
        let rx = self.rx.as_mut()?;
        loop {
            tokio::select! {
                // What was published before the hub closed goes out first.
                biased;
                r = rx.recv() => match r {
                    Ok(line) if self.query.keeps(&line) => return Some(line.json),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        self.rx = None;
                        return Some(cut_off(missed));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                r = self.closing.wait_for(|&c| c) => {
                    let _ = r;
                    self.rx = None;
                    return None;
                }
            }
        }
    }
}

fn respond(hub: &Hub, req: &Request<hyper::body::Incoming>) -> Response<Body> {
    if req.method() != hyper::Method::GET {
        return http::text(405, "text/plain", USAGE);
    }
    if req.uri().path() != "/events" {
        return http::text(404, "text/plain", USAGE);
    }
    let query = match Query::parse(req.uri().query().unwrap_or("")) {
        Ok(q) => q,
        Err(e) => return http::text(400, "text/plain", format!("{e}\n")),
    };
    let (backlog, rx) = hub.subscribe(&query);
    let state = Stream {
        backlog: backlog.into(),
        rx: query.follow.then_some(rx),
        query,
        closing: hub.closing(),
    };
    let frames = futures::stream::unfold(state, |mut s| async move {
        let data = s.next().await?;
        Some((Ok::<_, std::convert::Infallible>(Frame::data(data)), s))
    });
    let mut r = Response::new(StreamBody::new(frames).boxed_unsync());
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-ndjson"),
    );
    // One stream per connection, as before: the body ends with the connection.
    h.insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    r
}

fn handler(hub: Arc<Hub>) -> Handler {
    Arc::new(move |req| {
        let r = respond(&hub, &req);
        Box::pin(async move { r })
    })
}

/// Why the stream socket cannot be served. Nothing the agent did not create is removed.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(
        "{path} exists and is not a socket ({what}); refusing to replace it: move it away or choose another --stream-socket"
    )]
    NotASocket { path: PathBuf, what: &'static str },
    #[error(
        "{path} is served by another hotplug-agent (PID {pid}, which holds {lock}); stop it or give this one another --stream-socket"
    )]
    Held {
        path: PathBuf,
        lock: PathBuf,
        pid: String,
    },
    #[error(
        "{path}: something is listening on this socket although nobody holds {lock}; refusing to take it over"
    )]
    Live { path: PathBuf, lock: PathBuf },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The lock file next to the stream socket and the socket itself, both the agent's own
/// while this lives; both removed on drop (only if they are still the ones it made).
pub struct SocketGuard {
    path: PathBuf,
    lock_path: PathBuf,
    lock: File,
    socket_id: Option<(u64, u64)>,
}

fn lock_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".lock");
    p.into()
}

fn file_id(m: &std::fs::Metadata) -> (u64, u64) {
    (m.dev(), m.ino())
}

fn what(t: std::fs::FileType) -> &'static str {
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "not a socket"
    }
}

impl SocketGuard {
    /// Takes `<path>.lock` (flock, our PID inside), then makes `path` free to bind: absent,
    /// or a stale socket (nobody holds the lock, nothing listens) which is removed.
    fn take(path: &Path) -> Result<Self, SocketError> {
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| SocketError::Io { what, path, source }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        }
        let lock_path = lock_path(path);
        let lock = Self::lock(path, &lock_path)?;
        let guard = Self {
            path: path.to_path_buf(),
            lock_path,
            lock,
            socket_id: None,
        };
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("inspecting", path)(e)),
            Ok(m) if !m.file_type().is_socket() => {
                return Err(SocketError::NotASocket {
                    path: path.to_path_buf(),
                    what: what(m.file_type()),
                });
            }
            Ok(_) => {
                // A socket nobody holds the lock for: an agent that died, or something
                // else entirely. Only a socket that refuses connections is stale.
                match std::os::unix::net::UnixStream::connect(path) {
                    Ok(_) => {
                        return Err(SocketError::Live {
                            path: path.to_path_buf(),
                            lock: guard.lock_path.clone(),
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        tracing::info!(path = %path.display(), "replacing a stale stream socket");
                        std::fs::remove_file(path)
                            .map_err(io("removing the stale socket", path))?;
                    }
                    Err(e) => return Err(io("probing the existing socket", path)(e)),
                }
            }
        }
        Ok(guard)
    }

    fn lock(path: &Path, lock_path: &Path) -> Result<File, SocketError> {
        let io = |what: &'static str| {
            let path = lock_path.to_path_buf();
            move |source| SocketError::Io { what, path, source }
        };
        // The lock file can be unlinked by an agent that is just exiting between our open
        // and our flock: then we hold a lock on a file nobody else can find. Retry.
        for _ in 0..5 {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
                .open(lock_path)
                .map_err(io("opening the lock file"))?;
            let meta = file.metadata().map_err(io("inspecting the lock file"))?;
            if !meta.file_type().is_file() {
                return Err(SocketError::NotASocket {
                    path: lock_path.to_path_buf(),
                    what: what(meta.file_type()),
                });
            }
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    return Err(io("locking the lock file")(e));
                }
                let mut pid = String::new();
                let _ = std::io::Read::by_ref(&mut file)
                    .take(32)
                    .read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(SocketError::Held {
                    path: path.to_path_buf(),
                    lock: lock_path.to_path_buf(),
                    pid: if pid.is_empty() {
                        "unknown".into()
                    } else {
                        pid.into()
                    },
                });
            }
            match std::fs::symlink_metadata(lock_path) {
                Ok(now) if file_id(&now) == file_id(&meta) => {}
                _ => continue,
            }
            file.set_len(0).map_err(io("writing the lock file"))?;
            file.rewind().map_err(io("writing the lock file"))?;
            writeln!(file, "{}", std::process::id()).map_err(io("writing the lock file"))?;
            return Ok(file);
        }
        Err(io("locking the lock file")(std::io::Error::other(
            "it kept being replaced by another process",
        )))
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let ours = |p: &Path, id: Option<(u64, u64)>| {
            id.is_some() && std::fs::symlink_metadata(p).ok().map(|m| file_id(&m)) == id
        };
        if ours(&self.path, self.socket_id) {
            let _ = std::fs::remove_file(&self.path);
        }
        let lock_id = self.lock.metadata().ok().map(|m| file_id(&m));
        if ours(&self.lock_path, lock_id) {
            let _ = std::fs::remove_file(&self.lock_path);
        }
    }
}

/// Serves the stream on a unix socket (mode 0600: the records are the node's business),
/// with the default limits.
pub async fn serve_unix(
    hub: Arc<Hub>,
    path: &Path,
) -> Result<tokio::task::JoinHandle<()>, SocketError> {
    serve_unix_with(hub, path, Limits::default()).await
}

/// [`serve_unix`] with chosen limits. The socket and its lock file are removed when the
/// server ends (after [`Hub::close`]) or is dropped with the runtime.
pub async fn serve_unix_with(
    hub: Arc<Hub>,
    path: &Path,
    limits: Limits,
) -> Result<tokio::task::JoinHandle<()>, SocketError> {
    let mut guard = SocketGuard::take(path)?;
    let io = |what: &'static str| {
        let path = path.to_path_buf();
        move |source| SocketError::Io { what, path, source }
    };
    let listener = UnixListener::bind(path).map_err(io("binding"))?;
    guard.socket_id = std::fs::symlink_metadata(path).ok().map(|m| file_id(&m));
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(io("restricting the mode of"))?;
    let (shutdown, keep) = (hub.closing(), hub.closing());
    let name = path.display().to_string();
    Ok(tokio::spawn(async move {
        http::serve(listener, name, limits, handler(hub), shutdown).await;
        // The socket goes before the hub hears that this server is done.
        drop(guard);
        drop(keep);
    }))
}

/// Serves the stream on TCP as well (opt-in).
pub async fn serve_tcp(hub: Arc<Hub>, addr: &str) -> std::io::Result<tokio::task::JoinHandle<()>> {
    serve_tcp_with(hub, addr, Limits::default()).await
}

/// [`serve_tcp`] with chosen limits.
pub async fn serve_tcp_with(
    hub: Arc<Hub>,
    addr: &str,
    limits: Limits,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    let shutdown = hub.closing();
    let name = listener.local_addr()?.to_string();
    Ok(tokio::spawn(http::serve(
        listener,
        name,
        limits,
        handler(hub),
        shutdown,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn queries_are_parsed_and_bad_ones_named() {
        let q = Query::parse(
            "replay=all&follow=0&kind=cpu,memory%5Fblock&since=2026-01-02T08%3A04%3A05.5%2B05%3A00",
        )
        .unwrap();
        assert_eq!(q.replay, Replay::All);
        assert!(!q.follow);
        assert_eq!(q.kinds, ["cpu", "memory_block"]);
        assert_eq!(q.since, Some(ts("2026-01-02T03:04:05.5Z")));
        assert_eq!(Query::parse("").unwrap(), Query::default());
        assert!(matches!(
            Query::parse("since=garbage"),
            Err(QueryError::Since { .. })
        ));
        assert!(matches!(
            Query::parse("replay=ten"),
            Err(QueryError::Replay(_))
        ));
        assert!(matches!(
            Query::parse("follow=maybe"),
            Err(QueryError::Follow(_))
        ));
        assert!(matches!(
            Query::parse("tail=3"),
            Err(QueryError::Unknown(_))
        ));
    }

    #[test]
    fn since_compares_instants_not_text() {
        let line = |time: &str| Line {
            seq: 0,
            kind: "cpu".into(),
            time: time.into(),
            at: time.parse().ok(),
            json: Bytes::new(),
        };
        let q = Query::parse("since=2026-01-02T03:04:32Z").unwrap();
        // Same second, later: kept (as text, "…32.5Z" < "…32Z").
        assert!(q.keeps(&line("2026-01-02T03:04:32.500000Z")));
        assert!(!q.keeps(&line("2026-01-02T03:04:31.999999Z")));
        // An offset: 08:04:33+05:00 is 03:04:33Z.
        let q = Query::parse("since=2026-01-02T08:04:33%2B05:00").unwrap();
        assert!(!q.keeps(&line("2026-01-02T03:04:32.900000Z")));
        assert!(q.keeps(&line("2026-01-02T03:04:33.000000Z")));
    }
}
