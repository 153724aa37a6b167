//! Entry and exit decoders named in the syscall table, and the events they
//! build. Decoders never fail: what cannot be read is left out and the event
//! is marked `partial`.

use std::cell::RefCell;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use nix::unistd::Pid;

use crate::export::EventSink;
use crate::proto::{self, event::Payload, AddressFamily, Event, FileOperation, Protocol};
use crate::trace::memory;
use crate::trace::paths;
use crate::trace::process::{ForkRequest, ProcessTable};
use crate::trace::procfs::{self, End};
use crate::trace::ptrace;
use crate::trace::syscalls::{self, Abi, Call, Next};

const AT_FDCWD: i32 = -100;
const PATH_MAX: usize = 4096;
const CLONE_UNTRACED: u64 = 0x0080_0000;
const SOCKADDR_MAX: usize = 128;
/// Bounds of exec arguments and environment (entries, and bytes per entry),
/// the same as the agent-side model expects.
const MAX_EXEC_ENTRIES: usize = 356;
const MAX_EXEC_ENTRY_LEN: usize = 356;
/// Environment variables kept before all others when envp is cut.
const PRIORITY_ENVS: [&str; 6] =
    ["LD_PRELOAD=", "LD_LIBRARY_PATH=", "PATH=", "HISTSIZE=", "HISTFILESIZE=", "GLIBC_TUNABLES="];
/// How much of the argument strings, and of the environment, is read at exec.
const EXEC_STRINGS_MAX: usize = 256 * 1024;

/// What a decoder works with: the stopped thread, the process table and the
/// event queue.
pub struct Ctx<'a> {
    pub tid: Pid,
    pub procs: &'a mut ProcessTable,
    pub sink: &'a mut EventSink,
}

pub fn timestamp(time: SystemTime) -> pbjson_types::Timestamp {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    pbjson_types::Timestamp { seconds: since.as_secs() as i64, nanos: since.subsec_nanos() as i32 }
}

fn abi_field(abi: Abi) -> i32 {
    match abi {
        Abi::X86_64 => proto::Abi::X8664 as i32,
        Abi::I386 => proto::Abi::I386 as i32,
        Abi::Unknown => proto::Abi::Unspecified as i32,
    }
}

impl Ctx<'_> {
    pub fn tgid(&self) -> Pid {
        self.procs.thread(self.tid).map_or(self.tid, |t| t.tgid)
    }

    fn ppid(&self) -> u32 {
        self.procs.process_of(self.tid).map_or(0, |p| p.ppid.as_raw() as u32)
    }

    /// An event about this thread, without payload.
    pub fn event(&self, time: SystemTime) -> Event {
        Event {
            pid: self.tgid().as_raw() as u32,
            tid: self.tid.as_raw() as u32,
            ppid: self.ppid(),
            timestamp: Some(timestamp(time)),
            ..Event::default()
        }
    }

    fn emit_call(&mut self, call: &Call, retval: i64, partial: bool, payload: Payload) {
        let event = Event {
            retval: Some(retval),
            syscall: call.def.name.to_owned(),
            abi: abi_field(call.abi),
            partial: partial || call.partial,
            payload: Some(payload),
            ..self.event(call.time)
        };
        self.sink.emit(event);
    }

    pub fn cwd(&mut self) -> Option<String> {
        let thread = self.procs.thread(self.tid)?;
        if let Some(cwd) = &thread.fs.borrow().cwd {
            return Some(cwd.clone());
        }
        let cwd = procfs::cwd(self.tid)?;
        thread.fs.borrow_mut().cwd = Some(cwd.clone());
        Some(cwd)
    }

    /// Path of a descriptor, as the kernel's table has it now.
    fn fd_path(&mut self, fd: i32) -> Option<String> {
        procfs::fd_path(self.tid, fd)
    }

    /// A path argument made absolute against the cwd or a directory fd.
    fn resolve(&mut self, dirfd: i32, path: &[u8]) -> Option<String> {
        let path = String::from_utf8_lossy(path);
        if path.starts_with('/') {
            return Some(paths::absolute("/", &path));
        }
        let base = if dirfd == AT_FDCWD { self.cwd()? } else { self.fd_path(dirfd)? };
        Some(paths::absolute(&base, &path))
    }

    /// Reads a path argument and resolves it; None when unreadable.
    fn read_path(&mut self, dirfd: i32, addr: u64) -> Option<String> {
        let (raw, _) = memory::read_cstring(self.tid, addr, PATH_MAX).ok()?;
        self.resolve(dirfd, &raw)
    }
}

/// Table entry for calls whose whole story is told at the exit stop.
pub fn await_exit(_: &mut Ctx<'_>, _: &mut Call) -> Next {
    Next::Exit
}

/// Table entry for calls decoded completely at entry; never called because
/// their entry decoders answer `Next::Done`.
pub fn never_exit(_: &mut Ctx<'_>, _: &Call, _: i64) {}

fn arg_fd(value: u64) -> i32 {
    value as i32
}

// ---- exec -------------------------------------------------------------------

/// (dirfd, path, argv, envp, flags) argument positions of execve/execveat.
fn exec_args(call: &Call) -> (i32, u64, u64, u64, i32) {
    let a = call.args;
    match call.def.name {
        "execveat" => (arg_fd(a[0]), a[1], a[2], a[3], a[4] as i32),
        _ => (AT_FDCWD, a[0], a[1], a[2], 0),
    }
}

/// The program path must be read before the call: on success the memory
/// that held it is gone.
pub fn exec_entry(cx: &mut Ctx<'_>, call: &mut Call) -> Next {
    let (dirfd, path, _, _, flags) = exec_args(call);
    let requested = memory::read_cstring(cx.tid, path, PATH_MAX);
    call.entry_path = match requested {
        // execveat(fd, "", AT_EMPTY_PATH): the descriptor itself (fileless exec).
        Ok((raw, _)) if raw.is_empty() && flags & libc::AT_EMPTY_PATH != 0 => cx.fd_path(dirfd),
        Ok((raw, _)) => cx.resolve(dirfd, &raw),
        Err(_) => None,
    };
    call.partial = call.entry_path.is_none();
    Next::Exit
}

fn bound_entry(raw: &[u8], truncated: &mut bool) -> String {
    if raw.len() > MAX_EXEC_ENTRY_LEN {
        *truncated = true;
        let mut cut = String::from_utf8_lossy(&raw[..MAX_EXEC_ENTRY_LEN - 4]).into_owned();
        cut.push_str("...");
        cut
    } else {
        String::from_utf8_lossy(raw).into_owned()
    }
}

/// argv within the bounds; `cut` says entries were already left out.
fn bound_args<'a>(items: impl IntoIterator<Item = &'a [u8]>, mut cut: bool) -> (Vec<String>, bool) {
    let mut args = Vec::new();
    for item in items {
        if args.len() == MAX_EXEC_ENTRIES {
            cut = true;
            break;
        }
        args.push(bound_entry(item, &mut cut));
    }
    (args, cut)
}

/// envp within the bounds, the variables that change how programs load and
/// run first.
fn bound_envs<'a>(items: impl IntoIterator<Item = &'a [u8]> + Clone, cut: bool) -> (Vec<String>, bool) {
    let is_priority = |item: &[u8]| PRIORITY_ENVS.iter().any(|p| item.starts_with(p.as_bytes()));
    let priority = items.clone().into_iter().filter(|i| is_priority(i));
    let rest = items.into_iter().filter(|i| !is_priority(i));
    bound_args(priority.chain(rest), cut)
}

fn split_nul(buf: &[u8]) -> impl Iterator<Item = &[u8]> + Clone {
    buf.strip_suffix(b"\0").unwrap_or(buf).split(|&b| b == 0).filter(|_| !buf.is_empty())
}

/// Only failed execs reach their exit stop: a successful one is reported at
/// PTRACE_EVENT_EXEC, from which the tracee is resumed past its exit stop.
/// The old image is intact, so argv and envp are read from its memory.
pub fn exec_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64) {
    let (_, _, argv, envp, _) = exec_args(call);
    let limit = MAX_EXEC_ENTRY_LEN + 1;
    let args = memory::read_string_array(cx.tid, argv, call.abi, MAX_EXEC_ENTRIES, limit);
    let envs = memory::read_string_array(cx.tid, envp, call.abi, 4 * MAX_EXEC_ENTRIES, limit);
    let partial = args.is_err() || envs.is_err();
    let (args, args_cut) = args.unwrap_or_default();
    let (envs, envs_cut) = envs.unwrap_or_default();
    let (args, args_truncated) = bound_args(args.iter().map(Vec::as_slice), args_cut);
    let (envs, envs_truncated) = bound_envs(envs.iter().map(Vec::as_slice), envs_cut);
    let exec = proto::ExecEvent {
        path: call.entry_path.clone().unwrap_or_default(),
        args,
        args_truncated,
        envs,
        envs_truncated,
        cwd: cx.cwd().unwrap_or_default(),
        credentials: procfs::status(cx.tid).map(|s| s.credentials),
        executable: String::new(),
    };
    cx.emit_call(call, retval, partial, Payload::Exec(exec));
}

/// PTRACE_EVENT_EXEC: the new image is in place. argv and envp are read from
/// what the kernel copied onto the new stack (before the program runs; /proc
/// when that stack is not as expected), not from the old memory a thread
/// could have changed after the entry stop.
pub fn exec_succeeded(cx: &mut Ctx<'_>, call: Option<Call>, time: SystemTime) {
    let pid = cx.tgid();
    let from_stack = ptrace::stack_at_exec(pid)
        .ok()
        .filter(|(_, abi)| *abi != Abi::Unknown)
        .and_then(|(sp, abi)| memory::exec_strings(pid, sp, abi, EXEC_STRINGS_MAX));
    let (cmdline, environ) = match from_stack {
        Some((cmdline, environ)) => (Some(cmdline), Some(environ)),
        None => (
            procfs::read_bounded(&format!("/proc/{pid}/cmdline"), EXEC_STRINGS_MAX),
            procfs::read_bounded(&format!("/proc/{pid}/environ"), EXEC_STRINGS_MAX),
        ),
    };
    let status = procfs::status(pid);
    let executable = procfs::exe(pid);
    let partial = cmdline.is_none() || environ.is_none() || status.is_none() || executable.is_none();
    let (cmdline, cmdline_cut) = cmdline.unwrap_or_default();
    let (environ, environ_cut) = environ.unwrap_or_default();
    let (args, args_truncated) = bound_args(split_nul(&cmdline), cmdline_cut);
    let (envs, envs_truncated) = bound_envs(split_nul(&environ), environ_cut);
    let executable = executable.unwrap_or_default();
    let path = call.as_ref().and_then(|c| c.entry_path.clone()).unwrap_or_else(|| executable.clone());
    let exec = proto::ExecEvent {
        path,
        args,
        args_truncated,
        envs,
        envs_truncated,
        cwd: cx.cwd().unwrap_or_default(),
        credentials: status.map(|s| s.credentials),
        executable,
    };
    match call {
        Some(call) => cx.emit_call(&call, 0, partial, Payload::Exec(exec)),
        None => {
            let event = Event {
                retval: Some(0),
                syscall: "execve".to_owned(),
                partial: true,
                payload: Some(Payload::Exec(exec)),
                ..cx.event(time)
            };
            cx.sink.emit(event);
        }
    }
}

// ---- open -------------------------------------------------------------------

/// openat2 passes flags and mode in a `struct open_how` {u64 flags, u64
/// mode, u64 resolve}, read at entry.
pub fn openat2_entry(cx: &mut Ctx<'_>, call: &mut Call) -> Next {
    call.entry_bytes = read_bytes(cx, call.args[2], 16);
    Next::Exit
}

/// The `index`th native-endian u32 of the memory read at entry, if read.
fn entry_u32(call: &Call, index: usize) -> Option<u32> {
    let bytes = call.entry_bytes.get(index * 4..index * 4 + 4)?;
    Some(u32::from_ne_bytes(bytes.try_into().expect("4 bytes")))
}

/// The `index`th native-endian u64 of the memory read at entry, if read.
fn entry_u64(call: &Call, index: usize) -> Option<u64> {
    let bytes = call.entry_bytes.get(index * 8..index * 8 + 8)?;
    Some(u64::from_ne_bytes(bytes.try_into().expect("8 bytes")))
}

fn read_bytes(cx: &Ctx<'_>, addr: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    let got = memory::read(cx.tid, addr, &mut bytes);
    bytes.truncate(got);
    bytes
}

/// (dirfd, path, flags, mode) of the open family. open_by_handle_at names
/// no path (a file handle instead): its path is known only on success.
fn open_args(call: &Call) -> (i32, u64, i32, u32) {
    let a = call.args;
    match call.def.name {
        "open_by_handle_at" => (arg_fd(a[0]), 0, a[2] as i32, 0),
        "open" => (AT_FDCWD, a[0], a[1] as i32, a[2] as u32),
        "creat" => (AT_FDCWD, a[0], libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC, a[1] as u32),
        "openat2" => {
            let word = |i| entry_u64(call, i).unwrap_or(0);
            (arg_fd(a[0]), a[1], word(0) as i32, word(1) as u32)
        }
        _ => (arg_fd(a[0]), a[1], a[2] as i32, a[3] as u32),
    }
}

pub fn open_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64) {
    let (dirfd, path_addr, flags, mode) = open_args(call);
    // On success the kernel's own resolution of the new descriptor is the
    // truth (symlinks, `..`, and no window for the workload to change the
    // string after the kernel read it); on failure, the requested path.
    let path = if retval >= 0 {
        let fd = retval as i32;
        procfs::fd_path(cx.tid, fd).or_else(|| cx.read_path(dirfd, path_addr))
    } else {
        cx.read_path(dirfd, path_addr)
    };
    let creates = flags & (libc::O_CREAT | libc::O_TMPFILE) != 0;
    let open = proto::OpenEvent {
        path: path.clone().unwrap_or_default(),
        flags: Some(flags),
        mode: if creates { mode } else { 0 },
    };
    cx.emit_call(call, retval, path.is_none(), Payload::Open(open));
}

// ---- sockets ----------------------------------------------------------------

/// A socket address: family, textual address, port.
fn parse_sockaddr(raw: &[u8]) -> Option<(AddressFamily, String, u32)> {
    let family = i32::from(u16::from_ne_bytes(raw.get(0..2)?.try_into().ok()?));
    let port = || raw.get(2..4).map(|p| u32::from(u16::from_be_bytes([p[0], p[1]])));
    match family {
        libc::AF_INET => {
            let ip: [u8; 4] = raw.get(4..8)?.try_into().ok()?;
            Some((AddressFamily::Inet, Ipv4Addr::from(ip).to_string(), port()?))
        }
        libc::AF_INET6 => {
            let ip: [u8; 16] = raw.get(8..24)?.try_into().ok()?;
            Some((AddressFamily::Inet6, Ipv6Addr::from(ip).to_string(), port()?))
        }
        libc::AF_UNIX => {
            let path = &raw[2..];
            let text = match path.first() {
                // Abstract names start with a NUL and are not terminated.
                Some(0) => format!("@{}", String::from_utf8_lossy(&path[1..])),
                _ => {
                    let end = path.iter().position(|&b| b == 0).unwrap_or(path.len());
                    String::from_utf8_lossy(&path[..end]).into_owned()
                }
            };
            Some((AddressFamily::Unix, text, 0))
        }
        _ => Some((AddressFamily::Other, String::new(), 0)),
    }
}

fn protocol_of(family: AddressFamily, sock_type: i32, protocol: i32) -> Protocol {
    if !matches!(family, AddressFamily::Inet | AddressFamily::Inet6) {
        return Protocol::Unspecified;
    }
    match (sock_type, protocol) {
        (libc::SOCK_STREAM, 0 | libc::IPPROTO_TCP) => Protocol::Tcp,
        (libc::SOCK_DGRAM, 0 | libc::IPPROTO_UDP) => Protocol::Udp,
        _ => Protocol::Other,
    }
}

/// The address is read at entry, when the kernel copies it: a blocking
/// connect leaves time for another thread to rewrite it before the exit.
/// (bind's address too.)
pub fn sockaddr_entry(cx: &mut Ctx<'_>, call: &mut Call) -> Next {
    let [_, addr, len, ..] = call.args;
    call.entry_bytes = read_bytes(cx, addr, (len as usize).min(SOCKADDR_MAX));
    Next::Exit
}

/// An address that could not be read is reported empty (the event partial).
fn address_or_empty(parsed: Option<(AddressFamily, String, u32)>) -> (AddressFamily, String, u32) {
    parsed.unwrap_or((AddressFamily::Unspecified, String::new(), 0))
}

/// The socket behind a tracee's descriptor, asked of the kernel now rather
/// than of a table kept from socket(2) calls: inherited, passed or dup'ed
/// sockets are all the same.
fn socket_of(cx: &Ctx<'_>, fd: i32) -> Option<std::os::fd::OwnedFd> {
    procfs::descriptor_copy(cx.tid, cx.tgid(), fd)
}

fn protocol_of_socket(socket: Option<&std::os::fd::OwnedFd>, family: AddressFamily) -> Protocol {
    let (sock_type, protocol) = socket.and_then(procfs::socket_kind).unwrap_or((0, -1));
    protocol_of(family, sock_type, protocol)
}

pub fn connect_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64) {
    let fd = arg_fd(call.args[0]);
    let parsed = parse_sockaddr(&call.entry_bytes);
    let partial = parsed.is_none();
    let (family, address, port) = address_or_empty(parsed);
    let connect = proto::ConnectEvent {
        address,
        port,
        family: family as i32,
        protocol: protocol_of_socket(socket_of(cx, fd).as_ref(), family) as i32,
        fd: Some(fd),
    };
    cx.emit_call(call, retval, partial, Payload::Connect(connect));
}

/// bind: on success, the address the kernel bound (port 0 becomes the port
/// it chose); on failure, the one asked for.
pub fn bind_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64) {
    let fd = arg_fd(call.args[0]);
    let socket = socket_of(cx, fd);
    let bound = (retval == 0).then(|| socket.as_ref().and_then(|s| procfs::socket_address(s, End::Local))).flatten();
    let parsed = parse_sockaddr(bound.as_deref().unwrap_or(&call.entry_bytes));
    let partial = parsed.is_none();
    let (family, address, port) = address_or_empty(parsed);
    let bind = proto::BindEvent {
        address,
        port,
        family: family as i32,
        protocol: protocol_of_socket(socket.as_ref(), family) as i32,
        fd: Some(fd),
    };
    cx.emit_call(call, retval, partial, Payload::Bind(bind));
}

/// accept, accept4: the peer and local port of the new connection, asked of
/// its socket (so an accept that passes no address buffer is seen too).
/// Failed accepts are not reported: a non-blocking server fails with EAGAIN
/// at every idle wake-up.
pub fn accept_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64) {
    if retval < 0 {
        return;
    }
    let socket = socket_of(cx, retval as i32);
    let end = |end| socket.as_ref().and_then(|s| procfs::socket_address(s, end)).and_then(|a| parse_sockaddr(&a));
    let (peer, local) = (end(End::Peer), end(End::Local));
    let partial = peer.is_none();
    let (family, address, port) = address_or_empty(peer);
    let accept = proto::AcceptEvent {
        address,
        port,
        family: family as i32,
        protocol: protocol_of_socket(socket.as_ref(), family) as i32,
        fd: Some(arg_fd(call.args[0])),
        local_port: local.map_or(0, |(_, _, port)| port),
    };
    cx.emit_call(call, retval, partial, Payload::Accept(accept));
}

/// i386 `socketcall(call, args)`: the real arguments sit in an array in
/// memory. A call we watch is rewritten into the entry it stands for, so the
/// same exit decoder runs.
pub fn socketcall_entry(cx: &mut Ctx<'_>, call: &mut Call) -> Next {
    let (name, count) = match call.args[0] {
        2 => ("bind", 3),
        3 => ("connect", 3),
        5 => ("accept", 3),
        18 => ("accept4", 4),
        _ => return Next::Done,
    };
    let words = memory::read_words(cx.tid, call.args[1], Abi::I386, count);
    if words.len() < count {
        call.partial = true;
    }
    call.def = syscalls::by_name(name);
    call.args = [0; 6];
    call.args[..words.len()].copy_from_slice(&words);
    (call.def.on_entry)(cx, call)
}

// ---- shared state ------------------------------------------------------------

/// unshare(CLONE_FS) gives the thread a private copy of its working
/// directory; done at entry (a failed call leaves a private copy that is
/// still exact).
pub fn unshare_entry(cx: &mut Ctx<'_>, call: &mut Call) -> Next {
    if call.args[0] as i32 & libc::CLONE_FS != 0 {
        if let Some(thread) = cx.procs.thread_mut(cx.tid) {
            let copy = thread.fs.borrow().clone();
            thread.fs = Rc::new(RefCell::new(copy));
        }
    }
    Next::Done
}

// ---- credentials ----------------------------------------------------------------

/// The thread's credentials after the call, from the kernel: what set*id
/// changed is what matters, not the arguments (-1 means "unchanged", and
/// setfs*id reports failure only through its return value).
pub fn credentials_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64) {
    let credentials = procfs::status(cx.tid).map(|s| s.credentials);
    let (requested, unreadable) = requested_credentials(call);
    let partial = credentials.is_none() || unreadable;
    let event = proto::CredentialsEvent { credentials, requested };
    cx.emit_call(call, retval, partial, Payload::Credentials(event));
}

/// capset(header, data): the masks are in memory, read at entry as the
/// kernel reads them. Version 3 headers carry two 32-bit halves of each.
pub fn capset_entry(cx: &mut Ctx<'_>, call: &mut Call) -> Next {
    call.entry_bytes = read_bytes(cx, call.args[1], 24);
    Next::Exit
}

/// The ids a set*id call passed, or capset's masks; the flag says the masks
/// could not be read.
fn requested_credentials(call: &Call) -> (Vec<i64>, bool) {
    let name = call.def.name;
    if name == "capset" {
        let word = |i| entry_u32(call, i);
        // struct __user_cap_data_struct { effective, permitted, inheritable } × 2.
        let masks: Option<Vec<i64>> =
            (0..3).map(|set| Some(i64::from(word(set)?) | i64::from(word(3 + set).unwrap_or(0)) << 32)).collect();
        return masks.map_or((Vec::new(), true), |m| (m, false));
    }
    let base = name.trim_end_matches("32");
    let count = if base.starts_with("setres") {
        3
    } else if base.starts_with("setre") {
        2
    } else {
        1
    };
    (call.args[..count].iter().map(|&a| id_arg(call, a)).collect(), false)
}

/// A user or group id argument, -1 for "unchanged". i386's original id
/// calls (without the "32" suffix) take 16-bit ids.
fn id_arg(call: &Call, raw: u64) -> i64 {
    const SIXTEEN_BIT: [&str; 11] = [
        "setuid",
        "setgid",
        "setreuid",
        "setregid",
        "setresuid",
        "setresgid",
        "setfsuid",
        "setfsgid",
        "chown",
        "lchown",
        "fchown",
    ];
    if call.abi == Abi::I386 && SIXTEEN_BIT.contains(&call.def.name) {
        i64::from(raw as u16 as i16)
    } else {
        i64::from(raw as u32 as i32)
    }
}

// ---- file changes -----------------------------------------------------------------

/// Where a file call finds a path.
#[derive(Clone, Copy)]
enum PathArg {
    /// A path argument, against the cwd.
    Path(usize),
    /// A directory descriptor argument and a path argument.
    At(usize, usize),
    /// A descriptor argument: its path.
    Fd(usize),
    /// Text kept as given (a symlink's contents).
    Text(usize),
}

/// Which arguments of a file call mean what.
struct FileCall {
    operation: FileOperation,
    path: PathArg,
    target: Option<PathArg>,
    mode: Option<usize>,
    owner: Option<usize>,
    flags: Option<usize>,
}

fn file_call(name: &str) -> Option<FileCall> {
    use FileOperation as Op;
    use PathArg::{At, Fd, Path, Text};
    let call = |operation, path, target| FileCall { operation, path, target, mode: None, owner: None, flags: None };
    Some(match name {
        "unlink" => call(Op::Unlink, Path(0), None),
        "unlinkat" => FileCall { flags: Some(2), ..call(Op::Unlink, At(0, 1), None) },
        "rmdir" => call(Op::Rmdir, Path(0), None),
        "rename" => call(Op::Rename, Path(0), Some(Path(1))),
        "renameat" => call(Op::Rename, At(0, 1), Some(At(2, 3))),
        "renameat2" => FileCall { flags: Some(4), ..call(Op::Rename, At(0, 1), Some(At(2, 3))) },
        "mkdir" => FileCall { mode: Some(1), ..call(Op::Mkdir, Path(0), None) },
        "mkdirat" => FileCall { mode: Some(2), ..call(Op::Mkdir, At(0, 1), None) },
        "link" => call(Op::Link, Path(1), Some(Path(0))),
        "linkat" => FileCall { flags: Some(4), ..call(Op::Link, At(2, 3), Some(At(0, 1))) },
        "symlink" => call(Op::Symlink, Path(1), Some(Text(0))),
        "symlinkat" => call(Op::Symlink, At(1, 2), Some(Text(0))),
        "chmod" => FileCall { mode: Some(1), ..call(Op::Chmod, Path(0), None) },
        "fchmod" => FileCall { mode: Some(1), ..call(Op::Chmod, Fd(0), None) },
        "fchmodat" => FileCall { mode: Some(2), ..call(Op::Chmod, At(0, 1), None) },
        "fchmodat2" => FileCall { mode: Some(2), flags: Some(3), ..call(Op::Chmod, At(0, 1), None) },
        "chown" | "lchown" | "chown32" | "lchown32" => FileCall { owner: Some(1), ..call(Op::Chown, Path(0), None) },
        "fchown" | "fchown32" => FileCall { owner: Some(1), ..call(Op::Chown, Fd(0), None) },
        "fchownat" => FileCall { owner: Some(2), flags: Some(4), ..call(Op::Chown, At(0, 1), None) },
        _ => return None,
    })
}

fn read_path_arg(cx: &mut Ctx<'_>, call: &Call, arg: PathArg) -> Option<String> {
    match arg {
        PathArg::Path(i) => cx.read_path(AT_FDCWD, call.args[i]),
        // With AT_EMPTY_PATH and "", this is the descriptor's own path.
        PathArg::At(dirfd, i) => cx.read_path(arg_fd(call.args[dirfd]), call.args[i]),
        PathArg::Fd(i) => cx.fd_path(arg_fd(call.args[i])),
        PathArg::Text(i) => {
            let (raw, _) = memory::read_cstring(cx.tid, call.args[i], PATH_MAX).ok()?;
            Some(String::from_utf8_lossy(&raw).into_owned())
        }
    }
}

/// Paths are read at entry, when the kernel reads them: after an unlink or
/// rename there is nothing left to ask /proc about.
pub fn file_entry(cx: &mut Ctx<'_>, call: &mut Call) -> Next {
    let Some(spec) = file_call(call.def.name) else { return Next::Done };
    let path = read_path_arg(cx, call, spec.path);
    let target = spec.target.map(|t| read_path_arg(cx, call, t));
    call.partial |= path.is_none() || target.as_ref().is_some_and(Option::is_none);
    call.entry_path = path;
    call.entry_target = target.flatten();
    Next::Exit
}

pub fn file_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64) {
    let Some(spec) = file_call(call.def.name) else { return };
    let flags = spec.flags.map_or(0, |i| call.args[i] as u32);
    let removes_dir = call.def.name == "unlinkat" && flags & libc::AT_REMOVEDIR as u32 != 0;
    let file = proto::FileEvent {
        operation: if removes_dir { FileOperation::Rmdir } else { spec.operation } as i32,
        path: call.entry_path.clone().unwrap_or_default(),
        target: call.entry_target.clone().unwrap_or_default(),
        mode: spec.mode.map(|i| call.args[i] as u32),
        uid: spec.owner.map(|i| id_arg(call, call.args[i])),
        gid: spec.owner.map(|i| id_arg(call, call.args[i + 1])),
        flags,
    };
    cx.emit_call(call, retval, call.partial, Payload::File(file));
}

// ---- io_uring -------------------------------------------------------------------

/// io_uring_setup(entries, params): the flags sit in `struct io_uring_params`
/// (after `sq_entries` and `cq_entries`), read at entry as the kernel does.
pub fn io_uring_entry(cx: &mut Ctx<'_>, call: &mut Call) -> Next {
    call.entry_bytes = read_bytes(cx, call.args[1], 12);
    Next::Exit
}

pub fn io_uring_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64) {
    let flags = entry_u32(call, 2);
    let io_uring = proto::IoUringEvent { entries: call.args[0] as u32, flags: flags.unwrap_or(0) };
    cx.emit_call(call, retval, flags.is_none(), Payload::IoUring(io_uring));
}

// ---- working directory --------------------------------------------------------

pub fn chdir_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64) {
    let path = if retval == 0 {
        // The kernel's answer: symlinks and `..` resolved as it did.
        let cwd = procfs::cwd(cx.tid);
        if let Some(thread) = cx.procs.thread(cx.tid) {
            thread.fs.borrow_mut().cwd = cwd.clone();
        }
        cwd
    } else if call.def.name == "fchdir" {
        cx.fd_path(arg_fd(call.args[0]))
    } else {
        cx.read_path(AT_FDCWD, call.args[0])
    };
    let chdir = proto::ChdirEvent { path: path.clone().unwrap_or_default() };
    cx.emit_call(call, retval, path.is_none(), Payload::Chdir(chdir));
}

// ---- process creation ---------------------------------------------------------

/// clone and clone3 at entry. The child is reported by the kernel's fork
/// event; here the flags are recorded for it, and CLONE_UNTRACED is
/// cleared: it would let the child run untraced. (fork and vfork cannot
/// ask for that, so they are not stopped at entry at all.)
pub fn clone_entry(cx: &mut Ctx<'_>, call: &mut Call) -> Next {
    let flags = if call.def.name == "clone3" {
        // struct clone_args starts with a u64 `flags` in every ABI.
        let flags = memory::read_words(cx.tid, call.args[0], Abi::X86_64, 1).first().copied().unwrap_or(0);
        if flags & CLONE_UNTRACED != 0 {
            // Best effort: if the write fails the child is seen in /proc only.
            let _ = memory::write_u64(cx.tid, call.args[0], flags & !CLONE_UNTRACED);
        }
        flags
    } else {
        let flags = call.args[0];
        if flags & CLONE_UNTRACED != 0 {
            let _ = ptrace::set_first_arg(cx.tid, call.abi, flags & !CLONE_UNTRACED);
        }
        flags
    };
    let request = ForkRequest { syscall: call.def.name, flags: flags & !CLONE_UNTRACED, time: call.time };
    if let Some(thread) = cx.procs.thread_mut(cx.tid) {
        thread.forking = Some(request);
    }
    // clone3's flags live in memory, where another thread can set
    // CLONE_UNTRACED again after the write above: the exit checks.
    if call.def.name == "clone3" {
        Next::Exit
    } else {
        Next::Done
    }
}

/// A clone3 child the kernel did not report was made untraced behind the
/// tracer's back: it is seized now, and reported.
pub fn clone3_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64) {
    let child = Pid::from_raw(retval as i32);
    if retval <= 0 || cx.procs.thread(child).is_some() || ptrace::seize(child).is_err() {
        return;
    }
    let flags = cx.procs.thread_mut(cx.tid).and_then(|t| t.forking.take()).map_or(0, |r| r.flags);
    if flags & libc::CLONE_THREAD as u64 != 0 {
        cx.procs.add_thread(child, cx.tgid());
        return;
    }
    cx.procs.add_process(child, cx.tgid());
    let fork = proto::ForkEvent { child_pid: child.as_raw() as u32, kind: proto::ForkKind::Clone as i32, flags };
    cx.emit_call(call, retval, false, Payload::Fork(fork));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, abi: Abi, args: [u64; 6], entry_bytes: Vec<u8>) -> Call {
        let def = syscalls::by_name(name);
        Call {
            def,
            abi,
            args,
            time: SystemTime::now(),
            entry_path: None,
            entry_target: None,
            entry_bytes,
            partial: false,
        }
    }

    #[test]
    fn requested_credentials_keep_minus_one_whatever_the_id_width() {
        let unchanged = u64::from(u32::MAX);
        let setresuid = call("setresuid", Abi::X86_64, [unchanged, 0, 1000, 0, 0, 0], vec![]);
        assert_eq!(requested_credentials(&setresuid), (vec![-1, 0, 1000], false));
        // i386's setuid takes a 16-bit id; setuid32 a 32-bit one.
        let narrow = call("setreuid", Abi::I386, [0xffff, 5, 0, 0, 0, 0], vec![]);
        assert_eq!(requested_credentials(&narrow), (vec![-1, 5], false));
        let wide = call("setuid32", Abi::I386, [0xffff, 0, 0, 0, 0, 0], vec![]);
        assert_eq!(requested_credentials(&wide), (vec![0xffff], false));

        let halves: Vec<u8> = [1u32, 2, 4, 8, 0, 0].iter().flat_map(|w| w.to_ne_bytes()).collect();
        let capset = call("capset", Abi::X86_64, [0; 6], halves);
        assert_eq!(requested_credentials(&capset), (vec![1 | 8 << 32, 2, 4], false));
        let unreadable = call("capset", Abi::X86_64, [0; 6], vec![]);
        assert_eq!(requested_credentials(&unreadable), (vec![], true));
    }

    #[test]
    fn sockaddrs_decode_to_text() {
        let mut v4 = vec![0u8; 16];
        v4[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        v4[2..4].copy_from_slice(&8080u16.to_be_bytes());
        v4[4..8].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(parse_sockaddr(&v4), Some((AddressFamily::Inet, "127.0.0.1".into(), 8080)));

        let mut v6 = vec![0u8; 28];
        v6[0..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        v6[2..4].copy_from_slice(&443u16.to_be_bytes());
        v6[23] = 1;
        assert_eq!(parse_sockaddr(&v6), Some((AddressFamily::Inet6, "::1".into(), 443)));

        let mut unix = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
        unix.extend_from_slice(b"/run/x.sock\0garbage");
        assert_eq!(parse_sockaddr(&unix), Some((AddressFamily::Unix, "/run/x.sock".into(), 0)));
        let mut abstract_name = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
        abstract_name.extend_from_slice(b"\0agent");
        assert_eq!(parse_sockaddr(&abstract_name), Some((AddressFamily::Unix, "@agent".into(), 0)));
        assert_eq!(parse_sockaddr(&[2]), None);
    }

    #[test]
    fn exec_entries_are_bounded_with_priority_envs_first() {
        let long = vec![b'a'; 400];
        let (args, cut) = bound_args([b"ls".as_slice(), &long], false);
        assert!(cut);
        assert_eq!(args[1].len(), MAX_EXEC_ENTRY_LEN - 1);
        assert!(args[1].ends_with("..."));

        let many: Vec<Vec<u8>> =
            (0..400).map(|i| format!("V{i}=x").into_bytes()).chain([b"PATH=/bin".to_vec()]).collect();
        let (envs, cut) = bound_envs(many.iter().map(Vec::as_slice), false);
        assert!(cut);
        assert_eq!(envs.len(), MAX_EXEC_ENTRIES);
        assert_eq!(envs[0], "PATH=/bin");
        assert_eq!(envs[1], "V0=x");
    }

    #[test]
    fn nul_separated_lists_split_without_a_trailing_empty_entry() {
        assert_eq!(split_nul(b"a\0bc\0").collect::<Vec<_>>(), vec![b"a".as_slice(), b"bc"]);
        assert_eq!(split_nul(b"").count(), 0);
        assert_eq!(split_nul(b"a\0\0b\0").count(), 3);
    }
}
