//! What /proc/PID/stat says of a process: its state, parent, terminal and
//! start time. Read for processes found running (attach mode, the /proc
//! scan) and for an exec's terminal.

use std::time::{Duration, SystemTime};

use nix::unistd::Pid;

use crate::trace::procfs;

/// The fields of /proc/PID/stat the tracer needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// The state letter (`R`, `S`, `Z` for a zombie, ...).
    pub state: u8,
    pub ppid: i32,
    /// The controlling terminal's device number (0: none).
    pub tty_nr: u32,
    /// Clock ticks after boot: with the pid, it names a process (pids are reused).
    pub start_ticks: u64,
}

/// Parses /proc/PID/stat. The command name (field 2) is the process's own
/// and may hold spaces and parentheses: fields are counted after its last ')'.
pub fn parse_stat(text: &[u8]) -> Option<Stat> {
    let end = text.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&text[end + 1..]).ok()?;
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    // fields[0] is field 3 (state): ppid is field 4, tty_nr 7, starttime 22.
    Some(Stat {
        state: *fields.first()?.as_bytes().first()?,
        ppid: fields.get(1)?.parse().ok()?,
        tty_nr: fields.get(4)?.parse::<i64>().ok()? as u32,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

pub fn stat(pid: Pid) -> Option<Stat> {
    let (bytes, _) = procfs::read_record(&format!("/proc/{pid}/stat"), 1024)?;
    parse_stat(&bytes)
}

/// The unit of /proc's times: USER_HZ, 100 on x86_64 whatever the kernel's own tick.
const USER_HZ: u64 = 100;

/// When a process started, as wall-clock time: its start (in ticks after
/// boot) against the time since boot now.
pub fn start_time(start_ticks: u64) -> Option<SystemTime> {
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    let uptime: f64 = uptime.split_whitespace().next()?.parse().ok()?;
    let started_after_boot = Duration::from_secs_f64(start_ticks as f64 / USER_HZ as f64);
    let ago = Duration::from_secs_f64(uptime).checked_sub(started_after_boot).unwrap_or_default();
    SystemTime::now().checked_sub(ago)
}

/// The path of a terminal, from its device number: pseudo-terminals
/// (majors 136-143) by their devpts number, other devices by the name sysfs
/// gives them.
pub fn tty_name(tty_nr: u32) -> String {
    if tty_nr == 0 {
        return String::new();
    }
    let major = (tty_nr >> 8) & 0xfff;
    let minor = (tty_nr & 0xff) | ((tty_nr >> 12) & 0xfff00);
    if (136..=143).contains(&major) {
        return format!("/dev/pts/{}", (major - 136) * 256 + minor);
    }
    let uevent = std::fs::read_to_string(format!("/sys/dev/char/{major}:{minor}/uevent")).unwrap_or_default();
    match uevent.lines().find_map(|l| l.strip_prefix("DEVNAME=")) {
        Some(name) => format!("/dev/{name}"),
        None => format!("char device {major}:{minor}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let line = b"42 (a) b (c) d) S 7 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 1000 10 0\n";
        assert_eq!(parse_stat(line), Some(Stat { state: b'S', ppid: 7, tty_nr: 0, start_ticks: 123456 }));
        assert_eq!(parse_stat(b"42 (x) S"), None);
    }

    #[test]
    fn terminals_are_named_as_in_dev() {
        assert_eq!(tty_name(0), "");
        // makedev(136, 3) and makedev(137, 2): /dev/pts/3 and /dev/pts/258.
        assert_eq!(tty_name(136 << 8 | 3), "/dev/pts/3");
        assert_eq!(tty_name(137 << 8 | 2), "/dev/pts/258");
        // makedev(136, 300): the minor's high bits sit above the major.
        assert_eq!(tty_name(136 << 8 | (300 & 0xff) | (300 & !0xff) << 12), "/dev/pts/300");
    }
}
