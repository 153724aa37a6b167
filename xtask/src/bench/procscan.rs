//! W9: what the /proc scan costs with 1,000 processes outside the traced
//! tree. The tracer's scan thread counts its own CPU time (`--stats`): the
//! first scan, which reads the details of every process present, apart from
//! the steady state (one `stat` read per process), measured with the
//! process connector turned off (`CWS_INSTRUMENTATION_PROC_CONNECTOR=off`).
//! Against it, a walk as Datadog's scanner makes on every tick (section 4
//! of the reference: the create time of every process, and its parent chain
//! up to pid 1, read again for each process), timed here in the same way.
//! Then, where the kernel grants the tracer the connector (root in the
//! initial namespaces), what following it costs: the scan thread's CPU
//! beyond its first listing while 1,000 processes start and end outside
//! the tree (other processes of the machine starting meanwhile count too).

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{bare, parse_stats};

/// Turns the connector off for the listing's measurement.
const CONNECTOR_ENV: (&str, &str) = ("CWS_INSTRUMENTATION_PROC_CONNECTOR", "off");
/// What the tracer says when it follows the connector.
const CONNECTOR_LINE: &str = "processes outside the traced tree: as the kernel's process connector reports them";
/// Longest the connector's measurement waits for the tracer to report what it must.
const DEADLINE: Duration = Duration::from_secs(120);

pub struct ScanCost {
    pub processes: usize,
    pub scans: u64,
    pub first_scan: Duration,
    /// CPU per scan after the first.
    pub steady_scan: Duration,
    /// CPU of one Datadog-style walk.
    pub full_walk: Duration,
    /// CPU spent following the connector for `processes` processes started
    /// and ended (None: the kernel does not grant it here).
    pub connector: Option<Duration>,
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
            .env(CONNECTOR_ENV.0, CONNECTOR_ENV.1)
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
        connector: connector_cost(tracer, processes)?,
    })
}

/// The pids of the processes the tracer's events file reports, found
/// (exec) and gone (exit).
fn reported(events: &Path) -> (HashSet<u32>, HashSet<u32>) {
    let text = std::fs::read_to_string(events).unwrap_or_default();
    let (mut found, mut gone) = (HashSet::new(), HashSet::new());
    for event in text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
        let pid = event["pid"].as_u64().unwrap_or(0) as u32;
        if event["exec"]["from_procfs"] == true {
            found.insert(pid);
        } else if event["exit"].is_object() {
            gone.insert(pid);
        }
    }
    (found, gone)
}

/// Waits until the tracer reported every one of `pids` in `reports`.
fn wait_for(events: &Path, pids: &HashSet<u32>, reports: fn(&Path) -> HashSet<u32>) -> Result<(), String> {
    let started = Instant::now();
    while !pids.is_subset(&reports(events)) {
        if started.elapsed() > DEADLINE {
            return Err("the tracer did not report every process started".to_owned());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The scan thread's CPU beyond its first listing while `processes`
/// processes start and end; None where the kernel refuses the connector.
fn connector_cost(tracer: &str, processes: usize) -> Result<Option<Duration>, String> {
    let dir = std::env::temp_dir().join(format!("cws-bench-connector-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let events = dir.join("events.jsonl");
    let mut traced = bare(Command::new(tracer).args(["trace", "--stats", "--probe-addr", ""]))
        .arg("--events-file")
        .arg(&events)
        // No listing but the first: what follows is the connector's.
        .args(["--proc-scan-rate", "1h", "--", "sh", "-c", "read line"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run the tracer: {e}"))?;
    let mut stderr = BufReader::new(traced.stderr.take().expect("piped"));
    let mut line = String::new();
    let granted = loop {
        line.clear();
        if stderr.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            break false;
        }
        if line.contains("processes outside the traced tree: ") {
            break line.contains(CONNECTOR_LINE);
        }
    };
    let measured = if granted { follow(&events, processes) } else { Ok(()) };
    drop(traced.stdin.take());
    let mut rest = String::new();
    let _ = stderr.read_to_string(&mut rest);
    let _ = traced.wait();
    let _ = std::fs::remove_dir_all(&dir);
    measured?;
    if !granted {
        return Ok(None);
    }
    let stats = parse_stats(&rest);
    let stat = |name: &str| stats.get(name).copied().ok_or_else(|| format!("no {name} in the tracer's stats"));
    let (total, first) = (stat("proc_scan_cpu_us")?, stat("proc_scan_first_cpu_us")?);
    Ok(Some(Duration::from_micros(total - first)))
}

/// Starts and ends `processes` sleepers, each reported by the tracer.
fn follow(events: &Path, processes: usize) -> Result<(), String> {
    // Reported once the first listing is over: what comes after is the connector's.
    let marker = Sleepers(vec![Command::new("sleep").arg("600").spawn().map_err(|e| e.to_string())?]);
    wait_for(events, &marker.0.iter().map(Child::id).collect(), |e| reported(e).0)?;
    let mut sleepers = Sleepers(Vec::with_capacity(processes));
    for _ in 0..processes {
        let child = Command::new("sleep").arg("600").stdin(Stdio::null()).spawn().map_err(|e| e.to_string())?;
        sleepers.0.push(child);
    }
    let pids: HashSet<u32> = sleepers.0.iter().map(Child::id).collect();
    wait_for(events, &pids, |e| reported(e).0)?;
    drop(sleepers);
    wait_for(events, &pids, |e| reported(e).1)?;
    drop(marker);
    Ok(())
}

pub fn report(cost: &ScanCost) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let connector = match cost.connector {
        Some(cpu) => format!(
            "; the process connector: {:.2} ms per 1,000 processes started and ended",
            ms(cpu) * 1000.0 / cost.processes as f64
        ),
        None => "; the process connector: not granted here".to_owned(),
    };
    format!(
        "W9 /proc scan, {} processes outside the tree: first scan {:.2} ms CPU, then {:.2} ms per scan ({} scans); a Datadog-style walk: {:.2} ms per tick{connector}",
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
        "connector_cpu_ms_per_1000_processes":
            cost.connector.map(|cpu| cpu.as_secs_f64() * 1e3 * 1000.0 / cost.processes as f64),
    })
}
