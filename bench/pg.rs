//! The PostgreSQL server under test: a throwaway cluster (`initdb` + `postgres`, run
//! as the `postgres` user when the bench runs as root), or an existing server given
//! with `--database-url`. Each scenario gets a scratch database of its own.
//!
//! The server's CPU time is the postmaster's own, plus what it has reaped from exited
//! backends (`cutime`/`cstime`), plus its live children — backends, autovacuum,
//! checkpointer, WAL writer — read from `/proc`.

use std::ffi::CString;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use crate::procs;

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Server settings of the throwaway cluster. fsync, synchronous_commit and
/// full_page_writes stay at their (durable) defaults.
pub const DEFAULT_SETTINGS: &[&str] = &[
    "listen_addresses=127.0.0.1",
    "max_connections=100",
    "shared_buffers=256MB",
    "max_wal_size=4GB",
];

pub struct Server {
    admin_url: String,
    /// The postmaster, when it runs on this machine and we can see it.
    postmaster: Option<i32>,
    /// Names of scratch databases get this prefix.
    prefix: &'static str,
    cluster: Option<Cluster>,
}

struct Cluster {
    dir: PathBuf,
    child: procs::Child,
}

/// A scratch database and a small pool for the bench's own queries.
pub struct Database {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl Server {
    /// `initdb` a cluster under `dir` with `locale` and start it with `settings`
    /// (NAME=VALUE).
    pub async fn start(dir: &Path, settings: &[String], locale: &str) -> anyhow::Result<Server> {
        let dir = dir.to_path_buf();
        let settings = settings.to_vec();
        let locale = locale.to_owned();
        let cluster = tokio::task::spawn_blocking(move || Cluster::start(dir, &settings, &locale))
            .await
            .context("the start-up task panicked")??;
        let admin_url = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port()?);
        Ok(Server {
            admin_url,
            postmaster: Some(cluster.child.pid),
            prefix: "bench_",
            cluster: Some(cluster),
        })
    }

    /// Use an existing server; scratch databases are created (and dropped) on it.
    pub async fn external(url: &str) -> anyhow::Result<Server> {
        let mut conn = connect(url).await?;
        let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut conn)
            .await?;
        let _ = conn.close().await;
        let local = PgConnectOptions::from_str(url)
            .map(|o| {
                matches!(o.get_host(), "localhost" | "127.0.0.1" | "::1")
                    || o.get_host().starts_with('/')
            })
            .unwrap_or(false);
        // the backend's parent is the postmaster, if this is a local server we can see
        let postmaster = procs::read_stat(backend)
            .filter(|_| local && procs::comm(backend).is_some_and(|c| c.starts_with("postgres")))
            .map(|s| s.ppid)
            .filter(|pm| {
                procs::comm(*pm)
                    .is_some_and(|c| c.starts_with("postgres") || c.starts_with("postmaster"))
            });
        if postmaster.is_none() {
            eprintln!("note: the server's processes are not visible here; PostgreSQL CPU will not be reported");
        }
        Ok(Server {
            admin_url: url.to_string(),
            postmaster,
            prefix: "serversync_bench_",
            cluster: None,
        })
    }

    pub fn is_throwaway(&self) -> bool {
        self.cluster.is_some()
    }

    /// Connection arguments for libpq tools (pgbench, psql): a URI as the dbname.
    pub fn libpq_url(&self, database: &str) -> anyhow::Result<String> {
        with_database(&self.admin_url, database)
    }

    /// A fresh, empty database called `<prefix><name>` (dropped first if left over).
    pub async fn create_database(&self, name: &str) -> anyhow::Result<Database> {
        let name = format!("{}{name}", self.prefix);
        let mut admin = connect(&self.admin_url).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await
            .with_context(|| format!("dropping the leftover database {name}"))?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .with_context(|| {
                format!("creating the scratch database {name} (the user needs CREATEDB)")
            })?;
        let _ = admin.close().await;
        let url = with_database(&self.admin_url, &name)?;
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&url)
            .await
            .with_context(|| format!("connecting to {name}"))?;
        Ok(Database { name, url, pool })
    }

    pub async fn drop_database(&self, db: Database) -> anyhow::Result<()> {
        db.pool.close().await;
        let mut admin = connect(&self.admin_url).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", db.name))
            .execute(&mut admin)
            .await?;
        let _ = admin.close().await;
        Ok(())
    }

    /// CPU time of every server process so far, if the server is visible.
    pub fn cpu(&self) -> Option<Duration> {
        let pm = self.postmaster?;
        let root = procs::read_stat(pm)?;
        let mut ticks = root.utime + root.stime + root.cutime + root.cstime;
        for pid in procs::children_of(pm) {
            if let Some(s) = procs::read_stat(pid) {
                ticks += s.utime + s.stime + s.cutime + s.cstime;
            }
        }
        Some(procs::ticks(ticks))
    }

    /// `version()` and the settings that matter for these figures.
    pub async fn describe(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut conn = connect(&self.admin_url).await?;
        let mut out = vec![(
            "version".to_string(),
            sqlx::query_scalar("SELECT version()")
                .fetch_one(&mut conn)
                .await?,
        )];
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT name, setting || COALESCE(' ' || unit, '') FROM pg_settings WHERE name = ANY($1) ORDER BY name",
        )
        .bind(
            [
                "shared_buffers", "fsync", "synchronous_commit", "full_page_writes", "wal_sync_method",
                "max_wal_size", "checkpoint_timeout", "wal_writer_delay", "commit_delay", "max_connections",
                "shared_preload_libraries", "autovacuum",
            ]
            .map(String::from)
            .to_vec(),
        )
        .fetch_all(&mut conn)
        .await?;
        out.extend(rows);
        let _ = conn.close().await;
        Ok(out)
    }

    /// Fast shutdown, bounded (the throwaway cluster only).
    pub async fn stop(&mut self) {
        if let Some(mut cluster) = self.cluster.take() {
            cluster.child.signal(libc::SIGINT);
            if cluster.child.wait(Duration::from_secs(30)).await.is_err() {
                eprintln!("warning: PostgreSQL did not stop in 30 s; killed it");
            }
        }
    }
}

impl Database {
    /// Committed transactions of this database so far (`pg_stat_database`).
    pub async fn xact_commit(&self) -> anyhow::Result<i64> {
        // make this session's own counts visible before reading
        sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(&self.pool)
            .await?;
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(&self.pool)
            .await?;
        let n: i64 = sqlx::query_scalar(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(n)
    }

    pub async fn count(&self, sql: &str) -> anyhow::Result<i64> {
        sqlx::query_scalar(sql)
            .fetch_one(&self.pool)
            .await
            .with_context(|| format!("running {sql}"))
    }

    pub async fn exec(&self, sql: &str) -> anyhow::Result<()> {
        sqlx::raw_sql(sql)
            .execute(&self.pool)
            .await
            .with_context(|| format!("running {}", first_line(sql)))?;
        Ok(())
    }
}

fn first_line(sql: &str) -> &str {
    sql.trim().lines().next().unwrap_or("")
}

pub async fn connect(url: &str) -> anyhow::Result<PgConnection> {
    let options = PgConnectOptions::from_str(url).context("invalid database URL")?;
    tokio::time::timeout(
        Duration::from_secs(30),
        PgConnection::connect_with(&options),
    )
    .await
    .context("timed out connecting to PostgreSQL")?
    .context("cannot connect to PostgreSQL")
}

/// `url` with its database name replaced.
pub fn with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let mut parsed = reqwest::Url::parse(url).context("invalid database URL")?;
    parsed.set_path(&format!("/{database}"));
    Ok(parsed.to_string())
}

impl Cluster {
    fn start(dir: PathBuf, extra: &[String], locale: &str) -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        give_to_server_user(&dir)?;
        initdb(&dir, locale)?;
        let mut last = None;
        // a free port can be taken between our probe and the server's bind: retry
        for _ in 0..3 {
            let port = free_port()?;
            match start_postgres(&dir, port, extra) {
                Ok(child) => return Ok(Cluster { dir, child }),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("PostgreSQL did not start")))
    }

    fn port(&self) -> anyhow::Result<u16> {
        let pid_file = std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
            .context("reading postmaster.pid")?;
        pid_file
            .lines()
            .nth(3)
            .and_then(|l| l.trim().parse().ok())
            .context("no port in postmaster.pid")
    }
}

impl Drop for Cluster {
    /// Immediate shutdown if `stop` was not called (an error path).
    fn drop(&mut self) {
        self.child.signal(libc::SIGQUIT);
        for _ in 0..500 {
            if self.child.try_exit().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn start_postgres(dir: &Path, port: u16, extra: &[String]) -> anyhow::Result<procs::Child> {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))?;
    let mut cmd = Command::new(pg_bin("postgres"));
    cmd.arg("-D")
        .arg(dir.join("data"))
        .arg("-k")
        .arg(dir)
        .arg("-p")
        .arg(port.to_string());
    for setting in DEFAULT_SETTINGS
        .iter()
        .map(|s| s.to_string())
        .chain(extra.iter().cloned())
    {
        cmd.arg("-c").arg(setting);
    }
    cmd.current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    as_server_user(&mut cmd)?;
    let mut child = procs::spawn(cmd, "postgres")?;
    let deadline = Instant::now() + START_TIMEOUT;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        if let Some(exit) = child.try_exit() {
            let how = exit
                .map(|e| e.describe())
                .unwrap_or_else(|e| format!("{e:#}"));
            bail!(
                "postgres exited during start-up ({how}):\n{}",
                log_tail(dir)
            );
        }
        let ready = std::fs::read_to_string(dir.join("data/postmaster.pid"))
            .map(|t| t.lines().nth(7).is_some_and(|l| l.trim() == "ready"))
            .unwrap_or(false);
        if ready && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            bail!(
                "postgres did not accept connections within {START_TIMEOUT:?}:\n{}",
                log_tail(dir)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn initdb(dir: &Path, locale: &str) -> anyhow::Result<()> {
    let mut cmd = Command::new(pg_bin("initdb"));
    cmd.arg("-D")
        .arg(dir.join("data"))
        .args(["-U", "postgres", "--auth=trust", "-E", "UTF8"])
        .arg(format!("--locale={locale}"))
        .current_dir(dir)
        .stdin(Stdio::null());
    as_server_user(&mut cmd)?;
    let out = cmd
        .output()
        .context("cannot run initdb (are the PostgreSQL server binaries on PATH?)")?;
    if !out.status.success() {
        bail!(
            "initdb failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn log_tail(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// uid/gid of `postgres` when we are root (PostgreSQL refuses root), else `None`.
fn server_user() -> anyhow::Result<Option<(u32, u32)>> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = CString::new("postgres").context("user name")?;
    // SAFETY: the bench looks users up from one thread at a time; the fields are
    // copied out before any other lookup could reuse getpwnam's static buffer.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        bail!("running as root, and there is no `postgres` user to run PostgreSQL as (useradd --system postgres)");
    }
    // SAFETY: pw is non-null and points to a valid passwd entry.
    Ok(Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) }))
}

fn as_server_user(cmd: &mut Command) -> anyhow::Result<()> {
    if let Some((uid, gid)) = server_user()? {
        cmd.uid(uid)
            .gid(gid)
            .env("HOME", "/tmp")
            .env_remove("PGDATA");
    }
    Ok(())
}

pub fn give_to_server_user(dir: &Path) -> anyhow::Result<()> {
    if let Some((uid, gid)) = server_user()? {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))
            .with_context(|| format!("chown {}", dir.display()))?;
    }
    Ok(())
}

/// `PG_BIN_DIR/<name>` if set, else `<name>` on PATH, else a Debian install.
pub fn pg_bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("PG_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    procs::which(name).unwrap_or_else(|| {
        ["17", "16", "15", "14", "13"]
            .iter()
            .map(|v| PathBuf::from(format!("/usr/lib/postgresql/{v}/bin/{name}")))
            .find(|c| c.is_file())
            .unwrap_or_else(|| PathBuf::from(name))
    })
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding a probe port")?;
    Ok(listener.local_addr()?.port())
}
