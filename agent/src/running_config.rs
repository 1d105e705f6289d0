//! `hotplug-agent config` without `run` flags: what the running agent runs with, read from
//! its `/config` (on `metrics_addr`, found from this command's own flags, environment and
//! config file, which in the agent's pod or unit are the agent's), or, when no agent
//! answers there, computed here. The first line says which of the two it is.
use std::{
    io::{Read, Write},
    net::{TcpStream, ToSocketAddrs},
    time::Duration,
};

/// How long an agent on loopback or the pod's own IP may take to answer.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// `/config` is a few KiB; anything much larger is not the agent's.
const MAX_ANSWER: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("metrics are off (`metrics_addr = \"off\"`)")]
    Off,
    #[error("{addr:?} is not an address")]
    Address {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} answered {status:?} to GET /config")]
    Status { addr: String, status: String },
}

/// The value of `key` in a `hotplug-agent config` description (`key = "value"  # source`).
pub fn value_of(description: &str, key: &str) -> Option<String> {
    description.lines().find_map(|l| {
        let (setting, _) = l.rsplit_once("  # ")?;
        let value = setting.strip_prefix(key)?.strip_prefix(" = ")?;
        Some(value.trim_matches('"').to_owned())
    })
}

/// GET `/config` from the agent on `addr` (HTTP/1.1, the agent's own server).
pub fn fetch(addr: &str, timeout: Duration) -> Result<String, QueryError> {
    if addr == "off" {
        return Err(QueryError::Off);
    }
    let io = |source| QueryError::Io {
        addr: addr.to_owned(),
        source,
    };
    let target = addr
        .to_socket_addrs()
        .and_then(|mut a| a.next().ok_or_else(|| std::io::ErrorKind::NotFound.into()))
        .map_err(|source| QueryError::Address {
            addr: addr.to_owned(),
            source,
        })?;
    let mut s = TcpStream::connect_timeout(&target, timeout).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    s.write_all(b"GET /config HTTP/1.1\r\nhost: hotplug-agent\r\nconnection: close\r\n\r\n")
        .map_err(io)?;
    let mut answer = Vec::new();
    s.take(MAX_ANSWER).read_to_end(&mut answer).map_err(io)?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(QueryError::Status {
            addr: addr.to_owned(),
            status: status.to_owned(),
        });
    }
    Ok(body.to_owned())
}

/// What `hotplug-agent config` prints without `run` flags: the running agent's
/// configuration if one answers on the `metrics_addr` of `computed`, else `computed`;
/// the first line says which.
pub fn show(computed: &str, timeout: Duration) -> String {
    let addr = value_of(computed, "metrics_addr").unwrap_or_else(|| "off".into());
    match fetch(&addr, timeout) {
        Ok(running) => {
            format!("# the running agent's configuration, from http://{addr}/config\n{running}")
        }
        Err(e) => format!(
            "# computed here from this command's flags, environment and config file: no \
             running agent answered ({})\n{computed}",
            crate::sources::error_chain(&e)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_address_is_read_from_a_description() {
        let d = "# config file: /etc/x.toml\nmetrics_addr = \"10.0.0.7:9477\"  # env HOTPLUG_AGENT_METRICS_ADDR\n# log_file (unset)\n";
        assert_eq!(
            value_of(d, "metrics_addr").as_deref(),
            Some("10.0.0.7:9477")
        );
        assert_eq!(value_of(d, "log_file"), None);
    }

    #[test]
    fn no_agent_falls_back_and_says_so() {
        // A port nobody listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let computed = format!("metrics_addr = \"127.0.0.1:{port}\"  # default\n");
        let shown = show(&computed, TIMEOUT);
        assert!(
            shown.starts_with("# computed here") && shown.ends_with(&computed),
            "{shown}"
        );
        let off = show("metrics_addr = \"off\"  # flag\n", TIMEOUT);
        assert!(off.contains("metrics are off"), "{off}");
    }
}
