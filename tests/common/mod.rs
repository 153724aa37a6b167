//! Helpers for tests that run the real binary on real programs.
#![allow(dead_code)] // each test crate uses its own subset

use std::io::{BufRead, Read};
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

/// Compiles `tests/fixtures/NAME.c` once per test run and returns the program.
pub fn fixture(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<()>> = OnceLock::new();
    let _guard = BUILT.get_or_init(Mutex::default).lock().unwrap_or_else(|e| e.into_inner());
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(format!("{name}.c"));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
    std::fs::create_dir_all(&dir).unwrap();
    let program = dir.join(name);
    let fresh = |p: &Path| {
        let built = std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let changed = std::fs::metadata(&source).and_then(|m| m.modified()).ok();
        built.is_some() && built >= changed
    };
    if !fresh(&program) {
        // Built under another name, then renamed: another test binary
        // running at the same time never sees a half-written program.
        let partial = dir.join(format!("{name}.{}.tmp", std::process::id()));
        let status = Command::new("cc")
            .args(["-O1", "-Wall", "-pthread", "-o"])
            .arg(&partial)
            .arg(&source)
            .status()
            .expect("a C compiler (cc) is needed to build test fixtures");
        assert!(status.success(), "building fixture {name} failed");
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
        let mut cmd = Command::new(binary());
        cmd.arg("trace").arg("--events-file").arg(dir.path().join("events.jsonl"));
        // Offline unless the test names an agent.
        if !flags.iter().any(|f| f.as_ref() == "--probe-addr") {
            cmd.args(["--probe-addr", ""]);
        }
        cmd.args(flags).arg("--").args(command);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        Trace { dir, command: cmd }
    }

    /// Starts the tracer itself as `launcher TRACER ARGS…`.
    pub fn via(mut self, launcher: &Path) -> Self {
        let args: Vec<std::ffi::OsString> = self.command.get_args().map(ToOwned::to_owned).collect();
        let mut cmd = Command::new(launcher);
        cmd.arg(binary()).args(args);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        self.command = cmd;
        self
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
            std::fs::copy(binary(), &copy).unwrap();
        }
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let mut command = Command::new(copy);
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
        let text = std::fs::read_to_string(self.dir.path().join("events.jsonl")).unwrap_or_default();
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
        use std::os::unix::process::CommandExt;
        let pty = nix::pty::openpty(None, None).unwrap();
        // openpty's descriptors are inheritable: keep them out of the
        // commands other tests start meanwhile, or their EOF never comes.
        for fd in [&pty.master, &pty.slave] {
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC)).unwrap();
        }
        let slave = || Stdio::from(pty.slave.try_clone().unwrap());
        command.stdin(slave()).stdout(slave()).stderr(slave());
        // SAFETY: setsid and ioctl are async-signal-safe.
        unsafe {
            command.pre_exec(|| {
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
        drop(pty.slave);
        let (tx, lines) = std::sync::mpsc::channel();
        let reader = std::fs::File::from(pty.master.try_clone().unwrap());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                if tx.send(line.trim_end_matches('\r').to_owned()).is_err() {
                    break;
                }
            }
        });
        (child, Terminal { master: std::fs::File::from(pty.master), lines })
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
