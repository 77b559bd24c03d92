//! A throwaway PostgreSQL for the test process, and a fresh database per test.
//!
//! One cluster is initialised and started the first time a test asks for a database
//! and is shared by every test of the process; it dies with the process
//! (`PR_SET_PDEATHSIG`) and its directory is removed at exit (and, should a run be
//! killed, by the next run). When `DATABASE_URL` is set, that server is used instead
//! and no cluster is started. A test that must stop and restart PostgreSQL takes a
//! [`PrivatePg`] of its own.
//!
//! PostgreSQL refuses to run as root; when the tests do (CI), `initdb` and `postgres`
//! run as the `postgres` user in directories that user owns.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

/// Upper bound for a cluster to accept connections after `postgres` is started.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for a cluster to shut down.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A database of its own for one test.
pub struct TestDb {
    /// `postgres://postgres@127.0.0.1:<port>/t_<random>`
    pub url: String,
    pub name: String,
    /// A small pool for the test's own queries.
    pub pool: PgPool,
}

/// A fresh, empty database on the shared cluster (or on `DATABASE_URL`'s server).
pub async fn test_db() -> TestDb {
    let admin_url = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => match shared_cluster() {
            Ok(cluster) => cluster.admin_url(),
            Err(e) => panic!("cannot start the test PostgreSQL: {e}"),
        },
    };
    create_database(&admin_url).await
}

/// Create `t_<random>` on the server of `admin_url` and connect a pool to it.
pub async fn create_database(admin_url: &str) -> TestDb {
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut conn = PgConnection::connect(admin_url)
        .await
        .unwrap_or_else(|e| panic!("connect to {admin_url}: {e}"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
    let _ = conn.close().await;
    let url = with_database(admin_url, &name);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&url)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    TestDb { url, name, pool }
}

/// `url` with its path (database name) replaced.
pub fn with_database(url: &str, database: &str) -> String {
    let mut parsed =
        reqwest::Url::parse(url).unwrap_or_else(|e| panic!("bad database url {url}: {e}"));
    parsed.set_path(&format!("/{database}"));
    parsed.to_string()
}

/// `url` with a password set. Under `--auth=trust` the server ignores it, which lets a
/// test check that a password given to the relay never shows up in its output.
pub fn with_password(url: &str, password: &str) -> String {
    let mut parsed =
        reqwest::Url::parse(url).unwrap_or_else(|e| panic!("bad database url {url}: {e}"));
    parsed
        .set_password(Some(password))
        .expect("url can carry a password");
    parsed.to_string()
}

/// A cluster of its own for a test that stops and restarts PostgreSQL. Same data
/// directory and port across `stop`/`start`, so URLs stay valid. Removed on drop.
pub struct PrivatePg {
    cluster: Arc<Cluster>,
}

impl PrivatePg {
    /// `initdb` a new cluster and start it (a few seconds).
    pub async fn start_new() -> PrivatePg {
        let cluster = tokio::task::spawn_blocking(|| Cluster::init("private"))
            .await
            .expect("initdb task")
            .unwrap_or_else(|e| panic!("cannot start a private PostgreSQL: {e}"));
        PrivatePg {
            cluster: Arc::new(cluster),
        }
    }

    pub fn port(&self) -> u16 {
        self.cluster.port
    }

    /// URL of the `postgres` database (superuser, trust auth).
    pub fn admin_url(&self) -> String {
        self.cluster.admin_url()
    }

    /// A fresh database on this cluster.
    pub async fn create_database(&self) -> TestDb {
        create_database(&self.admin_url()).await
    }

    /// Fast shutdown (SIGINT); returns when the server has exited.
    pub async fn stop(&self) {
        let cluster = Arc::clone(&self.cluster);
        tokio::task::spawn_blocking(move || cluster.stop())
            .await
            .expect("stop task")
            .unwrap_or_else(|e| panic!("cannot stop the private PostgreSQL: {e}"));
    }

    /// Immediate shutdown (SIGQUIT): what the server had not written out is lost,
    /// as in a crash of the server (its operating system survives).
    pub async fn crash(&self) {
        let cluster = Arc::clone(&self.cluster);
        tokio::task::spawn_blocking(move || cluster.kill())
            .await
            .expect("crash task");
    }

    /// Start again on the same data directory and port; returns when it accepts
    /// connections.
    pub async fn start(&self) {
        let cluster = Arc::clone(&self.cluster);
        tokio::task::spawn_blocking(move || cluster.start())
            .await
            .expect("start task")
            .unwrap_or_else(|e| panic!("cannot restart the private PostgreSQL: {e}"));
    }
}

/// The process-wide cluster, started on first use.
static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();

fn shared_cluster() -> Result<&'static Cluster, String> {
    let cluster = SHARED.get_or_init(|| {
        let cluster = Cluster::init("shared")?;
        // SAFETY: registers a plain function; it runs once, at process exit.
        unsafe { libc::atexit(remove_shared_cluster) };
        Ok(cluster)
    });
    cluster.as_ref().map_err(Clone::clone)
}

/// Statics are never dropped: stop the shared server and remove the files at exit.
extern "C" fn remove_shared_cluster() {
    if let Some(Ok(cluster)) = SHARED.get() {
        cluster.kill();
    }
    if let Some(base) = BASE_DIR.get() {
        let _ = std::fs::remove_dir_all(base);
    }
}

/// One PostgreSQL data directory and the server running on it, if any.
struct Cluster {
    /// Owned by the server's user; holds `data/`, the socket and `server.log`.
    dir: PathBuf,
    port: u16,
    server: Mutex<Option<Server>>,
}

struct Server {
    pid: libc::pid_t,
    /// The thread that spawned the server and waits for it. The parent-death signal
    /// fires when the *thread* that forked exits, so this thread lives exactly as long
    /// as the server does.
    keeper: JoinHandle<Option<ExitStatus>>,
}

impl Cluster {
    fn init(kind: &str) -> Result<Cluster, String> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = base_dir()?.join(format!("{kind}-{n}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        give_to_server_user(&dir)?;
        initdb(&dir)?;

        // A free port can be taken between our probe and the server's bind: retry.
        let mut cluster = Cluster {
            dir,
            port: 0,
            server: Mutex::new(None),
        };
        let mut last_error = String::new();
        for _ in 0..3 {
            cluster.port = free_port()?;
            match cluster.start() {
                Ok(()) => return Ok(cluster),
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }

    fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn start(&self) -> Result<(), String> {
        let mut guard = self.server.lock().unwrap();
        if guard.is_some() {
            return Err("already running".into());
        }
        let log_path = self.dir.join("server.log");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("open {}: {e}", log_path.display()))?;
        let log_err = log.try_clone().map_err(|e| format!("dup log fd: {e}"))?;

        let mut cmd = Command::new(pg_bin("postgres"));
        cmd.arg("-D")
            .arg(self.dir.join("data"))
            .arg("-k")
            .arg(&self.dir)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"])
            .args(["-c", "max_connections=300"])
            .args(["-c", "shared_buffers=128MB"])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        as_server_user(&mut cmd)?;
        // SAFETY: prctl is async-signal-safe; nothing else runs in the forked child.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }

        let (tx, rx) = mpsc::channel();
        let keeper = std::thread::Builder::new()
            .name(format!("pg-keeper-{}", self.port))
            .spawn(move || match cmd.spawn() {
                Ok(mut child) => {
                    let _ = tx.send(Ok(child.id()));
                    child.wait().ok()
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    None
                }
            })
            .map_err(|e| format!("spawn keeper thread: {e}"))?;
        let pid = rx
            .recv()
            .map_err(|_| "keeper thread died".to_string())?
            .map_err(|e| format!("spawn postgres: {e}"))? as libc::pid_t;

        let deadline = Instant::now() + START_TIMEOUT;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            if keeper.is_finished() {
                let _ = keeper.join();
                return Err(format!(
                    "postgres exited during start-up:\n{}",
                    self.log_tail()
                ));
            }
            if self.pid_file_says_ready()
                && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            {
                *guard = Some(Server { pid, keeper });
                return Ok(());
            }
            if Instant::now() >= deadline {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let _ = keeper.join();
                return Err(format!(
                    "postgres did not accept connections within {START_TIMEOUT:?}:\n{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(super::POLL);
        }
    }

    /// Fast shutdown, bounded; SIGKILL if it does not finish.
    fn stop(&self) -> Result<(), String> {
        let server = self.server.lock().unwrap().take().ok_or("not running")?;
        if stop_server(server, libc::SIGINT, STOP_TIMEOUT) {
            Ok(())
        } else {
            Err(format!(
                "postgres did not stop within {STOP_TIMEOUT:?}:\n{}",
                self.log_tail()
            ))
        }
    }

    /// Immediate shutdown, for teardown.
    fn kill(&self) {
        if let Some(server) = self.server.lock().unwrap_or_else(|p| p.into_inner()).take() {
            stop_server(server, libc::SIGQUIT, Duration::from_secs(5));
        }
    }

    /// Line 8 of postmaster.pid is the postmaster status; "ready" once it accepts
    /// connections.
    fn pid_file_says_ready(&self) -> bool {
        std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
            .map(|text| text.lines().nth(7).is_some_and(|l| l.trim() == "ready"))
            .unwrap_or(false)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Signal the server and wait for its keeper thread; SIGKILL after `timeout`.
/// Returns whether it stopped within `timeout`.
fn stop_server(server: Server, signal: libc::c_int, timeout: Duration) -> bool {
    // SAFETY: signalling our own child, which the keeper has not reaped yet.
    unsafe { libc::kill(server.pid, signal) };
    let deadline = Instant::now() + timeout;
    while !server.keeper.is_finished() && Instant::now() < deadline {
        std::thread::sleep(super::POLL);
    }
    let in_time = server.keeper.is_finished();
    if !in_time {
        // SAFETY: as above.
        unsafe { libc::kill(server.pid, libc::SIGKILL) };
    }
    let _ = server.keeper.join();
    in_time
}

fn initdb(dir: &Path) -> Result<(), String> {
    let mut cmd = Command::new(pg_bin("initdb"));
    cmd.arg("-D")
        .arg(dir.join("data"))
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .current_dir(dir)
        .stdin(Stdio::null());
    as_server_user(&mut cmd)?;
    let out = cmd.output().map_err(|e| format!("run initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "initdb failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// `temp_dir()/serversync-it-<pid>`, owned by the server's user. Directories left by
/// earlier runs whose process is gone are removed first.
fn base_dir() -> Result<PathBuf, String> {
    static BASE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BASE.get_or_init(|| {
        let tmp = std::env::temp_dir();
        remove_stale_dirs(&tmp);
        let dir = tmp.join(format!("serversync-it-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        give_to_server_user(&dir)?;
        let _ = BASE_DIR.set(dir.clone());
        Ok(dir)
    })
    .clone()
}

/// The base directory once created, for the exit hook.
static BASE_DIR: OnceLock<PathBuf> = OnceLock::new();

fn remove_stale_dirs(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("serversync-it-")) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// uid/gid of `postgres` when we are root, else `None` (run as ourselves).
fn server_user() -> Result<Option<(u32, u32)>, String> {
    static USER: OnceLock<Result<Option<(u32, u32)>, String>> = OnceLock::new();
    USER.get_or_init(|| {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(None);
        }
        let name = CString::new("postgres").expect("no NUL");
        // SAFETY: getpwnam is called once, under the OnceLock; the fields are copied
        // out before any other passwd lookup could reuse the static buffer.
        let pw = unsafe { libc::getpwnam(name.as_ptr()) };
        if pw.is_null() {
            return Err(
                "running as root, and there is no `postgres` user to run PostgreSQL as".into(),
            );
        }
        // SAFETY: pw is non-null and points to a valid passwd entry.
        Ok(Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) }))
    })
    .clone()
}

fn as_server_user(cmd: &mut Command) -> Result<(), String> {
    if let Some((uid, gid)) = server_user()? {
        cmd.uid(uid)
            .gid(gid)
            .env("HOME", "/tmp")
            .env_remove("PGDATA");
    }
    Ok(())
}

fn give_to_server_user(dir: &Path) -> Result<(), String> {
    if let Some((uid, gid)) = server_user()? {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))
            .map_err(|e| format!("chown {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// `PG_BIN_DIR/<name>` if set, else `<name>` on PATH, else a Debian install.
fn pg_bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("PG_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|c| c.is_file())
        })
        .unwrap_or(None);
    on_path.unwrap_or_else(|| {
        ["17", "16", "15", "14", "13"]
            .iter()
            .map(|v| PathBuf::from(format!("/usr/lib/postgresql/{v}/bin/{name}")))
            .find(|c| c.is_file())
            .unwrap_or_else(|| PathBuf::from(name))
    })
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    Ok(listener
        .local_addr()
        .map_err(|e| format!("local addr: {e}"))?
        .port())
}
