//! `cargo xtask bench [--quick] [--runs N] [--only W1,W8] [--tracer PATH]`: what tracing costs a workload,
//! measured side by side in one run: native, strace with and without its
//! seccomp filter, and this tracer offline (events encoded to /dev/null),
//! exporting to a local `serve`, and with `--disable-seccomp`. Then how fast
//! `serve` ingests events from a load generator.
//!
//! The two full-ptrace configurations (strace without its filter, ours
//! with `--disable-seccomp`) stop at every syscall: they run fewer of a
//! loop's iterations (`programs::Count`), their times scaled to the whole
//! count, and not W2, whose unwatched calls W0a already prices.
//!
//! Wall times are medians and minimums over N runs after one warm-up run,
//! the configurations taking turns;
//! ratios are against native measured in the same run (the machines are
//! shared and noisy). The tracer's own counters (`--stats`) give the ptrace
//! stops, events, drops and its peak RSS; one more run of `ours`, not
//! timed, counts the tracer thread's own syscalls (perf's syscall
//! tracepoint, filtered to the `cws-tracer` thread), so that each workload
//! shows its stops per second and the tracer's syscalls per stop. A table
//! goes to stdout, then the targets of issues 5 and 16 with what was
//! measured against each, and JSON to `TARGET_DIR/bench/results.json`
//! (cargo's target directory). Last, W9: the /proc scan's CPU per scan with
//! 1,000 processes present, and the process connector's per 1,000
//! processes started (`--only-procscan` runs only that; `--only-ingest`
//! the ingest alone). W10, not timed:
//! the stops and events per call of each family of issue 11's calls
//! (`families`). `--only` runs only the workloads named (by their ids, W10
//! among them), without the ingest and /proc scan parts.
//! `--stops-reference PATH` compares each workload's stops under `ours`
//! with those of an earlier run's results.json.

mod families;
mod ingest;
mod postgres;
mod procscan;
mod programs;
mod redis;
mod report;
mod syscalls;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use programs::{compile, Count, Sizes};

/// The syscalls every traced configuration watches: this tracer's table
/// (but fchmodat2, which Debian 12's strace does not know).
const SET: &str = "execve,execveat,open,openat,openat2,creat,open_by_handle_at,connect,bind,accept,accept4,chdir,fchdir,io_uring_setup,unlink,unlinkat,rmdir,rename,renameat,renameat2,mkdir,mkdirat,link,linkat,symlink,symlinkat,chmod,fchmod,fchmodat,chown,lchown,fchown,fchownat,setuid,setgid,setreuid,setregid,setresuid,setresgid,setfsuid,setfsgid,capset,unshare,clone,clone3";

/// One workload under one configuration.
pub struct Measurement {
    pub workload: &'static str,
    pub config: &'static str,
    /// Of the whole count, where the configuration ran fewer iterations
    /// (`Count::full_ptrace`): `median` and `min` are scaled to it.
    pub scaled: Option<Count>,
    pub median: Duration,
    pub min: Duration,
    /// Median wall time over native's median, from the same run.
    pub ratio: f64,
    /// The tracer's `--stats` counters (ours only).
    pub stats: BTreeMap<String, u64>,
    /// W7: the worst p99 latency of SET and GET, in ms (median over runs).
    pub p99_ms: Option<f64>,
    /// Ptrace stops (`--stats`) over the median wall time (the tracer's configurations).
    pub stops_per_second: Option<f64>,
    /// The tracer thread's syscalls per stop, from the counted run (`ours` only).
    pub tracer_syscalls_per_stop: Option<f64>,
}

/// One timed run.
pub struct Run {
    elapsed: Duration,
    stats: BTreeMap<String, u64>,
    p99_ms: Option<f64>,
}

/// What a workload runs under each configuration's prefix.
enum Workload {
    /// A program run to its end, under the full-ptrace configurations too
    /// where `full_ptrace`.
    Command { argv: Vec<String>, full_ptrace: bool },
    /// A program that loops as many times as its last argument says.
    Loop(Vec<String>, Count),
    /// W7: a Redis server under the prefix, loaded by redis-benchmark with
    /// this many requests of each kind.
    Redis(Count),
    /// W8: a PostgreSQL server under the prefix, loaded by pgbench with this
    /// many transactions per client.
    Postgres(postgres::Mix, Count),
}

impl Workload {
    /// Its iterations, where its time is proportional to them.
    fn count(&self) -> Option<Count> {
        match self {
            Workload::Command { .. } => None,
            Workload::Loop(_, count) | Workload::Redis(count) | Workload::Postgres(_, count) => Some(*count),
        }
    }

    /// Whether `config` runs it at all.
    fn runs_under(&self, config: &Config) -> bool {
        !config.full_ptrace || !matches!(self, Workload::Command { full_ptrace: false, .. })
    }

    /// One run under `prefix`, of the iterations a full-ptrace
    /// configuration runs or of the whole count.
    fn run_once(
        &self,
        prefix: &[String],
        full_ptrace: bool,
        cluster: Option<&postgres::Cluster>,
    ) -> Result<Run, String> {
        match self {
            Workload::Command { argv, .. } => time_once(&[prefix, argv.as_slice()].concat()),
            Workload::Loop(argv, count) => {
                time_once(&[prefix, argv.as_slice(), &[count.under(full_ptrace).to_string()]].concat())
            }
            Workload::Redis(count) => redis::run_once(prefix, count.under(full_ptrace)),
            Workload::Postgres(mix, count) => {
                postgres::run_once(prefix, cluster.ok_or("no cluster")?, *mix, count.under(full_ptrace))
            }
        }
    }
}

/// A configuration: how it prefixes a workload, and whether it stops the
/// workload at every syscall (no seccomp filter).
struct Config {
    name: &'static str,
    prefix: Vec<String>,
    full_ptrace: bool,
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

struct Arguments {
    quick: bool,
    runs: usize,
    /// `--only W1,W8`: the ids of the workloads to run (all when None).
    only: Option<Vec<String>>,
    /// `--tracer PATH`: measure that binary instead of building the static one.
    tracer: Option<String>,
    /// `--stops-reference PATH`: an earlier results.json whose stops to compare with.
    stops_reference: Option<String>,
}

fn arguments(args: &[String]) -> Result<Arguments, String> {
    let quick = args.iter().any(|a| a == "--quick");
    let value = |flag: &str| args.iter().position(|a| a == flag).map(|i| args.get(i + 1));
    let runs = match value("--runs") {
        Some(n) => n.and_then(|n| n.parse().ok()).filter(|&n| n > 0).ok_or("--runs takes a number")?,
        None if quick => 2,
        None => 10,
    };
    let only = match value("--only") {
        Some(ids) => {
            Some(ids.ok_or("--only takes workload ids: --only W1,W8")?.split(',').map(str::to_owned).collect())
        }
        None => None,
    };
    let tracer = value("--tracer").map(|path| path.cloned().ok_or("--tracer takes a path")).transpose()?;
    let stops_reference =
        value("--stops-reference").map(|path| path.cloned().ok_or("--stops-reference takes a path")).transpose()?;
    Ok(Arguments { quick, runs, only, tracer, stops_reference })
}

/// A workload's id: the first word of its name (`W8`).
fn id(workload: &str) -> &str {
    workload.split(' ').next().unwrap_or(workload)
}

/// The programs the workloads need, with the Debian package to install
/// (PostgreSQL installs itself, see `postgres`).
fn check_tools(workloads: &[(&'static str, Workload)]) -> Result<(), String> {
    let redis = workloads.iter().any(|(_, w)| matches!(w, Workload::Redis(_)));
    let tools = [
        (true, "strace", "strace"),
        (redis, "redis-server", "redis-server"),
        (redis, "redis-benchmark", "redis-tools"),
        (redis, "redis-cli", "redis-tools"),
    ];
    for (_, program, package) in tools.into_iter().filter(|(needed, ..)| *needed) {
        if Command::new(program).arg("--version").output().is_err() {
            return Err(format!("{program} is needed: apt-get install -y {package}"));
        }
    }
    Ok(())
}

/// Processes present for W9, the /proc scan's cost.
const SCAN_PROCESSES: usize = 1000;

fn bench_procscan(tracer: &str, dir: &Path) -> Result<(), String> {
    let cost = procscan::measure(tracer, SCAN_PROCESSES)?;
    println!("{}", procscan::report(&cost));
    let out = dir.join("procscan.json");
    std::fs::write(&out, procscan::json(&cost).to_string()).map_err(|e| e.to_string())?;
    println!("results: {}", out.display());
    Ok(())
}

fn bench_families(tracer: &str, dir: &Path, quick: bool) -> Result<(), String> {
    let calls = if quick { 200 } else { 2_000 };
    let costs = families::measure(tracer, dir, calls)?;
    print!("{}", families::report(&costs, calls));
    let out = dir.join("families.json");
    std::fs::write(&out, families::json(&costs, calls).to_string()).map_err(|e| e.to_string())?;
    println!("results: {}", out.display());
    Ok(())
}

pub fn bench(args: &[String]) -> Result<(), String> {
    let Arguments { quick, runs, only, tracer, stops_reference } = arguments(args)?;
    if args.iter().any(|a| a == "--only-procscan") {
        let dir = crate::target_subdir("bench")?;
        return bench_procscan(&crate::dist()?.display().to_string(), &dir);
    }
    let sizes: Sizes = if quick { programs::QUICK } else { programs::FULL };
    let tracer = match tracer {
        Some(path) => path,
        None => crate::dist()?.display().to_string(),
    };
    let dir = crate::target_subdir("bench")?;
    if args.iter().any(|a| a == "--only-ingest") {
        let project = programs::build_project(&dir, sizes.c_files)?;
        return ingest::measure(&tracer, &dir, &project, sizes.ingest_events).map(drop);
    }
    let getpid = compile(&dir, "getpid", programs::GETPID)?;
    let openclose = compile(&dir, "openclose", programs::OPENCLOSE)?;
    let connect = compile(&dir, "connect", programs::CONNECT)?;
    let cpu = compile(&dir, "cpu", programs::CPU)?;
    let threads = compile(&dir, "threads", programs::THREADS)?;
    let project = programs::build_project(&dir, sizes.c_files)?;

    let agent = Agent::start(&tracer, Path::new("/dev/null"))?;

    let s = |v: &str| v.to_owned();
    let p = |v: &Path| v.display().to_string();
    let command = |argv: Vec<String>| Workload::Command { argv, full_ptrace: true };
    let make = format!("make -s -B -j2 -C {}", project.display());
    let workloads: Vec<(&'static str, Workload)> = vec![
        ("W0a getpid (untraced)", Workload::Loop(vec![p(&getpid)], sizes.getpid)),
        ("W0b openat+close", Workload::Loop(vec![p(&openclose)], sizes.openclose)),
        // What checking each open's descriptor costs where another task
        // could swap it (issue 9): W0b with an idle second thread.
        ("W0c openat+close, 2 threads", Workload::Loop(vec![p(&openclose), s("threaded")], sizes.openclose)),
        (
            "W1 exec loop",
            command(vec![
                s("sh"),
                s("-c"),
                format!("i=0; while [ $i -lt {} ]; do /bin/true; i=$((i+1)); done", sizes.execs),
            ]),
        ),
        (
            "W2 find",
            // Not under full ptrace: find's unwatched calls (fcntl, close,
            // fstat, getdents, 15 a directory) cost there what W0a's show
            // per call, and in /usr make 460,000 stops, 40 s a run.
            Workload::Command { argv: vec![s("find"), s(sizes.find_root), s("-type"), s("f")], full_ptrace: false },
        ),
        ("W3 connects", Workload::Loop(vec![p(&connect)], sizes.connects)),
        ("W4 cpu", command(vec![p(&cpu), sizes.cpu.to_string()])),
        ("W5 make -j2", command(vec![s("sh"), s("-c"), make])),
        // Its threads spin for a fixed time whatever the signals' count:
        // not a loop whose time scales with its count.
        ("W6 16 threads + signals", command(vec![p(&threads), sizes.signals.to_string()])),
        ("W7 redis SET+GET", Workload::Redis(sizes.redis_requests)),
        ("W8 postgres select-only", Workload::Postgres(postgres::Mix::SelectOnly, sizes.pgbench_select)),
        ("W8 postgres TPC-B", Workload::Postgres(postgres::Mix::TpcB, sizes.pgbench_tpcb)),
    ];
    let workloads: Vec<_> = match &only {
        Some(ids) => workloads.into_iter().filter(|(name, _)| ids.iter().any(|i| i == id(name))).collect(),
        None => workloads,
    };
    let families_wanted = !matches!(&only, Some(ids) if !ids.iter().any(|i| i == families::ID));
    if workloads.is_empty() && families_wanted {
        return bench_families(&tracer, &dir, quick);
    }
    if workloads.is_empty() {
        return Err(format!("--only {}: no such workload", only.unwrap_or_default().join(",")));
    }
    check_tools(&workloads)?;
    let cluster = match workloads.iter().any(|(_, w)| matches!(w, Workload::Postgres(..))) {
        true => Some(postgres::Cluster::create()?),
        false => None,
    };
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
    let config = |name, prefix, full_ptrace| Config { name, prefix, full_ptrace };
    let configs = [
        config("native", vec![], false),
        config("strace --seccomp-bpf", strace(true), false),
        config("strace", strace(false), true),
        config("ours", ours(&["--probe-addr", "", "--events-file", "/dev/null"]), false),
        config("ours + gRPC", ours(&["--probe-addr", &agent.address]), false),
        config(
            "ours --disable-seccomp",
            ours(&["--probe-addr", "", "--events-file", "/dev/null", "--disable-seccomp"]),
            true,
        ),
    ];

    let ours_prefix = &configs.iter().find(|c| c.name == "ours").ok_or("no ours configuration")?.prefix;
    let mut results = Vec::new();
    for (workload, what) in &workloads {
        let once = |config: &Config| what.run_once(&config.prefix, config.full_ptrace, cluster.as_ref());
        let configs: Vec<&Config> = configs.iter().filter(|c| what.runs_under(c)).collect();
        for config in &configs {
            once(config)?; // warm-up
        }
        // Round-robin over the configurations, so that a noisy spell of the
        // machine spreads over all of them rather than landing on one.
        let mut runs_of: Vec<Vec<Run>> = configs.iter().map(|_| Vec::with_capacity(runs)).collect();
        for _ in 0..runs {
            for (config, done) in configs.iter().zip(&mut runs_of) {
                done.push(once(config)?);
            }
        }
        // Not timed: the tracer thread's syscalls, counted by the kernel.
        let counted = syscalls::counting_prefix(&dir, ours_prefix);
        let tracer_syscalls = counted
            .and_then(|prefix| Some((what.run_once(&prefix, false, cluster.as_ref()).ok()?, syscalls::count(&dir)?)));
        let mut native = None;
        for (config, done) in configs.iter().zip(runs_of) {
            // A full-ptrace run of fewer iterations stands for the whole count.
            let scaled = what.count().filter(|count| count.under(config.full_ptrace) < count.n);
            let scale = scaled.map_or(1.0, |count| count.n as f64 / count.full_ptrace.max(1) as f64);
            let mut times: Vec<Duration> = done.iter().map(|r| r.elapsed).collect();
            let mut p99s: Vec<f64> = done.iter().filter_map(|r| r.p99_ms).collect();
            let min = *times.iter().min().unwrap_or(&Duration::ZERO);
            let run_time = median(&mut times);
            let median_time = run_time.mul_f64(scale);
            let base = *native.get_or_insert(median_time);
            let stats = done.into_iter().last().map(|r| r.stats).unwrap_or_default();
            let stops = stop_count(&stats);
            let measurement = Measurement {
                workload,
                config: config.name,
                scaled,
                median: median_time,
                min: min.mul_f64(scale),
                ratio: median_time.as_secs_f64() / base.as_secs_f64().max(1e-9),
                // Over the time of the iterations run, whose stops these are.
                stops_per_second: stops.map(|n| n as f64 / run_time.as_secs_f64().max(1e-9)),
                tracer_syscalls_per_stop: tracer_syscalls
                    .as_ref()
                    .filter(|_| config.name == "ours")
                    .and_then(|(run, count)| Some(*count as f64 / tracer_wakes(&run.stats)?.max(1) as f64)),
                stats,
                p99_ms: (!p99s.is_empty()).then(|| median(&mut p99s)),
            };
            println!("{}", report::row(&measurement));
            results.push(measurement);
        }
    }
    agent.stop()?;
    drop(cluster);

    let ingest = match only {
        Some(_) => Vec::new(),
        None => ingest::measure(&tracer, &dir, &project, sizes.ingest_events)?,
    };
    let targets = report::targets(&results, &ingest);
    report::print_targets(&targets);
    println!("\n{}", report::markdown(&results));
    let out = dir.join("results.json");
    let json = report::json(runs, quick, &results, &ingest, &targets);
    std::fs::write(&out, json).map_err(|e| e.to_string())?;
    println!("results: {}", out.display());
    if let Some(path) = stops_reference {
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        let reference = serde_json::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
        println!("\nstops per run under ours, against {path}");
        for line in report::stops_against(&results, &reference) {
            println!("{line}");
        }
    }
    if families_wanted {
        bench_families(&tracer, &dir, quick)?;
    }
    match only {
        Some(_) => Ok(()),
        None => bench_procscan(&tracer, &dir),
    }
}

/// What wakes the tracer thread: its ptrace stops and the opens it
/// performed itself (each a notification it serves), None without stats.
fn tracer_wakes(stats: &BTreeMap<String, u64>) -> Option<u64> {
    Some(stop_count(stats)? + stats.get("supervised_calls").copied().unwrap_or(0))
}

/// The ptrace stops of a `--stats` line (None without one: not ours).
fn stop_count(stats: &BTreeMap<String, u64>) -> Option<u64> {
    let stops: Vec<u64> = stats.iter().filter(|(name, _)| name.ends_with("_stops")).map(|(_, n)| *n).collect();
    (!stops.is_empty()).then(|| stops.iter().sum())
}
