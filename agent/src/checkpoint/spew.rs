//! The kubelet's checkpoint checksum: FNV-32a of the checkpoint struct as go-spew prints it.
//!
//! pkg/kubelet/checkpointmanager/checksum/checksum.go `New` hashes
//! `hashutil.DeepHashObject(fnv.New32a(), data)`, which writes `dump.ForHash(data)`
//! (k8s.io/utils/dump; before that, pkg/util/hash with the same spew settings): go-spew
//! `ConfigState{Indent: " ", SortKeys: true, DisableMethods: true, SpewKeys: true,
//! DisablePointerAddresses: true, DisableCapacities: true}.Sprintf("%#v", data)`. With
//! `%#v` spew prints in one line, with types (davecgh/go-spew spew/format.go,
//! v1.1.2-0.20180830191138-d8f796af33cc as vendored by the kubelet):
//! - a value's Go type in parentheses before it, unless it sits directly in a map (key or
//!   value), a slice, or behind a pointer (`ignoreNextType`);
//! - structs as `{Field:(type)value Field2:...}`, maps as `map[k:v k2:v2]` with keys sorted
//!   (strings bytewise, ints numerically), slices as `[a b]`, strings unquoted;
//! - a nil map or slice as `<nil>` (after its type), a pointer as `(*T)` or, untyped, `<*>`.
//!
//! No Go toolchain is needed: the kubelet's structs are described here as [`Go`] values
//! and printed the same way. The published checkpoints in the tests pin the result.
use std::fmt::Write as _;

/// A Go value, with the type name `reflect.Type.String()` gives it (`state.NUMANodeMap`,
/// `map[string]string`, `*state.MemoryTable`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Go {
    /// Any string kind (`string`, `v1.ResourceName`).
    Str(String, String),
    /// Any signed integer kind.
    Int(String, i64),
    /// Any unsigned integer kind (`uint64`, `checksum.Checksum`).
    Uint(String, u64),
    /// `None` is a nil map. Entries in any order: printed sorted, as spew's `SortKeys`.
    Map(String, Option<Vec<(Go, Go)>>),
    /// `None` is a nil slice.
    Slice(String, Option<Vec<Go>>),
    Struct(String, Vec<(&'static str, Go)>),
    /// The pointer's type (`*state.MemoryTable`) and what it points to; `None` is nil.
    Ptr(String, Option<Box<Go>>),
}

impl Go {
    pub fn string(s: impl Into<String>) -> Self {
        Self::Str("string".into(), s.into())
    }

    fn type_name(&self) -> &str {
        match self {
            Self::Str(t, _)
            | Self::Int(t, _)
            | Self::Uint(t, _)
            | Self::Map(t, _)
            | Self::Slice(t, _)
            | Self::Struct(t, _)
            | Self::Ptr(t, _) => t,
        }
    }
}

/// What `printer.Sprintf("%#v", value)` gives.
pub fn sprint(value: &Go) -> String {
    let mut out = String::new();
    write(&mut out, value, true);
    out
}

/// FNV-1a, 32 bits (Go's `hash/fnv.New32a`).
pub fn fnv32a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |hash, b| {
        (hash ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// `typed` is spew's `!ignoreNextType`.
fn write(out: &mut String, value: &Go, typed: bool) {
    if let Go::Ptr(ty, target) = value {
        // formatPtr: the pointer's own type, or `<*>` where types are not shown; the
        // value behind it never repeats its type.
        match (target, typed) {
            (None, false) => out.push_str("<nil>"),
            (None, true) => {
                let _ = write!(out, "({ty})<nil>");
            }
            (Some(target), true) => {
                let _ = write!(out, "({ty})");
                write(out, target, false);
            }
            (Some(target), false) => {
                out.push_str("<*>");
                write(out, target, false);
            }
        }
        return;
    }
    if typed {
        let _ = write!(out, "({})", value.type_name());
    }
    match value {
        Go::Str(_, s) => out.push_str(s),
        Go::Int(_, i) => {
            let _ = write!(out, "{i}");
        }
        Go::Uint(_, u) => {
            let _ = write!(out, "{u}");
        }
        Go::Map(_, None) | Go::Slice(_, None) => out.push_str("<nil>"),
        Go::Map(_, Some(entries)) => {
            let mut sorted: Vec<&(Go, Go)> = entries.iter().collect();
            sorted.sort_by(|(a, _), (b, _)| key_order(a, b));
            out.push_str("map[");
            for (i, (k, v)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                write(out, k, false);
                out.push(':');
                write(out, v, false);
            }
            out.push(']');
        }
        Go::Slice(_, Some(items)) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                write(out, item, false);
            }
            out.push(']');
        }
        Go::Struct(_, fields) => {
            out.push('{');
            for (i, (name, field)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                out.push_str(name);
                out.push(':');
                write(out, field, true);
            }
            out.push('}');
        }
        Go::Ptr(..) => unreachable!("handled above"),
    }
}

/// spew common.go `valueSortLess`: strings by bytes, integers by value.
fn key_order(a: &Go, b: &Go) -> std::cmp::Ordering {
    match (a, b) {
        (Go::Str(_, a), Go::Str(_, b)) => a.as_bytes().cmp(b.as_bytes()),
        (Go::Int(_, a), Go::Int(_, b)) => a.cmp(b),
        (Go::Uint(_, a), Go::Uint(_, b)) => a.cmp(b),
        _ => std::cmp::Ordering::Equal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv32a_matches_the_reference_vectors() {
        // The FNV reference test vectors (draft-eastlake-fnv): "" and "a".
        assert_eq!(fnv32a(b""), 0x811c_9dc5);
        assert_eq!(fnv32a(b"a"), 0xe40c_292c);
        assert_eq!(fnv32a(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn prints_like_spew_with_types() {
        let table = Go::Struct(
            "state.MemoryTable".into(),
            vec![("TotalMemSize", Go::Uint("uint64".into(), 2048))],
        );
        let value = Go::Ptr(
            "*state.X".into(),
            Some(Box::new(Go::Struct(
                "state.X".into(),
                vec![
                    ("Name", Go::string("a b")),
                    (
                        "M",
                        Go::Map(
                            "map[int]*state.MemoryTable".into(),
                            Some(vec![
                                (
                                    Go::Int("int".into(), 10),
                                    Go::Ptr("*state.MemoryTable".into(), None),
                                ),
                                (
                                    Go::Int("int".into(), 2),
                                    Go::Ptr("*state.MemoryTable".into(), Some(Box::new(table))),
                                ),
                            ]),
                        ),
                    ),
                    ("S", Go::Slice("[]int".into(), None)),
                    (
                        "T",
                        Go::Slice("[]int".into(), Some(vec![Go::Int("int".into(), 0)])),
                    ),
                    ("P", Go::Ptr("*int".into(), None)),
                ],
            ))),
        );
        assert_eq!(
            sprint(&value),
            "(*state.X){Name:(string)a b M:(map[int]*state.MemoryTable)map[2:<*>{TotalMemSize:(uint64)2048} 10:<nil>] \
             S:([]int)<nil> T:([]int)[0] P:(*int)<nil>}"
        );
    }
}
