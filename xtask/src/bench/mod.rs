//! `cargo xtask bench [--quick] [--runs N]`: what tracing costs a workload,
//! measured side by side in one run: native, strace with and without its
//! seccomp filter, and this tracer offline (events encoded to /dev/null),
//! exporting to a local `serve`, and with `--disable-seccomp`. Then how fast
//! `serve` ingests events from a load generator.
//!
//! Wall times are medians and minimums over N runs after one warm-up run,
//! the configurations taking turns;
//! ratios are against native measured in the same run (the machines are
//! shared and noisy). The tracer's own counters (`--stats`) give the ptrace
//! stops, events, drops and its peak RSS. A table goes to stdout, then the
//! targets of issue 5 with what was measured against each, and JSON to
//! `TARGET_DIR/bench/results.json` (cargo's target directory). Last, W8: the
//! /proc scan's CPU per scan with 1,000 processes present (`--only-procscan`
//! runs only that).
//!
//! `--only W0b,W0c,W1` runs only the workloads whose names start so (no
//! ingest, no W8), and `--tracer PATH` measures that binary instead of
//! building the static one: a quick look at what one change costs. Where
//! `perf` works, each command workload also gets the tracer's own syscalls
//! per ptrace stop (a traced run's count less a native one's).

mod ingest;
mod procscan;
mod programs;
mod redis;
mod report;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use programs::{compile, Sizes};

/// The syscalls every traced configuration watches: this tracer's table
/// (but fchmodat2, which Debian 12's strace does not know).
const SET: &str = "execve,execveat,open,openat,openat2,creat,open_by_handle_at,connect,bind,accept,accept4,chdir,fchdir,io_uring_setup,unlink,unlinkat,rmdir,rename,renameat,renameat2,mkdir,mkdirat,link,linkat,symlink,symlinkat,chmod,fchmod,fchmodat,chown,lchown,fchown,fchownat,setuid,setgid,setreuid,setregid,setresuid,setresgid,setfsuid,setfsgid,capset,unshare,clone,clone3";

/// One workload under one configuration.
pub struct Measurement {
    pub workload: &'static str,
    pub config: &'static str,
    pub median: Duration,
    pub min: Duration,
    /// Median wall time over native's median, from the same run.
    pub ratio: f64,
    /// The tracer's `--stats` counters (ours only).
    pub stats: BTreeMap<String, u64>,
    /// W7: the worst p99 latency of SET and GET, in ms (median over runs).
    pub p99_ms: Option<f64>,
}

/// One timed run.
pub struct Run {
    elapsed: Duration,
    stats: BTreeMap<String, u64>,
    p99_ms: Option<f64>,
}

/// What a workload runs under each configuration's prefix.
enum Workload {
    Command(Vec<String>),
    /// W7: a Redis server under the prefix, loaded by redis-benchmark.
    Redis,
}

/// A bare environment: what a container entrypoint gets, not cargo's (its
/// LD_LIBRARY_PATH alone multiplies the opens of every program).
fn bare(command: &mut Command) -> &mut Command {
    command.env_clear().env("PATH", "/usr/local/bin:/usr/bin:/bin")
}

/// The counters of the tracer's `stats: name=N …` line.
fn parse_stats(stderr: &str) -> BTreeMap<String, u64> {
    let Some(line) = stderr.lines().find_map(|l| l.split_once("stats: ").map(|(_, s)| s)) else {
        return BTreeMap::new();
    };
    line.split(' ')
        .filter_map(|pair| pair.split_once('='))
        .filter_map(|(name, value)| Some((name.to_owned(), value.parse().ok()?)))
        .collect()
}

fn time_once(argv: &[String]) -> Result<Run, String> {
    let started = Instant::now();
    let output = bare(Command::new(&argv[0]).args(&argv[1..]))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!("{argv:?} failed ({}): {}", output.status, stderr.trim()));
    }
    Ok(Run { elapsed, stats: parse_stats(&stderr), p99_ms: None })
}

/// The syscalls `argv` and everything it starts make (perf's count of
/// raw_syscalls:sys_enter); None without a usable perf.
fn count_syscalls(argv: &[String]) -> Option<u64> {
    let output = bare(Command::new("perf").args(["stat", "-x,", "-e", "raw_syscalls:sys_enter", "--"]).args(argv))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .ok()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stderr.lines().find(|l| l.contains("raw_syscalls:sys_enter"))?;
    line.split(',').next()?.trim().parse().ok()
}

/// The tracer's own syscalls per ptrace stop: the traced run's syscalls
/// less the native run's, over the stops `--stats` counted. What the
/// tracer does at each stop, in a number that the machine's noise does not
/// move (wall times do).
fn tracer_syscalls_per_stop(native: &[String], traced: &[String]) -> Option<(f64, u64, u64)> {
    let run = time_once(traced).ok()?;
    let stops: u64 = run.stats.iter().filter(|(k, _)| k.ends_with("_stops")).map(|(_, v)| v).sum();
    let tracer = count_syscalls(traced)?.checked_sub(count_syscalls(native)?)?;
    (stops > 0).then(|| (tracer as f64 / stops as f64, tracer, stops))
}

fn median<T: PartialOrd + Copy>(values: &mut [T]) -> T {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    values[values.len() / 2]
}

/// A local `serve`: the agent of the gRPC configuration and of the ingest
/// benchmark.
pub struct Agent {
    child: Child,
    pub address: String,
}

impl Agent {
    pub fn start(tracer: &str, output: &Path) -> Result<Agent, String> {
        let mut child = Command::new(tracer)
            .args(["serve", "--listen", "127.0.0.1:0", "--output"])
            .arg(output)
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start serve: {e}"))?;
        let mut log = BufReader::new(child.stderr.take().ok_or("no serve stderr")?);
        let mut line = String::new();
        log.read_line(&mut line).map_err(|e| e.to_string())?;
        // "…: listening on ADDR"
        let address = line.trim().rsplit(' ').next().unwrap_or("").to_owned();
        std::thread::spawn(move || for _ in log.lines() {});
        Ok(Agent { child, address })
    }

    /// SIGTERM, as an orchestrator stops a sidecar: it drains and exits 0.
    pub fn stop(mut self) -> Result<(), String> {
        crate::run(Command::new("kill").args(["-TERM", &self.child.id().to_string()]))?;
        let status = self.child.wait().map_err(|e| e.to_string())?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("serve exited with {status} after SIGTERM"))
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn arguments(args: &[String]) -> Result<(bool, usize), String> {
    let quick = args.iter().any(|a| a == "--quick");
    let runs = match args.iter().position(|a| a == "--runs") {
        Some(i) => args.get(i + 1).and_then(|n| n.parse().ok()).filter(|&n| n > 0).ok_or("--runs takes a number")?,
        None if quick => 2,
        None => 10,
    };
    Ok((quick, runs))
}

/// The value of `--NAME VALUE`, if given.
fn option<'a>(args: &'a [String], name: &str) -> Result<Option<&'a str>, String> {
    match args.iter().position(|a| a == name) {
        Some(i) => args.get(i + 1).map(|v| Some(v.as_str())).ok_or(format!("{name} takes a value")),
        None => Ok(None),
    }
}

/// The programs the workloads need, with the Debian package to install.
fn check_tools(redis: bool) -> Result<(), String> {
    let mut tools = vec![("strace", "strace")];
    if redis {
        tools.extend([
            ("redis-server", "redis-server"),
            ("redis-benchmark", "redis-tools"),
            ("redis-cli", "redis-tools"),
        ]);
    }
    for (program, package) in tools {
        if Command::new(program).arg("--version").output().is_err() {
            return Err(format!("{program} is needed: apt-get install -y {package}"));
        }
    }
    Ok(())
}

/// Processes present for W8, the /proc scan's cost.
const SCAN_PROCESSES: usize = 1000;

fn bench_procscan(tracer: &str, dir: &Path) -> Result<(), String> {
    let cost = procscan::measure(tracer, SCAN_PROCESSES)?;
    println!("{}", procscan::report(&cost));
    let out = dir.join("procscan.json");
    std::fs::write(&out, procscan::json(&cost).to_string()).map_err(|e| e.to_string())?;
    println!("results: {}", out.display());
    Ok(())
}

pub fn bench(args: &[String]) -> Result<(), String> {
    let (quick, runs) = arguments(args)?;
    if args.iter().any(|a| a == "--only-procscan") {
        let dir = crate::target_subdir("bench")?;
        return bench_procscan(&crate::dist()?.display().to_string(), &dir);
    }
    let sizes: Sizes = if quick { programs::QUICK } else { programs::FULL };
    let only: Option<Vec<&str>> = option(args, "--only")?.map(|list| list.split(',').collect());
    let chosen = |name: &str| only.as_ref().is_none_or(|prefixes| prefixes.iter().any(|p| name.starts_with(p)));
    check_tools(chosen("W7"))?;
    let tracer = match option(args, "--tracer")? {
        Some(path) => path.to_owned(),
        None => crate::dist()?.display().to_string(),
    };
    let dir = crate::target_subdir("bench")?;
    let getpid = compile(&dir, "getpid", programs::GETPID)?;
    let openclose = compile(&dir, "openclose", programs::OPENCLOSE)?;
    let connect = compile(&dir, "connect", programs::CONNECT)?;
    let cpu = compile(&dir, "cpu", programs::CPU)?;
    let threads = compile(&dir, "threads", programs::THREADS)?;
    let project = programs::build_project(&dir, sizes.c_files)?;

    let agent = Agent::start(&tracer, Path::new("/dev/null"))?;

    let s = |v: &str| v.to_owned();
    let p = |v: &Path| v.display().to_string();
    let command = |argv: Vec<String>| Workload::Command(argv);
    let make = format!("make -s -B -j2 -C {}", project.display());
    let workloads: Vec<(&'static str, Workload)> = vec![
        ("W0a getpid (untraced)", command(vec![p(&getpid), sizes.getpid.to_string()])),
        ("W0b openat+close", command(vec![p(&openclose), sizes.openclose.to_string()])),
        // W0b with an idle second thread: the cost of checking each open's
        // descriptor where another task could swap it (W0c / W0b, ours).
        ("W0c openat+close, 2 threads", command(vec![p(&openclose), sizes.openclose.to_string(), s("threaded")])),
        (
            "W1 exec loop",
            command(vec![
                s("sh"),
                s("-c"),
                format!("i=0; while [ $i -lt {} ]; do /bin/true; i=$((i+1)); done", sizes.execs),
            ]),
        ),
        ("W2 find", command(vec![s("find"), s(sizes.find_root), s("-type"), s("f")])),
        ("W3 connects", command(vec![p(&connect), sizes.connects.to_string()])),
        ("W4 cpu", command(vec![p(&cpu), sizes.cpu.to_string()])),
        ("W5 make -j2", command(vec![s("sh"), s("-c"), make])),
        ("W6 16 threads + signals", command(vec![p(&threads), sizes.signals.to_string()])),
        ("W7 redis SET+GET", Workload::Redis),
    ];
    let trace_set = format!("trace={SET}");
    let strace = |filter: bool| {
        let mut argv = vec![s("strace"), s("-f"), s("-qq")];
        if filter {
            argv.push(s("--seccomp-bpf"));
        }
        argv.extend([s("-o"), s("/dev/null"), s("-e"), trace_set.clone()]);
        argv
    };
    let ours = |extra: &[&str]| {
        let mut argv = vec![tracer.clone(), s("trace"), s("--stats")];
        argv.extend(extra.iter().map(|a| s(a)));
        argv.push(s("--"));
        argv
    };
    let configs: Vec<(&'static str, Vec<String>)> = vec![
        ("native", vec![]),
        ("strace --seccomp-bpf", strace(true)),
        ("strace", strace(false)),
        ("ours", ours(&["--probe-addr", "", "--events-file", "/dev/null"])),
        ("ours + gRPC", ours(&["--probe-addr", &agent.address])),
        ("ours --disable-seccomp", ours(&["--probe-addr", "", "--events-file", "/dev/null", "--disable-seccomp"])),
    ];

    let mut results = Vec::new();
    for (workload, what) in workloads.iter().filter(|(name, _)| chosen(name)) {
        let once = |prefix: &[String]| match what {
            Workload::Command(argv) => time_once(&[prefix, argv.as_slice()].concat()),
            Workload::Redis => redis::run_once(prefix, sizes.redis_requests),
        };
        for (_, prefix) in &configs {
            once(prefix)?; // warm-up
        }
        // Round-robin over the configurations, so that a noisy spell of the
        // machine spreads over all of them rather than landing on one.
        let mut runs_of: Vec<Vec<Run>> = configs.iter().map(|_| Vec::with_capacity(runs)).collect();
        for _ in 0..runs {
            for ((_, prefix), done) in configs.iter().zip(&mut runs_of) {
                done.push(once(prefix)?);
            }
        }
        let mut native = None;
        for ((config, _), done) in configs.iter().zip(runs_of) {
            let mut times: Vec<Duration> = done.iter().map(|r| r.elapsed).collect();
            let mut p99s: Vec<f64> = done.iter().filter_map(|r| r.p99_ms).collect();
            let min = *times.iter().min().unwrap_or(&Duration::ZERO);
            let median_time = median(&mut times);
            let base = *native.get_or_insert(median_time);
            let measurement = Measurement {
                workload,
                config,
                median: median_time,
                min,
                ratio: median_time.as_secs_f64() / base.as_secs_f64().max(1e-9),
                stats: done.into_iter().last().map(|r| r.stats).unwrap_or_default(),
                p99_ms: (!p99s.is_empty()).then(|| median(&mut p99s)),
            };
            println!("{}", report::row(&measurement));
            results.push(measurement);
        }
        if let (Workload::Command(argv), Some((_, ours))) = (what, configs.iter().find(|(c, _)| *c == "ours")) {
            let traced = [ours.as_slice(), argv.as_slice()].concat();
            if let Some((per_stop, tracer, stops)) = tracer_syscalls_per_stop(argv, &traced) {
                println!(
                    "{workload:<27} tracer syscalls per stop (ours, perf): {per_stop:.2} ({tracer} in {stops} stops)"
                );
            }
        }
    }
    agent.stop()?;
    if only.is_some() {
        return Ok(());
    }

    let ingest = ingest::measure(&tracer, &dir, &project, sizes.ingest_events)?;
    let targets = report::targets(&results, &ingest);
    report::print_targets(&targets);
    let out = dir.join("results.json");
    let json = report::json(runs, quick, &results, &ingest, &targets);
    std::fs::write(&out, json).map_err(|e| e.to_string())?;
    println!("results: {}", out.display());
    bench_procscan(&tracer, &dir)
}
