//! The machine's capacity as the kubelet sees it, read from a filesystem root.
//!
//! The kubelet's `capacity` comes from cadvisor's `MachineInfo`: `memory` is `MemTotal`
//! of `/proc/meminfo` and `cpu` is the number of online logical CPUs. Everything here is
//! a pure function of `root` (`/` on the host, a fixture tree in tests), so what the agent
//! reports can be checked against what the kubelet would compute from the same files.
//!
//! [`read_summary`] reads two small files and goes on every event record;
//! [`read_snapshot`] adds the memory blocks, hugepages and NUMA nodes, for start-up and
//! rescans.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

const MEMINFO: &str = "proc/meminfo";
const CPU_ONLINE: &str = "sys/devices/system/cpu/online";
const CPU_POSSIBLE: &str = "sys/devices/system/cpu/possible";
pub const MEMORY_DIR: &str = "sys/devices/system/memory";
const NODE_DIR: &str = "sys/devices/system/node";
const HUGEPAGES_DIR: &str = "sys/kernel/mm/hugepages";

/// Refuse CPU ids above this so a corrupt list such as `0-4294967295` cannot make us
/// allocate gigabytes; far above any kernel's NR_CPUS (x86 caps CONFIG_NR_CPUS at 8192).
const MAX_CPU_ID: u32 = 65_535;

/// What every event record carries: cheap to read (two small files).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub memory_bytes: u64,
    pub cpus_online: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// `MemTotal` of `proc/meminfo` in bytes, as cadvisor's `GetMachineMemoryCapacity`.
    pub memory_bytes: u64,
    /// Number of CPUs in `cpus_online_list`.
    pub cpus_online: u32,
    /// Canonical kernel list syntax, e.g. `0-3,8,10-11`.
    pub cpus_online_list: String,
    /// Number of CPUs in `cpu/possible`; 0 when the file is missing.
    pub cpus_possible: u32,
    /// `memory/block_size_bytes`; `None` without memory hotplug support.
    pub memory_block_size: Option<u64>,
    /// Sorted by id.
    pub memory_blocks: Vec<MemoryBlock>,
    /// Sorted by page size.
    pub hugepages: Vec<Hugepages>,
    /// Sorted by id.
    pub numa_nodes: Vec<NumaNode>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryBlock {
    pub id: u32,
    pub state: BlockState,
    /// The zone an online block is in; `None` when not online, or when it spans zones.
    pub zone: Option<String>,
    pub node: Option<u32>,
}

/// drivers/base/memory.c `state_show` (v6.18): "online", "offline", "going-offline",
/// otherwise "ERROR-UNKNOWN-<n>".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockState {
    Online,
    Offline,
    GoingOffline,
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Hugepages {
    pub size_bytes: u64,
    pub total: u64,
    pub free: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NumaNode {
    pub id: u32,
    pub cpus: Vec<u32>,
    pub memory_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CapacityError {
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("parsing {what} in {}: {value:?}", path.display())]
    Parse {
        path: PathBuf,
        what: &'static str,
        value: String,
    },
    #[error("parsing the CPU list in {}", path.display())]
    CpuList {
        path: PathBuf,
        #[source]
        source: CpuListError,
    },
}

/// One element of a CPU list that is not `N` or `N-M` with `N <= M`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad CPU list element {element:?}")]
pub struct CpuListError {
    pub element: String,
}

impl BlockState {
    fn parse(s: &str) -> Self {
        match s {
            "online" => Self::Online,
            "offline" => Self::Offline,
            "going-offline" => Self::GoingOffline,
            _ => Self::Unknown,
        }
    }
}

impl Snapshot {
    pub fn summary(&self) -> Summary {
        Summary {
            memory_bytes: self.memory_bytes,
            cpus_online: self.cpus_online,
        }
    }

    pub fn online_blocks(&self) -> usize {
        self.count_blocks(BlockState::Online)
    }

    /// Fully offline blocks; a block that is still going offline is not counted.
    pub fn offline_blocks(&self) -> usize {
        self.count_blocks(BlockState::Offline)
    }

    fn count_blocks(&self, state: BlockState) -> usize {
        self.memory_blocks
            .iter()
            .filter(|b| b.state == state)
            .count()
    }
}

/// `MemTotal` and the online CPU count: the kubelet's `memory` and `cpu` capacity.
pub fn read_summary(root: &Path) -> Result<Summary, CapacityError> {
    Ok(Summary {
        memory_bytes: read_memory_bytes(root)?,
        cpus_online: count(&read_cpu_list(&root.join(CPU_ONLINE))?),
    })
}

/// Everything in [`Snapshot`]. Only `proc/meminfo` and `cpu/online` are required; a
/// machine without memory hotplug, NUMA or hugepages has empty parts.
pub fn read_snapshot(root: &Path) -> Result<Snapshot, CapacityError> {
    let online = read_cpu_list(&root.join(CPU_ONLINE))?;
    let possible_path = root.join(CPU_POSSIBLE);
    let cpus_possible = match read_optional(&possible_path)? {
        Some(text) => count(&parse_cpu_list_at(&possible_path, &text)?),
        None => 0,
    };
    let block_size_path = root.join(MEMORY_DIR).join("block_size_bytes");
    let memory_block_size = read_optional(&block_size_path)?
        .map(|text| {
            // drivers/base/memory.c `block_size_bytes_show` prints "%lx": hex, no prefix.
            u64::from_str_radix(text.trim(), 16)
                .map_err(|_| parse_error(&block_size_path, "block size", &text))
        })
        .transpose()?;
    let numa_nodes = read_numa_nodes(&root.join(NODE_DIR))?;
    let node_ids: Vec<u32> = numa_nodes.iter().map(|n| n.id).collect();
    Ok(Snapshot {
        memory_bytes: read_memory_bytes(root)?,
        cpus_online: count(&online),
        cpus_online_list: format_cpu_list(&online),
        cpus_possible,
        memory_block_size,
        memory_blocks: read_memory_blocks(&root.join(MEMORY_DIR), &node_ids)?,
        hugepages: read_hugepages(&root.join(HUGEPAGES_DIR))?,
        numa_nodes,
    })
}

/// Parses the kernel's CPU list syntax (lib/bitmap-str.c `bitmap_parselist`, without the
/// `:used/group` strides that sysfs never prints). The result is sorted and deduplicated.
pub fn parse_cpu_list(s: &str) -> Result<Vec<u32>, CpuListError> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(Vec::new());
    }
    // One bit per possible id (8 KiB), not one u32 per element's id: a list repeating
    // `0-65535` (a checkpoint may hold 4 MiB of it) would otherwise expand to gigabytes
    // before the duplicates are dropped.
    let mut seen = vec![0u64; (MAX_CPU_ID as usize + 1).div_ceil(64)];
    for element in s.split(',') {
        let bad = || CpuListError {
            element: element.to_owned(),
        };
        let (first, last) = match element.split_once('-') {
            Some((a, b)) => (cpu_id(a).ok_or_else(bad)?, cpu_id(b).ok_or_else(bad)?),
            None => {
                let cpu = cpu_id(element).ok_or_else(bad)?;
                (cpu, cpu)
            }
        };
        if first > last {
            return Err(bad());
        }
        let (mut from, end) = (first as usize, last as usize + 1);
        while from < end {
            let (word, bit) = (from / 64, from % 64);
            let n = (64 - bit).min(end - from);
            seen[word] |= (u64::MAX >> (64 - n)) << bit;
            from += n;
        }
    }
    let mut cpus = Vec::new();
    for (word, &bits) in (0u32..).zip(&seen) {
        let mut bits = bits;
        while bits != 0 {
            cpus.push(word * 64 + bits.trailing_zeros());
            bits &= bits - 1;
        }
    }
    Ok(cpus)
}

/// The kernel's canonical list form (`%*pbl`, lib/vsprintf.c `bitmap_list_string`):
/// runs of two or more as `a-b`, singletons alone, comma-separated, ascending.
pub fn format_cpu_list(cpus: &[u32]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let first = sorted[i];
        while i + 1 < sorted.len() && sorted[i + 1] == sorted[i] + 1 {
            i += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        if sorted[i] == first {
            out.push_str(&first.to_string());
        } else {
            out.push_str(&format!("{first}-{}", sorted[i]));
        }
        i += 1;
    }
    out
}

/// `MemTotal` of `/proc/meminfo` in bytes. Same rule as cadvisor's
/// `memoryCapacityRegexp` (`MemTotal:\s*([0-9]+) kB`, value times 1024):
/// <https://github.com/google/cadvisor/blob/master/machine/machine.go>
pub fn parse_meminfo_total(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(parse_kb)
}

/// `nodeN/meminfo` prefixes each line with "Node N " (drivers/base/node.c `node_read_meminfo`).
fn parse_node_meminfo_total(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| {
            let (_, rest) = line.strip_prefix("Node ")?.split_once(' ')?;
            rest.trim_start().strip_prefix("MemTotal:")
        })
        .and_then(parse_kb)
}

/// "   24684096 kB" to bytes.
fn parse_kb(field: &str) -> Option<u64> {
    let mut words = field.split_whitespace();
    let kb = digits(words.next()?)?;
    if words.next()? != "kB" {
        return None;
    }
    kb.checked_mul(1024)
}

fn read_memory_bytes(root: &Path) -> Result<u64, CapacityError> {
    let path = root.join(MEMINFO);
    let text = read(&path)?;
    parse_meminfo_total(&text).ok_or_else(|| {
        let line = text.lines().find(|l| l.starts_with("MemTotal:"));
        parse_error(&path, "MemTotal (kB)", line.unwrap_or("no MemTotal line"))
    })
}

/// `cpu/online` is the kernel's cpu_online_mask, the same set `/proc/cpuinfo` lists and
/// cadvisor counts for `NumCores` (utils/sysinfo/sysinfo.go skips offline CPUs):
/// <https://github.com/google/cadvisor/blob/master/utils/sysinfo/sysinfo.go>
fn read_cpu_list(path: &Path) -> Result<Vec<u32>, CapacityError> {
    parse_cpu_list_at(path, &read(path)?)
}

fn parse_cpu_list_at(path: &Path, text: &str) -> Result<Vec<u32>, CapacityError> {
    parse_cpu_list(text).map_err(|source| CapacityError::CpuList {
        path: path.to_owned(),
        source,
    })
}

/// Reads `state` for every block, `valid_zones` only for online blocks (for the others it
/// lists candidate zones, not a zone), and looks for the block's `nodeM` link.
fn read_memory_blocks(dir: &Path, node_ids: &[u32]) -> Result<Vec<MemoryBlock>, CapacityError> {
    let mut blocks = Vec::new();
    for (id, path) in numbered_entries(dir, |n| numbered(n, "memory"))? {
        if let Some(block) = read_block(&path, id, node_ids) {
            blocks.push(block);
        }
    }
    blocks.sort_unstable_by_key(|b| b.id);
    Ok(blocks)
}

/// `None` when the block vanished mid-scan (hot-remove deletes its directory). Any other
/// failure leaves a field unknown rather than failing the whole snapshot.
fn read_block(dir: &Path, id: u32, node_ids: &[u32]) -> Option<MemoryBlock> {
    let state = match fs::read_to_string(dir.join("state")) {
        Ok(s) => BlockState::parse(s.trim()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(_) => BlockState::Unknown,
    };
    // drivers/base/memory.c `valid_zones_show` (v6.18): an online block prints its zone,
    // or "none" when it spans several zones. Missing without CONFIG_MEMORY_HOTREMOVE.
    let zone = (state == BlockState::Online)
        .then(|| fs::read_to_string(dir.join("valid_zones")).ok())
        .flatten()
        .and_then(|text| {
            let mut words = text.split_whitespace();
            match (words.next(), words.next()) {
                (Some(zone), None) if zone != "none" => Some(zone.to_owned()),
                _ => None,
            }
        });
    // drivers/base/node.c `do_register_memory_block_under_node` links memoryN/nodeM.
    // Probing the known nodes costs one lstat per block; listing the directory, four
    // syscalls (that is the fallback, for a block outside every listed node).
    let probe = |&n: &u32| fs::symlink_metadata(dir.join(format!("node{n}"))).is_ok();
    let node = match node_ids.iter().copied().find(probe) {
        Some(node) => Some(node),
        None => match fs::read_dir(dir) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .find_map(|e| numbered(e.file_name().to_str()?, "node")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(_) => None,
        },
    };
    Some(MemoryBlock {
        id,
        state,
        zone,
        node,
    })
}

/// cadvisor reads the same directory for `MachineInfo.HugePages`.
fn read_hugepages(dir: &Path) -> Result<Vec<Hugepages>, CapacityError> {
    let mut pools = Vec::new();
    let size_kb = |name: &str| digits(name.strip_prefix("hugepages-")?.strip_suffix("kB")?);
    for (size_kb, pool) in numbered_entries(dir, size_kb)? {
        pools.push(Hugepages {
            size_bytes: size_kb.saturating_mul(1024),
            total: read_count(&pool.join("nr_hugepages"))?,
            free: read_count(&pool.join("free_hugepages"))?,
        });
    }
    pools.sort_unstable_by_key(|p| p.size_bytes);
    Ok(pools)
}

fn read_count(path: &Path) -> Result<u64, CapacityError> {
    let text = read(path)?;
    digits(text.trim()).ok_or_else(|| parse_error(path, "page count", &text))
}

/// A node file that is missing (a node going away, or a sparse fixture) reads as empty.
fn read_numa_nodes(dir: &Path) -> Result<Vec<NumaNode>, CapacityError> {
    let mut nodes = Vec::new();
    for (id, path) in numbered_entries(dir, |n| numbered(n, "node"))? {
        let cpulist = path.join("cpulist");
        let cpus = match read_optional(&cpulist)? {
            Some(text) => parse_cpu_list_at(&cpulist, &text)?,
            None => Vec::new(),
        };
        let meminfo = path.join("meminfo");
        let memory_bytes = match read_optional(&meminfo)? {
            Some(text) => parse_node_meminfo_total(&text)
                .ok_or_else(|| parse_error(&meminfo, "node MemTotal (kB)", &text))?,
            None => 0,
        };
        nodes.push(NumaNode {
            id,
            cpus,
            memory_bytes,
        });
    }
    nodes.sort_unstable_by_key(|n| n.id);
    Ok(nodes)
}

/// `(N, path)` for each entry of `dir` whose name `number` accepts; nothing when `dir`
/// does not exist.
fn numbered_entries<T>(
    dir: &Path,
    number: impl Fn(&str) -> Option<T>,
) -> Result<Vec<(T, PathBuf)>, CapacityError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read_error(dir, e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| read_error(dir, e))?;
        if let Some(n) = entry.file_name().to_str().and_then(&number) {
            found.push((n, entry.path()));
        }
    }
    Ok(found)
}

/// `memory12` with prefix `memory` is 12; `memory_failure` or `node` alone are not ids.
fn numbered(name: &str, prefix: &str) -> Option<u32> {
    u32::try_from(digits(name.strip_prefix(prefix)?)?).ok()
}

/// Decimal digits only: `str::parse` would also take a leading `+`.
fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn cpu_id(s: &str) -> Option<u32> {
    let id = u32::try_from(digits(s.trim())?).ok()?;
    (id <= MAX_CPU_ID).then_some(id)
}

/// Lists hold at most MAX_CPU_ID + 1 ids, so the count always fits.
fn count(cpus: &[u32]) -> u32 {
    u32::try_from(cpus.len()).unwrap_or(u32::MAX)
}

fn read(path: &Path) -> Result<String, CapacityError> {
    fs::read_to_string(path).map_err(|e| read_error(path, e))
}

fn read_optional(path: &Path) -> Result<Option<String>, CapacityError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(read_error(path, e)),
    }
}

fn read_error(path: &Path, source: io::Error) -> CapacityError {
    CapacityError::Read {
        path: path.to_owned(),
        source,
    }
}

/// Keeps error messages short: a whole meminfo is 1.5 kB.
fn parse_error(path: &Path, what: &'static str, value: &str) -> CapacityError {
    CapacityError::Parse {
        path: path.to_owned(),
        what,
        value: value.trim().chars().take(80).collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// A fixture root in a tempdir, laid out like `/`.
    struct Tree(tempfile::TempDir);

    impl Tree {
        fn new() -> Self {
            Self(tempfile::tempdir().expect("creating a tempdir"))
        }

        fn root(&self) -> &Path {
            self.0.path()
        }

        fn file(&self, rel: &str, contents: &str) -> &Self {
            let path = self.root().join(rel);
            fs::create_dir_all(path.parent().expect("fixture paths have a parent")).expect("mkdir");
            fs::write(&path, contents).expect("writing a fixture file");
            self
        }

        fn dir(&self, rel: &str) -> &Self {
            fs::create_dir_all(self.root().join(rel)).expect("mkdir");
            self
        }

        /// A memory block as sysfs shows it, with the `nodeM` link the kernel makes.
        fn block(&self, id: u32, state: &str, valid_zones: &str, node: Option<u32>) -> &Self {
            let dir = format!("{MEMORY_DIR}/memory{id}");
            self.file(&format!("{dir}/state"), &format!("{state}\n"))
                .file(&format!("{dir}/valid_zones"), &format!("{valid_zones}\n"));
            if let Some(node) = node {
                let link = self.root().join(format!("{dir}/node{node}"));
                symlink(format!("../../node/node{node}"), link).expect("symlink");
            }
            self
        }
    }

    fn minimal(meminfo: &str, online: &str) -> Tree {
        let tree = Tree::new();
        tree.file(MEMINFO, meminfo).file(CPU_ONLINE, online);
        tree
    }

    const MEMINFO_16G: &str = "MemTotal:       16318480 kB\nMemFree:        15000000 kB\n";

    /// Two NUMA nodes with a hole in the CPU numbering, blocks in every state, blocks
    /// that vanish or cannot be read mid-scan, and two hugepage sizes.
    fn two_node_machine() -> Tree {
        let tree = minimal(MEMINFO_16G, "0-3,8,10-11\n");
        tree.file(CPU_POSSIBLE, "0-15\n")
            .file(&format!("{MEMORY_DIR}/block_size_bytes"), "8000000\n")
            .file(&format!("{MEMORY_DIR}/auto_online_blocks"), "offline\n")
            .file(&format!("{NODE_DIR}/node0/cpulist"), "0-3\n")
            .file(
                &format!("{NODE_DIR}/node0/meminfo"),
                "Node 0 MemTotal:        8159240 kB\nNode 0 MemFree:         7000000 kB\n",
            )
            .file(&format!("{NODE_DIR}/node1/cpulist"), "8,10-11\n")
            .file(
                &format!("{NODE_DIR}/node1/meminfo"),
                "Node 1 MemTotal:        8159232 kB\n",
            )
            .file(&format!("{NODE_DIR}/online"), "0-1\n")
            .file(&format!("{NODE_DIR}/has_cpu"), "0-1\n")
            .block(0, "online", "none", Some(0))
            .block(1, "online", "DMA32", Some(0))
            .block(2, "online", "Normal", Some(0))
            .block(3, "offline", "Normal Movable", Some(0))
            .block(8, "online", "Movable", Some(1))
            .block(9, "going-offline", "Movable", Some(1))
            .block(10, "offline", "Movable", Some(1))
            .block(11, "ERROR-UNKNOWN-7", "Movable", Some(1))
            // No node link, and sorts before memory11 as a string.
            .block(100, "online", "Normal", None)
            // Hot-removed between listing and reading: its directory is empty.
            .dir(&format!("{MEMORY_DIR}/memory13"))
            .file(
                &format!("{HUGEPAGES_DIR}/hugepages-2048kB/nr_hugepages"),
                "16\n",
            )
            .file(
                &format!("{HUGEPAGES_DIR}/hugepages-2048kB/free_hugepages"),
                "12\n",
            )
            .file(
                &format!("{HUGEPAGES_DIR}/hugepages-1048576kB/nr_hugepages"),
                "2\n",
            )
            .file(
                &format!("{HUGEPAGES_DIR}/hugepages-1048576kB/free_hugepages"),
                "0\n",
            );
        // A state that cannot be read (EISDIR; permissions would not stop root).
        tree.dir(&format!("{MEMORY_DIR}/memory12/state"));
        tree
    }

    fn block(id: u32, state: BlockState, zone: Option<&str>, node: Option<u32>) -> MemoryBlock {
        MemoryBlock {
            id,
            state,
            zone: zone.map(str::to_owned),
            node,
        }
    }

    fn pool(size_bytes: u64, total: u64, free: u64) -> Hugepages {
        Hugepages {
            size_bytes,
            total,
            free,
        }
    }

    fn node(id: u32, cpus: &[u32], memory_bytes: u64) -> NumaNode {
        NumaNode {
            id,
            cpus: cpus.to_vec(),
            memory_bytes,
        }
    }

    #[test]
    fn two_node_machine_snapshot() {
        use BlockState::*;
        let tree = two_node_machine();
        let snapshot = read_snapshot(tree.root()).expect("reading the fixture");
        let expected = Snapshot {
            memory_bytes: 16_318_480 * 1024,
            cpus_online: 7,
            cpus_online_list: "0-3,8,10-11".to_owned(),
            cpus_possible: 16,
            memory_block_size: Some(128 << 20),
            memory_blocks: vec![
                block(0, Online, None, Some(0)),
                block(1, Online, Some("DMA32"), Some(0)),
                block(2, Online, Some("Normal"), Some(0)),
                block(3, Offline, None, Some(0)),
                block(8, Online, Some("Movable"), Some(1)),
                block(9, GoingOffline, None, Some(1)),
                block(10, Offline, None, Some(1)),
                block(11, Unknown, None, Some(1)),
                block(12, Unknown, None, None),
                block(100, Online, Some("Normal"), None),
            ],
            hugepages: vec![pool(2 << 20, 16, 12), pool(1 << 30, 2, 0)],
            numa_nodes: vec![
                node(0, &[0, 1, 2, 3], 8_159_240 * 1024),
                node(1, &[8, 10, 11], 8_159_232 * 1024),
            ],
        };
        assert_eq!(snapshot, expected);
        assert_eq!(snapshot.online_blocks(), 5);
        assert_eq!(snapshot.offline_blocks(), 2);
        assert_eq!(
            read_summary(tree.root()).expect("summary"),
            snapshot.summary()
        );
    }

    #[test]
    fn summary_reads_only_meminfo_and_cpu_online() {
        let tree = minimal(MEMINFO_16G, "0,2-3\n");
        tree.file(&format!("{MEMORY_DIR}/block_size_bytes"), "not hex\n");
        let summary = read_summary(tree.root()).expect("summary ignores the memory dir");
        assert_eq!(
            summary,
            Summary {
                memory_bytes: 16_318_480 * 1024,
                cpus_online: 3
            }
        );
        let err = read_snapshot(tree.root()).expect_err("the snapshot reads the block size");
        assert!(
            matches!(&err, CapacityError::Parse { path, what: "block size", .. } if path.ends_with("block_size_bytes")),
            "{err:?}"
        );
    }

    #[test]
    fn missing_optional_parts_are_empty() {
        let tree = minimal(MEMINFO_16G, "0\n");
        let snapshot =
            read_snapshot(tree.root()).expect("only meminfo and cpu/online are required");
        assert_eq!(
            snapshot,
            Snapshot {
                memory_bytes: 16_318_480 * 1024,
                cpus_online: 1,
                cpus_online_list: "0".to_owned(),
                cpus_possible: 0,
                memory_block_size: None,
                memory_blocks: Vec::new(),
                hugepages: Vec::new(),
                numa_nodes: Vec::new(),
            }
        );
    }

    #[test]
    fn malformed_or_missing_required_files_name_the_path() {
        let tree = minimal("MemTotal:       lots kB\n", "0-1\n");
        let err = read_summary(tree.root()).expect_err("MemTotal is not a number");
        assert!(
            matches!(&err, CapacityError::Parse { path, value, .. }
                if path.ends_with(MEMINFO) && value == "MemTotal:       lots kB"),
            "{err:?}"
        );
        assert!(err.to_string().contains("proc/meminfo"), "{err}");

        let tree = minimal("MemFree: 1 kB\n", "0-1\n");
        let err = read_snapshot(tree.root()).expect_err("no MemTotal line");
        assert!(
            matches!(&err, CapacityError::Parse { value, .. } if value == "no MemTotal line"),
            "{err:?}"
        );

        let tree = Tree::new();
        tree.file(CPU_ONLINE, "0\n");
        let err = read_summary(tree.root()).expect_err("no meminfo");
        assert!(
            matches!(&err, CapacityError::Read { path, source } if path.ends_with(MEMINFO) && source.kind() == io::ErrorKind::NotFound),
            "{err:?}"
        );

        let tree = minimal(MEMINFO_16G, "0-3,,5\n");
        let err = read_summary(tree.root()).expect_err("bad CPU list");
        assert!(
            matches!(&err, CapacityError::CpuList { path, source } if path.ends_with(CPU_ONLINE) && source.element.is_empty()),
            "{err:?}"
        );
    }

    #[test]
    fn cpu_lists_parse_like_the_kernel_prints_them() {
        let ok = |s: &str| parse_cpu_list(s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
        assert_eq!(ok("0-3,8,10-11"), [0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(ok("0"), [0]);
        assert_eq!(ok(""), [] as [u32; 0]);
        assert_eq!(ok("\n"), [] as [u32; 0]);
        assert_eq!(ok(" 0-1 , 4\n"), [0, 1, 4]);
        assert_eq!(ok("5,1-2,2"), [1, 2, 5]);
        assert_eq!(ok("65535"), [65_535]);
        for bad in [
            "3-1",
            "a",
            "1,,2",
            "1,",
            "-1",
            "1-",
            "1-2-3",
            "+1",
            "0-3:1/2",
            "65536",
            "0-4294967295",
        ] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(
            parse_cpu_list("0,x-2"),
            Err(CpuListError {
                element: "x-2".to_owned()
            })
        );
    }

    #[test]
    fn cpu_lists_format_canonically() {
        assert_eq!(format_cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(format_cpu_list(&[]), "");
        assert_eq!(format_cpu_list(&[7]), "7");
        assert_eq!(format_cpu_list(&[0, 1]), "0-1");
        assert_eq!(format_cpu_list(&[11, 3, 10, 3, 0]), "0,3,10-11");
        for list in ["0-3,8,10-11", "1,3,5", "0-65535", "4-5,7-9,100"] {
            let cpus = parse_cpu_list(list).expect("valid list");
            assert_eq!(format_cpu_list(&cpus), list);
        }
    }

    #[test]
    fn meminfo_totals() {
        let proc_meminfo = "MemTotal:       24684096 kB\nMemFree:        23608680 kB\n";
        assert_eq!(parse_meminfo_total(proc_meminfo), Some(24_684_096 * 1024));
        assert_eq!(
            parse_meminfo_total("MemFree: 1 kB\nMemTotal: 2 kB"),
            Some(2048)
        );
        // cadvisor's regexp wants the kB unit; anything else is not a capacity.
        assert_eq!(parse_meminfo_total("MemTotal: 2 MB\n"), None);
        assert_eq!(parse_meminfo_total("MemTotal:\n"), None);
        assert_eq!(parse_meminfo_total("MemTotal: -2 kB\n"), None);
        assert_eq!(
            parse_meminfo_total("MemTotal: 18446744073709551615 kB\n"),
            None
        );
        assert_eq!(parse_meminfo_total(""), None);
        assert_eq!(
            parse_node_meminfo_total("Node 12 MemFree: 1 kB\nNode 12 MemTotal:    5204184 kB\n"),
            Some(5_204_184 * 1024)
        );
        assert_eq!(parse_node_meminfo_total(proc_meminfo), None);
    }

    #[test]
    fn serialized_names_are_stable() {
        let json = serde_json::to_string(&block(9, BlockState::GoingOffline, None, Some(1)))
            .expect("serialize");
        assert_eq!(
            json,
            r#"{"id":9,"state":"going_offline","zone":null,"node":1}"#
        );
        let summary = Summary {
            memory_bytes: 1 << 30,
            cpus_online: 2,
        };
        let json = serde_json::to_string(&summary).expect("serialize");
        assert_eq!(json, r#"{"memory_bytes":1073741824,"cpus_online":2}"#);
        assert_eq!(
            serde_json::from_str::<Summary>(&json).expect("deserialize"),
            summary
        );
    }

    /// The real machine: what the kubelet would read from this host.
    #[test]
    fn real_machine_matches_proc_and_sysfs() {
        let root = Path::new("/");
        let meminfo = fs::read_to_string("/proc/meminfo").expect("reading /proc/meminfo");
        let mem_total_kb: u64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .expect("MemTotal in /proc/meminfo");
        // /proc/cpuinfo lists the online CPUs only (cadvisor's fallback count).
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").expect("reading /proc/cpuinfo");
        let processors = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();

        let summary = read_summary(root).expect("reading the real summary");
        assert_eq!(summary.memory_bytes, mem_total_kb * 1024);
        assert_eq!(summary.cpus_online as usize, processors);

        let snapshot = read_snapshot(root).expect("reading the real snapshot");
        assert_eq!(snapshot.summary(), summary);
        let online =
            fs::read_to_string("/sys/devices/system/cpu/online").expect("reading cpu/online");
        assert_eq!(
            snapshot.cpus_online_list,
            online.trim(),
            "our list form is the kernel's"
        );
        assert!(snapshot.cpus_possible >= snapshot.cpus_online);

        let is_block = |e: io::Result<fs::DirEntry>| {
            let name = e.expect("listing memory blocks").file_name();
            let id = name
                .to_string_lossy()
                .strip_prefix("memory")
                .map(str::parse::<u32>);
            matches!(id, Some(Ok(_)))
        };
        let listed = fs::read_dir("/sys/devices/system/memory")
            .map_or(0, |dir| dir.map(is_block).filter(|&b| b).count());
        assert_eq!(snapshot.memory_blocks.len(), listed);
        if let Some(size) = snapshot.memory_block_size {
            // MemTotal is online memory minus what the kernel reserved at boot.
            let online_bytes = snapshot.online_blocks() as u64 * size;
            assert!(
                snapshot.memory_bytes <= online_bytes,
                "MemTotal {} above {} online blocks of {size}",
                snapshot.memory_bytes,
                snapshot.online_blocks()
            );
        }
    }
}
