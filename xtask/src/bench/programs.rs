//! The workloads' programs: C sources compiled by the harness, a generated
//! make project, and the sizes of each workload for a full or quick run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const GETPID: &str = r#"#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int c, char **v) { long n = atol(v[1]); for (long i = 0; i < n; i++) syscall(SYS_getpid); return 0; }
"#;
/// `openclose [threaded] N`: with `threaded`, an idle second thread shares
/// the descriptor table and memory: the tracer then checks each open's
/// descriptor (W0c). The count comes last, as for every `Loop` workload.
pub const OPENCLOSE: &str = r#"#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>
static void *idle(void *u) { (void)u; pause(); return NULL; }
int main(int c, char **v) {
    long n = atol(v[c - 1]);
    pthread_t t;
    if (c > 2) pthread_create(&t, NULL, idle, NULL);
    for (long i = 0; i < n; i++) close(open("/etc/hostname", O_RDONLY));
    return 0;
}
"#;
/// Connects to its own loopback listener and accepts each connection
/// itself, so the accept queue never overflows (an overflow costs a 1 s SYN
/// retransmission and made native runs the slowest).
pub const CONNECT: &str = r#"#include <arpa/inet.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int c, char **v) {
    long n = atol(v[1]);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof sa;
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    if (bind(listener, (void *)&sa, sizeof sa) || listen(listener, 16) || getsockname(listener, (void *)&sa, &len)) return 1;
    for (long i = 0; i < n; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(fd, (void *)&sa, sizeof sa)) return 1;
        close(accept(listener, NULL, NULL));
        close(fd);
    }
    return 0;
}
"#;
pub const CPU: &str = r#"#include <stdio.h>
#include <stdlib.h>
int main(int c, char **v) { long n = atol(v[1]); unsigned long x = 1; for (long i = 0; i < n; i++) x = x * 6364136223846793005UL + 1442695040888963407UL; printf("%lu\n", x); return 0; }
"#;
pub const THREADS: &str = r#"#include <pthread.h>
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

/// How many iterations (calls, connections, requests, transactions per
/// client) a workload makes, and how many of them the full-ptrace
/// configurations (`strace` without its filter, `ours --disable-seccomp`)
/// run: those stop at every syscall, 25 to 300 µs an iteration here, so
/// that the full count would take minutes a run. Their times are scaled to
/// `n` (time per iteration times `n`), which keeps their ratios to native
/// comparable with the other configurations'.
#[derive(Clone, Copy)]
pub struct Count {
    pub n: u64,
    pub full_ptrace: u64,
}

impl Count {
    /// The same count under every configuration.
    const fn all(n: u64) -> Count {
        Count { n, full_ptrace: n }
    }

    /// The iterations a configuration runs.
    pub fn under(self, full_ptrace: bool) -> u64 {
        if full_ptrace {
            self.full_ptrace
        } else {
            self.n
        }
    }
}

pub struct Sizes {
    pub getpid: Count,
    pub openclose: Count,
    pub execs: u64,
    pub connects: Count,
    pub cpu: u64,
    pub signals: u64,
    pub find_root: &'static str,
    pub c_files: usize,
    /// Requests of each kind (SET, GET) redis-benchmark sends in W7.
    pub redis_requests: Count,
    /// W8: transactions per pgbench client, select-only and TPC-B.
    pub pgbench_select: Count,
    pub pgbench_tpcb: Count,
    /// Events the ingest load generator sends to `serve` per stream count.
    pub ingest_events: u64,
}

/// Sized for a full run (10 runs of each configuration) in about 25
/// minutes on two vCPUs where a ptrace stop costs 60 to 90 µs (README,
/// "Benchmarks", has the estimate per workload): each traced loop is
/// thousands of iterations long, so that a tracer's start (15 ms) stays
/// under 1% of a run.
pub const FULL: Sizes = Sizes {
    getpid: Count { n: 1_000_000, full_ptrace: 10_000 },
    openclose: Count { n: 20_000, full_ptrace: 2_000 },
    execs: 500,
    connects: Count { n: 5_000, full_ptrace: 1_000 },
    cpu: 400_000_000,
    signals: 10_000,
    find_root: "/usr",
    c_files: 24,
    redis_requests: Count { n: 100_000, full_ptrace: 5_000 },
    pgbench_select: Count { n: 10_000, full_ptrace: 2_000 },
    pgbench_tpcb: Count { n: 1_000, full_ptrace: 250 },
    ingest_events: 2_000_000,
};
/// Small enough that --quick, full-ptrace configurations included,
/// finishes within about three minutes on two cores.
pub const QUICK: Sizes = Sizes {
    getpid: Count { n: 30_000, full_ptrace: 10_000 },
    openclose: Count::all(2_000),
    execs: 50,
    connects: Count::all(500),
    cpu: 100_000_000,
    signals: 500,
    find_root: "/usr/include/linux",
    c_files: 4,
    redis_requests: Count { n: 20_000, full_ptrace: 5_000 },
    pgbench_select: Count::all(5_000),
    pgbench_tpcb: Count::all(500),
    ingest_events: 500_000,
};

pub fn compile(dir: &Path, name: &str, source: &str) -> Result<PathBuf, String> {
    let src = dir.join(format!("{name}.c"));
    let out = dir.join(name);
    std::fs::write(&src, source).map_err(|e| e.to_string())?;
    crate::run(Command::new("cc").args(["-O2", "-pthread", "-o"]).arg(&out).arg(&src))?;
    Ok(out)
}

/// A make project of `files` C files, rebuilt from scratch by each run.
pub fn build_project(dir: &Path, files: usize) -> Result<PathBuf, String> {
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
