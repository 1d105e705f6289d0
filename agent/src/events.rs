//! `hotplug-agent events`: the client of the live stream, in the spirit of
//! `kubectl logs -f`: what the agent still holds, then (with `--follow`) every new record.
use std::{io::Write, path::PathBuf, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UnixStream};

use crate::{
    record::Record,
    report::{Format, text},
};

/// Where the stream is served.
#[derive(Clone, Debug)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

#[derive(Clone, Debug)]
pub struct StreamRequest {
    pub follow: bool,
    pub since: Option<Duration>,
    /// Only the last N held records (default: all held).
    pub tail: Option<usize>,
    pub kinds: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error(
        "connecting to {endpoint}: is `hotplug-agent run` running (and are you allowed to read its socket)?"
    )]
    Connect {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent")]
    Http(#[source] hyper::Error),
    #[error("the agent answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("writing")]
    Write(#[source] std::io::Error),
    #[error(
        "the agent sent a line longer than {limit} bytes without ending it; this is not the stream of a hotplug-agent (or it is broken)"
    )]
    LineTooLong { limit: usize },
}

/// The longest record line accepted. Records are a few hundred bytes (a `ready` record a
/// few KiB); whatever sends more without a newline is not the agent, and must not make
/// this client grow without bound.
pub const MAX_LINE: usize = 1 << 20;

fn path_and_query(req: &StreamRequest) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("follow", if req.follow { "1" } else { "0" });
    match req.tail {
        Some(n) => q.append_pair("replay", &n.to_string()),
        None => q.append_pair("replay", "all"),
    };
    if !req.kinds.is_empty() {
        q.append_pair("kind", &req.kinds.join(","));
    }
    if let Some(since) = req.since {
        let at = std::time::SystemTime::now()
            .checked_sub(since)
            .unwrap_or(std::time::UNIX_EPOCH);
        q.append_pair("since", &humantime::format_rfc3339_micros(at).to_string());
    }
    format!("/events?{}", q.finish())
}

/// Colours by kind on a terminal; plain otherwise.
fn paint(line: &str, kind: &str, action: &str, colour: bool) -> String {
    if !colour {
        return line.to_string();
    }
    let code = match (kind, action) {
        (_, "failed" | "timeout" | "loss" | "cut_off" | "api_unreachable") => "31",
        ("cpu", _) => "32",
        ("memory" | "memory_block", _) => "36",
        ("agent", _) => "33",
        _ => "35",
    };
    format!("\x1b[{code}m{line}\x1b[0m")
}

/// Streams records from the agent to `out` until the agent closes the stream.
pub async fn follow(
    endpoint: &Endpoint,
    req: &StreamRequest,
    format: Format,
    colour: bool,
    out: &mut impl Write,
) -> Result<(), EventsError> {
    let uri = path_and_query(req);
    let request = Request::get(&uri)
        .header("host", "hotplug-agent")
        .body(Empty::<Bytes>::new())
        .expect("static request");
    let connect_err = |source| EventsError::Connect {
        endpoint: format!("{endpoint:?}"),
        source,
    };
    let mut body = match endpoint {
        Endpoint::Unix(path) => {
            let io = TokioIo::new(UnixStream::connect(path).await.map_err(connect_err)?);
            send(io, request).await?
        }
        Endpoint::Tcp(addr) => {
            let io = TokioIo::new(TcpStream::connect(addr).await.map_err(connect_err)?);
            send(io, request).await?
        }
    };
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(EventsError::Http)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        let complete = pending
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        if pending.len() - complete > MAX_LINE {
            return Err(EventsError::LineTooLong { limit: MAX_LINE });
        }
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            let shown = match format {
                Format::Json => line,
                Format::Text => match serde_json::from_str::<Record>(&line) {
                    Ok(rec) => {
                        let (kind, action) = match &rec {
                            Record::Event(e) => {
                                (e.kind.as_str().to_string(), e.action.as_str().to_string())
                            }
                            Record::Agent(a) => (a.kind.to_string(), a.action.to_string()),
                            Record::Decision(d) => (d.kind.to_string(), d.action.to_string()),
                        };
                        paint(&text::line(&rec), &kind, &action, colour)
                    }
                    // A record this client does not know yet: show it as it came.
                    Err(_) => line,
                },
            };
            writeln!(out, "{shown}")
                .and_then(|()| out.flush())
                .map_err(EventsError::Write)?;
        }
    }
    Ok(())
}

async fn send<I>(
    io: I,
    request: Request<Empty<Bytes>>,
) -> Result<hyper::body::Incoming, EventsError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(EventsError::Http)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender
        .send_request(request)
        .await
        .map_err(EventsError::Http)?;
    let status = resp.status().as_u16();
    if status != 200 {
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        return Err(EventsError::Status { status, body });
    }
    Ok(resp.into_body())
}
