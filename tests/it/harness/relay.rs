//! The real `serversync` binary as a child process.
//!
//! Children get a clean environment for the relay (no inherited `DATABASE_URL`,
//! `SERVERSYNC__*`, `RUST_LOG`, `RUST_BACKTRACE`, `SSL_CERT_FILE`, `SSL_CERT_DIR`),
//! are bounded in time, and die with
//! the thread that started them (`PR_SET_PDEATHSIG`): start them from the test body,
//! not from a `spawn_blocking` closure. Set `IT_SHOW_OUTPUT=1` to print every
//! finished command's output (with `--nocapture`).

use std::ffi::OsStr;
use std::fmt;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

/// Default bound for a command run with [`Cmd::output`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// `serversync` with no arguments yet.
pub fn serversync() -> Cmd {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_serversync"));
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if name.starts_with("SERVERSYNC__")
            || matches!(
                &*name,
                "DATABASE_URL"
                    | "RUST_LOG"
                    | "RUST_BACKTRACE"
                    | "RUST_LIB_BACKTRACE"
                    | "SSL_CERT_FILE"
                    | "SSL_CERT_DIR"
            )
        {
            cmd.env_remove(&key);
        }
    }
    cmd.env("NO_COLOR", "1").stdin(Stdio::null());
    // SAFETY: prctl is async-signal-safe; nothing else runs in the forked child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Cmd {
        cmd,
        shown: vec!["serversync".into()],
        timeout: DEFAULT_TIMEOUT,
    }
}

/// A `serversync` invocation being built.
pub struct Cmd {
    cmd: Command,
    shown: Vec<String>,
    timeout: Duration,
}

impl Cmd {
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Cmd {
        self.shown.push(arg.as_ref().to_string_lossy().into_owned());
        self.cmd.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for arg in args {
            self = self.arg(arg);
        }
        self
    }

    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Cmd {
        self.cmd.env(key, value);
        self
    }

    pub fn env_remove(mut self, key: &str) -> Cmd {
        self.cmd.env_remove(key);
        self
    }

    pub fn current_dir(mut self, dir: &Path) -> Cmd {
        self.cmd.current_dir(dir);
        self
    }

    /// Kill the child and fail the test when it runs longer than this.
    pub fn timeout(mut self, timeout: Duration) -> Cmd {
        self.timeout = timeout;
        self
    }

    /// Run to completion and capture everything.
    pub async fn output(self) -> Output {
        let command = self.shown.join(" ");
        let mut cmd = tokio::process::Command::from(self.cmd);
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn `{command}`: {e}"));
        let stdout = collect(child.stdout.take().expect("piped stdout"));
        let stderr = collect(child.stderr.take().expect("piped stderr"));
        let status = match tokio::time::timeout(self.timeout, child.wait()).await {
            Ok(status) => status.unwrap_or_else(|e| panic!("wait for `{command}`: {e}")),
            Err(_) => {
                let _ = child.kill().await;
                let out = Output {
                    command,
                    code: None,
                    stdout: stdout.await.unwrap_or_default(),
                    stderr: stderr.await.unwrap_or_default(),
                    elapsed: started.elapsed(),
                };
                panic!("did not finish within {:?} (killed)\n{out}", self.timeout);
            }
        };
        let out = Output {
            command,
            code: status.code(),
            stdout: stdout.await.unwrap_or_default(),
            stderr: stderr.await.unwrap_or_default(),
            elapsed: started.elapsed(),
        };
        if std::env::var_os("IT_SHOW_OUTPUT").is_some() {
            eprintln!("{out}\n");
        }
        out
    }

    /// Run with stdout and stderr going to pipes nobody reads (closed at once, as
    /// `serversync status | head -0` leaves them); the exit code, `None` for a signal.
    pub async fn output_to_closed_pipes(self) -> Option<i32> {
        let command = self.shown.join(" ");
        let mut cmd = tokio::process::Command::from(self.cmd);
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn `{command}`: {e}"));
        drop(child.stdout.take());
        drop(child.stderr.take());
        match tokio::time::timeout(self.timeout, child.wait()).await {
            Ok(status) => status
                .unwrap_or_else(|e| panic!("wait for `{command}`: {e}"))
                .code(),
            Err(_) => {
                let _ = child.kill().await;
                panic!(
                    "`{command}` did not finish within {:?} with its output closed (killed)",
                    self.timeout
                );
            }
        }
    }

    /// Start in the background (e.g. `run`); the child is killed when the guard drops.
    pub fn spawn(mut self) -> Running {
        let command = self.shown.join(" ");
        self.cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = self
            .cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn `{command}`: {e}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            pump(
                child.stdout.take().expect("piped stdout"),
                Arc::clone(&stdout),
            ),
            pump(
                child.stderr.take().expect("piped stderr"),
                Arc::clone(&stderr),
            ),
        ];
        Running {
            command,
            child,
            stdout,
            stderr,
            readers,
            started: Instant::now(),
        }
    }
}

fn collect<R>(mut reader: R) -> tokio::task::JoinHandle<String>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = reader.read_to_end(&mut buf).await;
        String::from_utf8_lossy(&buf).into_owned()
    })
}

fn pump<R: Read + Send + 'static>(mut reader: R, sink: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => sink
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(&buf[..n]),
            }
        }
    })
}

/// A relay running in the background. Killed (SIGKILL) on drop unless it has exited.
pub struct Running {
    command: String,
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Output so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    /// Send a signal (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: signalling our own child, not yet reaped (we hold its `Child`).
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }

    /// Still running?
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then wait for the exit (bounded by `timeout`, then SIGKILL and panic).
    pub async fn terminate(self, timeout: Duration) -> Output {
        self.signal(libc::SIGTERM);
        self.wait(timeout).await
    }

    /// SIGTERM, and a clean exit within 10 s: 0, no panic.
    pub async fn stop_cleanly(self) -> Output {
        let out = self.terminate(Duration::from_secs(10)).await;
        out.assert_success().assert_no_panic();
        out
    }

    /// Wait for the child to exit by itself; SIGKILL and panic after `timeout`.
    pub async fn wait(mut self, timeout: Duration) -> Output {
        let deadline = Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => tokio::time::sleep(super::POLL).await,
                Ok(None) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    let out = self.finish(None);
                    panic!("did not exit within {timeout:?} (killed)\n{out}");
                }
                Err(e) => panic!("wait for `{}`: {e}", self.command),
            }
        };
        self.finish(status.code())
    }

    fn finish(&mut self, code: Option<i32>) -> Output {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        Output {
            command: self.command.clone(),
            code,
            stdout: self.stdout(),
            stderr: self.stderr(),
            elapsed: self.started.elapsed(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a finished command did.
#[derive(Clone, Debug)]
pub struct Output {
    pub command: String,
    /// Exit code; `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Output {
    /// Exit code must be `code`; otherwise panic showing everything.
    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Output {
        assert_eq!(self.code, Some(code), "unexpected exit code\n{self}");
        self
    }

    #[track_caller]
    pub fn assert_success(&self) -> &Output {
        self.assert_code(0)
    }

    /// Non-empty stderr lines, ANSI colours removed.
    pub fn stderr_lines(&self) -> Vec<String> {
        strip_ansi(&self.stderr)
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Neither a panic message nor a backtrace on either stream.
    #[track_caller]
    pub fn assert_no_panic(&self) -> &Output {
        for text in [&self.stdout, &self.stderr] {
            let lower = text.to_lowercase();
            assert!(!lower.contains("panicked"), "output shows a panic\n{self}");
            assert!(
                !lower.contains("backtrace"),
                "output shows a backtrace\n{self}"
            );
        }
        self
    }

    /// Exit 1 with exactly one `error: …` line on stderr that contains `needle` (case
    /// insensitive), and
    /// no panic or backtrace. Other stderr lines (logs) are allowed; see
    /// [`Output::assert_single_stderr_line`] to forbid them.
    #[track_caller]
    pub fn assert_fails_with(&self, needle: &str) -> &Output {
        self.assert_code(1).assert_no_panic();
        let lines = self.stderr_lines();
        let errors: Vec<&String> = lines.iter().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(
            errors.len(),
            1,
            "expected exactly one `error:` line on stderr\n{self}"
        );
        assert!(
            errors[0].to_lowercase().contains(&needle.to_lowercase()),
            "the error line does not mention {needle:?}\n{self}"
        );
        self
    }

    /// stderr holds exactly one non-empty line.
    #[track_caller]
    pub fn assert_single_stderr_line(&self) -> &Output {
        assert_eq!(
            self.stderr_lines().len(),
            1,
            "expected exactly one line on stderr\n{self}"
        );
        self
    }

    /// stdout parsed as one JSON document.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e})\n{self}"))
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "$ {}", self.command)?;
        writeln!(f, "exit: {:?} after {:?}", self.code, self.elapsed)?;
        writeln!(f, "--- stdout ---\n{}", tail(&self.stdout))?;
        write!(f, "--- stderr ---\n{}", tail(&self.stderr))
    }
}

/// The last 60 lines: enough to diagnose, short enough to read.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let skipped = lines.len().saturating_sub(60);
    let mut out = String::new();
    if skipped > 0 {
        out.push_str(&format!("[… {skipped} lines …]\n"));
    }
    out.push_str(&lines[skipped..].join("\n"));
    out
}

/// Remove ANSI escape sequences (`ESC [ … letter`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
