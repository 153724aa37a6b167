//! `--verbose`: one strace-like line per event on stderr.

use std::fmt::Write as _;
use std::io;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use tokio::io::{AsyncWriteExt, BufWriter, Stderr};

use crate::proto::{event::Payload, Abi, AddressFamily, Event, ExitCause, FileOperation, Protocol};

pub struct Printer {
    out: BufWriter<Stderr>,
    line: String,
}

impl Printer {
    pub fn new() -> Self {
        Printer { out: BufWriter::new(tokio::io::stderr()), line: String::new() }
    }

    pub async fn write(&mut self, batch: &[Event]) -> io::Result<()> {
        for event in batch {
            self.line.clear();
            format_event(&mut self.line, event);
            self.line.push('\n');
            self.out.write_all(self.line.as_bytes()).await?;
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        self.out.flush().await
    }
}

const OPEN_FLAGS: &[(i32, &str)] = &[
    (libc::O_CREAT, "O_CREAT"),
    (libc::O_EXCL, "O_EXCL"),
    (libc::O_NOCTTY, "O_NOCTTY"),
    (libc::O_TRUNC, "O_TRUNC"),
    (libc::O_APPEND, "O_APPEND"),
    (libc::O_NONBLOCK, "O_NONBLOCK"),
    (libc::O_SYNC, "O_SYNC"),
    (libc::O_DSYNC, "O_DSYNC"),
    (libc::O_DIRECT, "O_DIRECT"),
    (0o100000, "O_LARGEFILE"),
    (libc::O_TMPFILE, "O_TMPFILE"),
    (libc::O_DIRECTORY, "O_DIRECTORY"),
    (libc::O_NOFOLLOW, "O_NOFOLLOW"),
    (libc::O_NOATIME, "O_NOATIME"),
    (libc::O_CLOEXEC, "O_CLOEXEC"),
    (libc::O_PATH, "O_PATH"),
];

fn format_open_flags(out: &mut String, flags: i32) {
    out.push_str(match flags & libc::O_ACCMODE {
        libc::O_RDONLY => "O_RDONLY",
        libc::O_WRONLY => "O_WRONLY",
        libc::O_RDWR => "O_RDWR",
        _ => "O_ACCMODE",
    });
    let mut rest = flags & !libc::O_ACCMODE;
    // Multi-bit flags (O_SYNC, O_TMPFILE) come before their sub-bits.
    for &(bit, name) in OPEN_FLAGS {
        if rest & bit == bit {
            out.push('|');
            out.push_str(name);
            rest &= !bit;
        }
    }
    if rest != 0 {
        let _ = write!(out, "|{rest:#x}");
    }
}

fn signal_name(signal: i32) -> String {
    Signal::try_from(signal).map_or_else(|_| format!("SIG{signal}"), |s| s.as_str().to_owned())
}

/// A constant by its name, or its number when it has none.
fn name_or_number(name: &str, number: i64) -> String {
    match name {
        "" => number.to_string(),
        name => name.to_owned(),
    }
}

fn format_retval(out: &mut String, retval: i64) {
    if retval < 0 {
        let errno = Errno::from_raw(-retval as i32);
        let _ = write!(out, " = -1 {errno:?} ({})", errno.desc());
    } else {
        let _ = write!(out, " = {retval}");
    }
}

/// What the utime family, truncate, xattr calls, mknod and memfd_create set.
fn format_file_detail(out: &mut String, file: &crate::proto::FileEvent) {
    let time = |t: &crate::proto::FileTime| match (t.now, t.omit) {
        (true, _) => "now".to_owned(),
        (_, true) => "omit".to_owned(),
        _ => format!("{}.{:09}", t.seconds, t.nanos),
    };
    if let (Some(access), Some(modification)) = (&file.access_time, &file.modification_time) {
        let _ = write!(out, ", atime={} mtime={}", time(access), time(modification));
    }
    if let Some(length) = file.length {
        let _ = write!(out, ", {length}");
    }
    if !file.name.is_empty() {
        let _ = write!(out, ", {}", Quoted(&file.name));
    }
    if let Some(size) = file.value_size {
        let _ = write!(out, ", {size} bytes");
    }
    if let Some(caps) = &file.capabilities {
        let effective = if caps.effective { "+e" } else { "" };
        let _ = write!(out, " (cap_prm={:#x} cap_inh={:#x}{effective})", caps.permitted, caps.inheritable);
    }
    if let (Some(major), Some(minor)) = (file.device_major, file.device_minor) {
        let _ = write!(out, ", {major}:{minor}");
    }
}

/// `TCP 127.0.0.1:80`, `UDP [::1]:53`, `unix "/path"`.
fn format_address(out: &mut String, protocol: Protocol, family: AddressFamily, address: &str, port: u32) {
    let protocol = match protocol {
        Protocol::Tcp => "TCP ",
        Protocol::Udp => "UDP ",
        _ => "",
    };
    match family {
        AddressFamily::Inet => {
            let _ = write!(out, "{protocol}{address}:{port}");
        }
        AddressFamily::Inet6 => {
            let _ = write!(out, "{protocol}[{address}]:{port}");
        }
        AddressFamily::Unix => {
            let _ = write!(out, "unix {}", Quoted(address));
        }
        _ => out.push('?'),
    }
}

/// A name as events carry it (escaped as `crate::text` says), in quotes:
/// the same text, with a quote written `\"` and a control character
/// `\xHH`, so that a line stays one line and reads back to the same bytes.
struct Quoted<'a>(&'a str);

impl std::fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_char('"')?;
        for c in self.0.chars() {
            match c {
                '"' => f.write_str("\\\"")?,
                c if c.is_ascii_control() => write!(f, "\\x{:02x}", c as u8)?,
                c => f.write_char(c)?,
            }
        }
        f.write_char('"')
    }
}

pub fn format_event(out: &mut String, event: &Event) {
    let _ = write!(out, "[pid {} ppid {}", event.pid, event.ppid);
    if event.tid != event.pid {
        let _ = write!(out, " tid {}", event.tid);
    }
    out.push_str("] ");
    let name = &event.syscall;
    match &event.payload {
        Some(Payload::Exec(exec)) => {
            // A process found running, not an exec seen: no syscall, no result.
            let name = match () {
                _ if exec.seen_at_attach => "attached",
                _ if exec.from_procfs => "found in /proc",
                _ => name.as_str(),
            };
            let _ = write!(out, "{name}({}, [", Quoted(&exec.path));
            for (i, arg) in exec.args.iter().enumerate() {
                let _ = write!(out, "{}{}", if i == 0 { "" } else { ", " }, Quoted(arg));
            }
            out.push(']');
            if exec.args_truncated {
                out.push_str("...");
            }
            let _ = write!(out, ", {} vars", exec.envs.len());
            if exec.envs_truncated {
                out.push('+');
            }
            out.push(')');
            if let Some(retval) = event.retval {
                format_retval(out, retval);
            }
            if !exec.executable.is_empty() && exec.executable != exec.path {
                let _ = write!(out, " exe={}", Quoted(&exec.executable));
            }
            let _ = write!(out, " cwd={}", Quoted(&exec.cwd));
            if let Some(c) = &exec.credentials {
                let _ = write!(out, " uid={} gid={}", c.uid.unwrap_or(0), c.gid.unwrap_or(0));
                if c.euid != c.uid || c.egid != c.gid {
                    let _ = write!(out, " euid={} egid={}", c.euid.unwrap_or(0), c.egid.unwrap_or(0));
                }
            }
        }
        Some(Payload::Open(open)) => {
            let _ = write!(out, "{name}({}, ", Quoted(&open.path));
            let flags = open.flags.unwrap_or(0);
            format_open_flags(out, flags);
            if open.mode != 0 || flags & libc::O_CREAT != 0 {
                let _ = write!(out, ", {:#o}", open.mode);
            }
            out.push(')');
            format_retval(out, event.retval.unwrap_or(0));
        }
        Some(Payload::Connect(c)) => {
            let _ = write!(out, "{name}({}, ", c.fd.unwrap_or(-1));
            format_address(out, c.protocol(), c.family(), &c.address, c.port);
            if c.send_flags != 0 {
                let _ = write!(out, ", flags={:#x}", c.send_flags);
            }
            out.push(')');
            format_retval(out, event.retval.unwrap_or(0));
        }
        Some(Payload::Bind(b)) => {
            let _ = write!(out, "{name}({}, ", b.fd.unwrap_or(-1));
            format_address(out, b.protocol(), b.family(), &b.address, b.port);
            out.push(')');
            format_retval(out, event.retval.unwrap_or(0));
        }
        Some(Payload::Accept(a)) => {
            let _ = write!(out, "{name}({}, from ", a.fd.unwrap_or(-1));
            format_address(out, a.protocol(), a.family(), &a.address, a.port);
            let _ = write!(out, " to port {})", a.local_port);
            format_retval(out, event.retval.unwrap_or(0));
        }
        Some(Payload::Fork(fork)) => {
            if fork.flags != 0 && name.starts_with("clone") {
                let _ = write!(out, "{name}(flags={:#x})", fork.flags);
            } else {
                let _ = write!(out, "{name}()");
            }
            format_retval(out, event.retval.unwrap_or(i64::from(fork.child_pid)));
        }
        Some(Payload::Exit(exit)) => match exit.cause() {
            ExitCause::Signaled => {
                let core = if exit.core_dumped { " (core dumped)" } else { "" };
                let _ = write!(out, "+++ killed by {}{core} +++", signal_name(exit.signal.unwrap_or(0)));
            }
            ExitCause::Exited => {
                let _ = write!(out, "+++ exited with {} +++", exit.code.unwrap_or(0));
            }
            // A process the /proc scan saw go: how, only its parent knows.
            ExitCause::Unspecified => out.push_str("+++ gone +++"),
        },
        Some(Payload::Chdir(chdir)) => {
            let _ = write!(out, "{name}({})", Quoted(&chdir.path));
            format_retval(out, event.retval.unwrap_or(0));
        }
        Some(Payload::Credentials(changed)) => {
            let c = changed.credentials.clone().unwrap_or_default();
            let id = |v: Option<u32>| v.map_or_else(|| "?".to_owned(), |v| v.to_string());
            let requested: Vec<String> = changed.requested.iter().map(|r| r.to_string()).collect();
            let _ = write!(out, "{name}({})", requested.join(", "));
            format_retval(out, event.retval.unwrap_or(0));
            let _ = write!(
                out,
                " uid={}/{}/{}/{} gid={}/{}/{}/{} cap_eff={:#x}",
                id(c.uid),
                id(c.euid),
                id(c.suid),
                id(c.fsuid),
                id(c.gid),
                id(c.egid),
                id(c.sgid),
                id(c.fsgid),
                c.cap_effective.unwrap_or(0)
            );
            if !c.groups.is_empty() {
                let groups: Vec<String> = c.groups.iter().map(u32::to_string).collect();
                let _ = write!(out, " groups={}", groups.join(","));
            }
        }
        Some(Payload::File(file)) => {
            let _ = write!(out, "{name}({}", Quoted(&file.path));
            if !file.target.is_empty() {
                // A link points at its target; a rename goes from path to target.
                let arrow = if file.operation() == FileOperation::Rename { ", " } else { " -> " };
                let _ = write!(out, "{arrow}{}", Quoted(&file.target));
            }
            if let Some(mode) = file.mode {
                let _ = write!(out, ", {mode:#o}");
            }
            if let (Some(uid), Some(gid)) = (file.uid, file.gid) {
                let _ = write!(out, ", {uid}, {gid}");
            }
            format_file_detail(out, file);
            if file.flags != 0 {
                let _ = write!(out, ", flags={:#x}", file.flags);
            }
            out.push(')');
            format_retval(out, event.retval.unwrap_or(0));
        }
        Some(Payload::IoUring(ring)) => {
            let _ = write!(out, "{name}({}, flags={:#x})", ring.entries, ring.flags);
            format_retval(out, event.retval.unwrap_or(0));
        }
        Some(Payload::Ptrace(ptrace)) => {
            match ptrace.request_name.as_str() {
                "" => write!(out, "{name}({}, {})", ptrace.request, ptrace.pid),
                request => write!(out, "{name}({request}, {})", ptrace.pid),
            }
            .unwrap_or_default();
            format_retval(out, event.retval.unwrap_or(0));
        }
        Some(Payload::Seccomp(seccomp)) => {
            match seccomp.operation_name.as_str() {
                "" => write!(out, "{name}({}", seccomp.operation),
                operation => write!(out, "{name}({operation}"),
            }
            .unwrap_or_default();
            if seccomp.flags != 0 {
                let _ = write!(out, ", flags={:#x}", seccomp.flags);
            }
            if let Some(instructions) = seccomp.instructions {
                let _ = write!(out, ", {instructions} instructions");
            }
            out.push(')');
            format_retval(out, event.retval.unwrap_or(0));
        }
        Some(Payload::Namespace(ns)) => {
            let _ = write!(out, "{name}(");
            let texts = [&ns.path, &ns.source, &ns.fstype, &ns.namespace];
            for (i, text) in texts.into_iter().filter(|t| !t.is_empty()).enumerate() {
                let _ = write!(out, "{}{}", if i == 0 { "" } else { ", " }, Quoted(text));
            }
            if ns.flag_names.is_empty() {
                let _ = write!(out, ", flags={:#x})", ns.flags);
            } else {
                let _ = write!(out, ", flags={})", ns.flag_names.join("|"));
            }
            format_retval(out, event.retval.unwrap_or(0));
        }
        Some(Payload::Userfaultfd(uffd)) => {
            let _ = write!(out, "{name}(flags={:#x})", uffd.flags);
            format_retval(out, event.retval.unwrap_or(0));
        }
        Some(Payload::Prctl(prctl)) => {
            let _ = write!(out, "{name}({}", name_or_number(&prctl.option_name, i64::from(prctl.option)));
            match prctl.new_name.as_str() {
                "" => {
                    let _ = write!(out, ", {}", name_or_number(&prctl.arg2_name, prctl.arg2 as i64));
                    if !prctl.arg3_name.is_empty() {
                        let _ = write!(out, ", {}", prctl.arg3_name);
                    }
                }
                new_name => {
                    let _ = write!(out, ", {}", Quoted(new_name));
                }
            }
            out.push(')');
            format_retval(out, event.retval.unwrap_or(0));
        }
        Some(Payload::Rlimit(rlimit)) => {
            let limit = |l: Option<u64>| match l {
                Some(u64::MAX) => "RLIM_INFINITY".to_owned(),
                Some(l) => l.to_string(),
                None => "?".to_owned(),
            };
            let resource = name_or_number(&rlimit.resource_name, i64::from(rlimit.resource));
            let (soft, hard) = (limit(rlimit.soft), limit(rlimit.hard));
            let _ = write!(out, "{name}(pid {}, {resource}, soft={soft}, hard={hard})", rlimit.pid);
            format_retval(out, event.retval.unwrap_or(0));
        }
        Some(Payload::Setsockopt(opt)) => {
            let level = name_or_number(&opt.level_name, i64::from(opt.level));
            let option = name_or_number(&opt.option_name, i64::from(opt.option));
            let _ = write!(out, "{name}({}, {level}, {option}", opt.fd.unwrap_or(-1));
            if let Some(value) = opt.value {
                let _ = write!(out, ", {value}");
            }
            if !opt.name.is_empty() {
                let _ = write!(out, ", {}", Quoted(&opt.name));
            }
            if let Some(instructions) = opt.filter_instructions {
                let _ = write!(out, ", {instructions} instructions");
            }
            out.push(')');
            format_retval(out, event.retval.unwrap_or(0));
        }
        Some(Payload::Socket(socket)) => {
            let family = name_or_number(&socket.family_name, i64::from(socket.family));
            let _ = write!(out, "{name}({family}, {:#x}, {})", socket.r#type, socket.protocol);
            format_retval(out, event.retval.unwrap_or(0));
        }
        Some(Payload::Module(module)) => {
            let _ = write!(out, "{name}({}", Quoted(&module.name));
            for text in [&module.path, &module.args].into_iter().filter(|t| !t.is_empty()) {
                let _ = write!(out, ", {}", Quoted(text));
            }
            out.push(')');
            format_retval(out, event.retval.unwrap_or(0));
        }
        Some(Payload::Bpf(bpf)) => {
            let _ = write!(out, "{name}({})", name_or_number(&bpf.command_name, i64::from(bpf.command)));
            format_retval(out, event.retval.unwrap_or(0));
        }
        Some(Payload::Signal(signal)) => {
            let _ = write!(out, "{name}(pid {}", signal.pid);
            if let Some(tid) = signal.tid {
                let _ = write!(out, ", tid {tid}");
            }
            let _ = write!(out, ", {})", name_or_number(&signal.signal_name, i64::from(signal.signal)));
            format_retval(out, event.retval.unwrap_or(0));
        }
        Some(Payload::TracerTarget(target)) => {
            let _ = match target.signal_name.as_str() {
                "" => write!(out, "{name}(tracer {}, {})", target.pid, target.signal),
                signal => write!(out, "{name}(tracer {}, {signal})", target.pid),
            };
            format_retval(out, event.retval.unwrap_or(0));
        }
        None => {
            let _ = write!(out, "{name}(?)");
        }
    }
    if event.abi() == Abi::I386 {
        out.push_str(" [i386]");
    }
    if event.partial {
        out.push_str(" (partial)");
    }
    if !event.denied.is_empty() {
        let _ = write!(out, " (denied: {})", event.denied);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{ConnectEvent, OpenEvent};

    #[test]
    fn lines_read_like_strace() {
        let mut line = String::new();
        let open = Event {
            pid: 7,
            ppid: 1,
            tid: 7,
            syscall: "openat".into(),
            retval: Some(-2),
            payload: Some(Payload::Open(OpenEvent {
                path: "/etc/x".into(),
                flags: Some(libc::O_RDONLY | libc::O_CLOEXEC),
                ..Default::default()
            })),
            ..Event::default()
        };
        format_event(&mut line, &open);
        assert_eq!(
            line,
            r#"[pid 7 ppid 1] openat("/etc/x", O_RDONLY|O_CLOEXEC) = -1 ENOENT (No such file or directory)"#
        );

        line.clear();
        let connect = Event {
            pid: 7,
            ppid: 1,
            tid: 8,
            syscall: "connect".into(),
            retval: Some(0),
            abi: Abi::I386 as i32,
            payload: Some(Payload::Connect(ConnectEvent {
                address: "127.0.0.1".into(),
                port: 80,
                family: AddressFamily::Inet as i32,
                protocol: Protocol::Tcp as i32,
                fd: Some(3),
                ..Default::default()
            })),
            ..Event::default()
        };
        format_event(&mut line, &connect);
        assert_eq!(line, "[pid 7 ppid 1 tid 8] connect(3, TCP 127.0.0.1:80) = 0 [i386]");
        // Processes found running, not seen starting: no syscall, no result; how they end is unknown.
        let found = |seen_at_attach, from_procfs| Event {
            pid: 9,
            ppid: 1,
            tid: 9,
            payload: Some(Payload::Exec(crate::proto::ExecEvent {
                path: "/bin/sleep".into(),
                args: vec!["sleep".into()],
                cwd: "/".into(),
                seen_at_attach,
                from_procfs,
                ..Default::default()
            })),
            ..Event::default()
        };
        for (event, name) in [(found(true, false), "attached"), (found(false, true), "found in /proc")] {
            line.clear();
            format_event(&mut line, &event);
            assert_eq!(line, format!(r#"[pid 9 ppid 1] {name}("/bin/sleep", ["sleep"], 0 vars) cwd="/""#));
        }
        line.clear();
        let gone = Event { pid: 9, tid: 9, payload: Some(Payload::Exit(Default::default())), ..Event::default() };
        format_event(&mut line, &gone);
        assert_eq!(line, "[pid 9 ppid 0] +++ gone +++");
    }

    #[test]
    fn namespace_flags_show_by_name_and_bare_ones_as_hex() {
        let mount = |flags, flag_names: &[&str]| Event {
            pid: 7,
            ppid: 1,
            tid: 7,
            syscall: "mount".into(),
            retval: Some(0),
            payload: Some(Payload::Namespace(crate::proto::NamespaceEvent {
                path: "/mnt".into(),
                source: "/srv".into(),
                flags,
                flag_names: flag_names.iter().map(|n| (*n).to_owned()).collect(),
                ..Default::default()
            })),
            ..Event::default()
        };
        let mut line = String::new();
        format_event(&mut line, &mount(0x5000, &["MS_BIND", "MS_REC"]));
        assert_eq!(line, r#"[pid 7 ppid 1] mount("/mnt", "/srv", flags=MS_BIND|MS_REC) = 0"#);
        line.clear();
        format_event(&mut line, &mount(0, &[]));
        assert_eq!(line, r#"[pid 7 ppid 1] mount("/mnt", "/srv", flags=0x0) = 0"#);
    }

    #[test]
    fn names_show_as_the_events_carry_them() {
        let raw = b"/tmp/\xff \\ \"q\"\n";
        assert_eq!(Quoted(&crate::text::lossless(raw)).to_string(), r#""/tmp/\xff \\ \"q\"\x0a""#);
    }
}
