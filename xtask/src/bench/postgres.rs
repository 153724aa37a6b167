//! W8: a PostgreSQL server started under a configuration's prefix (the
//! postmaster is the traced entrypoint, every backend its child), loaded by
//! pgbench from outside the trace with a few clients and a fixed number of
//! transactions: select-only (`-S`) or the default TPC-B-like mix.
//!
//! The cluster lives in a directory of its own under the temporary
//! directory, made once per bench (initdb, then `pgbench -i` on a native
//! server) and removed whatever happens. The server listens only on a unix
//! socket in that directory, so no port is taken. postgres refuses to run
//! as root: it runs as the `postgres` account, through `setpriv`, the same
//! entrypoint under every configuration (the tracer stays root, as it is in
//! a container).
//!
//! What is compared is pgbench's TPS (without the connections' set-up); a
//! run's time is the transactions over that TPS, so that ratios to native
//! read as for the other workloads.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{bare, parse_stats, Run};

/// Clients pgbench keeps busy, and its threads.
const CLIENTS: u64 = 4;
const THREADS: &str = "2";
/// How long a server (traced or not) may take to accept connections, and to
/// stop after a fast shutdown.
const PATIENCE: Duration = Duration::from_secs(60);
/// The Debian packages: the server, and pgbench (in contrib on Debian 11, in
/// the server package since).
const PACKAGES: [&str; 2] = ["postgresql", "postgresql-contrib"];

#[derive(Clone, Copy)]
pub enum Mix {
    SelectOnly,
    TpcB,
}

/// A cluster in a temporary directory, removed on drop.
pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    /// The `postgres` account's uid and gid.
    user: (u32, u32),
}

/// The newest `/usr/lib/postgresql/VERSION/bin` that has both the server and pgbench.
fn bindir() -> Option<PathBuf> {
    let versions = std::fs::read_dir("/usr/lib/postgresql").ok()?;
    versions
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("postgres").exists() && bin.join("pgbench").exists()).then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version)
        .map(|(_, bin)| bin)
}

/// The server binaries, installed from Debian's packages if missing.
fn installed() -> Result<PathBuf, String> {
    if let Some(bin) = bindir() {
        return Ok(bin);
    }
    let hint = format!("PostgreSQL is needed: apt-get install -y {}", PACKAGES.join(" "));
    eprintln!("xtask: PostgreSQL not found; installing {}", PACKAGES.join(" "));
    crate::run(Command::new("apt-get").arg("update").arg("-qq")).map_err(|e| format!("{e}; {hint}"))?;
    crate::run(
        Command::new("apt-get").args(["install", "-y", "-qq"]).args(PACKAGES).env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .map_err(|e| format!("{e}; {hint}"))?;
    bindir().ok_or(hint)
}

/// The uid and gid of `account`, from /etc/passwd.
fn account(name: &str) -> Result<(u32, u32), String> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| format!("/etc/passwd: {e}"))?;
    passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&name))
        .and_then(|fields| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))
        .ok_or_else(|| format!("no {name} account in /etc/passwd"))
}

impl Cluster {
    /// initdb, and pgbench's tables created on a native server.
    pub fn create() -> Result<Cluster, String> {
        let bin = installed()?;
        let user = account("postgres")?;
        let dir = std::env::temp_dir().join(format!("cws-bench-postgres-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let cluster = Cluster { dir, bin, user };
        std::fs::set_permissions(&cluster.dir, std::fs::Permissions::from_mode(0o700))
            .and_then(|()| std::os::unix::fs::chown(&cluster.dir, Some(user.0), Some(user.1)))
            .map_err(|e| format!("{}: {e}", cluster.dir.display()))?;
        let mut initdb = cluster.as_postgres(&cluster.bin.join("initdb"));
        initdb.arg("-D").arg(cluster.data()).args(["-A", "trust", "-U", "postgres", "-N", "-E", "UTF8", "--locale=C"]);
        crate::run(initdb.stdout(Stdio::null()))?;
        let server = Server::start(&cluster, &[])?;
        crate::run(cluster.pgbench().args(["-i", "-q", "postgres"]).stderr(Stdio::null()))?;
        server.stop()?;
        Ok(cluster)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// `program` run as the postgres account, by setpriv.
    fn as_postgres(&self, program: &Path) -> Command {
        let mut command = Command::new("setpriv");
        bare(&mut command).args(self.setpriv()).arg(program);
        command
    }

    fn setpriv(&self) -> Vec<String> {
        let (uid, gid) = self.user;
        vec![format!("--reuid={uid}"), format!("--regid={gid}"), "--clear-groups".into(), "--".into()]
    }

    /// pgbench against this cluster's socket, as the database's superuser.
    fn pgbench(&self) -> Command {
        let mut command = Command::new(self.bin.join("pgbench"));
        bare(&mut command).arg("-h").arg(&self.dir).args(["-U", "postgres"]).stdin(Stdio::null());
        command
    }

    fn ready(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .arg("-q")
            .arg("-h")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("xtask: cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// A postmaster under a prefix. Dropped without `stop`, it is killed.
struct Server {
    child: Child,
    pid_file: PathBuf,
    stderr: Option<JoinHandle<String>>,
}

impl Server {
    fn start(cluster: &Cluster, prefix: &[String]) -> Result<Server, String> {
        let postgres = cluster.bin.join("postgres").display().to_string();
        let data = cluster.data().display().to_string();
        let socket_dir = cluster.dir.display().to_string();
        let argv: Vec<String> = prefix
            .iter()
            .cloned()
            .chain(std::iter::once("setpriv".to_owned()))
            .chain(cluster.setpriv())
            .chain([postgres, "-D".into(), data, "-k".into(), socket_dir])
            // No TCP; and no disk flushes, whose time would hide the tracer's
            // cost (and vary with the neighbours' I/O).
            .chain(["-c", "listen_addresses=", "-c", "fsync=off"].map(str::to_owned))
            .collect();
        let mut child = bare(Command::new(&argv[0]).args(&argv[1..]))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
        // postgres logs to stderr: read as it comes, so that it never fills the pipe.
        let stderr = child.stderr.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text);
                text
            })
        });
        let mut server = Server { child, pid_file: cluster.data().join("postmaster.pid"), stderr };
        let deadline = Instant::now() + PATIENCE;
        while !cluster.ready() {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("{argv:?} exited with {status}: {}", server.log().trim()));
            }
            if Instant::now() > deadline {
                return Err(format!("postgres did not accept connections within {PATIENCE:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    /// The postmaster's pid, from its pid file (the prefix's child, or deeper).
    fn postmaster(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.pid_file).ok()?;
        text.lines().next().map(str::to_owned)
    }

    fn signal(&self, signal: &str) {
        if let Some(pid) = self.postmaster() {
            let _ = Command::new("kill").args([signal, &pid]).stderr(Stdio::null()).status();
        }
    }

    fn log(&mut self) -> String {
        self.stderr.take().and_then(|reader| reader.join().ok()).unwrap_or_default()
    }

    /// Fast shutdown (SIGINT to the postmaster itself: strace would not pass
    /// a signal on), then the prefix's exit. Returns the prefix's stderr.
    fn stop(mut self) -> Result<String, String> {
        self.signal("-INT");
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            match self.child.try_wait().map_err(|e| e.to_string())? {
                Some(status) => break status,
                None if Instant::now() > deadline => return Err(format!("postgres did not stop within {PATIENCE:?}")),
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let log = self.log();
        if !status.success() {
            return Err(format!("postgres exited with {status}: {}", log.trim()));
        }
        Ok(log)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal("-KILL");
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// pgbench's "tps = N (without initial connection time)".
fn tps(output: &str) -> Result<f64, String> {
    output
        .lines()
        .find_map(|line| line.strip_prefix("tps = ")?.split(' ').next()?.parse().ok())
        .ok_or_else(|| format!("pgbench printed no tps: {}", output.trim()))
}

/// One server under `prefix`, `transactions` per client of `mix`.
pub fn run_once(prefix: &[String], cluster: &Cluster, mix: Mix, transactions: u64) -> Result<Run, String> {
    let server = Server::start(cluster, prefix)?;
    let mut pgbench = cluster.pgbench();
    pgbench.args(["-c", &CLIENTS.to_string(), "-j", THREADS, "-t", &transactions.to_string()]);
    if let Mix::SelectOnly = mix {
        pgbench.arg("-S");
    }
    let output = pgbench.arg("postgres").output().map_err(|e| format!("cannot run pgbench: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!("pgbench failed: {}", String::from_utf8_lossy(&output.stderr).trim()));
    }
    let tps = tps(&text)?;
    let stderr = server.stop()?;
    let elapsed = Duration::from_secs_f64((CLIENTS * transactions) as f64 / tps);
    Ok(Run { elapsed, stats: parse_stats(&stderr), p99_ms: None })
}
