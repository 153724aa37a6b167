//! Helpers for tests that run the real binary on real programs.
#![allow(dead_code)] // each test crate uses its own subset

use std::ffi::OsStr;
use std::io::{BufRead, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Longest any traced command may take before the test fails as hung.
pub const DEADLINE: Duration = Duration::from_secs(120);

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_cws-instrumentation")
}

/// A command whose process starts with stdin, stdout and stderr only.
///
/// Test threads run side by side: a descriptor another one holds, or opens
/// while this command forks, must not reach a traced workload, whose
/// descriptor numbers and open files the tests compare. Everything the tests
/// open is close-on-exec already; this makes it so for whatever else the
/// process holds (close_range needs Linux 5.11).
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(program);
    clean_descriptors(&mut command);
    command
}

/// Makes `command` start with stdin, stdout and stderr only (see `command`).
pub fn clean_descriptors(command: &mut Command) -> &mut Command {
    // SAFETY: close_range is a single async-signal-safe system call, the
    // only thing done between fork and exec here. Marking descriptors
    // close-on-exec, rather than closing them, keeps the pipe through which
    // std reports a failed exec (close-on-exec already) working.
    unsafe {
        command.pre_exec(|| {
            if libc::close_range(3, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_int) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Says past libtest's output capture that the running test is skipped and
/// why, so that a skip never reads as a pass.
pub fn skip(reason: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    // One write: test threads share stderr.
    let _ = std::io::stderr().write_all(format!("skipped: {test}: {reason}\n").as_bytes());
}

/// Capabilities the privileged tests need, with their bit in CapEff.
pub const CAP_CHOWN: (u32, &str) = (0, "CAP_CHOWN");
pub const CAP_SETGID: (u32, &str) = (6, "CAP_SETGID");
pub const CAP_SETUID: (u32, &str) = (7, "CAP_SETUID");
pub const CAP_SYS_CHROOT: (u32, &str) = (18, "CAP_SYS_CHROOT");
pub const CAP_SYS_ADMIN: (u32, &str) = (21, "CAP_SYS_ADMIN");

/// Whether this process has every capability of `needed` (root has them,
/// unless a container took them away); if not, the test is skipped with
/// `why` it needs them.
pub fn require_root(needed: &[(u32, &str)], why: &str) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .expect("CapEff in /proc/self/status");
    let missing: Vec<&str> = needed.iter().filter(|(bit, _)| effective & (1 << bit) == 0).map(|(_, n)| *n).collect();
    if missing.is_empty() {
        return true;
    }
    skip(&format!("needs root ({} to {why}); run the suite as root, as CI does", missing.join(", ")));
    false
}

/// The static release binary that `cargo xtask ci` builds once (`cargo
/// xtask dist`) and names in `CWS_STATIC_BINARY`; without it the test is
/// skipped.
pub fn static_binary() -> Option<PathBuf> {
    let path = std::env::var_os("CWS_STATIC_BINARY").map(PathBuf::from);
    if path.is_none() {
        skip("needs the static release binary: run `cargo xtask ci`, or set CWS_STATIC_BINARY to what `cargo xtask dist` built");
    }
    path
}

/// Compiles `tests/fixtures/NAME.c` once per test run and returns the program.
pub fn fixture(name: &str) -> PathBuf {
    build_fixture(name, name, &[])
}

/// `tests/fixtures/NAME.c` built as an i386 program (`cc -m32`: Debian's
/// gcc-multilib), or None, with a line saying so, where it cannot be.
pub fn fixture_i386(name: &str) -> Option<PathBuf> {
    let probe = Command::new("cc").args(["-m32", "-print-file-name=libc.so"]).output();
    let libc = probe.ok().map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned());
    // Without the i386 C library, gcc prints the name back unresolved.
    if !libc.is_some_and(|path| Path::new(&path).is_absolute()) {
        skip("needs the i386 C library for `cc -m32` (Debian: gcc-multilib)");
        return None;
    }
    Some(fixture_variant(name, "i386", &["-m32"]))
}

/// `tests/fixtures/NAME.c` built with `flags` as NAME-VARIANT (`-static`, say).
pub fn fixture_variant(name: &str, variant: &str, flags: &[&str]) -> PathBuf {
    build_fixture(name, &format!("{name}-{variant}"), flags)
}

fn build_fixture(name: &str, output: &str, flags: &[&str]) -> PathBuf {
    static BUILT: OnceLock<Mutex<()>> = OnceLock::new();
    let _guard = BUILT.get_or_init(Mutex::default).lock().unwrap_or_else(|e| e.into_inner());
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(format!("{name}.c"));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
    std::fs::create_dir_all(&dir).unwrap();
    let program = dir.join(output);
    let fresh = |p: &Path| {
        let built = std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let changed = std::fs::metadata(&source).and_then(|m| m.modified()).ok();
        built.is_some() && built >= changed
    };
    if !fresh(&program) {
        // Built under another name, then renamed: another test binary
        // running at the same time never sees a half-written program.
        let partial = dir.join(format!("{output}.{}.tmp", std::process::id()));
        let status = Command::new("cc")
            .args(flags)
            .args(["-O1", "-Wall", "-pthread", "-o"])
            .arg(&partial)
            .arg(&source)
            .status()
            .expect("a C compiler (cc) is needed to build test fixtures");
        assert!(status.success(), "building fixture {output} failed");
        std::fs::rename(&partial, &program).unwrap();
    }
    program
}

/// A finished `trace` run.
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub events: Vec<Value>,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// A counter of the tracer's `--stats` line.
    pub fn stat(&self, name: &str) -> u64 {
        let line = self.stderr.lines().find(|l| l.contains("stats: ")).unwrap_or_else(|| panic!("{}", self.stderr));
        let value = line.split_whitespace().find_map(|f| f.strip_prefix(&format!("{name}=")));
        value.unwrap_or_else(|| panic!("no {name} in {line}")).parse().unwrap()
    }

    /// Events with a payload of `kind` (exec, open, connect, fork, exit, chdir).
    pub fn of(&self, kind: &str) -> Vec<&Value> {
        self.events.iter().filter(|e| e.get(kind).is_some()).collect()
    }

    /// The one event of `kind` whose `field` is `value`; fails otherwise.
    pub fn one(&self, kind: &str, field: &str, value: &str) -> &Value {
        let found: Vec<_> = self.of(kind).into_iter().filter(|e| e[kind][field] == value).collect();
        assert_eq!(
            found.len(),
            1,
            "expected one {kind} event with {field}={value}, got {found:#?}\nstderr: {}",
            self.stderr
        );
        found[0]
    }

    pub fn opens_of(&self, path: &str) -> Vec<&Value> {
        self.of("open").into_iter().filter(|e| e["open"]["path"] == path).collect()
    }
}

/// `path` as the tracer reports it: its directory where the kernel
/// resolves it (`/bin` is `/usr/bin` where it is a symlink), its final name
/// as given.
pub fn real_path(path: &str) -> String {
    let path = Path::new(path);
    let dir = path.parent().unwrap().canonicalize().unwrap();
    dir.join(path.file_name().unwrap()).to_str().unwrap().to_owned()
}

pub fn pid_of(event: &Value) -> i64 {
    event["pid"].as_i64().expect("pid")
}

/// protojson writes 64-bit integers as strings.
pub fn retval(event: &Value) -> i64 {
    event["retval"].as_str().expect("retval").parse().expect("numeric retval")
}

/// Waits for `child` with the test deadline; kills it and fails on expiry.
/// Its output is drained as it comes, so a chatty child never blocks.
pub fn wait(mut child: Child) -> (ExitStatus, String, String) {
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                pipe.read_to_string(&mut text).unwrap();
            }
            text
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("traced command did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    (status, stdout.join().unwrap(), stderr.join().unwrap())
}

/// Builds `cws-instrumentation trace --events-file F EXTRA... -- COMMAND...`.
pub struct Trace {
    dir: tempfile::TempDir,
    command: Command,
}

impl Trace {
    pub fn new<S: AsRef<std::ffi::OsStr>>(command: &[S]) -> Self {
        Self::with_flags(&[] as &[&str], command)
    }

    pub fn with_flags<F: AsRef<std::ffi::OsStr>, S: AsRef<std::ffi::OsStr>>(flags: &[F], command: &[S]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = self::command(binary());
        cmd.arg("trace").arg("--events-file").arg(dir.path().join("events.jsonl"));
        // Offline unless the test names an agent.
        if !flags.iter().any(|f| f.as_ref() == "--probe-addr") {
            cmd.args(["--probe-addr", ""]);
        }
        // Without the /proc scan unless the test asks for it: it would
        // report the processes of tests running alongside.
        if !flags.iter().any(|f| f.as_ref() == "--proc-scan-rate") {
            cmd.arg("--disable-proc-scan");
        }
        cmd.args(flags).arg("--").args(command);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        Trace { dir, command: cmd }
    }

    /// Starts the tracer itself as `launcher TRACER ARGS…`.
    pub fn via(mut self, launcher: &Path) -> Self {
        let args: Vec<std::ffi::OsString> = self.command.get_args().map(ToOwned::to_owned).collect();
        let mut cmd = command(launcher);
        cmd.arg(binary()).args(args);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        self.command = cmd;
        self
    }

    /// The `--events-file` of the run.
    pub fn events_path(&self) -> PathBuf {
        self.dir.path().join("events.jsonl")
    }

    pub fn command(&mut self) -> &mut Command {
        &mut self.command
    }

    /// Runs the tracer itself as user and group `id`, from a copy of the
    /// binary in `dir` (which that user must be able to enter): the build
    /// tree may be closed to it.
    pub fn run_by_user(mut self, id: u32, dir: &Path) -> Self {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        let copy = dir.join("cws-instrumentation");
        if !copy.exists() {
            // Written by another process: a descriptor open for writing in
            // this one would be inherited by the programs other tests fork
            // meanwhile, and running the copy would fail with ETXTBSY.
            let status = Command::new("install").arg("-m755").arg(binary()).arg(&copy).status().unwrap();
            assert!(status.success());
        }
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let mut command = self::command(copy);
        command.args(self.command.get_args()).uid(id).gid(id);
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        self.command = command;
        self
    }

    pub fn spawn(&mut self) -> Child {
        self.command.spawn().unwrap()
    }

    /// Collects the events of a child started with `spawn`.
    pub fn finish(&self, child: Child) -> Run {
        let (status, stdout, stderr) = wait(child);
        let text = std::fs::read_to_string(self.events_path()).unwrap_or_default();
        let events = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON line {line:?}: {e}")))
            .collect();
        Run { status, stdout, stderr, events }
    }

    pub fn run(mut self) -> Run {
        let child = self.spawn();
        self.finish(child)
    }
}

/// A pseudo-terminal that is the traced command's controlling terminal and
/// stdio, as when a person runs it in a terminal.
pub struct Terminal {
    master: std::fs::File,
    lines: Receiver<String>,
}

impl Terminal {
    /// Starts `trace` as the session leader of a new terminal.
    pub fn spawn(trace: &mut Trace) -> (Child, Terminal) {
        Self::spawn_command(trace.command())
    }

    /// Starts `command` as the session leader of a new terminal.
    pub fn spawn_command(command: &mut Command) -> (Child, Terminal) {
        use std::os::unix::fs::OpenOptionsExt;
        // Both ends are opened close-on-exec, never inheritable even for a
        // moment: a copy in a command another test starts meanwhile would
        // keep the terminal open, and the EOF below would never come.
        let flags = nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_NOCTTY | nix::fcntl::OFlag::O_CLOEXEC;
        let master = nix::pty::posix_openpt(flags).unwrap();
        nix::pty::grantpt(&master).unwrap();
        nix::pty::unlockpt(&master).unwrap();
        let slave_path = nix::pty::ptsname_r(&master).unwrap();
        // std opens with O_CLOEXEC.
        let slave =
            std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOCTTY).open(slave_path).unwrap();
        let master = std::os::fd::OwnedFd::from(master);
        let stdio = || Stdio::from(slave.try_clone().unwrap());
        clean_descriptors(command).stdin(stdio()).stdout(stdio()).stderr(stdio());
        // SAFETY: signal (sigaction), setsid and ioctl are async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                // As a person's shell gives them: a suite started in the
                // background (`cargo test &`) has SIGINT and SIGQUIT ignored,
                // which the tracer passes on to the workload as it should.
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                libc::signal(libc::SIGQUIT, libc::SIG_DFL);
                nix::unistd::setsid()?;
                if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().unwrap();
        // Only the started processes keep the terminal open now, so the
        // master reads EOF once they are gone.
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        drop(slave);
        let (tx, lines) = std::sync::mpsc::channel();
        let reader = std::fs::File::from(master.try_clone().unwrap());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                if tx.send(line.trim_end_matches('\r').to_owned()).is_err() {
                    break;
                }
            }
        });
        (child, Terminal { master: std::fs::File::from(master), lines })
    }

    /// Types on the keyboard.
    pub fn type_keys(&mut self, keys: &[u8]) {
        std::io::Write::write_all(&mut self.master, keys).unwrap();
    }

    /// Lines up to and including the first one `done` accepts.
    pub fn read_until(&self, done: impl Fn(&str) -> bool) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let line = self.lines.recv_timeout(DEADLINE).unwrap_or_else(|_| panic!("terminal output ended: {seen:#?}"));
            let finished = done(&line);
            seen.push(line);
            if finished {
                return seen;
            }
        }
    }

    /// Every remaining line, once the terminal is closed.
    pub fn rest(self) -> Vec<String> {
        self.lines.iter().collect()
    }
}

/// A run of a fixture that prints one line per call it made, `LABEL WORD...`:
/// what it got and what the kernel says afterwards, the ground truth its
/// events are compared with.
pub struct Made {
    pub run: Run,
    pub lines: std::collections::HashMap<String, Vec<String>>,
}

impl Made {
    /// `fixture_name ARGS`, traced with `flags`; it must exit 0.
    pub fn new(fixture_name: &str, flags: &[&str], args: &[&str]) -> Made {
        let program = fixture(fixture_name);
        let mut command = vec![program.to_str().unwrap()];
        command.extend_from_slice(args);
        let run = Trace::with_flags(flags, &command).run();
        assert_eq!(run.code(), Some(0), "{flags:?} {args:?}: {}\n{}", run.stdout, run.stderr);
        let lines = run
            .stdout
            .lines()
            .map(|l| {
                let mut words = l.split(' ').map(str::to_owned);
                (words.next().unwrap(), words.collect())
            })
            .collect();
        Made { run, lines }
    }

    /// Word `i` of the line labelled `label`.
    pub fn word(&self, label: &str, i: usize) -> &str {
        let line = self.lines.get(label).unwrap_or_else(|| panic!("no {label} line in {:?}", self.run.stdout));
        &line[i]
    }

    /// Word `i` of the line labelled `label`, as a number.
    pub fn num(&self, label: &str, i: usize) -> i64 {
        self.word(label, i).parse().unwrap_or_else(|_| panic!("{label}: {:?}", self.lines[label]))
    }

    /// The events of `kind` from the calls named `syscalls`.
    pub fn events(&self, kind: &str, syscalls: &[&str]) -> Vec<&Value> {
        self.run.of(kind).into_iter().filter(|e| syscalls.iter().any(|s| e["syscall"] == *s)).collect()
    }
}

/// The ways the tests run a workload: as the tracer's user, and when the
/// tests are root, also as uid 1000 under a root tracer (`--uid`) and under
/// a tracer that is itself uid 1000: (trace flags, the tracer's own uid).
pub fn users() -> Vec<(&'static [&'static str], Option<u32>)> {
    let mut users: Vec<(&[&str], Option<u32>)> = vec![(&[], None)];
    if nix::unistd::geteuid().is_root() {
        users.push((&["--uid", "1000", "--gid", "1000"], None));
        users.push((&[], Some(1000)));
    }
    users
}
