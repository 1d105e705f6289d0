//! `/metrics`, `/healthz` and `/readyz` as a client reads them off the socket: every whole
//! body is framed by `content-length`, never chunked (Prometheus scrapes and
//! `promtool check metrics` on a live scrape need that, and an eviction wrapper once lost
//! it), and at the connection limit a probe is still answered 200 because idle holders
//! make room for it.
use std::time::Duration;

use hotplug_agent::report::{http::Limits, metrics};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// One response: status, headers (names lowercased) and body.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads exactly one response from `s` (which may carry more after it, keep-alive):
/// the head up to the blank line, then `content-length` bytes. A response without
/// `content-length` fails the test, since that is what this file guards.
async fn read_response(s: &mut TcpStream) -> Response {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.expect("reading the response head");
        assert!(n > 0, "connection closed inside the head: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).expect("an ASCII head");
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut r = Response {
        status,
        headers,
        body: buf[head_end + 4..].to_vec(),
    };
    assert_eq!(
        r.header("transfer-encoding"),
        None,
        "a whole body sent chunked:\n{head}"
    );
    let length: usize = r
        .header("content-length")
        .unwrap_or_else(|| panic!("no content-length:\n{head}"))
        .parse()
        .expect("a numeric content-length");
    while r.body.len() < length {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.expect("reading the body");
        assert!(n > 0, "closed before content-length was read:\n{head}");
        r.body.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(r.body.len(), length, "more than content-length:\n{head}");
    r
}

async fn request(s: &mut TcpStream, path: &str) -> Response {
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n").as_bytes())
        .await
        .expect("sending the request");
    read_response(s).await
}

async fn serve(limits: Limits) -> (std::net::SocketAddr, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
    let addr = listener.local_addr().expect("address");
    let (stop, shutdown) = watch::channel(false);
    metrics::serve_on(metrics::Metrics::new(), listener, limits, shutdown).expect("serving");
    (addr, stop)
}

#[tokio::test]
async fn every_endpoint_sends_content_length_not_chunks() {
    let (addr, _stop) = serve(Limits::default()).await;
    // One keep-alive connection for all: each response must end where its length says,
    // or the next one would be read from the middle of it.
    let mut s = TcpStream::connect(addr).await.expect("connecting");
    let m = request(&mut s, "/metrics").await;
    assert_eq!(m.status, 200);
    let text = String::from_utf8(m.body).expect("UTF-8 metrics");
    assert!(text.contains("# TYPE "), "{text}");
    let h = request(&mut s, "/healthz").await;
    assert_eq!((h.status, h.body.as_slice()), (200, b"ok\n".as_slice()));
    // Not ready (no ready record yet): a 503, framed the same way.
    let r = request(&mut s, "/readyz").await;
    assert_eq!(r.status, 503, "{:?}", String::from_utf8_lossy(&r.body));
    let n = request(&mut s, "/nothing-here").await;
    assert_eq!(n.status, 404);
    // And the metrics once more, after the others, on the same connection.
    assert_eq!(request(&mut s, "/metrics").await.status, 200);
}

#[tokio::test]
async fn at_the_limit_idle_holders_make_room_for_a_probe() {
    let limits = Limits {
        max_connections: 4,
        ..Limits::default()
    };
    let (addr, _stop) = serve(limits).await;
    // Hold every slot: connected, never a request (slowloris), well inside the header
    // read timeout (10 s).
    let mut holders = Vec::new();
    for _ in 0..limits.max_connections {
        holders.push(TcpStream::connect(addr).await.expect("connecting"));
    }
    // Probes, each on a new connection as a kubelet's are: every one answered 200 with its
    // length, each evicting the oldest holder (or an earlier probe's idle connection).
    for i in 0..2 * limits.max_connections {
        let mut s = TcpStream::connect(addr).await.expect("connecting");
        let h = tokio::time::timeout(Duration::from_secs(5), request(&mut s, "/healthz"))
            .await
            .unwrap_or_else(|_| panic!("probe {i} unanswered"));
        assert_eq!(
            h.status,
            200,
            "probe {i}: {:?}",
            String::from_utf8_lossy(&h.body)
        );
        holders.push(s);
    }
    // The first holders were closed for them (EOF), long before the header read timeout.
    for (i, h) in holders.iter_mut().take(limits.max_connections).enumerate() {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), h.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|_| panic!("holder {i} still held"))
            .ok();
    }
}
