//! `cargo xtask bench [--quick] [--runs N]`: what tracing costs a workload,
//! measured side by side in one run: native, strace with and without its
//! seccomp filter, and this tracer offline, exporting to a local `serve`,
//! and with `--disable-seccomp`.
//!
//! Wall times are medians and minimums over N runs after one warm-up run;
//! ratios are against native measured in the same run (the machines are
//! shared and noisy). The tracer's own counters (`--stats`) give the ptrace
//! stops, events, drops and its peak RSS. A table goes to stdout and JSON to
//! `target/bench/results.json`.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The syscalls every traced configuration watches: this tracer's table.
const SET: &str = "execve,execveat,open,openat,openat2,creat,socket,connect,close,close_range,dup,dup2,dup3,fcntl,chdir,fchdir,unshare,clone,clone3";

const GETPID: &str = r#"#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int c, char **v) { long n = atol(v[1]); for (long i = 0; i < n; i++) syscall(SYS_getpid); return 0; }
"#;
const OPENCLOSE: &str = r#"#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>
int main(int c, char **v) { long n = atol(v[1]); for (long i = 0; i < n; i++) close(open("/etc/hostname", O_RDONLY)); return 0; }
"#;
const CONNECT: &str = r#"#include <arpa/inet.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int c, char **v) {
    long n = atol(v[2]);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(v[1]))};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    for (long i = 0; i < n; i++) { int fd = socket(AF_INET, SOCK_STREAM, 0); connect(fd, (void *)&sa, sizeof sa); close(fd); }
    return 0;
}
"#;
const CPU: &str = r#"#include <stdio.h>
#include <stdlib.h>
int main(int c, char **v) { long n = atol(v[1]); unsigned long x = 1; for (long i = 0; i < n; i++) x = x * 6364136223846793005UL + 1442695040888963407UL; printf("%lu\n", x); return 0; }
"#;
const THREADS: &str = r#"#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>
static volatile long hits;
static void on_signal(int s) { (void)s; hits++; }
static void *spin(void *a) { volatile long x = 0; for (long i = 0; i < (long)a; i++) x += i; return NULL; }
int main(int c, char **v) {
    long signals = atol(v[1]);
    signal(SIGUSR1, on_signal);
    pthread_t t[16];
    for (int i = 0; i < 16; i++) pthread_create(&t[i], NULL, spin, (void *)20000000L);
    for (long i = 0; i < signals; i++) kill(getpid(), SIGUSR1);
    for (int i = 0; i < 16; i++) pthread_join(t[i], NULL);
    return hits > 0 ? 0 : 1;
}
"#;

struct Sizes {
    getpid: u64,
    openclose: u64,
    execs: u64,
    connects: u64,
    cpu: u64,
    signals: u64,
    find_root: &'static str,
    c_files: usize,
}

const FULL: Sizes = Sizes {
    getpid: 1_000_000,
    openclose: 200_000,
    execs: 500,
    connects: 10_000,
    cpu: 400_000_000,
    signals: 10_000,
    find_root: "/usr",
    c_files: 24,
};
/// Small enough that --quick, full-ptrace configurations included,
/// finishes within about three minutes on two cores.
const QUICK: Sizes = Sizes {
    getpid: 30_000,
    openclose: 2_000,
    execs: 50,
    connects: 500,
    cpu: 100_000_000,
    signals: 500,
    find_root: "/usr/include/linux",
    c_files: 4,
};

struct Measurement {
    workload: &'static str,
    config: &'static str,
    median: Duration,
    min: Duration,
    ratio: f64,
    stats: Option<String>,
}

fn compile(dir: &Path, name: &str, source: &str) -> Result<PathBuf, String> {
    let src = dir.join(format!("{name}.c"));
    let out = dir.join(name);
    std::fs::write(&src, source).map_err(|e| e.to_string())?;
    crate::run(Command::new("cc").args(["-O2", "-pthread", "-o"]).arg(&out).arg(&src))?;
    Ok(out)
}

/// A make project of `files` C files, rebuilt from scratch by each run.
fn build_project(dir: &Path, files: usize) -> Result<PathBuf, String> {
    let project = dir.join("project");
    std::fs::create_dir_all(&project).map_err(|e| e.to_string())?;
    let mut objects = String::new();
    for i in 0..files {
        let body = format!(
            "#include <stdio.h>\n#include <string.h>\nint f{i}(int x) {{ char b[64]; snprintf(b, sizeof b, \"%d\", x); return (int)strlen(b) + {i}; }}\n"
        );
        std::fs::write(project.join(format!("f{i}.c")), body).map_err(|e| e.to_string())?;
        let _ = write!(objects, " f{i}.o");
    }
    let makefile = format!("all:{objects}\n%.o: %.c\n\tcc -O2 -c $< -o $@\n");
    std::fs::write(project.join("Makefile"), makefile).map_err(|e| e.to_string())?;
    Ok(project)
}

fn time_once(argv: &[String]) -> Result<(Duration, String), String> {
    let started = Instant::now();
    // A bare environment: what a container entrypoint gets, not cargo's
    // (its LD_LIBRARY_PATH alone multiplies the opens of every program).
    let output = Command::new(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
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
    let stats =
        stderr.lines().find(|l| l.contains("stats: ")).map(|l| l.split("stats: ").nth(1).unwrap_or("").to_owned());
    Ok((elapsed, stats.unwrap_or_default()))
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn json_escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

pub fn bench(args: &[String]) -> Result<(), String> {
    let quick = args.iter().any(|a| a == "--quick");
    let runs: usize = match args.iter().position(|a| a == "--runs") {
        Some(i) => args.get(i + 1).and_then(|n| n.parse().ok()).ok_or("--runs takes a number")?,
        None if quick => 2,
        None => 10,
    };
    let sizes = if quick { QUICK } else { FULL };
    let tracer = crate::dist()?;
    let tracer = tracer.display().to_string();
    if Command::new("strace").arg("-V").output().is_err() {
        return Err("strace is needed for the comparison: apt-get install -y strace".into());
    }
    let dir = crate::root().join("target/bench");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let getpid = compile(&dir, "getpid", GETPID)?;
    let openclose = compile(&dir, "openclose", OPENCLOSE)?;
    let connect = compile(&dir, "connect", CONNECT)?;
    let cpu = compile(&dir, "cpu", CPU)?;
    let threads = compile(&dir, "threads", THREADS)?;
    let project = build_project(&dir, sizes.c_files)?;

    // A loopback listener for W3 that accepts and closes.
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    // A local agent that writes to /dev/null.
    let mut serve = Command::new(&tracer)
        .args(["serve", "--listen", "127.0.0.1:0", "--output", "/dev/null"])
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut log = BufReader::new(serve.stderr.take().ok_or("no serve stderr")?);
    let mut line = String::new();
    log.read_line(&mut line).map_err(|e| e.to_string())?;
    let agent = line.trim().rsplit(' ').next().unwrap_or("").to_owned();
    std::thread::spawn(move || for _ in log.lines() {});

    let s = |v: &str| v.to_owned();
    let p = |v: &Path| v.display().to_string();
    let make = format!("make -s -B -j2 -C {}", project.display());
    let workloads: Vec<(&'static str, Vec<String>)> = vec![
        ("W0a getpid (untraced)", vec![p(&getpid), sizes.getpid.to_string()]),
        ("W0b openat+close", vec![p(&openclose), sizes.openclose.to_string()]),
        (
            "W1 exec loop",
            vec![s("sh"), s("-c"), format!("i=0; while [ $i -lt {} ]; do /bin/true; i=$((i+1)); done", sizes.execs)],
        ),
        ("W2 find", vec![s("find"), s(sizes.find_root), s("-type"), s("f")]),
        ("W3 connects", vec![p(&connect), port.to_string(), sizes.connects.to_string()]),
        ("W4 cpu", vec![p(&cpu), sizes.cpu.to_string()]),
        ("W5 make -j2", vec![s("sh"), s("-c"), make]),
        ("W6 16 threads + signals", vec![p(&threads), sizes.signals.to_string()]),
    ];
    let strace_seccomp =
        vec![s("strace"), s("-f"), s("-qq"), s("--seccomp-bpf"), s("-o"), s("/dev/null"), format!("-e trace={SET}")];
    let strace_full = vec![s("strace"), s("-f"), s("-qq"), s("-o"), s("/dev/null"), format!("-e trace={SET}")];
    let ours = vec![tracer.clone(), s("trace"), s("--probe-addr"), s(""), s("--stats"), s("--")];
    let ours_grpc = vec![tracer.clone(), s("trace"), s("--probe-addr"), agent, s("--stats"), s("--")];
    let ours_full =
        vec![tracer.clone(), s("trace"), s("--probe-addr"), s(""), s("--disable-seccomp"), s("--stats"), s("--")];
    let configs: Vec<(&'static str, Vec<String>)> = vec![
        ("native", vec![]),
        ("strace --seccomp-bpf", strace_seccomp),
        ("strace", strace_full),
        ("ours", ours),
        ("ours + gRPC", ours_grpc),
        ("ours --disable-seccomp", ours_full),
    ];

    let mut results = Vec::new();
    for (workload, argv) in &workloads {
        let mut native = None;
        for (config, prefix) in &configs {
            let full: Vec<String> = prefix.iter().cloned().chain(argv.iter().cloned()).collect();
            let full: Vec<String> = full
                .iter()
                .flat_map(|a| {
                    // strace's "-e trace=…" was kept as one string for readability.
                    if let Some(set) = a.strip_prefix("-e ") {
                        vec![s("-e"), s(set)]
                    } else {
                        vec![a.clone()]
                    }
                })
                .collect();
            time_once(&full)?; // warm-up
            let mut times = Vec::with_capacity(runs);
            let mut stats = String::new();
            for _ in 0..runs {
                let (elapsed, run_stats) = time_once(&full)?;
                times.push(elapsed);
                stats = run_stats;
            }
            let min = *times.iter().min().unwrap_or(&Duration::ZERO);
            let median = median(&mut times);
            let base = *native.get_or_insert(median);
            let ratio = median.as_secs_f64() / base.as_secs_f64().max(1e-9);
            let stats = (!stats.is_empty()).then_some(stats);
            println!(
                "{workload:<26} {config:<24} median {:>9.1} ms  min {:>9.1} ms  x{ratio:<6.2} {}",
                median.as_secs_f64() * 1e3,
                min.as_secs_f64() * 1e3,
                stats.as_deref().unwrap_or("")
            );
            results.push(Measurement { workload, config, median, min, ratio, stats });
        }
    }
    let _ = serve.kill();
    let _ = serve.wait();

    let mut json = String::from("{\n  \"runs\": ");
    let _ = write!(json, "{runs},\n  \"quick\": {quick},\n  \"results\": [\n");
    for (i, m) in results.iter().enumerate() {
        let _ = writeln!(
            json,
            "    {{\"workload\": \"{}\", \"config\": \"{}\", \"median_ms\": {:.3}, \"min_ms\": {:.3}, \"ratio_to_native\": {:.4}, \"stats\": {}}}{}",
            json_escape(m.workload),
            json_escape(m.config),
            m.median.as_secs_f64() * 1e3,
            m.min.as_secs_f64() * 1e3,
            m.ratio,
            m.stats.as_ref().map_or_else(|| "null".to_owned(), |s| format!("\"{}\"", json_escape(s))),
            if i + 1 < results.len() { "," } else { "" }
        );
    }
    json.push_str("  ]\n}\n");
    let out = dir.join("results.json");
    std::fs::write(&out, json).map_err(|e| e.to_string())?;
    println!("results: {}", out.display());
    Ok(())
}
