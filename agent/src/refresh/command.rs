//! The `command` refresh backend: `--refresh-command 'PROGRAM ARG...'`.
//!
//! The string is split into words as a POSIX shell would (quotes, backslashes) and run
//! *without* a shell, so nothing in it is expanded or interpreted. The child gets its own
//! process group, stdin from /dev/null and stdout to /dev/null (the agent's stdout is the
//! event log); the tail of its stderr goes into the error when it fails. On timeout the
//! whole group is killed, so a wrapper script cannot leave a hung `systemctl` behind.
//! After a normal exit the group is left alone: a restart command may legitimately leave
//! the new kubelet running in it.
use std::{
    io,
    os::unix::process::ExitStatusExt,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{io::AsyncReadExt, process::ChildStderr, time::Instant};

use super::{Outcome, RefreshError};

/// How much of the child's stderr is kept for the error message: its last 2 KiB.
const STDERR_TAIL: usize = 2048;
/// After the child exits, how long its stderr may stay open (held by a grandchild) before
/// we stop reading it.
const STDERR_GRACE: Duration = Duration::from_millis(200);
/// Long enough for an init system's restart verb; a hung command is killed after this.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct CommandConfig {
    /// Restarts the kubelet.
    pub argv: Vec<String>,
    /// Stops it, for the static-policy reset procedure.
    pub stop: Option<Vec<String>>,
    /// Starts it again.
    pub start: Option<Vec<String>>,
    pub timeout: Duration,
}

impl CommandConfig {
    /// A restart command only, with [`DEFAULT_TIMEOUT`].
    pub fn new(argv: Vec<String>) -> Self {
        Self {
            argv,
            stop: None,
            start: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CommandParseError {
    #[error("empty command")]
    Empty,
    #[error("cannot split {input:?} into words")]
    Syntax {
        input: String,
        #[source]
        source: shell_words::ParseError,
    },
}

/// Splits `s` into argv as a shell would; no shell is ever run.
pub fn parse(s: &str) -> Result<Vec<String>, CommandParseError> {
    let argv = shell_words::split(s).map_err(|source| CommandParseError::Syntax {
        input: s.to_owned(),
        source,
    })?;
    if argv.is_empty() {
        return Err(CommandParseError::Empty);
    }
    Ok(argv)
}

/// Runs `argv` without a shell, kills its process group after `timeout`, and checks the
/// exit status.
pub async fn run(argv: &[String], timeout: Duration) -> Result<Outcome, RefreshError> {
    let (program, args) = argv.split_first().ok_or(RefreshError::EmptyCommand)?;
    let command = shell_words::join(argv);
    let started = Instant::now();
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => RefreshError::ProgramNotFound {
                program: program.clone(),
                source,
            },
            _ => RefreshError::Spawn {
                program: program.clone(),
                source,
            },
        })?;
    // process_group(0): the child's pgid is its pid. Armed until the child exits on its own,
    // so a timeout or a dropped future (the agent shutting down) takes the group with it.
    let group = child
        .id()
        .and_then(|pid| libc::pid_t::try_from(pid).ok())
        .map(|pgid| GroupKill(Some(pgid)));

    let tail = Arc::new(Mutex::new(Tail::default()));
    let reader = child
        .stderr
        .take()
        .map(|stderr| tokio::spawn(read_tail(stderr, tail.clone())));

    let waited = tokio::time::timeout(timeout, child.wait()).await;
    let status = match waited {
        Err(_elapsed) => {
            drop(group); // SIGKILL to the whole group
            // Reap the leader so no zombie is left; it has been killed, this is quick.
            let _ = child.kill().await;
            if let Some(reader) = reader {
                reader.abort();
            }
            return Err(RefreshError::Timeout {
                what: format!("`{command}`"),
                timeout,
            });
        }
        Ok(Err(source)) => return Err(RefreshError::Wait { command, source }),
        Ok(Ok(status)) => {
            if let Some(mut group) = group {
                group.disarm();
            }
            status
        }
    };
    if let Some(mut reader) = reader {
        // A grandchild may still hold stderr open; what arrived so far is enough.
        if tokio::time::timeout(STDERR_GRACE, &mut reader)
            .await
            .is_err()
        {
            reader.abort();
        }
    }
    let stderr = tail.lock().map(|t| t.text()).unwrap_or_default();
    let duration = started.elapsed();
    match (status.code(), status.signal()) {
        (Some(0), _) => Ok(Outcome {
            backend: "command",
            detail: format!("`{command}` exited 0 in {duration:.2?}"),
            duration,
        }),
        (Some(code), _) => Err(RefreshError::Exit {
            command,
            code,
            stderr,
        }),
        (None, Some(signal)) => Err(RefreshError::Signal {
            command,
            signal,
            stderr,
        }),
        // A reaped child has an exit code or a signal; kept total rather than panicking.
        (None, None) => Err(RefreshError::Exit {
            command,
            code: -1,
            stderr,
        }),
    }
}

/// `stop`/`start` of the command backend: the configured argv, or a clear error.
pub(super) async fn run_optional(
    argv: Option<&[String]>,
    action: &'static str,
    timeout: Duration,
) -> Result<Outcome, RefreshError> {
    match argv {
        Some(argv) => run(argv, timeout).await,
        None => Err(RefreshError::NotConfigured {
            backend: "command",
            action,
        }),
    }
}

/// Sends SIGKILL to a process group on drop unless disarmed.
struct GroupKill(Option<libc::pid_t>);

impl GroupKill {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupKill {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.take() {
            // SAFETY: killpg takes no pointers; an error (ESRCH: the group is already gone) is
            // what we want anyway. The workspace's nix lacks its `signal` feature.
            unsafe { libc::killpg(pgid, libc::SIGKILL) };
        }
    }
}

/// The last [`STDERR_TAIL`] bytes of a stream.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
        if self.0.len() > STDERR_TAIL {
            self.0.drain(..self.0.len() - STDERR_TAIL);
        }
    }

    /// Whole lines only when the tail was cut mid-line; trimmed; lossy UTF-8.
    fn text(&self) -> String {
        let mut bytes = self.0.as_slice();
        if self.0.len() == STDERR_TAIL
            && let Some(newline) = bytes.iter().position(|b| *b == b'\n')
        {
            bytes = &bytes[newline + 1..];
        }
        String::from_utf8_lossy(bytes).trim().to_owned()
    }
}

async fn read_tail(mut stderr: ChildStderr, tail: Arc<Mutex<Tail>>) {
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = stderr.read(&mut buf).await {
        if let Ok(mut tail) = tail.lock() {
            tail.push(&buf[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant as StdInstant;

    use super::*;

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| (*w).to_owned()).collect()
    }

    const LONG: Duration = Duration::from_secs(10);

    #[test]
    fn parse_splits_like_a_shell_and_rejects_empty() {
        assert_eq!(
            parse(r#"rc-service kubelet restart --opt "a b" 'c d'"#).unwrap(),
            argv(&["rc-service", "kubelet", "restart", "--opt", "a b", "c d"])
        );
        // Shell syntax is not interpreted: `;` and `$X` are plain words.
        assert_eq!(
            parse("echo $HOME; rm").unwrap(),
            argv(&["echo", "$HOME;", "rm"])
        );
        assert!(matches!(parse("   "), Err(CommandParseError::Empty)));
        assert!(matches!(
            parse("unterminated 'quote"),
            Err(CommandParseError::Syntax { .. })
        ));
    }

    #[tokio::test]
    async fn true_succeeds() {
        let outcome = run(&argv(&["true"]), LONG).await.expect("`true` exits 0");
        assert_eq!(outcome.backend, "command");
        assert!(
            outcome.detail.starts_with("`true` exited 0"),
            "{}",
            outcome.detail
        );
    }

    #[tokio::test]
    async fn false_is_a_non_zero_exit() {
        let err = run(&argv(&["false"]), LONG)
            .await
            .expect_err("`false` exits 1");
        assert!(matches!(err, RefreshError::Exit { code: 1, .. }), "{err:?}");
    }

    #[tokio::test]
    async fn exit_status_and_stderr_are_in_the_error() {
        let err = run(&argv(&["sh", "-c", "echo oops >&2; exit 3"]), LONG)
            .await
            .expect_err("exits 3");
        assert_eq!(
            err.to_string(),
            "`sh -c 'echo oops >&2; exit 3'` exited with status 3: oops"
        );
    }

    #[tokio::test]
    async fn stderr_is_bounded_to_its_last_lines() {
        let script = "i=0; while [ $i -lt 2000 ]; do echo line$i >&2; i=$((i+1)); done; exit 2";
        let err = run(&argv(&["sh", "-c", script]), LONG)
            .await
            .expect_err("exits 2");
        let RefreshError::Exit { stderr, .. } = err else {
            panic!("{err:?}")
        };
        assert!(stderr.len() <= STDERR_TAIL, "{} bytes", stderr.len());
        assert!(stderr.ends_with("line1999"), "{stderr}");
        assert!(
            stderr.starts_with("line"),
            "cut at a line boundary: {stderr}"
        );
    }

    #[tokio::test]
    async fn a_signal_is_reported_as_such() {
        let err = run(&argv(&["sh", "-c", "kill -TERM $$"]), LONG)
            .await
            .expect_err("killed");
        assert!(
            matches!(err, RefreshError::Signal { signal: 15, .. }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn missing_program_is_not_found() {
        let err = run(&argv(&["/nonexistent/kubelet-restart"]), LONG)
            .await
            .expect_err("ENOENT");
        assert_eq!(
            err.to_string(),
            "program not found: /nonexistent/kubelet-restart"
        );
        assert!(matches!(
            run(&[], LONG).await,
            Err(RefreshError::EmptyCommand)
        ));
    }

    #[tokio::test]
    async fn timeout_kills_the_child_quickly() {
        let started = StdInstant::now();
        let err = run(&argv(&["sleep", "10"]), Duration::from_millis(200))
            .await
            .expect_err("times out");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(err.to_string(), "`sleep 10` did not finish within 200ms");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("grandchild.pid");
        // A grandchild in the background, as a wrapper script would leave one.
        let script = format!("sleep 10 & echo $! > {}; wait", pidfile.display());
        let err = run(&argv(&["sh", "-c", &script]), Duration::from_millis(300))
            .await
            .expect_err("times out");
        assert!(matches!(err, RefreshError::Timeout { .. }), "{err:?}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .expect("the script wrote the grandchild's pid")
            .trim()
            .parse()
            .expect("a pid");
        let deadline = StdInstant::now() + Duration::from_secs(2);
        while alive(pid) {
            assert!(
                StdInstant::now() < deadline,
                "grandchild {pid} survived the timeout"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Running, as opposed to gone or a zombie waiting for an init that does not reap.
    fn alive(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The state follows the parenthesised command name: "pid (comm) S ...".
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z')),
            Err(_) => false,
        }
    }
}
