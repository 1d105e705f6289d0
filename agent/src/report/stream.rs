//! The live stream: every record, as NDJSON over HTTP, to any number of local clients.
//!
//! `GET /events?replay=N&follow=1&kind=cpu,memory&since=RFC3339` answers with the last N
//! records still held (`replay=all` for all of them), then, with `follow=1`, every new one
//! as it is made. Publishing never waits for a client: each client reads from a bounded
//! broadcast queue, and one that falls behind by more than the queue is cut off with a final
//! `{"kind":"agent","action":"cut_off","missed":N}` record. Replay and subscription are
//! taken under one lock, so a reconnecting client sees every record exactly once.
use std::{
    collections::VecDeque,
    path::Path,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use serde::Deserialize;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, UnixListener},
    sync::broadcast,
};

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
}

/// What a client asks for.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Query {
    /// `all` or a number of held records to send first; default none.
    pub replay: Option<String>,
    /// Keep the connection open for new records (`1`/`true`); default on.
    pub follow: Option<String>,
    /// Comma-separated `kind`s to keep.
    pub kind: Option<String>,
    /// Only records at or after this RFC 3339 time.
    pub since: Option<String>,
}

impl Query {
    fn follow(&self) -> bool {
        !matches!(self.follow.as_deref(), Some("0" | "false" | "no"))
    }

    fn replay(&self, held: usize) -> usize {
        match self.replay.as_deref() {
            Some("all") => held,
            Some(n) => n.parse().unwrap_or(0).min(held),
            None => 0,
        }
    }

    fn keeps(&self, line: &Line) -> bool {
        let kind_ok = self
            .kind
            .as_deref()
            .is_none_or(|k| k.split(',').any(|k| k.trim() == &*line.kind));
        // RFC 3339 UTC with a fixed width sorts as text.
        let time_ok = self.since.as_deref().is_none_or(|s| &*line.time >= s);
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
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.seq += 1;
        let line = Line {
            seq: held.seq,
            kind: kind.into(),
            time: time.into(),
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

    pub fn clients(&self) -> usize {
        self.tx.receiver_count()
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

/// Reads the request head (bounded), returns the request target.
async fn read_request<S: AsyncRead + Unpin>(io: &mut S) -> std::io::Result<String> {
    let mut head = Vec::with_capacity(512);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 || io.read(&mut byte).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "incomplete request head",
            ));
        }
        head.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.lines().next().unwrap_or_default().split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some(target)) => Ok(target.to_string()),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "only GET is served",
        )),
    }
}

async fn respond<S: AsyncWrite + Unpin>(
    io: &mut S,
    status: &str,
    body: &str,
) -> std::io::Result<()> {
    let msg = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    io.write_all(msg.as_bytes()).await
}

/// One client: a minimal HTTP/1.1 exchange, then the records, delimited by the close of
/// the connection. Written by hand rather than through an HTTP server so that a stalled
/// client is nothing but a pending `write_all` on its own task.
async fn client<S: AsyncRead + AsyncWrite + Unpin>(
    hub: Arc<Hub>,
    mut io: S,
) -> std::io::Result<()> {
    let target = read_request(&mut io).await?;
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    if path != "/events" {
        return respond(
            &mut io,
            "404 Not Found",
            "GET /events?replay=N|all&follow=0|1&kind=K,K&since=RFC3339\n",
        )
        .await;
    }
    let query = match parse_query(query) {
        Ok(q) => q,
        Err(e) => return respond(&mut io, "400 Bad Request", &format!("{e}\n")).await,
    };
    let (backlog, mut rx) = hub.subscribe(&query);
    io.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\nconnection: close\r\n\r\n",
    )
    .await?;
    for line in backlog {
        io.write_all(&line.json).await?;
    }
    if query.follow() {
        loop {
            match rx.recv().await {
                Ok(line) if query.keeps(&line) => io.write_all(&line.json).await?,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    io.write_all(&cut_off(missed)).await?;
                    break;
                }
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    }
    io.shutdown().await
}

fn parse_query(q: &str) -> Result<Query, String> {
    let mut query = Query::default();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "replay" => query.replay = Some(v),
            "follow" => query.follow = Some(v),
            "kind" => query.kind = Some(v),
            "since" => query.since = Some(v),
            other => return Err(format!("unknown parameter {other:?}")),
        }
    }
    Ok(query)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Serves the stream on a unix socket (mode 0600: the records are the node's business).
pub async fn serve_unix(
    hub: Arc<Hub>,
    path: &Path,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            spawn_connection(hub.clone(), stream);
        }
    }))
}

/// Serves the stream on TCP as well (opt-in).
pub async fn serve_tcp(hub: Arc<Hub>, addr: &str) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            spawn_connection(hub.clone(), stream);
        }
    }))
}

fn spawn_connection<S>(hub: Arc<Hub>, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = client(hub, io).await {
            tracing::debug!(error = %e, "stream client connection ended");
        }
    });
}
