//! The live stream over a real unix socket, with the real `events` client: several clients
//! at once, a reconnect with replay, a slow client cut off without holding anyone up, and
//! every record in order under a burst.
use std::{io::Write, sync::Arc, time::Duration};

use hotplug_agent::{
    capacity::Summary,
    events::{self, Endpoint, StreamRequest},
    record::{AgentAction, AgentRecord, Record},
    report::{Format, http::Limits, stream::Hub},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A `ready` record whose `lost` field carries its sequence number, so order can be checked
/// (the agent itself writes no `ready` into these hubs).
fn numbered(n: u64) -> Record {
    let mut a = AgentRecord::new(
        AgentAction::Ready,
        Summary {
            memory_bytes: n,
            cpus_online: 1,
        },
    );
    a.lost = Some(n);
    Record::Agent(Box::new(a))
}

fn numbers(ndjson: &[u8]) -> Vec<u64> {
    String::from_utf8_lossy(ndjson)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["action"] == "ready")
        .map(|v| v["lost"].as_u64().unwrap())
        .collect()
}

/// Lines received so far (cheap enough to poll while waiting).
fn line_count(b: &Buf) -> usize {
    b.0.lock().unwrap().iter().filter(|&&c| c == b'\n').count()
}

/// Collects what `events` prints into a shared buffer.
#[derive(Clone, Default)]
struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn serve(replay: usize, queue: usize) -> (Arc<Hub>, tempfile::TempDir, Endpoint) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.sock");
    let hub = Hub::new(replay, queue);
    hotplug_agent::report::stream::serve_unix(hub.clone(), &path)
        .await
        .unwrap();
    let mode = std::fs::metadata(&path)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap();
    assert_eq!(mode, 0o600, "the socket is for root only");
    (hub, dir, Endpoint::Unix(path))
}

fn follow_request() -> StreamRequest {
    StreamRequest {
        follow: true,
        since: None,
        tail: Some(0),
        kinds: vec!["agent".into()],
    }
}

/// Waits until the hub has `n` clients (they subscribe when their request arrives).
async fn clients(hub: &Hub, n: usize) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while hub.clients() < n {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("clients connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_clients_get_every_record_in_order_under_a_burst() {
    let (hub, _dir, endpoint) = serve(100, 100_000).await;
    let mut tasks = Vec::new();
    let mut bufs = Vec::new();
    for _ in 0..4 {
        let buf = Buf::default();
        bufs.push(buf.clone());
        let endpoint = endpoint.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = buf;
            events::follow(&endpoint, &follow_request(), Format::Json, false, &mut out).await
        }));
    }
    clients(&hub, 4).await;
    const N: u64 = 20_000;
    for n in 0..N {
        hub.publish(&numbered(n));
    }
    // Every client has everything, in order.
    tokio::time::timeout(Duration::from_secs(30), async {
        while bufs.iter().any(|b| line_count(b) < N as usize) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("all records delivered");
    for b in &bufs {
        let got = numbers(&b.0.lock().unwrap());
        assert_eq!(got, (0..N).collect::<Vec<_>>());
    }
    for t in tasks {
        t.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_client_gets_what_it_missed_from_the_replay() {
    let (hub, _dir, endpoint) = serve(1000, 1000).await;
    for n in 0..100 {
        hub.publish(&numbered(n));
    }
    // Without follow: what is held, then the stream ends.
    let mut first = Buf::default();
    let req = StreamRequest {
        follow: false,
        since: None,
        tail: None,
        kinds: vec![],
    };
    events::follow(&endpoint, &req, Format::Json, false, &mut first)
        .await
        .unwrap();
    assert_eq!(
        numbers(&first.0.lock().unwrap()),
        (0..100).collect::<Vec<_>>()
    );
    // Away for a while...
    for n in 100..250 {
        hub.publish(&numbered(n));
    }
    // ...back with the last 150: exactly the ones missed.
    let mut again = Buf::default();
    let req = StreamRequest {
        follow: false,
        since: None,
        tail: Some(150),
        kinds: vec![],
    };
    events::follow(&endpoint, &req, Format::Json, false, &mut again)
        .await
        .unwrap();
    assert_eq!(
        numbers(&again.0.lock().unwrap()),
        (100..250).collect::<Vec<_>>()
    );
    // Replay is bounded: the oldest are gone once more than it holds were published.
    for n in 250..1500 {
        hub.publish(&numbered(n));
    }
    let mut all = Buf::default();
    let req = StreamRequest {
        follow: false,
        since: None,
        tail: None,
        kinds: vec![],
    };
    events::follow(&endpoint, &req, Format::Json, false, &mut all)
        .await
        .unwrap();
    assert_eq!(
        numbers(&all.0.lock().unwrap()),
        (500..1500).collect::<Vec<_>>()
    );
    assert!(hub.held_bytes() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_cut_off_and_told_how_much_it_missed() {
    let (hub, _dir, endpoint) = serve(10, 4096).await;
    let Endpoint::Unix(path) = endpoint.clone() else {
        unreachable!()
    };
    // A client that asks and then does not read.
    let mut slow = tokio::net::UnixStream::connect(&path).await.unwrap();
    slow.write_all(b"GET /events?follow=1 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    // A fast one alongside.
    let fast = Buf::default();
    let fast_task = {
        let (endpoint, mut out) = (endpoint.clone(), fast.clone());
        tokio::spawn(async move {
            events::follow(&endpoint, &follow_request(), Format::Json, false, &mut out).await
        })
    };
    clients(&hub, 2).await;
    // Publishing never waits for anyone: 200k records go out while the slow client sleeps.
    const N: u64 = 50_000;
    let started = std::time::Instant::now();
    for n in 0..N {
        hub.publish(&numbered(n));
        if n % 256 == 0 {
            // Give the fast client's task a turn, as the agent's own pace would.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let publish_time = started.elapsed();
    eprintln!("published {N} records in {publish_time:?} with a stalled client attached");
    // Now the slow client reads: some records, then the cut-off record, then the end.
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut chunk = vec![0u8; 1 << 16];
        loop {
            let n = slow.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    let tail = String::from_utf8_lossy(&got[got.len().saturating_sub(600)..]).into_owned();
    assert!(
        read.is_ok(),
        "the slow client's stream did not end; {} bytes, ending with {tail}",
        got.len()
    );
    let text = String::from_utf8_lossy(&got);
    let cut = text
        .lines()
        .find(|l| l.contains("\"cut_off\""))
        .unwrap_or_else(|| panic!("no cut_off record in {} bytes", got.len()));
    let cut: serde_json::Value = serde_json::from_str(cut).unwrap();
    assert!(cut["missed"].as_u64().unwrap() > 0, "{cut}");
    // The fast client, alongside, got every record in order.
    tokio::time::timeout(Duration::from_secs(30), async {
        while line_count(&fast) < N as usize {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the fast client got everything");
    fast_task.abort();
    assert_eq!(numbers(&fast.0.lock().unwrap()), (0..N).collect::<Vec<_>>());
}

/// Throughput to 1 and 10 clients and the memory the replay buffer holds. Run by
/// `cargo xtask bench` (`-- --ignored`); prints one `BENCH_STREAM_JSON` line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by cargo xtask bench"]
async fn bench_stream_throughput() {
    const N: u64 = 100_000;
    let mut results = serde_json::Map::new();
    for clients_n in [1usize, 10] {
        let (hub, _dir, endpoint) = serve(DEFAULT_REPLAY_FOR_BENCH, 1 << 20).await;
        let mut bufs = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..clients_n {
            let buf = Buf::default();
            bufs.push(buf.clone());
            let (endpoint, mut out) = (endpoint.clone(), buf);
            tasks.push(tokio::spawn(async move {
                events::follow(&endpoint, &follow_request(), Format::Json, false, &mut out).await
            }));
        }
        clients(&hub, clients_n).await;
        let started = std::time::Instant::now();
        for n in 0..N {
            hub.publish(&numbered(n));
            if n % 1024 == 0 {
                tokio::task::yield_now().await;
            }
        }
        tokio::time::timeout(Duration::from_secs(120), async {
            while bufs.iter().any(|b| line_count(b) < N as usize) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("all delivered");
        let secs = started.elapsed().as_secs_f64();
        for t in tasks {
            t.abort();
        }
        results.insert(
            format!("records_per_s_{clients_n}_clients"),
            serde_json::json!((N as f64 / secs).round()),
        );
        results.insert(
            format!("seconds_{clients_n}_clients"),
            serde_json::json!(secs),
        );
        results.insert(
            "replay_records".into(),
            serde_json::json!(DEFAULT_REPLAY_FOR_BENCH),
        );
        results.insert("replay_bytes".into(), serde_json::json!(hub.held_bytes()));
    }
    results.insert("records".into(), serde_json::json!(N));
    println!("BENCH_STREAM_JSON {}", serde_json::Value::Object(results));
}

const DEFAULT_REPLAY_FOR_BENCH: usize = hotplug_agent::report::stream::DEFAULT_REPLAY;

/// One request over the socket as HTTP/1.0 (no chunked framing to undo); (status, body).
async fn get(path: &std::path::Path, target: &str) -> (u16, String) {
    let mut s = tokio::net::UnixStream::connect(path).await.unwrap();
    // A refused connection may be closed before the request is written: read anyway.
    let _ = s
        .write_all(format!("GET {target} HTTP/1.0\r\n\r\n").as_bytes())
        .await;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("the response ended")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn at(time: &str, n: u64) -> Record {
    let mut r = numbered(n);
    if let Record::Agent(a) = &mut r {
        a.time = time.into();
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_is_an_instant_and_a_bad_query_is_refused() {
    let (hub, _dir, endpoint) = serve(100, 100).await;
    let Endpoint::Unix(path) = endpoint else {
        unreachable!()
    };
    hub.publish(&at("2026-01-02T03:04:31.999999Z", 0));
    hub.publish(&at("2026-01-02T03:04:32.000000Z", 1));
    hub.publish(&at("2026-01-02T03:04:32.500000Z", 2));
    hub.publish(&at("2026-01-02T03:04:33.000000Z", 3));
    let since = |s: &str| format!("/events?replay=all&follow=0&since={s}");
    // Fractions in the same second are later, not earlier (text comparison got this wrong).
    let (status, body) = get(&path, &since("2026-01-02T03:04:32Z")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(numbers(body.as_bytes()), [1, 2, 3]);
    let (_, body) = get(&path, &since("2026-01-02T03:04:32.25Z")).await;
    assert_eq!(numbers(body.as_bytes()), [2, 3]);
    // An offset, percent-encoded as a form would send it: 08:04:32.6+05:00 is 03:04:32.6Z.
    let (_, body) = get(&path, &since("2026-01-02T08%3A04%3A32.6%2B05%3A00")).await;
    assert_eq!(numbers(body.as_bytes()), [3]);
    // Garbage is a 400 that says what is expected, not an empty 200.
    let (status, body) = get(&path, &since("garbage")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("RFC 3339"), "{body}");
    let (status, body) = get(&path, "/events?replay=ten").await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = get(&path, "/nothing").await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_that_hang_up_are_let_go_even_when_nothing_matches() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.sock");
    let hub = Hub::new(10, 100);
    let limits = Limits {
        max_connections: 300,
        ..Limits::default()
    };
    hotplug_agent::report::stream::serve_unix_with(hub.clone(), &path, limits)
        .await
        .unwrap();
    const N: usize = 200;
    let mut conns = Vec::new();
    for _ in 0..N {
        let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
        s.write_all(b"GET /events?follow=1&kind=nothing-matches HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        conns.push(s);
    }
    clients(&hub, N).await;
    // They hang up; no record is ever published that they would want.
    drop(conns);
    tokio::time::timeout(Duration::from_secs(5), async {
        while hub.clients() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} followers still held after they hung up", hub.clients()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_limited_and_slow_requests_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.sock");
    let hub = Hub::new(10, 100);
    let limits = Limits {
        max_connections: 4,
        header_read_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    hotplug_agent::report::stream::serve_unix_with(hub.clone(), &path, limits)
        .await
        .unwrap();
    // Four clients that send half a request head and then nothing (slowloris): they fill
    // the listener.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
        s.write_all(b"GET /events?follow=1 HTTP/1.1\r\nhost:")
            .await
            .unwrap();
        slow.push(s);
    }
    // A fifth that sends a whole request is served all the same: the oldest slowloris
    // makes room for it (it is closed at once, long before the header read timeout).
    let started = std::time::Instant::now();
    hub.publish(&numbered(7));
    let (status, body) = get(&path, "/events?follow=0&replay=all").await;
    assert_eq!(
        status, 200,
        "at the limit, an idle connection is evicted: {body}"
    );
    assert_eq!(numbers(body.as_bytes()), [7]);
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_millis(400), slow[0].read_to_end(&mut rest))
        .await
        .expect("the oldest slowloris was evicted before its header read timeout")
        .ok();
    // The others are closed by the header read timeout, not held for ever.
    for s in &mut slow[1..] {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .expect("a slow request head was dropped")
            .ok();
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // Four followers inside their request are never evicted: a fifth is refused (503).
    let mut followers = Vec::new();
    for _ in 0..4 {
        let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
        s.write_all(b"GET /events?follow=1 HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        followers.push(s);
    }
    clients(&hub, 4).await;
    let (status, body) = get(&path, "/events?follow=0").await;
    assert_eq!(status, 503, "over the limit, every connection busy: {body}");
    // When they leave, the listener serves again.
    drop(followers);
    tokio::time::timeout(Duration::from_secs(5), async {
        while hub.clients() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the followers were let go");
    let (status, body) = get(&path, "/events?follow=0&replay=all").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_path_is_never_taken_from_anyone() {
    use hotplug_agent::report::stream::{SocketError, serve_unix};
    let dir = tempfile::tempdir().unwrap();
    // A regular file where the socket should go: refused, and left as it was.
    let file = dir.path().join("precious");
    std::fs::write(&file, "keep me").unwrap();
    let err = serve_unix(Hub::new(1, 1), &file).await.unwrap_err();
    assert!(matches!(err, SocketError::NotASocket { .. }), "{err}");
    assert!(err.to_string().contains("regular file"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");

    // A live socket of another agent: refused, naming its PID.
    let path = dir.path().join("events.sock");
    let first = Hub::new(10, 10);
    serve_unix(first.clone(), &path).await.unwrap();
    let err = serve_unix(Hub::new(1, 1), &path).await.unwrap_err();
    assert!(matches!(err, SocketError::Held { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("PID {}", std::process::id())),
        "{err}"
    );
    // ...which still serves, and its follower gets the last record before the end.
    let mut follower = Buf::default();
    let task = {
        let (endpoint, mut out) = (Endpoint::Unix(path.clone()), follower.clone());
        tokio::spawn(async move {
            events::follow(&endpoint, &follow_request(), Format::Json, false, &mut out).await
        })
    };
    clients(&first, 1).await;
    first.publish(&numbered(42));
    first.close();
    assert!(
        first.closed(Duration::from_secs(5)).await,
        "the server ended"
    );
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the follower's stream ended with the hub")
        .unwrap()
        .unwrap();
    assert_eq!(numbers(&follower.0.lock().unwrap()), [42]);
    follower.flush().unwrap();
    // Removed at exit: the socket and its lock file.
    assert!(!path.exists(), "the socket is removed at exit");
    assert!(!dir.path().join("events.sock.lock").exists());

    // A stale socket (nobody listens, nobody holds the lock) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let hub = Hub::new(10, 10);
    serve_unix(hub.clone(), &path).await.unwrap();
    hub.publish(&numbered(1));
    let (status, body) = get(&path, "/events?follow=0&replay=all").await;
    assert_eq!((status, numbers(body.as_bytes())), (200, vec![1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_refuses_a_line_that_never_ends() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-an-agent.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = [0u8; 1024];
        let _ = s.read(&mut head).await;
        s.write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        // Far more than the client may hold, never a newline; ends when the client leaves.
        for _ in 0..1024 {
            if s.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let mut out = Buf::default();
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        events::follow(
            &Endpoint::Unix(path),
            &follow_request(),
            Format::Json,
            false,
            &mut out,
        ),
    )
    .await
    .expect("the client gave up on the endless line")
    .unwrap_err();
    assert!(
        matches!(err, events::EventsError::LineTooLong { .. }),
        "{err}"
    );
    assert!(out.0.lock().unwrap().is_empty());
    server.abort();
}
