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
}

fn path_and_query(req: &StreamRequest) -> String {
    let mut q = format!("/events?follow={}", u8::from(req.follow));
    match req.tail {
        Some(n) => q.push_str(&format!("&replay={n}")),
        None => q.push_str("&replay=all"),
    }
    if !req.kinds.is_empty() {
        q.push_str(&format!("&kind={}", req.kinds.join(",")));
    }
    if let Some(since) = req.since {
        let t = humantime::format_rfc3339_micros(std::time::SystemTime::now() - since).to_string();
        q.push_str(&format!("&since={t}"));
    }
    q
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
                            Record::Agent(a) => (a.kind.clone(), a.action.clone()),
                            Record::Decision(d) => (d.kind.clone(), d.action.clone()),
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
