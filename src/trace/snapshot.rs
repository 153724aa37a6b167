//! A running process as /proc describes it: what attach mode and the /proc
//! scan report for processes they find rather than see start. Everything
//! here is read from files the process controls in part (its argv and
//! environment): bounded as exec events are.

use std::time::SystemTime;

use nix::unistd::Pid;

use crate::proto::{self, event::Payload, Event};
use crate::trace::decode::{bound_args, bound_envs, split_nul};
use crate::trace::procfs;
use crate::trace::procstat::{start_time, stat, tty_name};

/// How much of the argument strings, and of the environment, is read.
const STRINGS_MAX: usize = 256 * 1024;

/// Which kind of finding an exec event reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// A process the tracer attached to (`--pid`), or a descendant of it.
    AtAttach,
    /// A process outside the traced tree, found by the /proc scan.
    ByScan,
}

/// The exec event of a running process, from /proc. None when it is gone
/// (or is a kernel thread: no executable).
pub fn exec_event(pid: Pid, found: Found) -> Option<Event> {
    let stat = stat(pid)?;
    let executable = procfs::exe(pid)?;
    let cmdline = procfs::read_bounded(&format!("/proc/{pid}/cmdline"), STRINGS_MAX);
    let environ = procfs::read_bounded(&format!("/proc/{pid}/environ"), STRINGS_MAX);
    let status = procfs::status(pid);
    let cwd = procfs::cwd(pid);
    let partial = cmdline.is_none() || environ.is_none() || status.is_none() || cwd.is_none();
    let (cmdline, cmdline_cut) = cmdline.unwrap_or_default();
    let (environ, environ_cut) = environ.unwrap_or_default();
    let (args, args_truncated) = bound_args(split_nul(&cmdline), cmdline_cut);
    let (envs, envs_truncated) = bound_envs(split_nul(&environ), environ_cut);
    let file = procfs::exe_file(pid);
    let exec = proto::ExecEvent {
        path: executable.clone(),
        args,
        args_truncated,
        envs,
        envs_truncated,
        cwd: cwd.unwrap_or_default(),
        credentials: status.map(|s| s.credentials),
        executable,
        seen_at_attach: found == Found::AtAttach,
        from_procfs: found == Found::ByScan,
        tty: tty_name(stat.tty_nr),
        interpreter: Vec::new(),
        device: file.map_or(0, |f| f.device),
        inode: file.map_or(0, |f| f.inode),
        mount_id: file.and_then(|f| f.mount_id),
        ..Default::default()
    };
    let time = start_time(stat.start_ticks).unwrap_or_else(SystemTime::now);
    Some(Event {
        pid: pid.as_raw() as u32,
        tid: pid.as_raw() as u32,
        ppid: stat.ppid as u32,
        timestamp: Some(proto::timestamp(time)),
        partial,
        payload: Some(Payload::Exec(exec)),
        ..Event::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tracer_s_own_snapshot_is_its_own_process() {
        let me = Pid::this();
        let event = exec_event(me, Found::AtAttach).unwrap();
        let Some(Payload::Exec(exec)) = &event.payload else { panic!("not an exec") };
        assert_eq!(exec.executable, std::env::current_exe().unwrap().to_string_lossy());
        assert_eq!(event.ppid, nix::unistd::getppid().as_raw() as u32);
        assert!(exec.seen_at_attach && !exec.from_procfs);
        let started = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(event.timestamp.unwrap().seconds as u64);
        assert!(started <= SystemTime::now());
    }
}
