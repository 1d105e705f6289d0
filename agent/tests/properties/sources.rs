//! The two kernel sources: uevent datagrams (lib/kobject_uevent.c) and eBPF ring-buffer
//! records (agent-common's `ProbeRecord`).
use std::sync::atomic::Ordering::Relaxed;

use agent_common::{CpuAction, Probe, ProbeRecord};
use hotplug_agent::{
    record::{Action, Kind},
    sources::{
        Counters, Loss, SourceMsg,
        ebpf::{self, DecodeError},
        uevent::{self, SeqnumTracker, Uevent, UeventError},
    },
};
use proptest::{collection::vec, prelude::*, sample::select};

use crate::{check, ensure};

/// What a kernel uevent says, before it is written as a datagram.
#[derive(Clone, Debug)]
struct Model {
    action: String,
    subsystem: String,
    devpath: String,
    seqnum: u64,
    /// Other `KEY=VALUE` fields, in the order written (the kernel adds e.g. `STATE=`).
    extra: Vec<(String, String)>,
    /// Where among the extra fields SUBSYSTEM and SEQNUM go.
    order: (usize, usize),
}

impl Model {
    /// lib/kobject_uevent.c: `ACTION@DEVPATH\0` then `KEY=VALUE\0` for ACTION, DEVPATH,
    /// SUBSYSTEM, the caller's fields and SEQNUM.
    fn datagram(&self) -> Vec<u8> {
        let mut fields = vec![
            format!("ACTION={}", self.action),
            format!("DEVPATH={}", self.devpath),
        ];
        let mut rest: Vec<String> = self.extra.iter().map(|(k, v)| format!("{k}={v}")).collect();
        rest.insert(
            self.order.0.min(rest.len()),
            format!("SUBSYSTEM={}", self.subsystem),
        );
        rest.insert(
            self.order.1.min(rest.len()),
            format!("SEQNUM={}", self.seqnum),
        );
        fields.extend(rest);
        let mut out = format!("{}@{}", self.action, self.devpath).into_bytes();
        for f in fields {
            out.push(0);
            out.extend(f.into_bytes());
        }
        out.push(0);
        out
    }
}

fn token() -> impl Strategy<Value = String> {
    // Printable, no NUL, no '=', no '@': what the kernel puts in a value it formats.
    vec(
        select(&b"abcdefghijklmnopqrstuvwxyz0123456789_-:./ "[..]),
        1..24,
    )
    .prop_map(|b| String::from_utf8(b).expect("ASCII"))
}

fn model() -> impl Strategy<Value = Model> {
    let action = prop_oneof![
        select(
            &[
                "add", "remove", "online", "offline", "change", "bind", "unbind", "move"
            ][..]
        )
        .prop_map(String::from),
        token().prop_filter("no '@' or '/' in an action", |t| !t.contains('/')),
    ];
    let device = prop_oneof![
        (0u32..4096).prop_map(|n| (
            "memory".to_owned(),
            format!("/devices/system/memory/memory{n}")
        )),
        (0u32..8192).prop_map(|n| ("cpu".to_owned(), format!("/devices/system/cpu/cpu{n}"))),
        (token(), token()).prop_map(|(s, p)| (s, format!("/devices/{p}"))),
    ];
    let extra = vec(
        (
            select(&["STATE", "MODALIAS", "DRIVER", "OF_NAME", "X"][..]).prop_map(String::from),
            token(),
        ),
        0..4,
    );
    (action, device, any::<u64>(), extra, (0usize..6, 0usize..6)).prop_map(
        |(action, (subsystem, devpath), seqnum, extra, order)| Model {
            action,
            subsystem,
            devpath,
            seqnum,
            extra,
            order,
        },
    )
}

/// A valid datagram with bytes changed, cut or inserted: what a corrupted or hostile
/// message looks like.
fn mutated() -> impl Strategy<Value = Vec<u8>> {
    super::mutated(model().prop_map(|m| m.datagram()), 6)
}

#[test]
fn uevent_datagrams_from_the_model_parse_to_the_model() {
    check("uevent_model", 2000, model(), |m| {
        let parsed = uevent::parse(&m.datagram());
        let want = Uevent {
            action: m.action.clone(),
            devpath: m.devpath.clone(),
            subsystem: m.subsystem.clone(),
            seqnum: m.seqnum,
        };
        ensure!(parsed.as_ref() == Ok(&want), "{m:?} parsed to {parsed:?}");
        let ev = parsed.expect("checked");
        let change = ev.change();
        let kind = match (m.subsystem.as_str(), ev.sysname()) {
            ("memory", name) if name.starts_with("memory") => Some(Kind::MemoryBlock),
            ("cpu", name) if name.starts_with("cpu") => Some(Kind::Cpu),
            _ => None,
        };
        let action = match m.action.as_str() {
            "add" => Some(Action::Add),
            "remove" => Some(Action::Remove),
            "online" => Some(Action::Online),
            "offline" => Some(Action::Offline),
            "change" => Some(Action::Change),
            _ => None,
        };
        match (kind, action, &change) {
            (Some(kind), Some(action), Some(c)) => ensure!(
                c.kind == kind && c.action == action && c.device.as_deref() == Some(ev.sysname()),
                "{m:?} became {c:?}"
            ),
            (Some(_), Some(_), None) | (_, _, Some(_)) => {
                ensure!(false, "{m:?}: change {change:?}, want {kind:?} {action:?}")
            }
            _ => {}
        }
        Ok(())
    });
}

#[test]
fn any_datagram_is_parsed_or_refused_and_counted() {
    let input = prop_oneof![vec(any::<u8>(), 0..300), mutated()];
    let counters = Counters::default();
    let seen = std::cell::Cell::new(0u64);
    // The tracker carries state from one datagram to the next, as the socket's does.
    let tracker = std::cell::RefCell::new(SeqnumTracker::default());
    check("uevent_any_bytes", 6000, input, |bytes| {
        match uevent::parse(&bytes) {
            Ok(ev) => {
                // What was parsed is in the datagram.
                let text = String::from_utf8_lossy(&bytes);
                ensure!(
                    text.contains(&format!("ACTION={}", ev.action))
                        && text.contains(&format!("DEVPATH={}", ev.devpath)),
                    "{ev:?} not in {text:?}"
                );
            }
            Err(UeventError::BadSeqnum(v)) => {
                ensure!(
                    String::from_utf8_lossy(&bytes).contains(&v),
                    "{v:?} not in the datagram"
                )
            }
            Err(UeventError::HeaderMismatch { header }) => {
                ensure!(
                    String::from_utf8_lossy(&bytes).contains(&header),
                    "{header:?} not in it"
                )
            }
            Err(_) => {}
        }
        let before = counters.uevents.load(Relaxed);
        let msgs = uevent::handle_datagram(&bytes, &mut tracker.borrow_mut(), &counters);
        seen.set(seen.get() + 1);
        ensure!(counters.uevents.load(Relaxed) == before + 1, "not counted");
        ensure!(msgs.len() <= 2, "{} messages from one datagram", msgs.len());
        Ok(())
    });
    let c = |a: &std::sync::atomic::AtomicU64| a.load(Relaxed);
    assert_eq!(c(&counters.uevents), seen.get(), "every datagram counted");
    assert!(
        c(&counters.uevents_malformed) > 0,
        "the mutations never made a bad datagram"
    );
}

#[test]
fn seqnum_gaps_follow_the_highest_seqnum_seen_to_the_end_of_u64() {
    let seqnums = vec(
        prop_oneof![any::<u64>(), (0u64..8).prop_map(|d| u64::MAX - d), 0u64..16,],
        1..40,
    );
    check("uevent_seqnums", 2000, seqnums, |seqnums| {
        let mut tracker = SeqnumTracker::default();
        let mut highest: Option<u64> = None;
        for s in seqnums {
            let gap = tracker.observe(s);
            let want = match highest {
                Some(h) if h.checked_add(1).is_some_and(|next| s > next) => Some(Loss::SeqnumGap {
                    expected: h + 1,
                    got: s,
                }),
                _ => None,
            };
            ensure!(
                gap == want,
                "after {highest:?}, {s}: {gap:?}, want {want:?}"
            );
            highest = Some(highest.map_or(s, |h| h.max(s)));
        }
        Ok(())
    });
}

#[test]
fn uevent_regressions() {
    // A datagram with the largest SEQNUM, then another one: `last + 1` overflowed.
    let counters = Counters::default();
    let mut tracker = SeqnumTracker::default();
    for seqnum in [u64::MAX, 5] {
        let msg = format!(
            "online@/devices/system/cpu/cpu1\0ACTION=online\0DEVPATH=/devices/system/cpu/cpu1\0\
             SUBSYSTEM=cpu\0SEQNUM={seqnum}\0"
        );
        let out = uevent::handle_datagram(msg.as_bytes(), &mut tracker, &counters);
        assert!(matches!(out.last(), Some(SourceMsg::Change(_))), "{out:?}");
    }
}

/// A ring-buffer record as the eBPF side writes it.
fn record() -> impl Strategy<Value = ProbeRecord> {
    (
        (any::<u64>(), any::<i64>(), any::<u64>()),
        (any::<u32>(), any::<u32>(), any::<u32>()),
        (
            prop_oneof![1u16..=6, any::<u16>()],
            prop_oneof![0u16..4, any::<u16>()],
        ),
        any::<[u8; 16]>(),
    )
        .prop_map(
            |((kernel_ns, pages, pfn), (pid, cpu, subject), (probe, action), comm)| ProbeRecord {
                kernel_ns,
                pages,
                pfn,
                pid,
                cpu,
                subject,
                probe,
                action,
                comm,
            },
        )
}

fn bytes_of(r: &ProbeRecord) -> Vec<u8> {
    // SAFETY: ProbeRecord is repr(C) with no padding (asserted in agent-common).
    unsafe {
        std::slice::from_raw_parts(
            (r as *const ProbeRecord).cast::<u8>(),
            size_of::<ProbeRecord>(),
        )
    }
    .to_vec()
}

#[test]
fn ring_buffer_records_decode_to_what_the_probe_wrote() {
    // Ring-buffer items are 8-aligned, but decode must not rely on it: any offset.
    check(
        "ebpf_records",
        3000,
        (record(), 0usize..8, vec(any::<u8>(), 0..8)),
        |(r, offset, tail)| {
            let mut bytes = vec![0xAA; offset];
            bytes.extend(bytes_of(&r));
            bytes.extend(&tail);
            let decoded = ebpf::decode(&bytes[offset..], 7);
            let Some(probe) = Probe::from_u16(r.probe) else {
                ensure!(
                    decoded == Err(DecodeError::UnknownProbe { probe: r.probe }),
                    "probe {}: {decoded:?}",
                    r.probe
                );
                return Ok(());
            };
            let ev = decoded.map_err(|e| TestCaseError::fail(format!("{r:?}: {e}")))?;
            let comm_len = r.comm.iter().position(|&b| b == 0).unwrap_or(16);
            ensure!(
                ev.probe == probe
                    && (
                        ev.kernel_ns,
                        ev.pages,
                        ev.pid,
                        ev.cpu,
                        ev.subject,
                        ev.action
                    ) == (r.kernel_ns, r.pages, r.pid, r.cpu, r.subject, r.action)
                    && ev.pfn == r.pfn
                    && ev.comm == String::from_utf8_lossy(&r.comm[..comm_len])
                    && ev.received_ns == 7,
                "{r:?} decoded to {ev:?}"
            );
            // Any page frame number, even one past the end of memory, names a block or none.
            let change = ebpf::change_of(&ev, "probe", Some(128 << 20));
            if probe == Probe::CpuhpExit {
                let action = match r.action {
                    a if a == CpuAction::Online as u16 => Some(Action::Online),
                    a if a == CpuAction::Offline as u16 => Some(Action::Offline),
                    _ => None,
                };
                ensure!(
                    change.as_ref().map(|c| (c.action, c.device.clone()))
                        == action.map(|a| (a, Some(format!("cpu{}", r.subject)))),
                    "{r:?}: {change:?}"
                );
            } else {
                ensure!(change.is_some(), "a memory probe hit without a change");
            }
            Ok(())
        },
    );
}

#[test]
fn short_ring_buffer_records_are_refused_by_length() {
    check(
        "ebpf_short",
        1000,
        vec(any::<u8>(), 0..size_of::<ProbeRecord>()),
        |bytes| {
            let got = ebpf::decode(&bytes, 0);
            let want = Err(DecodeError::Short {
                len: bytes.len(),
                want: size_of::<ProbeRecord>(),
            });
            ensure!(got == want, "{got:?}");
            Ok(())
        },
    );
}
