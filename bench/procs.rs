//! Child processes measured the way the kernel accounts for them.
//!
//! A child is spawned from a keeper thread of its own that reaps it with `wait4`, which
//! returns the CPU time (user + system, all threads) and the peak RSS of the whole
//! process. The child gets `PR_SET_PDEATHSIG(SIGKILL)`; that signal fires when the
//! *thread* that forked exits, which is why the keeper lives exactly as long as the
//! child. While it runs, `/proc/<pid>/stat` gives CPU samples.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::sync::oneshot;

/// How a child ended, from `wait4`.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// User + system CPU time of the process and its threads.
    pub cpu: Duration,
    /// Peak resident set size (`ru_maxrss`).
    pub max_rss_kib: u64,
}

impl Exit {
    pub fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            (None, None) => "unknown exit status".into(),
        }
    }

    pub fn max_rss_mib(&self) -> f64 {
        self.max_rss_kib as f64 / 1024.0
    }
}

pub struct Child {
    pub pid: i32,
    pub name: String,
    exit: Option<oneshot::Receiver<io::Result<Exit>>>,
    reaped: Arc<AtomicBool>,
}

/// Spawn `cmd` from a keeper thread; the child dies with this process.
pub fn spawn(mut cmd: Command, name: &str) -> anyhow::Result<Child> {
    // SAFETY: prctl is async-signal-safe; nothing else runs in the forked child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (pid_tx, pid_rx) = std::sync::mpsc::channel();
    let (exit_tx, exit_rx) = oneshot::channel();
    let reaped = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&reaped);
    std::thread::Builder::new()
        .name(format!("keeper-{name}"))
        .spawn(move || {
            let child = match cmd.spawn() {
                Ok(child) => child,
                Err(e) => {
                    let _ = pid_tx.send(Err(e));
                    return;
                }
            };
            let pid = child.id() as i32;
            let _ = pid_tx.send(Ok(pid));
            let exit = wait4(pid);
            flag.store(true, Ordering::SeqCst);
            // `child` was reaped by wait4; dropping it neither waits nor kills.
            drop(child);
            let _ = exit_tx.send(exit);
        })
        .context("spawning a keeper thread")?;
    let pid = pid_rx
        .recv()
        .context("the keeper thread died")?
        .with_context(|| format!("cannot start {name}"))?;
    Ok(Child {
        pid,
        name: name.to_string(),
        exit: Some(exit_rx),
        reaped,
    })
}

impl Child {
    pub fn is_running(&self) -> bool {
        !self.reaped.load(Ordering::SeqCst)
    }

    pub fn signal(&self, signal: libc::c_int) {
        if self.is_running() {
            // SAFETY: signalling our own child, which the keeper has not reaped yet.
            unsafe { libc::kill(self.pid, signal) };
        }
    }

    /// Wait up to `limit`; past it the child is killed and this is an error.
    pub async fn wait(&mut self, limit: Duration) -> anyhow::Result<Exit> {
        let Some(mut rx) = self.exit.take() else {
            bail!("{} was already waited for", self.name)
        };
        match tokio::time::timeout(limit, &mut rx).await {
            Ok(exit) => exit
                .context("the keeper thread died")?
                .with_context(|| format!("wait4 on {}", self.name)),
            Err(_) => {
                self.signal(libc::SIGKILL);
                let _ = tokio::time::timeout(Duration::from_secs(10), rx).await;
                bail!("{} did not finish within {limit:?}; killed it", self.name)
            }
        }
    }

    /// Whether it has exited already (without waiting).
    pub fn try_exit(&mut self) -> Option<anyhow::Result<Exit>> {
        let rx = self.exit.as_mut()?;
        match rx.try_recv() {
            Ok(exit) => {
                self.exit = None;
                Some(exit.context("wait4"))
            }
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => {
                self.exit = None;
                Some(Err(anyhow::anyhow!(
                    "the keeper thread of {} died",
                    self.name
                )))
            }
        }
    }

    /// CPU time so far (user + system), from `/proc/<pid>/stat`.
    pub fn cpu_now(&self) -> Option<Duration> {
        read_stat(self.pid).map(|s| ticks(s.utime + s.stime))
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.exit.is_some() && self.is_running() {
            self.signal(libc::SIGKILL);
            if let Some(rx) = self.exit.as_mut() {
                for _ in 0..500 {
                    if !matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

fn wait4(pid: i32) -> io::Result<Exit> {
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain old data; zeroed is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut interrupted = 0;
    loop {
        // SAFETY: valid pointers to locals; pid is our own child.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            break;
        }
        let err = io::Error::last_os_error();
        interrupted += 1;
        if err.kind() != io::ErrorKind::Interrupted || interrupted > 10_000 {
            return Err(err);
        }
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    let (code, signal) = if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    };
    Ok(Exit {
        code,
        signal,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        max_rss_kib: usage.ru_maxrss.max(0) as u64,
    })
}

/// The fields of `/proc/<pid>/stat` the bench uses, in clock ticks and pages.
#[derive(Debug, Clone, Copy)]
pub struct ProcStat {
    pub ppid: i32,
    pub utime: u64,
    pub stime: u64,
    /// CPU of children this process has reaped (a postmaster's exited backends).
    pub cutime: u64,
    pub cstime: u64,
}

pub fn read_stat(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the command name is in parentheses and may itself contain spaces or ')'
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): field k is f[k - 3]
    let num = |k: usize| f.get(k - 3).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        ppid: f.get(1)?.parse().ok()?,
        utime: num(14)?,
        stime: num(15)?,
        cutime: num(16)?,
        cstime: num(17)?,
    })
}

/// The command name of a process (`/proc/<pid>/comm`).
pub fn comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Pids whose parent is `ppid`.
pub fn children_of(ppid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|pid| read_stat(*pid).is_some_and(|s| s.ppid == ppid))
        .collect()
}

/// Clock ticks as a duration.
pub fn ticks(n: u64) -> Duration {
    static HZ: OnceLock<u64> = OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    let hz = *HZ.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        v if v > 0 => v as u64,
        _ => 100,
    });
    Duration::from_nanos(n.saturating_mul(1_000_000_000) / hz)
}

/// CPU time of this process so far (the sink and the bench's own work).
pub fn self_cpu() -> Duration {
    // SAFETY: rusage is plain old data; getrusage fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a local.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// A program on PATH, if there is one.
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|c| c.is_file())
}
