//! Where every record goes: stdout (the event log), and optionally a rotated file, the
//! live stream and the metrics.
//!
//! Outputs never block detection or control. stdout and the file are each written by a
//! thread of their own from a bounded queue ([`DEFAULT_QUEUE`] records): a reader that
//! stops reading (a pipe nobody drains, a stuck journald) or a slow disk stalls only that
//! thread. What does not fit is counted as lost (`hotplug_agent_output_lost_records_total`)
//! and, once the output moves again, said in a `loss` record (`reason` `stdout_stalled` or
//! `log_file_stalled`, `lost` the count) that goes to every output. A failed write (ENOSPC)
//! is said once on stderr, its records counted, and a `loss` record (`…_failed`) follows
//! when writing works again. The stream hub never waits for anyone (stream.rs).
//!
//! Exit: [`drain`] writes `stopped` on every way out of the loop, ends the streams after it
//! and gives the output threads a bounded time to write what they hold. SIGHUP reopens the
//! log file (after logrotate moved it away) and never stops the agent.
use crate::record::AgentAction;
use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::{self, Write},
    path::PathBuf,
    sync::{Arc, Condvar, Mutex},
    time::Duration,
};

use bytes::Bytes;
use tokio::sync::{Notify, oneshot};

use super::{Format, metrics::Metrics, stream::Hub, text, write_record};
use crate::{
    capacity::Summary,
    record::{AgentRecord, Record},
};

/// Records an output may hold while its reader or disk is slow.
pub const DEFAULT_QUEUE: usize = 4096;
/// At exit, how long the outputs and the stream clients get to take the last records.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// A file that rotates by size and keeps a bounded number of old files
/// (`events.ndjson`, `events.ndjson.1`, ... `events.ndjson.N`). Lines are gathered and
/// written by [`FileSink::flush`]; a failed write drops what it held (counted by the
/// caller) rather than writing it again later, half of it twice.
pub struct FileSink {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    file: File,
    pending: Vec<u8>,
    size: u64,
}

impl FileSink {
    pub fn open(path: PathBuf, max_bytes: u64, keep: usize) -> io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path,
            max_bytes: max_bytes.max(1),
            keep,
            file,
            pending: Vec::new(),
            size,
        })
    }

    fn rotated(&self, n: usize) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        p.into()
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.flush()?;
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(self.rotated(self.keep));
            for n in (1..self.keep).rev() {
                let _ = std::fs::rename(self.rotated(n), self.rotated(n + 1));
            }
            std::fs::rename(&self.path, self.rotated(1))?;
        }
        self.reopen()
    }

    /// Opens the path again: after rotation, or after logrotate moved the file (SIGHUP).
    pub fn reopen(&mut self) -> io::Result<()> {
        self.flush()?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = self.file.metadata()?.len();
        Ok(())
    }

    pub fn write(&mut self, line: &[u8]) -> io::Result<()> {
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.pending.extend_from_slice(line);
        self.size += line.len() as u64;
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        let pending = std::mem::take(&mut self.pending);
        self.file.write_all(&pending)
    }
}

/// What an output thread writes to.
trait Target: Send + 'static {
    /// Writes a batch of lines and flushes it; on error the batch is gone.
    fn write_lines(&mut self, lines: &[Bytes]) -> io::Result<()>;
    fn reopen(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Target for FileSink {
    fn write_lines(&mut self, lines: &[Bytes]) -> io::Result<()> {
        let written = lines.iter().try_for_each(|l| self.write(l));
        let flushed = self.flush();
        written.and(flushed)
    }
    fn reopen(&mut self) -> io::Result<()> {
        FileSink::reopen(self)
    }
}

/// The process's stdout, written in one call per batch.
struct StdoutTarget;

impl Target for StdoutTarget {
    fn write_lines(&mut self, lines: &[Bytes]) -> io::Result<()> {
        let batch = lines.concat();
        let mut out = io::stdout().lock();
        out.write_all(&batch)?;
        out.flush()
    }
}

/// What an output thread tells the record loop.
#[derive(Debug)]
enum Note {
    /// `lost` records did not reach `output`; it writes again now.
    Lost {
        output: &'static str,
        why: &'static str,
        lost: u64,
    },
    /// The reader closed `output` (EPIPE).
    Gone(&'static str),
}

#[derive(Default)]
struct Notes {
    list: Mutex<Vec<Note>>,
    ready: Notify,
}

impl Notes {
    fn push(&self, note: Note) {
        self.list
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(note);
        self.ready.notify_one();
    }
}

struct QueueState {
    lines: VecDeque<Bytes>,
    capacity: usize,
    /// Records refused while full, not reported yet.
    lost: u64,
    closing: bool,
    reopen: bool,
    /// The reader went away: nothing more is queued.
    gone: bool,
}

struct Queue {
    state: Mutex<QueueState>,
    wake: Condvar,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One output behind a bounded queue, drained by its own thread.
struct Output {
    name: &'static str,
    queue: Arc<Queue>,
    done: Option<oneshot::Receiver<()>>,
}

/// Whether a push was taken.
#[derive(Debug, PartialEq, Eq)]
enum Pushed {
    Queued,
    Lost,
    Gone,
}

impl Output {
    fn spawn(
        name: &'static str,
        target: impl Target,
        capacity: usize,
        notes: Arc<Notes>,
    ) -> io::Result<Self> {
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState {
                lines: VecDeque::new(),
                capacity: capacity.max(1),
                lost: 0,
                closing: false,
                reopen: false,
                gone: false,
            }),
            wake: Condvar::new(),
        });
        let (done_tx, done) = oneshot::channel();
        let q = queue.clone();
        std::thread::Builder::new()
            .name(format!("out-{name}"))
            .spawn(move || {
                write_loop(name, &q, target, &notes);
                let _ = done_tx.send(());
            })?;
        Ok(Self {
            name,
            queue,
            done: Some(done),
        })
    }

    /// Queues `line`, or counts it lost when the queue is full. `force`: past the bound
    /// (the sinks' own loss records, one per note: the count must not be lost in turn).
    fn push(&self, line: Bytes, force: bool) -> Pushed {
        let mut st = self.queue.lock();
        if st.gone {
            return Pushed::Gone;
        }
        if st.lines.len() >= st.capacity && !force {
            st.lost += 1;
            return Pushed::Lost;
        }
        st.lines.push_back(line);
        drop(st);
        self.queue.wake.notify_one();
        Pushed::Queued
    }

    fn reopen(&self) {
        self.queue.lock().reopen = true;
        self.queue.wake.notify_one();
    }

    /// Lets the thread write what it holds, for at most `limit`.
    async fn close(&mut self, limit: Duration) {
        self.queue.lock().closing = true;
        self.queue.wake.notify_one();
        if let Some(done) = self.done.take()
            && tokio::time::timeout(limit, done).await.is_err()
        {
            tracing::warn!(
                output = self.name,
                "the output did not take the last records in time (its reader is stalled)"
            );
        }
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        // The thread ends once it has written what it holds (or stays blocked in a write
        // to a stalled reader until the process ends: it holds nothing else).
        self.queue.lock().closing = true;
        self.queue.wake.notify_one();
    }
}

fn write_loop(name: &'static str, queue: &Queue, mut target: impl Target, notes: &Notes) {
    let mut failed = 0u64;
    loop {
        let (batch, reopen, closing) = {
            let mut st = queue.lock();
            while st.lines.is_empty() && !st.closing && !st.reopen {
                st = queue.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            let batch: Vec<Bytes> = st.lines.drain(..).collect();
            (batch, std::mem::take(&mut st.reopen), st.closing)
        };
        if reopen {
            match target.reopen() {
                Ok(()) => tracing::info!(output = name, "reopened (SIGHUP)"),
                Err(e) => tracing::warn!(output = name, error = %e, "reopening failed"),
            }
        }
        if !batch.is_empty() {
            match target.write_lines(&batch) {
                Ok(()) => {
                    if failed > 0 {
                        tracing::info!(output = name, lost = failed, "writing works again");
                        notes.push(Note::Lost {
                            output: name,
                            why: "failed",
                            lost: std::mem::take(&mut failed),
                        });
                    }
                    let lost = std::mem::take(&mut queue.lock().lost);
                    if lost > 0 {
                        notes.push(Note::Lost {
                            output: name,
                            why: "stalled",
                            lost,
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                    let mut st = queue.lock();
                    st.gone = true;
                    st.lines.clear();
                    drop(st);
                    notes.push(Note::Gone(name));
                    return;
                }
                Err(e) => {
                    if failed == 0 {
                        // Once per failing spell: a full disk must not flood stderr.
                        tracing::warn!(
                            output = name,
                            error = %e,
                            "writing failed; its records are counted as lost until it works again, the other outputs carry on"
                        );
                    }
                    failed += batch.len() as u64;
                }
            }
        }
        if closing && queue.lock().lines.is_empty() {
            return;
        }
    }
}

/// What `run` does when stdout's reader goes away: `watch` ends (its output is the point,
/// as `head` expects), `run` carries on with its other outputs and its work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StdoutGone {
    End,
    CarryOn,
}

enum Stdout<'a> {
    /// Written inline (tests, tools): an error is returned by [`Sinks::record`].
    Direct(&'a mut dyn Write),
    Queued(Output),
}

/// Every record's destinations.
pub struct Sinks<'a> {
    out: Stdout<'a>,
    format: Format,
    pub hub: Option<Arc<Hub>>,
    pub metrics: Option<Arc<Metrics>>,
    file: Option<Output>,
    notes: Arc<Notes>,
    on_stdout_gone: StdoutGone,
    stdout_gone: bool,
    /// Recording a loss record: queued past the bound.
    forcing: bool,
    /// The capacity last recorded, for the records the sinks make themselves.
    last: Summary,
}

impl<'a> Sinks<'a> {
    /// Writes to `out` inline, on the caller's thread (tests and tools; the agent uses
    /// [`Sinks::stdout`]).
    pub fn new(out: &'a mut dyn Write, format: Format) -> Self {
        Self::with(Stdout::Direct(out), format, Arc::default())
    }

    fn with(out: Stdout<'a>, format: Format, notes: Arc<Notes>) -> Self {
        Self {
            out,
            format,
            hub: None,
            metrics: None,
            file: None,
            notes,
            on_stdout_gone: StdoutGone::CarryOn,
            stdout_gone: false,
            forcing: false,
            last: Summary::default(),
        }
    }

    /// The process's stdout behind a queue of `queue` records, written by its own thread.
    pub fn stdout(format: Format, queue: usize, gone: StdoutGone) -> io::Result<Self> {
        let notes = Arc::<Notes>::default();
        let out = Output::spawn("stdout", StdoutTarget, queue, notes.clone())?;
        let mut s = Self::with(Stdout::Queued(out), format, notes);
        s.on_stdout_gone = gone;
        Ok(s)
    }

    /// Also writes every record to `file`, behind a queue of `queue` records.
    pub fn set_file(&mut self, file: FileSink, queue: usize) -> io::Result<()> {
        self.file = Some(Output::spawn("log_file", file, queue, self.notes.clone())?);
        Ok(())
    }

    fn count_lost(&self, output: &str, n: u64) {
        if let Some(m) = &self.metrics {
            m.output_lost(output, n);
        }
    }

    /// Writes one record everywhere; only an inline stdout's failure is returned.
    pub fn record(&mut self, record: &Record) -> io::Result<()> {
        match record {
            Record::Event(e) => self.last = e.capacity,
            Record::Agent(a) => self.last = a.capacity,
            Record::Decision(_) => {}
        }
        if let Some(m) = &self.metrics {
            m.observe(record);
        }
        if let Some(h) = &self.hub {
            h.publish(record);
        }
        let json = || -> Bytes {
            let mut line = serde_json::to_vec(record).unwrap_or_default();
            line.push(b'\n');
            line.into()
        };
        let mut line = None;
        if let Some(f) = &self.file {
            let l = line.get_or_insert_with(json).clone();
            if f.push(l, self.forcing) == Pushed::Lost {
                self.count_lost(f.name, 1);
            }
        }
        match &mut self.out {
            Stdout::Direct(out) => write_record(out, record, self.format),
            Stdout::Queued(out) => {
                let l = match self.format {
                    Format::Json => line.get_or_insert_with(json).clone(),
                    Format::Text => format!("{}\n", text::line(record)).into(),
                };
                if out.push(l, self.forcing) == Pushed::Lost {
                    let name = out.name;
                    self.count_lost(name, 1);
                }
                Ok(())
            }
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        match &mut self.out {
            Stdout::Direct(out) => out.flush(),
            // The threads flush each batch they write.
            Stdout::Queued(_) => Ok(()),
        }
    }

    /// Reopens the log file (SIGHUP).
    pub fn reopen(&self) {
        if let Some(f) = &self.file {
            f.reopen();
        }
    }

    /// Turns what the output threads said into records. False: stop (stdout is gone and
    /// that ends this command).
    fn take_notes(&mut self) -> io::Result<bool> {
        let notes = std::mem::take(&mut *self.notes.list.lock().unwrap_or_else(|p| p.into_inner()));
        let mut go_on = true;
        for note in notes {
            match note {
                Note::Lost { output, why, lost } => {
                    if why == "failed" {
                        self.count_lost(output, lost);
                    }
                    let mut rec = AgentRecord::new(AgentAction::Loss, self.last);
                    rec.reason = Some(format!("{output}_{why}"));
                    rec.lost = Some(lost);
                    self.forcing = true;
                    let r = self.record(&Record::Agent(Box::new(rec)));
                    self.forcing = false;
                    r?;
                }
                Note::Gone(output) => {
                    self.stdout_gone = true;
                    match self.on_stdout_gone {
                        StdoutGone::End => go_on = false,
                        StdoutGone::CarryOn => tracing::warn!(
                            output,
                            "the reader of the event log went away; the other outputs and the agent's work carry on"
                        ),
                    }
                }
            }
        }
        Ok(go_on)
    }

    /// Ends the streams after what was published and lets the outputs write what they
    /// hold, each for a bounded time.
    async fn close(&mut self) {
        if let Some(h) = &self.hub {
            h.close();
            if !h.closed(CLOSE_GRACE).await {
                tracing::warn!("some stream clients did not take the last records in time");
            }
        }
        if let Some(f) = &mut self.file {
            f.close(CLOSE_GRACE).await;
        }
        if let Stdout::Queued(out) = &mut self.out
            && !self.stdout_gone
        {
            out.close(CLOSE_GRACE).await;
        }
    }
}

/// Writes `first`, then every record from `records` until it closes or `shutdown`
/// completes, then a `stopped` record (on every way out of the loop). Bursts cost one
/// flush. A closed stdout ends `watch` quietly; `run` carries on without it.
pub async fn drain(
    sinks: &mut Sinks<'_>,
    first: Record,
    records: &mut tokio::sync::mpsc::Receiver<Record>,
    shutdown: impl std::future::Future<Output = ()>,
    mut after_batch: impl FnMut(),
) -> io::Result<()> {
    // SIGHUP reopens the log file, as daemons do; it no longer kills the agent unannounced.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let notes = sinks.notes.clone();
    let result = async {
        sinks.record(&first)?;
        sinks.flush()?;
        after_batch();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                rec = records.recv() => {
                    let Some(mut rec) = rec else { break };
                    loop {
                        sinks.record(&rec)?;
                        match records.try_recv() {
                            Ok(next) => rec = next,
                            Err(_) => break,
                        }
                    }
                    sinks.flush()?;
                    after_batch();
                }
                () = notes.ready.notified() => {
                    if !sinks.take_notes()? {
                        break;
                    }
                    sinks.flush()?;
                }
                Some(()) = async {
                    match &mut hangup {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    tracing::info!("SIGHUP: reopening the log file");
                    sinks.reopen();
                }
                () = &mut shutdown => break,
            }
        }
        Ok::<_, io::Error>(())
    }
    .await;
    let result = match result {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    };
    // Whatever ended the loop: the last word, where any output can still take it.
    let stopped = Record::Agent(Box::new(AgentRecord::new(AgentAction::Stopped, sinks.last)));
    let _ = sinks.take_notes();
    // Past the queues' bound: a full queue must not swallow the last word.
    sinks.forcing = true;
    let _ = sinks.record(&stopped).and_then(|()| sinks.flush());
    sinks.close().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_a_bounded_number_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.ndjson");
        let mut sink = FileSink::open(path.clone(), 100, 2).unwrap();
        for i in 0..10 {
            sink.write(
                format!("{{\"n\":{i:03},\"pad\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}}\n")
                    .as_bytes(),
            )
            .unwrap();
        }
        sink.flush().unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["events.ndjson", "events.ndjson.1", "events.ndjson.2"]
        );
        let current = std::fs::read_to_string(&path).unwrap();
        assert!(
            current.len() <= 100 && current.contains("\"n\":009"),
            "{current}"
        );
        let oldest = std::fs::read_to_string(dir.path().join("events.ndjson.2")).unwrap();
        assert!(oldest.contains("\"n\":00"), "{oldest}");
        // Nothing in between was lost: the newest three files hold a contiguous tail.
        let all = [
            oldest,
            std::fs::read_to_string(dir.path().join("events.ndjson.1")).unwrap(),
            current,
        ]
        .concat();
        let ns: Vec<u32> = all.lines().map(|l| l[5..8].parse().unwrap()).collect();
        assert!(ns.windows(2).all(|w| w[1] == w[0] + 1), "{ns:?}");
        assert_eq!(*ns.last().unwrap(), 9);
    }

    /// A target that blocks until opened, or fails while `failing`, and keeps what it got.
    #[derive(Clone, Default)]
    struct Gate {
        open: Arc<(Mutex<bool>, Condvar)>,
        failing: Arc<std::sync::atomic::AtomicBool>,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Gate {
        fn open(&self) {
            *self.open.0.lock().unwrap() = true;
            self.open.1.notify_all();
        }
        fn lines(&self) -> Vec<serde_json::Value> {
            String::from_utf8(self.got.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        }
    }

    impl Target for Gate {
        fn write_lines(&mut self, lines: &[Bytes]) -> io::Result<()> {
            let mut open = self.open.0.lock().unwrap();
            while !*open {
                open = self.open.1.wait(open).unwrap();
            }
            if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            self.got.lock().unwrap().extend(lines.concat());
            Ok(())
        }
    }

    fn numbered(n: u64) -> Record {
        let mut a = AgentRecord::new(AgentAction::Ready, Summary::default());
        a.lost = Some(n);
        Record::Agent(Box::new(a))
    }

    fn lost_metric(m: &Metrics, output: &str) -> u64 {
        let key = format!("hotplug_agent_output_lost_records_total{{output=\"{output}\"}} ");
        m.render()
            .lines()
            .find_map(|l| l.strip_prefix(&key)?.parse().ok())
            .unwrap_or(0)
    }

    /// Until `pred` holds for what the notes turned into, within 10 s.
    async fn until_note(
        sinks: &mut Sinks<'_>,
        gate: &Gate,
        pred: impl Fn(&[serde_json::Value]) -> bool,
    ) {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                sinks.notes.ready.notified().await;
                sinks.take_notes().unwrap();
                // The loss record is written by the output thread; wait for it too.
                for _ in 0..100 {
                    if pred(&gate.lines()) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        })
        .await
        .expect("the loss record");
    }

    #[tokio::test]
    async fn a_stalled_stdout_loses_records_counted_and_said_never_blocking() {
        let gate = Gate::default();
        let notes = Arc::<Notes>::default();
        let out = Output::spawn("stdout", gate.clone(), 8, notes.clone()).unwrap();
        let mut sinks = Sinks::with(Stdout::Queued(out), Format::Json, notes);
        let metrics = Metrics::new();
        let hub = Hub::new(1000, 1000);
        sinks.metrics = Some(metrics.clone());
        sinks.hub = Some(hub.clone());
        // The reader is stuck: every record call still returns at once.
        let started = std::time::Instant::now();
        for n in 0..100 {
            sinks.record(&numbered(n)).unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // The stream had everything; stdout holds its queue (8) plus at most one batch
        // in the writer's hands (the writer takes whatever was queued when it woke: 0 to
        // 8 lines, depending on when its thread ran), the rest is counted.
        let (all, _) = hub.subscribe(&crate::report::stream::Query::parse("replay=all").unwrap());
        assert_eq!(all.len(), 100);
        let lost = lost_metric(&metrics, "stdout");
        assert!((100 - 16..=100 - 8).contains(&lost), "{lost}");
        // The reader moves again: what was queued arrives, then the loss record, everywhere.
        gate.open();
        until_note(&mut sinks, &gate, |l| {
            l.iter().any(|v| v["action"] == "loss")
        })
        .await;
        let lines = gate.lines();
        let loss = lines.iter().find(|v| v["action"] == "loss").unwrap();
        assert_eq!(loss["reason"], "stdout_stalled");
        assert_eq!(loss["lost"], lost);
        assert_eq!(lines.len() as u64, 100 - lost + 1);
        let (all, _) =
            hub.subscribe(&crate::report::stream::Query::parse("replay=all&kind=agent").unwrap());
        assert!(all.iter().any(|l| {
            std::str::from_utf8(&l.json)
                .unwrap()
                .contains("stdout_stalled")
        }));
        // The loss record is not counted a second time.
        assert_eq!(lost_metric(&metrics, "stdout"), lost);
    }

    #[tokio::test]
    async fn a_failing_disk_is_said_once_and_counted_when_it_works_again() {
        let gate = Gate::default();
        gate.open();
        gate.failing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut sink = Vec::new();
        let mut sinks = Sinks::new(&mut sink, Format::Json);
        let metrics = Metrics::new();
        sinks.metrics = Some(metrics.clone());
        sinks.file =
            Some(Output::spawn("log_file", gate.clone(), 1000, sinks.notes.clone()).unwrap());
        for n in 0..20 {
            sinks.record(&numbered(n)).unwrap();
        }
        // Wait until the writer has tried (and failed) all twenty.
        tokio::time::timeout(Duration::from_secs(10), async {
            while !sinks.file.as_ref().unwrap().queue.lock().lines.is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(gate.lines().is_empty());
        gate.failing
            .store(false, std::sync::atomic::Ordering::SeqCst);
        sinks.record(&numbered(20)).unwrap();
        until_note(&mut sinks, &gate, |l| {
            l.iter().any(|v| v["action"] == "loss")
        })
        .await;
        let lines = gate.lines();
        let loss = lines.iter().find(|v| v["action"] == "loss").unwrap();
        assert_eq!(loss["reason"], "log_file_failed");
        assert_eq!(loss["lost"], 20);
        assert_eq!(lost_metric(&metrics, "log_file"), 20);
        drop(sinks);
        // stdout (inline here) had every record and the loss record too.
        let text = String::from_utf8(sink).unwrap();
        assert_eq!(text.lines().count(), 22, "{text}");
    }

    #[tokio::test]
    async fn drain_ends_with_stopped_everywhere() {
        let gate = Gate::default();
        gate.open();
        let notes = Arc::<Notes>::default();
        let out = Output::spawn("stdout", gate.clone(), 100, notes.clone()).unwrap();
        let mut sinks = Sinks::with(Stdout::Queued(out), Format::Json, notes);
        let hub = Hub::new(100, 100);
        sinks.hub = Some(hub.clone());
        let (tx, mut rx) = tokio::sync::mpsc::channel(10);
        tx.send(numbered(1)).await.unwrap();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let stop = async move {
            let _ = stop_rx.await;
        };
        let first = numbered(0);
        let run = drain(&mut sinks, first, &mut rx, stop, || {});
        tokio::pin!(run);
        // Running until told to stop.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut run)
                .await
                .is_err()
        );
        stop_tx.send(()).unwrap();
        run.await.unwrap();
        let actions: Vec<_> = gate
            .lines()
            .iter()
            .map(|v| v["action"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(actions, ["ready", "ready", "stopped"]);
        let (held, _) = hub.subscribe(&crate::report::stream::Query::parse("replay=all").unwrap());
        assert!(
            std::str::from_utf8(&held.last().unwrap().json)
                .unwrap()
                .contains("\"stopped\"")
        );
    }
}
