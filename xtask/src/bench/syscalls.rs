//! The tracer thread's own syscalls in a run: perf counts the kernel's
//! `raw_syscalls:sys_enter` tracepoint, filtered to tasks named
//! `cws-tracer` (the tracer thread; the workload's first process too,
//! for its few calls before its exec). The count is exact and costs the
//! run a little, so it comes from a run of its own, not timed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn output(dir: &Path) -> PathBuf {
    dir.join("tracer-syscalls.csv")
}

/// `ours` prefixed with perf, or None when perf cannot count the
/// tracepoint here (not installed, no permission, no tracefs).
pub fn counting_prefix(dir: &Path, ours: &[String]) -> Option<Vec<String>> {
    let probe = Command::new("perf")
        .args(["stat", "-e", "raw_syscalls:sys_enter", "--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        return None;
    }
    let mut prefix: Vec<String> =
        ["perf", "stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "--filter"].map(str::to_owned).to_vec();
    prefix.push("comm == \"cws-tracer\"".to_owned());
    prefix.push("-o".to_owned());
    prefix.push(output(dir).display().to_string());
    prefix.push("--".to_owned());
    prefix.extend(ours.iter().cloned());
    Some(prefix)
}

/// The count of the last counted run (`N,,raw_syscalls:sys_enter,…`).
pub fn count(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(output(dir)).ok()?;
    text.lines().find(|l| l.contains("raw_syscalls:sys_enter"))?.split(',').next()?.parse().ok()
}
