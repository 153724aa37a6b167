//! Starting the workload: find the entrypoint as execvp would, fork, and
//! have the tracer seize the child before it can run anything of its own.
//!
//! Start-up handshake: the child blocks on a pipe while the tracer
//! PTRACE_SEIZEs it (with EXITKILL: if the tracer dies, the workload dies
//! with it rather than run on with a filter whose traced syscalls would all
//! fail with ENOSYS). Released, the child drops privileges if asked,
//! installs the seccomp filter and execs; that exec is the first stop.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, pipe2, ForkResult, Pid};

use crate::trace::ptrace;
use crate::trace::signals::IgnoredSignals;

/// Why the workload could not be started.
#[derive(Debug)]
pub enum LaunchError {
    /// No such program: exit 127, as a shell would.
    NotFound(String),
    /// Found but not executable: exit 126.
    NotExecutable(String),
    /// The tracer itself could not set up (ptrace refused, fork failed).
    Setup(String),
}

/// Everything the child needs, prepared before fork so that the child only
/// makes raw syscalls (the tracer is multi-threaded; after fork only
/// async-signal-safe calls are allowed).
pub struct Launch {
    program: CString,
    argv: Vec<CString>,
    env: Vec<CString>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub filter: Option<Vec<libc::sock_filter>>,
    /// The signal mask and ignored signals to restore in the workload.
    pub signal_mask: SigSet,
    pub ignored_signals: IgnoredSignals,
}

const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Finds `name` as execvp does: a name with a slash is used as is,
/// otherwise each PATH entry is tried in order.
pub fn resolve_entrypoint(name: &OsStr) -> Result<PathBuf, LaunchError> {
    let display = name.to_string_lossy().into_owned();
    if name.is_empty() {
        return Err(LaunchError::NotFound(display));
    }
    let candidates: Vec<PathBuf> = if name.as_bytes().contains(&b'/') {
        vec![PathBuf::from(name)]
    } else {
        let path = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
        std::env::split_paths(&path)
            .map(|dir| if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir }.join(name))
            .collect()
    };
    let mut denied = None;
    for candidate in candidates {
        match executable(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => denied = denied.or(Some(e)),
        }
    }
    match denied {
        Some(e) => Err(LaunchError::NotExecutable(format!("{display}: {e}"))),
        None => Err(LaunchError::NotFound(display)),
    }
}

fn executable(path: &Path) -> io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() {
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, "is a directory"));
    }
    if meta.permissions().mode() & 0o111 == 0 || nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_err() {
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, "permission denied"));
    }
    Ok(())
}

fn cstring(bytes: Vec<u8>) -> Result<CString, LaunchError> {
    CString::new(bytes).map_err(|_| LaunchError::Setup("argument or environment contains a NUL byte".into()))
}

impl Launch {
    /// `argv[0]` and the environment pass through unchanged.
    pub fn new(
        program: &Path,
        argv: &[OsString],
        signal_mask: SigSet,
        ignored_signals: IgnoredSignals,
    ) -> Result<Self, LaunchError> {
        let env = std::env::vars_os().map(|(key, value)| {
            let mut entry = key.into_vec();
            entry.push(b'=');
            entry.extend_from_slice(value.as_bytes());
            entry
        });
        Ok(Launch {
            program: cstring(program.as_os_str().as_bytes().to_vec())?,
            argv: argv.iter().map(|a| cstring(a.as_bytes().to_vec())).collect::<Result<_, _>>()?,
            env: env.map(cstring).collect::<Result<_, _>>()?,
            uid: None,
            gid: None,
            filter: None,
            signal_mask,
            ignored_signals,
        })
    }

    /// Forks the workload and seizes it. Must run on the tracer thread.
    pub fn spawn(&self, interrupt: bool) -> Result<Pid, LaunchError> {
        let (release_read, release_write) = pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| LaunchError::Setup(format!("cannot create a pipe: {e}")))?;
        let argv: Vec<*const libc::c_char> = self.argv.iter().map(|a| a.as_ptr()).chain([std::ptr::null()]).collect();
        let envp: Vec<*const libc::c_char> = self.env.iter().map(|e| e.as_ptr()).chain([std::ptr::null()]).collect();
        // SAFETY: the child only makes async-signal-safe calls (see `child`)
        // and never returns into Rust code that could touch shared state.
        match unsafe { fork() } {
            Err(e) => Err(LaunchError::Setup(format!("cannot fork: {e}"))),
            Ok(ForkResult::Child) => {
                drop(release_write);
                child(self, std::os::fd::AsRawFd::as_raw_fd(&release_read), &argv, &envp)
            }
            Ok(ForkResult::Parent { child }) => {
                drop(release_read);
                if let Err(e) = ptrace::seize(child) {
                    let _ = kill(child, Signal::SIGKILL);
                    let _ = waitpid(child, None);
                    return Err(LaunchError::Setup(format!(
                        "cannot trace the workload: ptrace(PTRACE_SEIZE): {e} (the container needs the SYS_PTRACE capability, or ptrace is forbidden by a security profile)"
                    )));
                }
                if interrupt {
                    // Full-ptrace mode: stop it once so that it can be resumed
                    // with PTRACE_SYSCALL.
                    let _ = nix::sys::ptrace::interrupt(child);
                }
                // Release the child; the write end closes on return.
                let _ = nix::unistd::write(&release_write, b"go");
                Ok(child)
            }
        }
    }
}

/// Writes "cws-instrumentation: <what>: errno <n>" and exits with `code`,
/// using only write(2) and _exit(2).
fn die(what: &[u8], errno: i32, code: i32) -> ! {
    let mut digits = [0u8; 12];
    let mut at = digits.len();
    let mut n = errno.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for part in [b"cws-instrumentation: ".as_slice(), what, b": errno ", &digits[at..], b"\n"] {
        // SAFETY: write(2) on stderr with a valid buffer.
        unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
    // SAFETY: _exit never returns and runs no atexit handlers.
    unsafe { libc::_exit(code) }
}

fn errno() -> i32 {
    nix::errno::Errno::last_raw()
}

/// The forked child, up to exec.
fn child(launch: &Launch, release: i32, argv: &[*const libc::c_char], envp: &[*const libc::c_char]) -> ! {
    // SAFETY (whole block): raw syscalls on values prepared before fork;
    // none allocates or takes a lock.
    unsafe {
        // The workload gets the signal state the tracer was started with,
        // not the one the tracer's runtime and its own blocked set made.
        launch.ignored_signals.restore();
        libc::pthread_sigmask(libc::SIG_SETMASK, launch.signal_mask.as_ref(), std::ptr::null_mut());
        let mut byte = [0u8; 2];
        if libc::read(release, byte.as_mut_ptr().cast(), byte.len()) <= 0 {
            // The tracer is gone before seizing us: never run untraced.
            libc::_exit(125);
        }
        libc::close(release);
        // The filter goes in while the tracer's privileges are still ours:
        // with CAP_SYS_ADMIN it needs no NO_NEW_PRIVS, so setuid programs
        // keep working in the workload even under --uid.
        if let Some(filter) = &launch.filter {
            if let Err(e) = crate::trace::seccomp::install(filter) {
                die(b"cannot install the seccomp filter", e, 125);
            }
        }
        if (launch.uid.is_some() || launch.gid.is_some()) && libc::setgroups(0, std::ptr::null()) != 0 {
            die(b"cannot clear supplementary groups (setgroups)", errno(), 125);
        }
        if let Some(gid) = launch.gid {
            if libc::setgid(gid) != 0 {
                die(b"cannot change group (setgid)", errno(), 125);
            }
        }
        if let Some(uid) = launch.uid {
            if libc::setuid(uid) != 0 {
                die(b"cannot change user (setuid)", errno(), 125);
            }
        }
        libc::execve(launch.program.as_ptr(), argv.as_ptr(), envp.as_ptr());
        let e = errno();
        die(b"cannot execute the entrypoint", e, if e == libc::ENOENT { 127 } else { 126 })
    }
}
