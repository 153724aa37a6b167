//! Starting the workload: find the entrypoint as execvp would, fork, and
//! have the tracer seize the child before it can run anything of its own.
//!
//! Start-up handshake: the child blocks on a socket while the tracer
//! PTRACE_SEIZEs it (with EXITKILL: if the tracer dies, the workload dies
//! with it rather than run on with a filter whose traced syscalls would all
//! fail with ENOSYS) and makes itself undumpable. Released, the child gives
//! up CAP_SYS_PTRACE, installs the seccomp filter and hands its
//! notification listener back to the tracer over the same socket (the
//! tracer copies it with pidfd_getfd), drops
//! privileges if asked, and execs; that exec is the first stop.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult, Pid};

use crate::exit::{code, ExitError};
use crate::log::log;
use crate::trace::procfs;
use crate::trace::ptrace;
use crate::trace::seccomp::{self, Listener};
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

/// The tool's own exit statuses, as a shell would give them.
impl From<LaunchError> for ExitError {
    fn from(error: LaunchError) -> ExitError {
        match error {
            LaunchError::NotFound(name) => ExitError::new(code::NOT_FOUND, format!("{name}: command not found")),
            LaunchError::NotExecutable(message) => ExitError::new(code::NOT_EXECUTABLE, message),
            LaunchError::Setup(message) => ExitError::setup(message),
        }
    }
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
    pub filter: Option<seccomp::Programs>,
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
    /// Returns the workload and, with a filter, its notification listener:
    /// while the tracer holds it open, the kernel refuses the workload a
    /// listener of its own (whose notifications would outrank the filter's
    /// stops and let calls run unseen).
    pub fn spawn(&self, interrupt: bool) -> Result<(Pid, Option<OwnedFd>), LaunchError> {
        let (tracer_end, child_end) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
                .map_err(|e| LaunchError::Setup(format!("cannot create a socket pair: {e}")))?;
        let argv: Vec<*const libc::c_char> = self.argv.iter().map(|a| a.as_ptr()).chain([std::ptr::null()]).collect();
        let envp: Vec<*const libc::c_char> = self.env.iter().map(|e| e.as_ptr()).chain([std::ptr::null()]).collect();
        // SAFETY: the child only makes async-signal-safe calls (see `child`)
        // and never returns into Rust code that could touch shared state.
        match unsafe { fork() } {
            Err(e) => Err(LaunchError::Setup(format!("cannot fork: {e}"))),
            Ok(ForkResult::Child) => {
                drop(tracer_end);
                child(self, child_end.as_raw_fd(), &argv, &envp)
            }
            Ok(ForkResult::Parent { child }) => {
                drop(child_end);
                if let Err(e) = ptrace::seize(child) {
                    let _ = kill(child, Signal::SIGKILL);
                    let _ = waitpid(child, None);
                    return Err(LaunchError::Setup(format!(
                        "cannot trace the workload: ptrace(PTRACE_SEIZE): {e} (the container needs the SYS_PTRACE capability, or ptrace is forbidden by a security profile)"
                    )));
                }
                // Only now: a child that is not dumpable cannot be seized
                // without CAP_SYS_PTRACE. From here on the workload cannot
                // attach to the tracer or open its memory (it also loses
                // CAP_SYS_PTRACE before exec).
                nix::sys::prctl::set_dumpable(false)
                    .map_err(|e| LaunchError::Setup(format!("cannot make the tracer undumpable: {e}")))?;
                if interrupt {
                    // Full-ptrace mode: stop it once so that it can be resumed
                    // with PTRACE_SYSCALL.
                    let _ = nix::sys::ptrace::interrupt(child);
                }
                // Release the child.
                let _ = nix::unistd::write(&tracer_end, b"go");
                let listener = match &self.filter {
                    Some(programs) => match receive_listener(&tracer_end, child) {
                        Ok(listener) => listener,
                        // The filter notifies opens that nobody could answer.
                        Err(()) if programs.supervised.is_some() => {
                            let _ = kill(child, Signal::SIGKILL);
                            let _ = waitpid(child, None);
                            return Err(LaunchError::Setup(
                                "cannot take the seccomp filter's listener from the workload (pidfd_getfd)".into(),
                            ));
                        }
                        Err(()) => None,
                    },
                    None => None,
                };
                Ok((child, listener))
            }
        }
    }
}

/// The child's answer after installing the filter: its listener, or why
/// the filter has none (logged: the workload could then install a
/// notifying filter of its own, whose calls the tracer would not see).
///
/// The child names the listener's descriptor and the tracer copies it
/// (pidfd_getfd), then says so: the child's sendmsg(2), which could pass it,
/// would stop at the filter now in place, before the tracer waits for stops.
/// Err: the child has a listener that could not be copied.
fn receive_listener(socket: &OwnedFd, child: Pid) -> Result<Option<OwnedFd>, ()> {
    let mut answer = [0u8; 8];
    // The child is still our own code, which answers or dies (and then the
    // socket ends): this read cannot hang on the workload.
    let received = nix::unistd::read(socket, &mut answer).map_err(drop)?;
    if received != answer.len() {
        return Err(());
    }
    let word = |at: usize| i32::from_ne_bytes(answer[at..at + 4].try_into().expect("4 bytes"));
    let (refused, value) = (word(0), word(4));
    if refused != 0 {
        let errno = nix::errno::Errno::from_raw(value);
        log!(
            "the seccomp filter could not reserve the notification listener ({errno}); a workload could install a notifying filter whose calls are not seen"
        );
        return Ok(None);
    }
    let listener = procfs::descriptor_copy(child, child, value);
    // The child closes its own copy once told.
    let _ = nix::unistd::write(socket, b"k");
    if listener.is_none() {
        log!("the seccomp filter's notification listener could not be copied; a workload could install a notifying filter whose calls are not seen");
    }
    listener.map(Some).ok_or(())
}

/// In the child: names the listener's descriptor (or the errno that
/// refused it) with one write(2), waits for the tracer to have copied it,
/// then closes it.
///
/// # Safety
/// Raw syscalls only, as after fork in a multi-threaded process.
unsafe fn send_listener(socket: i32, listener: Listener) {
    let (refused, value) = match listener {
        Listener::Fd(fd) => (0i32, fd),
        Listener::Refused(errno) => (1, errno),
    };
    let mut answer = [0u8; 8];
    answer[..4].copy_from_slice(&refused.to_ne_bytes());
    answer[4..].copy_from_slice(&value.to_ne_bytes());
    libc::write(socket, answer.as_ptr().cast(), answer.len());
    if let Listener::Fd(fd) = listener {
        let mut copied = [0u8; 1];
        libc::read(socket, copied.as_mut_ptr().cast(), copied.len());
        libc::close(fd);
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

/// CAP_SYS_PTRACE (linux/capability.h).
const CAP_SYS_PTRACE: u32 = 19;

/// In the child: CAP_SYS_PTRACE leaves every set, the bounding set
/// included, so no later exec gives it back. Without it the workload cannot
/// attach to the tracer, which is not dumpable; it could not trace its own
/// children anyway (they are the tracer's). Failures are left as they are:
/// without CAP_SETPCAP the bounding set cannot change, and a tracer without
/// the capability has none to pass on.
///
/// # Safety
/// Raw syscalls only, as after fork in a multi-threaded process.
unsafe fn drop_cap_sys_ptrace() {
    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    libc::prctl(libc::PR_CAPBSET_DROP, CAP_SYS_PTRACE as libc::c_ulong, 0, 0, 0);
    libc::prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_LOWER as libc::c_ulong,
        CAP_SYS_PTRACE as libc::c_ulong,
        0,
        0,
    );
    let mut header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [CapData { effective: 0, permitted: 0, inheritable: 0 }; 2];
    if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) == 0 {
        let bit = !(1u32 << CAP_SYS_PTRACE);
        data[0].effective &= bit;
        data[0].permitted &= bit;
        data[0].inheritable &= bit;
        libc::syscall(libc::SYS_capset, &mut header, data.as_ptr());
    }
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
        // Before the filter, so that the tracer's own setup is not traced.
        drop_cap_sys_ptrace();
        // The filter goes in while the tracer's privileges are still ours:
        // with CAP_SYS_ADMIN it needs no NO_NEW_PRIVS, so setuid programs
        // keep working in the workload even under --uid.
        if let Some(programs) = &launch.filter {
            match seccomp::install(programs) {
                Ok(listener) => send_listener(release, listener),
                Err(e) => die(b"cannot install the seccomp filter", e, 125),
            }
        }
        libc::close(release);
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

/// `spawn` and `inject`: runs `argv` in place of this program, as Datadog's
/// do. The name is looked up in PATH (one not found there is tried as it
/// is); argv[0], the environment, the signal mask and the ignored signals
/// this program was started with pass on. With `close_inherited`, every
/// descriptor above 2 is closed at the exec. Returns only when the exec failed.
pub fn exec_in_place(argv: &[OsString], close_inherited: bool) -> LaunchError {
    let Some(name) = argv.first() else { return LaunchError::NotFound(String::new()) };
    let program = match resolve_entrypoint(name) {
        Ok(program) => program,
        Err(LaunchError::NotFound(_)) => PathBuf::from(name),
        Err(e) => return e,
    };
    let (path, argv) = match (cstring(program.into_os_string().into_vec()), argv_cstrings(argv)) {
        (Ok(path), Ok(argv)) => (path, argv),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    // The Rust runtime ignores SIGPIPE; what this program inherited goes on.
    IgnoredSignals::capture().restore();
    if close_inherited {
        close_on_exec_above_stderr();
    }
    let display = name.to_string_lossy().into_owned();
    match nix::unistd::execv(&path, &argv) {
        Err(nix::errno::Errno::ENOENT) => LaunchError::NotFound(display),
        Err(e @ (nix::errno::Errno::EACCES | nix::errno::Errno::ENOEXEC)) => {
            LaunchError::NotExecutable(format!("{display}: {}", e.desc()))
        }
        Err(e) => LaunchError::Setup(format!("cannot execute {display}: {}", e.desc())),
        Ok(never) => match never {},
    }
}

fn argv_cstrings(argv: &[OsString]) -> Result<Vec<CString>, LaunchError> {
    argv.iter().map(|a| cstring(a.as_bytes().to_vec())).collect()
}

/// Marks every descriptor above 2 close-on-exec: close_range(2) where the
/// kernel has CLOSE_RANGE_CLOEXEC (5.11+), else each one listed in /proc.
fn close_on_exec_above_stderr() {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range takes integers; with CLOEXEC it only sets flags.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) };
    if rc == 0 {
        return;
    }
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else { return };
    // Collected first: the listing's own descriptor is closed with it.
    let fds: Vec<i32> = entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    for fd in fds.into_iter().filter(|&fd| fd > 2) {
        // SAFETY: F_SETFD on a descriptor number takes no pointer; a number
        // no longer open fails with EBADF, which is harmless.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}
