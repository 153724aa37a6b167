//! What the /proc scan costs with 1,000 processes outside the traced
//! tree. The tracer's scan thread counts its own CPU time (`--stats`): the
//! first scan, which reads the details of every process present, apart from
//! the steady state (one `stat` read per process). Against it, a walk as
//! Datadog's scanner makes on every tick (section 4 of the reference: the
//! create time of every process, and its parent chain up to pid 1, read
//! again for each process), timed here in the same way.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{bare, parse_stats};

pub struct ScanCost {
    pub processes: usize,
    pub scans: u64,
    pub first_scan: Duration,
    /// CPU per scan after the first.
    pub steady_scan: Duration,
    /// CPU of one Datadog-style walk.
    pub full_walk: Duration,
}

/// The calling thread's CPU time (schedstat's first field, nanoseconds).
fn thread_cpu_time() -> Duration {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    Duration::from_nanos(text.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0))
}

fn ppid_and_start(pid: u32) -> Option<(u32, u64)> {
    let stat = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    let end = stat.iter().rposition(|&b| b == b')')?;
    let fields: Vec<&str> = std::str::from_utf8(&stat[end + 1..]).ok()?.split_whitespace().collect();
    Some((fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

/// One walk as Datadog's scanner makes it, every tick.
fn datadog_style_walk() -> usize {
    let pids: Vec<u32> = std::fs::read_dir("/proc")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    let mut reads = 0;
    for &pid in &pids {
        let mut current = pid;
        // Its create time, then each parent's until pid 1.
        for _ in 0..64 {
            reads += 1;
            match ppid_and_start(current) {
                Some((ppid, _)) if ppid > 1 => current = ppid,
                _ => break,
            }
        }
    }
    reads
}

struct Sleepers(Vec<Child>);

impl Drop for Sleepers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn measure(tracer: &str, processes: usize) -> Result<ScanCost, String> {
    let mut sleepers = Sleepers(Vec::with_capacity(processes));
    for _ in 0..processes {
        let child = Command::new("sleep").arg("600").stdin(Stdio::null()).spawn().map_err(|e| e.to_string())?;
        sleepers.0.push(child);
    }
    // 2 s of start delay, then about 20 scans.
    let output =
        bare(Command::new(tracer).args(["trace", "--stats", "--probe-addr", "", "--events-file", "/dev/null"]))
            .args(["--proc-scan-rate", "100ms", "--", "sleep", "4"])
            .output()
            .map_err(|e| format!("cannot run the tracer: {e}"))?;
    let stats = parse_stats(&String::from_utf8_lossy(&output.stderr));
    let stat = |name: &str| stats.get(name).copied().ok_or_else(|| format!("no {name} in the tracer's stats"));
    let (scans, total, first) = (stat("proc_scans")?, stat("proc_scan_cpu_us")?, stat("proc_scan_first_cpu_us")?);
    if scans < 2 {
        return Err(format!("the tracer scanned {scans} times"));
    }
    let walks = 5;
    let before = thread_cpu_time();
    for _ in 0..walks {
        datadog_style_walk();
    }
    let full_walk = thread_cpu_time().saturating_sub(before) / walks;
    drop(sleepers);
    Ok(ScanCost {
        processes,
        scans,
        first_scan: Duration::from_micros(first),
        steady_scan: Duration::from_micros((total - first) / (scans - 1)),
        full_walk,
    })
}

pub fn report(cost: &ScanCost) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "/proc scan, {} processes outside the tree: first scan {:.2} ms CPU, then {:.2} ms per scan ({} scans); a Datadog-style walk: {:.2} ms per tick",
        cost.processes,
        ms(cost.first_scan),
        ms(cost.steady_scan),
        cost.scans,
        ms(cost.full_walk)
    )
}

pub fn json(cost: &ScanCost) -> serde_json::Value {
    serde_json::json!({
        "processes": cost.processes,
        "scans": cost.scans,
        "first_scan_cpu_ms": cost.first_scan.as_secs_f64() * 1e3,
        "steady_scan_cpu_ms": cost.steady_scan.as_secs_f64() * 1e3,
        "datadog_style_walk_cpu_ms": cost.full_walk.as_secs_f64() * 1e3,
    })
}
