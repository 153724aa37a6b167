//! The bench's output: one row per measurement, the targets of issues 5 and
//! 16 with what was measured against each, and the JSON document.

use std::collections::BTreeMap;

use serde_json::json;

use super::ingest::Load;
use super::Measurement;

/// The tracer's peak RSS goal, in KiB.
const RSS_LIMIT_KIB: u64 = 16 * 1024;
/// `serve` ingest goal on a 2-core machine, events per second.
const INGEST_GOAL: f64 = 500_000.0;
/// Largest mean encoded event, bytes.
const EVENT_SIZE_GOAL: f64 = 300.0;

pub fn row(m: &Measurement) -> String {
    let stats: Vec<String> = m.stats.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k}={v}")).collect();
    let p99 = m.p99_ms.map(|p| format!(" p99 {p:.2} ms")).unwrap_or_default();
    let rate = m.stops_per_second.map(|r| format!(" {r:.0} stops/s")).unwrap_or_default();
    let cost = m
        .tracer_syscalls_per_stop
        .map(|c| format!(" {c:.2} tracer syscalls/stop or supervised call"))
        .unwrap_or_default();
    let scaled = m.scaled.map(|c| format!(" (ran {} of {}, times scaled)", c.full_ptrace, c.n)).unwrap_or_default();
    format!(
        "{:<26} {:<24} median {:>9.1} ms  min {:>9.1} ms  x{:<6.3}{scaled}{p99}{rate}{cost} {}",
        m.workload,
        m.config,
        m.median.as_secs_f64() * 1e3,
        m.min.as_secs_f64() * 1e3,
        m.ratio,
        stats.join(" ")
    )
}

/// A goal, what was measured, and whether the goal is met.
pub struct Target {
    pub goal: String,
    pub measured: String,
    pub met: bool,
}

fn find<'a>(results: &'a [Measurement], workload: &str, config: &str) -> Option<&'a Measurement> {
    results.iter().find(|m| m.workload == workload && m.config == config)
}

fn workloads(results: &[Measurement]) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = results.iter().map(|m| m.workload).collect();
    names.dedup();
    names
}

fn ours_of<'a>(results: &'a [Measurement], id: &'a str) -> impl Iterator<Item = &'a Measurement> + 'a {
    results.iter().filter(move |m| super::id(m.workload) == id && m.config == "ours")
}

/// Issue 16: ours against strace --seccomp-bpf (same syscall set, same run)
/// where ptrace costs the most, native speed where little stops, and
/// throughput kept on real servers. Each with the workload it is about.
fn issue_16(results: &[Measurement]) -> Vec<(&'static str, Target)> {
    let mut targets = Vec::new();
    for (id, limit) in [("W1", 0.8), ("W2", 0.8), ("W0b", 0.6)] {
        for ours in ours_of(results, id) {
            let Some(strace) = find(results, ours.workload, "strace --seccomp-bpf") else { continue };
            let ratio = ours.median.as_secs_f64() / strace.median.as_secs_f64().max(1e-9);
            targets.push((
                ours.workload,
                Target {
                    goal: format!("{}: ours <= x{limit:.1} strace --seccomp-bpf", ours.workload),
                    measured: format!("x{ratio:.3}"),
                    met: ratio <= limit,
                },
            ));
        }
    }
    for ours in ours_of(results, "W4") {
        targets.push((
            ours.workload,
            Target {
                goal: format!("{}: ours within x1.01 of native", ours.workload),
                measured: format!("x{:.3}", ours.ratio),
                met: ours.ratio <= 1.01,
            },
        ));
    }
    // A fixed amount of work (W7: requests; W8: transactions, over
    // pgbench's TPS): throughput is the inverse of time.
    for (id, floor, what) in [("W7", 0.97, "throughput"), ("W8", 0.98, "TPS")] {
        for ours in ours_of(results, id) {
            let kept = 1.0 / ours.ratio;
            targets.push((
                ours.workload,
                Target {
                    goal: format!("{}: ours {what} >= {floor:.2} of native", ours.workload),
                    measured: format!("{kept:.3}"),
                    met: kept >= floor,
                },
            ));
        }
    }
    targets
}

pub fn targets(results: &[Measurement], ingest: &[Load]) -> Vec<Target> {
    let mut targets: Vec<Target> = issue_16(results).into_iter().map(|(_, target)| target).collect();
    for workload in workloads(results) {
        if let (Some(ours), Some(strace)) =
            (find(results, workload, "ours"), find(results, workload, "strace --seccomp-bpf"))
        {
            targets.push(Target {
                goal: format!("{workload}: ours <= strace --seccomp-bpf"),
                measured: format!("x{:.3} vs x{:.3}", ours.ratio, strace.ratio),
                met: ours.median <= strace.median,
            });
        }
    }
    for (id, limit) in [("W0a", 1.01), ("W1", 1.15), ("W5", 1.05)] {
        if let Some(ours) = ours_of(results, id).next() {
            targets.push(Target {
                goal: format!("{}: ours within x{limit:.2} of native", ours.workload),
                measured: format!("x{:.3}", ours.ratio),
                met: ours.ratio <= limit,
            });
        }
    }
    for workload in workloads(results) {
        if let (Some(grpc), Some(offline)) = (find(results, workload, "ours + gRPC"), find(results, workload, "ours")) {
            let ratio = grpc.median.as_secs_f64() / offline.median.as_secs_f64().max(1e-9);
            targets.push(Target {
                goal: format!("{workload}: gRPC within x1.10 of offline"),
                measured: format!("x{ratio:.3}"),
                met: ratio <= 1.10,
            });
        }
    }
    let rss = results.iter().filter_map(|m| m.stats.get("peak_rss_kib").map(|kib| (*kib, m))).max_by_key(|(k, _)| *k);
    if let Some((kib, m)) = rss {
        targets.push(Target {
            goal: format!("tracer peak RSS <= {} MiB", RSS_LIMIT_KIB / 1024),
            measured: format!("{:.1} MiB ({}, {})", kib as f64 / 1024.0, m.workload, m.config),
            met: kib <= RSS_LIMIT_KIB,
        });
    }
    if let Some(best) = ingest.iter().max_by(|a, b| a.events_per_second.total_cmp(&b.events_per_second)) {
        targets.push(Target {
            goal: format!("serve ingests >= {INGEST_GOAL:.0} events/s"),
            measured: format!("{:.0} events/s ({} streams)", best.events_per_second, best.streams),
            met: best.events_per_second >= INGEST_GOAL,
        });
        targets.push(Target {
            goal: format!("mean encoded event < {EVENT_SIZE_GOAL:.0} bytes"),
            measured: format!("{:.1} bytes", best.mean_event_bytes),
            met: best.mean_event_bytes < EVENT_SIZE_GOAL,
        });
    }
    targets
}

/// README's results table from this run: ratios of medians to native, the
/// tracer's stop rate and syscalls per stop, and issue 16's target.
pub fn markdown(results: &[Measurement]) -> String {
    let goals = issue_16(results);
    let ratio = |workload, config| find(results, workload, config).map_or(String::new(), |m| format!("{:.3}", m.ratio));
    let mut table = String::from(
        "| workload | strace --seccomp-bpf | ours | ours + gRPC | stops/s | tracer syscalls per stop or supervised call | issue 16 target: met (measured) |\n|---|---|---|---|---|---|---|\n",
    );
    for workload in workloads(results) {
        let ours = find(results, workload, "ours");
        let rate = ours.and_then(|m| m.stops_per_second).map_or(String::new(), |r| format!("{r:.0}"));
        let cost = ours.and_then(|m| m.tracer_syscalls_per_stop).map_or(String::new(), |c| format!("{c:.2}"));
        let goal = goals.iter().find(|(w, _)| *w == workload).map_or(String::new(), |(_, t)| {
            format!(
                "{}: {} ({})",
                t.goal.trim_start_matches(workload).trim_start_matches(": "),
                if t.met { "yes" } else { "no" },
                t.measured
            )
        });
        table += &format!(
            "| {workload} | {} | {} | {} | {rate} | {cost} | {goal} |\n",
            ratio(workload, "strace --seccomp-bpf"),
            ratio(workload, "ours"),
            ratio(workload, "ours + gRPC"),
        );
    }
    table
}

pub fn print_targets(targets: &[Target]) {
    println!("\n{:<60} {:<40} met", "target", "measured");
    for t in targets {
        println!("{:<60} {:<40} {}", t.goal, t.measured, if t.met { "yes" } else { "NO" });
    }
}

pub fn json(runs: usize, quick: bool, results: &[Measurement], ingest: &[Load], targets: &[Target]) -> String {
    let results: Vec<_> = results
        .iter()
        .map(|m| {
            json!({
                "workload": m.workload,
                "config": m.config,
                "scaled": m.scaled.map(|c| json!({ "ran": c.full_ptrace, "of": c.n })),
                "median_ms": m.median.as_secs_f64() * 1e3,
                "min_ms": m.min.as_secs_f64() * 1e3,
                "ratio_to_native": m.ratio,
                "p99_ms": m.p99_ms,
                "stops_per_second": m.stops_per_second,
                "tracer_syscalls_per_stop": m.tracer_syscalls_per_stop,
                "stops": super::stop_count(&m.stats),
                "stats": m.stats,
            })
        })
        .collect();
    let ingest: Vec<_> = ingest.iter().map(|l| l.report.clone()).collect();
    let targets: Vec<_> =
        targets.iter().map(|t| json!({ "goal": t.goal, "measured": t.measured, "met": t.met })).collect();
    let document = json!({ "runs": runs, "quick": quick, "results": results, "ingest": ingest, "targets": targets });
    serde_json::to_string_pretty(&document).unwrap_or_default() + "\n"
}

/// Each workload's stops per run under `ours` against a reference
/// results.json's (its stats' `*_stops`, so that files written before the
/// `stops` field compare too): a watched call added where a workload makes
/// none shows as more stops.
pub fn stops_against(results: &[Measurement], reference: &serde_json::Value) -> Vec<String> {
    let before = |workload: &str| {
        let entries = reference["results"].as_array()?;
        let entry = entries.iter().find(|e| e["workload"] == workload && e["config"] == "ours")?;
        let stats: BTreeMap<String, u64> = serde_json::from_value(entry["stats"].clone()).ok()?;
        super::stop_count(&stats)
    };
    results
        .iter()
        .filter(|m| m.config == "ours")
        .filter_map(|m| Some((m, super::stop_count(&m.stats)?)))
        .map(|(m, now)| match before(m.workload) {
            Some(then) => {
                let verdict = match now.cmp(&then) {
                    std::cmp::Ordering::Less => "fewer",
                    std::cmp::Ordering::Equal => "unchanged",
                    std::cmp::Ordering::Greater => "MORE",
                };
                format!("{:<26} {now:>10} (reference {then}): {verdict}", m.workload)
            }
            None => format!("{:<26} {now:>10} (not in the reference)", m.workload),
        })
        .collect()
}
