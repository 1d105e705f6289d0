//! Where every record goes: stdout (the event log), and optionally a rotated file, the
//! live stream and the metrics. One call per record; a sink that fails is reported once
//! and never stops the others (stdout excepted: it is the main output).
use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    path::PathBuf,
    sync::Arc,
};

use super::{Format, metrics::Metrics, stream::Hub, write_record};
use crate::record::Record;

/// A file that rotates by size and keeps a bounded number of old files
/// (`events.ndjson`, `events.ndjson.1`, ... `events.ndjson.N`).
pub struct FileSink {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    file: BufWriter<File>,
    size: u64,
    failing: bool,
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
            file: BufWriter::new(file),
            size,
            failing: false,
        })
    }

    fn rotated(&self, n: usize) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        p.into()
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file.flush()?;
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(self.rotated(self.keep));
            for n in (1..self.keep).rev() {
                let _ = std::fs::rename(self.rotated(n), self.rotated(n + 1));
            }
            std::fs::rename(&self.path, self.rotated(1))?;
        }
        self.file = BufWriter::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?,
        );
        self.size = 0;
        Ok(())
    }

    pub fn write(&mut self, line: &[u8]) -> io::Result<()> {
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(line)?;
        self.size += line.len() as u64;
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Every record's destinations.
pub struct Sinks<'a> {
    out: &'a mut dyn Write,
    format: Format,
    pub hub: Option<Arc<Hub>>,
    pub metrics: Option<Arc<Metrics>>,
    pub file: Option<FileSink>,
}

impl<'a> Sinks<'a> {
    pub fn new(out: &'a mut dyn Write, format: Format) -> Self {
        Self {
            out,
            format,
            hub: None,
            metrics: None,
            file: None,
        }
    }

    /// Writes one record everywhere; only a stdout failure is returned.
    pub fn record(&mut self, record: &Record) -> io::Result<()> {
        if let Some(m) = &self.metrics {
            m.observe(record);
        }
        if let Some(h) = &self.hub {
            h.publish(record);
        }
        if let Some(f) = &mut self.file {
            let mut line = serde_json::to_vec(record).unwrap_or_default();
            line.push(b'\n');
            if let Err(e) = f.write(&line) {
                if !f.failing {
                    tracing::warn!(error = %e, path = %f.path.display(), "writing the event log file failed; stdout and the stream carry on");
                }
                f.failing = true;
            } else {
                f.failing = false;
            }
        }
        write_record(&mut self.out, record, self.format)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        if let Some(f) = &mut self.file {
            let _ = f.flush();
        }
        self.out.flush()
    }
}

/// Writes `first`, then every record from `records` until it closes or `shutdown`
/// completes, then a `stopped` record. Bursts cost one flush. A closed stdout (the reader
/// went away) ends quietly.
pub async fn drain(
    sinks: &mut Sinks<'_>,
    first: Record,
    records: &mut tokio::sync::mpsc::Receiver<Record>,
    shutdown: impl std::future::Future<Output = ()>,
    mut after_batch: impl FnMut(),
) -> io::Result<()> {
    let mut last = match &first {
        Record::Agent(a) => a.capacity,
        _ => crate::capacity::Summary::default(),
    };
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
                        if let Record::Event(e) = &rec {
                            last = e.capacity;
                        }
                        sinks.record(&rec)?;
                        match records.try_recv() {
                            Ok(next) => rec = next,
                            Err(_) => break,
                        }
                    }
                    sinks.flush()?;
                    after_batch();
                }
                () = &mut shutdown => break,
            }
        }
        Ok::<_, io::Error>(())
    }
    .await;
    match result {
        Ok(()) => {
            let stopped = Record::Agent(Box::new(crate::record::AgentRecord::new("stopped", last)));
            let _ = sinks.record(&stopped).and_then(|()| sinks.flush());
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(e),
    }
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
}
