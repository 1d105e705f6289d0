//! The kernel uevent source: `NETLINK_KOBJECT_UEVENT`, group 1, through the udev crate's
//! kernel monitor.
//!
//! libudev opens and binds the socket (`MonitorBuilder::new_kernel()`); the agent reads the
//! datagrams itself, because libudev hides what we must see: it drops malformed messages
//! silently and turns `ENOBUFS` (the socket overflowed: events are gone) into a plain
//! "no device". Kernel messages are `ACTION@DEVPATH\0KEY=VALUE\0...`
//! (lib/kobject_uevent.c, v6.18); libudev's socket filter only filters udevd's messages,
//! so every kernel uevent arrives and `SEQNUM` gaps can be checked.
use std::{
    os::fd::{AsFd, AsRawFd, OwnedFd, RawFd},
    sync::Arc,
};

use nix::{
    errno::Errno,
    sys::socket::{NetlinkAddr, recvfrom, setsockopt, sockopt},
};
use tokio::{io::unix::AsyncFd, sync::mpsc};

use super::{Change, Counters, Detail, Loss, SourceMsg};
use crate::record::{Action, Kind, Source};

/// A parsed kernel uevent (only what the agent uses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uevent {
    pub action: String,
    pub devpath: String,
    pub subsystem: String,
    pub seqnum: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UeventError {
    #[error("empty message")]
    Empty,
    #[error("udevd message (libudev header), not a kernel uevent")]
    FromUdevd,
    #[error("no ACTION@DEVPATH header")]
    NoHeader,
    #[error("field {0} is not UTF-8")]
    NotUtf8(usize),
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("SEQNUM {0:?} is not a number")]
    BadSeqnum(String),
    #[error("header {header:?} does not match ACTION/DEVPATH")]
    HeaderMismatch { header: String },
}

/// Parses one kernel uevent datagram.
pub fn parse(buf: &[u8]) -> Result<Uevent, UeventError> {
    if buf.is_empty() {
        return Err(UeventError::Empty);
    }
    if buf.starts_with(b"libudev\0") {
        return Err(UeventError::FromUdevd);
    }
    let mut fields = buf.split(|&b| b == 0).filter(|f| !f.is_empty()).enumerate();
    let (_, header) = fields.next().ok_or(UeventError::Empty)?;
    let header = std::str::from_utf8(header).map_err(|_| UeventError::NotUtf8(0))?;
    let (h_action, h_devpath) = header.split_once('@').ok_or(UeventError::NoHeader)?;
    let (mut action, mut devpath, mut subsystem, mut seqnum) = (None, None, None, None);
    for (i, field) in fields {
        let field = std::str::from_utf8(field).map_err(|_| UeventError::NotUtf8(i))?;
        match field.split_once('=') {
            Some(("ACTION", v)) => action = Some(v),
            Some(("DEVPATH", v)) => devpath = Some(v),
            Some(("SUBSYSTEM", v)) => subsystem = Some(v),
            Some(("SEQNUM", v)) => seqnum = Some(v),
            _ => {}
        }
    }
    let action = action.ok_or(UeventError::Missing("ACTION"))?;
    let devpath = devpath.ok_or(UeventError::Missing("DEVPATH"))?;
    let subsystem = subsystem.ok_or(UeventError::Missing("SUBSYSTEM"))?;
    let seqnum = seqnum.ok_or(UeventError::Missing("SEQNUM"))?;
    let seqnum = seqnum
        .parse()
        .map_err(|_| UeventError::BadSeqnum(seqnum.into()))?;
    if action != h_action || devpath != h_devpath {
        return Err(UeventError::HeaderMismatch {
            header: header.into(),
        });
    }
    Ok(Uevent {
        action: action.into(),
        devpath: devpath.into(),
        subsystem: subsystem.into(),
        seqnum,
    })
}

impl Uevent {
    /// The sysfs name: the last component of DEVPATH (`memory42`, `cpu1`).
    pub fn sysname(&self) -> &str {
        self.devpath.rsplit('/').next().unwrap_or(&self.devpath)
    }

    /// What this uevent means for the agent; `None` for other subsystems and for actions
    /// that do not change capacity (`bind`, `unbind`, `move`).
    pub fn change(&self) -> Option<Change> {
        let kind = match self.subsystem.as_str() {
            "memory" if self.sysname().starts_with("memory") => Kind::MemoryBlock,
            "cpu" if self.sysname().starts_with("cpu") => Kind::Cpu,
            _ => return None,
        };
        let action = match self.action.as_str() {
            "add" => Action::Add,
            "remove" => Action::Remove,
            "online" => Action::Online,
            "offline" => Action::Offline,
            "change" => Action::Change,
            _ => return None,
        };
        Some(Change {
            source: Source::Uevent,
            kind,
            action,
            device: Some(self.sysname().into()),
            detail: Detail::Uevent {
                seqnum: self.seqnum,
            },
        })
    }
}

/// Tracks SEQNUM across every kernel uevent this socket receives.
#[derive(Debug, Default)]
pub struct SeqnumTracker {
    last: Option<u64>,
}

impl SeqnumTracker {
    /// Returns the gap, if this seqnum does not follow the previous one.
    pub fn observe(&mut self, seqnum: u64) -> Option<Loss> {
        // No gap can follow u64::MAX (and `last + 1` would overflow there).
        let gap = match self.last.and_then(|last| last.checked_add(1)) {
            Some(expected) if seqnum > expected => Some(Loss::SeqnumGap {
                expected,
                got: seqnum,
            }),
            _ => None,
        };
        self.last = Some(self.last.map_or(seqnum, |l| l.max(seqnum)));
        gap
    }
}

/// The listening socket and what it managed to set up.
pub struct UeventSocket {
    fd: AsyncFd<OwnedFd>,
    /// The receive buffer the kernel granted (bytes, as `SO_RCVBUF` reports it).
    pub rcvbuf: usize,
    /// Set when the wanted size could not be forced (no CAP_NET_ADMIN).
    pub rcvbuf_warning: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("opening the udev kernel monitor")]
    Monitor(#[source] std::io::Error),
    #[error("duplicating the monitor socket")]
    Dup(#[source] std::io::Error),
    #[error("registering the monitor socket with tokio")]
    Register(#[source] std::io::Error),
}

/// Opens the kernel monitor for `memory` and `cpu` with a receive buffer of `rcvbuf` bytes.
pub fn open(rcvbuf: usize) -> Result<UeventSocket, OpenError> {
    let socket = udev::MonitorBuilder::new_kernel()
        .and_then(|b| b.match_subsystem("memory"))
        .and_then(|b| b.match_subsystem("cpu"))
        .and_then(|b| b.listen())
        .map_err(OpenError::Monitor)?;
    // Keep our own descriptor of the bound socket; libudev's monitor is not Send.
    let fd = socket
        .as_fd()
        .try_clone_to_owned()
        .map_err(OpenError::Dup)?;
    drop(socket);
    // SO_RCVBUFFORCE passes rmem_max but needs CAP_NET_ADMIN; SO_RCVBUF is capped by it.
    let rcvbuf_warning = match setsockopt(&fd, sockopt::RcvBufForce, &rcvbuf) {
        Ok(()) => None,
        Err(e) => {
            let _ = setsockopt(&fd, sockopt::RcvBuf, &rcvbuf);
            Some(format!(
                "SO_RCVBUFFORCE {rcvbuf} bytes failed ({e}): a large hotplug burst may overflow the socket; \
                 overflows are detected and followed by a rescan"
            ))
        }
    };
    let granted = nix::sys::socket::getsockopt(&fd, sockopt::RcvBuf).unwrap_or(0);
    set_nonblocking(fd.as_raw_fd());
    // SAFETY: an OwnedFd keeps its descriptor open and unchanged until it is dropped.
    let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| OpenError::Register(e.into()))?;
    Ok(UeventSocket {
        fd,
        rcvbuf: granted,
        rcvbuf_warning,
    })
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

/// Reads the socket until `tx` closes. Never returns an error: problems are counted,
/// logged, and reported as [`SourceMsg::Loss`].
pub async fn run(socket: UeventSocket, tx: mpsc::Sender<SourceMsg>, counters: Arc<Counters>) {
    // UEVENT_BUFFER_SIZE is 2048 in the kernel; leave room.
    let mut buf = vec![0u8; 8192];
    let mut seq = SeqnumTracker::default();
    loop {
        let mut guard = match socket.fd.readable().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "uevent socket failed; the uevent source stops");
                return;
            }
        };
        loop {
            match recvfrom::<NetlinkAddr>(socket.fd.get_ref().as_raw_fd(), &mut buf) {
                Ok((len, from)) => {
                    // Only the kernel (port id 0) sends real uevents.
                    if from.is_some_and(|a| a.pid() != 0) {
                        Counters::bump(&counters.uevents_ignored);
                        continue;
                    }
                    let msg = handle_datagram(&buf[..len], &mut seq, &counters);
                    for m in msg {
                        if tx.send(m).await.is_err() {
                            return;
                        }
                    }
                }
                Err(Errno::EAGAIN) => {
                    guard.clear_ready();
                    break;
                }
                Err(Errno::ENOBUFS) => {
                    Counters::bump(&counters.uevent_overflows);
                    tracing::warn!(
                        "uevent socket overflowed (ENOBUFS): events were lost; rescanning"
                    );
                    let loss = SourceMsg::Loss {
                        source: Source::Uevent,
                        loss: Loss::Enobufs,
                    };
                    if tx.send(loss).await.is_err() {
                        return;
                    }
                }
                Err(Errno::EINTR) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "reading the uevent socket");
                    guard.clear_ready();
                    break;
                }
            }
        }
    }
}

/// One datagram to zero, one or two messages (a gap, then the change).
pub fn handle_datagram(buf: &[u8], seq: &mut SeqnumTracker, counters: &Counters) -> Vec<SourceMsg> {
    Counters::bump(&counters.uevents);
    let ev = match parse(buf) {
        Ok(ev) => ev,
        Err(e) => {
            Counters::bump(&counters.uevents_malformed);
            let shown = String::from_utf8_lossy(&buf[..buf.len().min(120)]).replace('\0', "\\0");
            tracing::warn!(error = %e, message = %shown, "malformed uevent ignored");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    if let Some(loss) = seq.observe(ev.seqnum) {
        Counters::bump(&counters.uevent_seqnum_gaps);
        out.push(SourceMsg::Loss {
            source: Source::Uevent,
            loss,
        });
    }
    match ev.change() {
        Some(change) => out.push(SourceMsg::Change(change)),
        None => Counters::bump(&counters.uevents_ignored),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(parts: &[&str]) -> Vec<u8> {
        let mut v = Vec::new();
        for p in parts {
            v.extend_from_slice(p.as_bytes());
            v.push(0);
        }
        v
    }

    fn offline_memory42(seq: u64) -> Vec<u8> {
        msg(&[
            "offline@/devices/system/memory/memory42",
            "ACTION=offline",
            "DEVPATH=/devices/system/memory/memory42",
            "SUBSYSTEM=memory",
            &format!("SEQNUM={seq}"),
        ])
    }

    #[test]
    fn parses_a_memory_block_offline() {
        let ev = parse(&offline_memory42(4242)).unwrap();
        assert_eq!(ev.sysname(), "memory42");
        assert_eq!(ev.seqnum, 4242);
        let c = ev.change().unwrap();
        assert_eq!(
            (c.kind, c.action, c.device.as_deref()),
            (Kind::MemoryBlock, Action::Offline, Some("memory42"))
        );
    }

    #[test]
    fn cpu_online_and_other_subsystems() {
        let cpu = msg(&[
            "online@/devices/system/cpu/cpu1",
            "ACTION=online",
            "DEVPATH=/devices/system/cpu/cpu1",
            "SUBSYSTEM=cpu",
            "SEQNUM=9",
        ]);
        let c = parse(&cpu).unwrap().change().unwrap();
        assert_eq!((c.kind, c.action), (Kind::Cpu, Action::Online));
        let block = msg(&[
            "add@/devices/virtual/block/loop0",
            "ACTION=add",
            "DEVPATH=/devices/virtual/block/loop0",
            "SUBSYSTEM=block",
            "SEQNUM=10",
        ]);
        assert_eq!(parse(&block).unwrap().change(), None);
        let bind = msg(&[
            "bind@/devices/system/cpu/cpu1",
            "ACTION=bind",
            "DEVPATH=/devices/system/cpu/cpu1",
            "SUBSYSTEM=cpu",
            "SEQNUM=11",
        ]);
        assert_eq!(parse(&bind).unwrap().change(), None);
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        assert_eq!(parse(b""), Err(UeventError::Empty));
        assert_eq!(parse(b"\0\0\0"), Err(UeventError::Empty));
        assert_eq!(parse(b"libudev\0\xfe\xed"), Err(UeventError::FromUdevd));
        assert_eq!(
            parse(&msg(&["no header here", "ACTION=add"])),
            Err(UeventError::NoHeader)
        );
        assert_eq!(
            parse(&msg(&[
                "add@/x",
                "ACTION=add",
                "DEVPATH=/x",
                "SUBSYSTEM=memory"
            ])),
            Err(UeventError::Missing("SEQNUM"))
        );
        assert_eq!(
            parse(&msg(&[
                "add@/x",
                "ACTION=add",
                "DEVPATH=/x",
                "SUBSYSTEM=memory",
                "SEQNUM=12x"
            ])),
            Err(UeventError::BadSeqnum("12x".into()))
        );
        assert!(matches!(
            parse(&msg(&[
                "add@/x",
                "ACTION=remove",
                "DEVPATH=/x",
                "SUBSYSTEM=memory",
                "SEQNUM=1"
            ])),
            Err(UeventError::HeaderMismatch { .. })
        ));
        let mut bad = offline_memory42(1);
        bad.extend_from_slice(b"FOO=\xff\xfe\0");
        assert_eq!(parse(&bad), Err(UeventError::NotUtf8(5)));
        // Truncated in the middle of a field: SEQNUM is cut off.
        let full = offline_memory42(77);
        assert_eq!(
            parse(&full[..full.len() - 5]),
            Err(UeventError::Missing("SEQNUM"))
        );
    }

    #[test]
    fn malformed_datagrams_are_counted_and_the_next_one_still_parses() {
        let counters = Counters::default();
        let mut seq = SeqnumTracker::default();
        assert!(handle_datagram(b"garbage", &mut seq, &counters).is_empty());
        let out = handle_datagram(&offline_memory42(5), &mut seq, &counters);
        assert!(matches!(out.as_slice(), [SourceMsg::Change(_)]));
        assert_eq!(
            counters
                .uevents_malformed
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn seqnum_gaps_are_reported_once() {
        let mut t = SeqnumTracker::default();
        assert_eq!(t.observe(100), None);
        assert_eq!(t.observe(101), None);
        assert_eq!(
            t.observe(105),
            Some(Loss::SeqnumGap {
                expected: 102,
                got: 105
            })
        );
        assert_eq!(t.observe(106), None);
        // A late, older message is not a gap.
        assert_eq!(t.observe(103), None);
        assert_eq!(t.observe(107), None);
    }

    #[test]
    fn seqnum_gaps_are_counted_for_the_metrics() {
        let counters = Counters::default();
        let mut seq = SeqnumTracker::default();
        handle_datagram(&offline_memory42(5), &mut seq, &counters);
        handle_datagram(&offline_memory42(6), &mut seq, &counters);
        let out = handle_datagram(&offline_memory42(9), &mut seq, &counters);
        assert!(matches!(
            out.as_slice(),
            [SourceMsg::Loss { .. }, SourceMsg::Change(_)]
        ));
        let gaps = || {
            counters
                .uevent_seqnum_gaps
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        assert_eq!(gaps(), 1);
        handle_datagram(&offline_memory42(10), &mut seq, &counters);
        assert_eq!(gaps(), 1, "a following seqnum is no gap");
    }
}
