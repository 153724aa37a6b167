//! execve and execveat: the path at entry, argv and envp from what the
//! kernel copied into the new image (or, for a failed exec, from the old
//! one), bounded as the agent-side model expects.

use std::time::SystemTime;

use nix::unistd::Pid;

use crate::proto::{self, event::Payload, Event};
use crate::text;
use crate::trace::abi::Abi;
use crate::trace::decode::context::{Call, Ctx, Next, AT_FDCWD, PATH_MAX};
use crate::trace::decode::identity::{self, CarriesFacts};
use crate::trace::decode::open;
use crate::trace::memory;
use crate::trace::procfs::{self, FileId};
use crate::trace::procstat;
use crate::trace::ptrace;

/// Bounds of exec arguments and environment (entries, and bytes per entry),
/// the same as the agent-side model expects.
const MAX_EXEC_ENTRIES: usize = 356;
const MAX_EXEC_ENTRY_LEN: usize = 356;
/// Environment variables kept before all others when envp is cut, and
/// looked for past the cut: every `LD_*` variable of the dynamic loader
/// (LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT, ...), glibc's other variables
/// that load code or data into a program (its "unsecure" list), PATH, and
/// the shell history switches.
const PRIORITY_ENVS: [&str; 10] = [
    "LD_",
    "GLIBC_TUNABLES=",
    "GCONV_PATH=",
    "LOCPATH=",
    "NLSPATH=",
    "MALLOC_TRACE=",
    "HOSTALIASES=",
    "PATH=",
    "HISTSIZE=",
    "HISTFILESIZE=",
];
/// How many environment entries of a failed exec are looked through for
/// priority variables (a successful exec's are all looked through).
const FAILED_EXEC_ENV_SCAN: usize = 1 << 16;
/// How much of the argument strings, and of the environment, is read at exec.
const EXEC_STRINGS_MAX: usize = 256 * 1024;
/// The longest name the kernel gives the file an exec runs: a path, after
/// `/dev/fd/N/` for one relative to a directory descriptor.
const KERNEL_NAME_MAX: usize = PATH_MAX + 32;

/// Which of the two exec calls, for their argument positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecCall {
    Execve,
    Execveat,
}

/// Argument values of an exec call.
struct ExecArgs {
    dirfd: i32,
    path: u64,
    argv: u64,
    envp: u64,
    flags: i32,
}

impl ExecCall {
    fn args(self, call: &Call) -> ExecArgs {
        let a = call.args;
        match self {
            ExecCall::Execve => ExecArgs { dirfd: AT_FDCWD, path: a[0], argv: a[1], envp: a[2], flags: 0 },
            ExecCall::Execveat => {
                ExecArgs { dirfd: call.fd(0), path: a[1], argv: a[2], envp: a[3], flags: a[4] as i32 }
            }
        }
    }
}

/// The program path must be read before the call: on success the memory
/// that held it is gone.
pub fn entry(cx: &mut Ctx<'_>, call: &mut Call, exec: ExecCall) -> Next {
    let args = exec.args(call);
    let raw = memory::read_cstring(cx.tid, args.path, PATH_MAX).ok().map(|(raw, _)| raw);
    // execveat(fd, "", AT_EMPTY_PATH): the descriptor itself (fileless exec).
    let fileless = raw.as_ref().is_some_and(|raw| raw.is_empty()) && args.flags & libc::AT_EMPTY_PATH != 0;
    // Another process that writes this memory (a shared mapping,
    // process_vm_writev) could rewrite the path before the kernel reads it,
    // which the tracer cannot rule out: the kernel's copy of the name is
    // checked at the exec event, for every exec. Another task sharing the
    // tables or the working directory could also change the directory the
    // name is looked up from: then the file it led to here is checked too,
    // found with the path from one look at that directory (or descriptor).
    call.shared = cx.procs.tables_shared(cx.tid);
    let follows = args.flags & libc::AT_SYMLINK_NOFOLLOW == 0;
    let (path, file) = match &raw {
        Some(_) if fileless && call.shared => procfs::descriptor_file(cx.tid, args.dirfd).unzip(),
        Some(_) if fileless => (cx.fd_path(args.dirfd), None),
        Some(raw) if call.shared => match procfs::resolve_opened_file(cx.tid, args.dirfd, raw, follows) {
            Some((path, file)) => (Some(path), file),
            None => (cx.resolve(args.dirfd, raw), None),
        },
        Some(raw) => (cx.resolve(args.dirfd, raw), None),
        None => (None, None),
    };
    call.entry_path = path;
    call.entry_file = file;
    call.partial = call.entry_path.is_none();
    if let Some(raw) = &raw {
        call.entry_bytes = kernel_file_name(args.dirfd, raw);
    }
    // The caller's argv: for a `#!` script the kernel replaces argv[0] by
    // the interpreter's line and the script's path.
    let limit = MAX_EXEC_ENTRY_LEN + 1;
    call.entry_args = memory::read_string_array(cx.tid, args.argv, call.abi, MAX_EXEC_ENTRIES, limit).ok();
    Next::Exit
}

/// The name the kernel gives the file an exec of `raw` from `dirfd` runs
/// (`bprm->filename`), and copies onto the new stack (AT_EXECFN): the path
/// as given, or `/dev/fd/N[/path]` for a relative path from a directory
/// descriptor or a fileless exec.
fn kernel_file_name(dirfd: i32, raw: &[u8]) -> Vec<u8> {
    match (dirfd, raw) {
        (AT_FDCWD, _) | (_, [b'/', ..]) => raw.to_vec(),
        (fd, []) => format!("/dev/fd/{fd}").into_bytes(),
        (fd, raw) => [format!("/dev/fd/{fd}/").as_bytes(), raw].concat(),
    }
}

/// Why a successful exec cannot be reported as read at its entry, or
/// empty. The kernel's own copy of the file name it was asked for
/// (`execfn`, on the new stack, which nothing but the new image can write
/// and which has not run yet) must be the name read at entry. Where another
/// task shared the tables, the file that name led to at entry must also be
/// the one the kernel ran (`/proc/PID/exe`; for a script, whose `exe` is
/// its interpreter, the file the name leads to now).
fn exec_unverified(cx: &Ctx<'_>, call: &Call, execfn: Option<&[u8]>, exe: Option<FileId>, script: bool) -> Vec<String> {
    const RACE: &str = "another task sharing the memory or the descriptor table, or another process writing the \
                        memory, changed it while the call ran";
    let Some(execfn) = execfn else {
        return vec![format!(
            "path: read at the call's entry; the kernel's copy of the file name on the new stack could not be \
             read to confirm it, and {RACE} may have"
        )];
    };
    if execfn != call.entry_bytes.as_slice() {
        let read = text::lossless(&call.entry_bytes);
        return vec![format!(
            "path: the name the kernel ran (its own copy, on the new stack), resolved after the exec; the tracer \
             read {read} at the call's entry: {RACE}"
        )];
    }
    let mut why = Vec::new();
    if !call.shared {
        return why;
    }
    // The kernel keeps no reference to a script once its interpreter runs:
    // it is looked for by name again, but a relative name's directory (the
    // working directory, a descriptor) the sharer may have changed and
    // changed back since the kernel's look.
    let relative_script = script && (execfn.starts_with(b"/dev/fd/") || !execfn.starts_with(b"/"));
    let ran = || match script {
        false => exe,
        true => procfs::opened_file(cx.tid, AT_FDCWD, execfn, true),
    };
    if relative_script {
        why.push(format!(
            "path: the name the kernel was asked to run, a script's, relative to a directory that a task sharing \
             it could have changed while the call ran and changed back since: the kernel keeps no reference to \
             the script to compare with, and {RACE} may have"
        ));
    } else if call.entry_file.is_none() {
        why.push(format!(
            "path: the name the kernel was asked to run, but the tracer could not follow it to a file at the \
             call's entry (a magic link such as /proc/self/exe, or a name not there then) to compare with the file \
             the kernel ran, and {RACE} may have"
        ));
    } else if !ran().zip(call.entry_file).is_some_and(|(ran, named)| ran.is(&named)) {
        let which = if script { "the script the name leads to after the exec" } else { "the file the kernel ran" };
        why.push(format!(
            "path: the name the kernel was asked to run, but {which} is not the file that name led to at the \
             call's entry: {RACE} (its directory, working directory or directory descriptor), or the file at \
             that name was replaced"
        ));
    }
    if script {
        why.push(format!(
            "args: argv[0] of a script as read at the call's entry; the kernel replaces it by the interpreter's \
             line and keeps no copy, and {RACE} may have"
        ));
    }
    why
}

/// The new image's argv (`stack`, the kernel's copy) against the caller's
/// (`entry`, read at the call's entry): (args, interpreter, verified).
/// Equal: a program. The stack ends with the caller's argv[1..] after one
/// or more entries: a script, run by the interpreter whose argv those
/// entries are (its path and optional argument from the `#!` line, then
/// the script's path; nested interpreters each in turn); the caller's
/// argv[0] is known from the entry read only. Anything else: the caller's
/// memory changed after the entry stop, and only the kernel's copy is
/// reported.
fn split_interpreter(stack: Vec<String>, entry: Vec<String>) -> (Vec<String>, Vec<String>, bool) {
    if stack == entry {
        return (stack, Vec::new(), true);
    }
    let tail = entry.get(1..).unwrap_or_default();
    if stack.len() > tail.len() && stack.ends_with(tail) {
        let interpreter = stack[..stack.len() - tail.len()].to_vec();
        return (entry, interpreter, true);
    }
    (stack, Vec::new(), false)
}

fn bound_entry(raw: &[u8], truncated: &mut bool) -> String {
    if raw.len() > MAX_EXEC_ENTRY_LEN {
        *truncated = true;
        let mut cut = text::lossless(&raw[..MAX_EXEC_ENTRY_LEN - 4]);
        cut.push_str("...");
        cut
    } else {
        text::lossless(raw)
    }
}

/// argv within the bounds; `cut` says entries were already left out.
pub fn bound_args<'a>(items: impl IntoIterator<Item = &'a [u8]>, mut cut: bool) -> (Vec<String>, bool) {
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
pub fn bound_envs<'a>(items: impl IntoIterator<Item = &'a [u8]> + Clone, cut: bool) -> (Vec<String>, bool) {
    let priority = items.clone().into_iter().filter(|i| is_priority(i));
    let rest = items.into_iter().filter(|i| !is_priority(i));
    bound_args(priority.chain(rest), cut)
}

fn is_priority(entry: &[u8]) -> bool {
    PRIORITY_ENVS.iter().any(|p| entry.starts_with(p.as_bytes()))
}

/// When the environment was cut at `kept`, the priority variables past the
/// cut, wherever they are: a large environment must not hide an LD_PRELOAD.
/// `kept` loses its last, partial entry (found again here if it is one of
/// them). `read_at(offset, buf)` reads the whole environment.
fn priority_envs_beyond(
    kept: &mut Vec<u8>,
    len: u64,
    mut read_at: impl FnMut(u64, &mut [u8]) -> usize,
) -> Vec<Vec<u8>> {
    let start = kept.iter().rposition(|&b| b == 0).map_or(0, |nul| nul + 1);
    kept.truncate(start);
    let from = start as u64;
    let read_rest = |offset: u64, buf: &mut [u8]| read_at(from + offset, buf);
    memory::select_entries(read_rest, len.saturating_sub(from), MAX_EXEC_ENTRY_LEN + 1, MAX_EXEC_ENTRIES, is_priority)
}

pub fn split_nul(buf: &[u8]) -> impl Iterator<Item = &[u8]> + Clone {
    buf.strip_suffix(b"\0").unwrap_or(buf).split(|&b| b == 0).filter(|_| !buf.is_empty())
}

/// Only failed execs reach their exit stop: a successful one is reported at
/// PTRACE_EVENT_EXEC, from which the tracee is resumed past its exit stop.
/// The old image is intact, so argv and envp are read from its memory.
pub fn failed(cx: &mut Ctx<'_>, call: &Call, retval: i64, exec: ExecCall) {
    let at = exec.args(call);
    let limit = MAX_EXEC_ENTRY_LEN + 1;
    let argv = memory::read_string_array(cx.tid, at.argv, call.abi, MAX_EXEC_ENTRIES, limit);
    let read_envs = 4 * MAX_EXEC_ENTRIES;
    let envp = memory::read_string_array(cx.tid, at.envp, call.abi, read_envs, limit);
    let partial = argv.is_err() || envp.is_err();
    let (argv, argv_cut) = argv.unwrap_or_default();
    let (envp, envp_cut) = envp.unwrap_or_default();
    let (args, args_truncated) = bound_args(argv.iter().map(Vec::as_slice), argv_cut);
    // Priority variables past the entries read, within a bound.
    let beyond = match envp_cut {
        true => {
            let bounds = (FAILED_EXEC_ENV_SCAN, limit, MAX_EXEC_ENTRIES);
            memory::select_from_array(cx.tid, at.envp, call.abi, read_envs, bounds, is_priority)
        }
        false => Vec::new(),
    };
    let envs = envp.iter().chain(&beyond).map(Vec::as_slice);
    let (envs, envs_truncated) = bound_envs(envs, envp_cut);
    let exec = proto::ExecEvent {
        path: call.entry_path.clone().unwrap_or_default(),
        args,
        args_truncated,
        envs,
        envs_truncated,
        cwd: cx.cwd().unwrap_or_default(),
        credentials: procfs::status(cx.tid).map(|s| s.credentials),
        executable: String::new(),
        tty: terminal(cx.tid),
        ..Default::default()
    };
    let event = cx.call_event(call, retval, partial, Payload::Exec(exec));
    // As a failed open: nothing the kernel did is left to check the path against.
    let unverified = if call.shared { open::FAILED_UNVERIFIABLE.to_owned() } else { String::new() };
    cx.sink.emit(Event { unverified, ..event });
}

/// The process's controlling terminal ("/dev/pts/3"), as the kernel has it
/// (/proc/PID/stat's tty_nr); empty when it has none.
fn terminal(pid: Pid) -> String {
    procstat::stat(pid).map(|s| procstat::tty_name(s.tty_nr)).unwrap_or_default()
}

/// PTRACE_EVENT_EXEC: the new image is in place. argv and envp are read from
/// what the kernel copied onto the new stack (before the program runs; /proc
/// when that stack is not as expected), not from the old memory a thread
/// could have changed after the entry stop. `call` is the exec's entry, when
/// it was seen; `caller`, the thread that called it (the kernel has given
/// it the process id by now). Returns what /proc/PID/status said of the
/// process after the exec (its credentials are the event's).
pub fn succeeded(cx: &mut Ctx<'_>, call: Option<Call>, time: SystemTime, caller: Pid) -> Option<procfs::Status> {
    let pid = cx.tgid();
    let from_stack = ptrace::stack_at_exec(pid)
        .ok()
        .filter(|(_, abi)| *abi != Abi::Unknown)
        .and_then(|(sp, abi)| memory::exec_strings(pid, sp, abi, EXEC_STRINGS_MAX));
    let execfn = from_stack
        .as_ref()
        .filter(|_| call.is_some())
        .and_then(|s| memory::read_cstring(pid, s.execfn_at, KERNEL_NAME_MAX).ok())
        .map(|(name, _)| name);
    let environ_path = format!("/proc/{pid}/environ");
    let (cmdline, environ, env_at, env_len) = match from_stack {
        Some(s) => (Some(s.args), Some(s.env), Some(s.env_at), s.env_len),
        None => (
            procfs::read_bounded(&format!("/proc/{pid}/cmdline"), EXEC_STRINGS_MAX),
            procfs::read_bounded(&environ_path, EXEC_STRINGS_MAX),
            None,
            u64::MAX,
        ),
    };
    let status = procfs::status(pid);
    let executable = procfs::exe(pid);
    let partial = cmdline.is_none() || environ.is_none() || status.is_none() || executable.is_none();
    let (cmdline, cmdline_cut) = cmdline.unwrap_or_default();
    let (mut environ, environ_cut) = environ.unwrap_or_default();
    let beyond = match (environ_cut, env_at) {
        (false, _) => Vec::new(),
        (true, Some(at)) => {
            priority_envs_beyond(&mut environ, env_len, |offset, buf| memory::read(pid, at.saturating_add(offset), buf))
        }
        (true, None) => match std::fs::File::open(&environ_path) {
            Ok(file) => priority_envs_beyond(&mut environ, env_len, |offset, buf| {
                std::os::unix::fs::FileExt::read_at(&file, buf, offset).unwrap_or(0)
            }),
            Err(_) => Vec::new(),
        },
    };
    let (args, args_truncated) = bound_args(split_nul(&cmdline), cmdline_cut);
    let entry_args = call.as_ref().and_then(|c| c.entry_args.as_ref()).filter(|(_, cut)| !cut);
    let (args, interpreter, verified) = match entry_args {
        Some((entry, _)) if !args_truncated => {
            let (entry, entry_truncated) = bound_args(entry.iter().map(Vec::as_slice), false);
            match entry_truncated {
                false => split_interpreter(args, entry),
                true => (args, Vec::new(), true),
            }
        }
        _ => (args, Vec::new(), true),
    };
    let partial = partial || !verified;
    let envs = split_nul(&environ).chain(beyond.iter().map(Vec::as_slice));
    let (envs, envs_truncated) = bound_envs(envs, environ_cut);
    let executable = executable.unwrap_or_default();
    let mut path = call.as_ref().and_then(|c| c.entry_path.clone()).unwrap_or_else(|| executable.clone());
    let exe = procfs::exe_file(pid);
    let unverified = match &call {
        Some(call) => exec_unverified(cx, call, execfn.as_deref(), exe, !interpreter.is_empty()),
        None => Vec::new(),
    };
    // The kernel's name, when it is not the one read at entry.
    if let Some(name) = execfn.filter(|name| call.as_ref().is_some_and(|c| c.entry_bytes != *name)) {
        path = match name.starts_with(b"/dev/fd/") {
            true => text::lossless(&name),
            false => cx.resolve(AT_FDCWD, &name).unwrap_or_else(|| text::lossless(&name)),
        };
    }
    let facts = identity::facts(cx, exe, &executable);
    let exec = proto::ExecEvent {
        path,
        args,
        args_truncated,
        envs,
        envs_truncated,
        cwd: cx.cwd().unwrap_or_default(),
        credentials: status.as_ref().map(|s| s.credentials.clone()),
        executable,
        interpreter,
        tty: terminal(pid),
        ..Default::default()
    }
    .with_facts(facts);
    let mut event = match call {
        Some(call) => cx.call_event(&call, 0, partial, Payload::Exec(exec)),
        None => Event {
            retval: Some(0),
            syscall: "execve".to_owned(),
            partial: true,
            payload: Some(Payload::Exec(exec)),
            ..cx.event(time)
        },
    };
    // The thread that called execve, though it now has the process id.
    event.tid = caller.as_raw() as u32;
    event.unverified = unverified.join("; ");
    cx.sink.emit(event);
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_entries_are_bounded_with_priority_envs_first() {
        let long = vec![b'a'; 400];
        let (args, cut) = bound_args([b"ls".as_slice(), &long], false);
        assert!(cut);
        assert_eq!(args[1].len(), MAX_EXEC_ENTRY_LEN - 1);
        assert!(args[1].ends_with("..."));

        let many: Vec<Vec<u8>> = (0..400)
            .map(|i| format!("V{i}=x").into_bytes())
            .chain([b"PATH=/bin".to_vec(), b"LD_AUDIT=a".to_vec()])
            .collect();
        let (envs, cut) = bound_envs(many.iter().map(Vec::as_slice), false);
        assert!(cut);
        assert_eq!(envs.len(), MAX_EXEC_ENTRIES);
        assert_eq!(envs[..3], ["PATH=/bin", "LD_AUDIT=a", "V0=x"]);
    }

    #[test]
    fn priority_variables_past_the_cut_are_found_and_the_cut_entry_dropped() {
        let whole = b"A=1\0B=2\0LD_PRELOAD=/x.so\0C=3\0PATH=/bin\0".to_vec();
        let read_at = |offset: u64, buf: &mut [u8]| {
            let rest = whole.get(offset as usize..).unwrap_or_default();
            let n = rest.len().min(buf.len());
            buf[..n].copy_from_slice(&rest[..n]);
            n
        };
        // Cut in the middle of LD_PRELOAD.
        let mut kept = whole[..12].to_vec();
        let beyond = priority_envs_beyond(&mut kept, whole.len() as u64, read_at);
        assert_eq!(kept, b"A=1\0B=2\0");
        assert_eq!(beyond, [b"LD_PRELOAD=/x.so".to_vec(), b"PATH=/bin".to_vec()]);
    }

    #[test]
    fn a_script_s_interpreter_is_what_the_kernel_put_before_the_caller_s_arguments() {
        let v = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let entry = v(&["name", "one", "two words"]);
        assert_eq!(split_interpreter(entry.clone(), entry.clone()), (entry.clone(), vec![], true));
        let stack = v(&["/bin/sh", "-e", "./s.sh", "one", "two words"]);
        assert_eq!(split_interpreter(stack, entry.clone()), (entry.clone(), v(&["/bin/sh", "-e", "./s.sh"]), true));
        let no_args = v(&["/bin/sh", "./s.sh"]);
        assert_eq!(split_interpreter(no_args, vec![]), (vec![], v(&["/bin/sh", "./s.sh"]), true));
        let rewritten = v(&["name", "one", "other"]);
        assert_eq!(split_interpreter(rewritten.clone(), entry), (rewritten, vec![], false));
    }

    #[test]
    fn nul_separated_lists_split_without_a_trailing_empty_entry() {
        assert_eq!(split_nul(b"a\0bc\0").collect::<Vec<_>>(), vec![b"a".as_slice(), b"bc"]);
        assert_eq!(split_nul(b"").count(), 0);
        assert_eq!(split_nul(b"a\0\0b\0").count(), 3);
    }
}
