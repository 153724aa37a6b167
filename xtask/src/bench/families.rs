//! W10, not timed: the ptrace stops and events each family of issue 11's
//! calls adds where a workload makes them. One program makes one call of
//! the family per iteration; the tracer's `--stats` of a run of N
//! iterations, less those of a run of none (the program's start and end),
//! over N, are the family's stops and events per call. The `unwatched`
//! family makes the calls of the same syscalls that the filter lets run
//! (getters, ordinary socket options, a send without destination): its
//! stops per call should be 0.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;

use super::programs::compile;

/// The id `--only` takes.
pub const ID: &str = "W10";

const SOURCE: &str = r#"#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>
int main(int c, char **v) {
    if (c < 4) return 2;
    const char *family = v[1];
    long n = atol(v[2]);
    char path[4096];
    snprintf(path, sizeof path, "%s/file", v[3]);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    struct sockaddr_in to = {.sin_family = AF_INET};
    to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof to;
    int rx = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    int udp = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    int connected = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(rx, (void *)&to, sizeof to) || getsockname(rx, (void *)&to, &len)) return 1;
    if (connect(connected, (void *)&to, sizeof to)) return 1;
    pid_t other = fork();
    if (other == 0) {
        for (;;) pause();
    }
    gid_t groups[1] = {getgid()};
    struct rlimit limit;
    getrlimit(RLIMIT_NOFILE, &limit);
    int mark = 1, size = 65536;
    char name[16], byte;
    struct iovec iov = {"x", 1};
    struct msghdr plain = {.msg_iov = &iov, .msg_iovlen = 1};
    for (long i = 0; i < n; i++) {
        if (!strcmp(family, "utimensat")) utimensat(AT_FDCWD, path, NULL, 0);
        else if (!strcmp(family, "ftruncate")) ftruncate(fd, 0);
        else if (!strcmp(family, "setxattr")) fsetxattr(fd, "user.cws", "1", 1, 0);
        else if (!strcmp(family, "mknod")) mknod(path, S_IFIFO | 0600, 0); /* EEXIST: reported too */
        else if (!strcmp(family, "memfd_create")) close(memfd_create("cws", MFD_CLOEXEC));
        else if (!strcmp(family, "setgroups")) setgroups(1, groups);
        else if (!strcmp(family, "prctl")) prctl(PR_SET_NAME, "cws-bench");
        else if (!strcmp(family, "setrlimit")) setrlimit(RLIMIT_NOFILE, &limit);
        else if (!strcmp(family, "setsockopt")) setsockopt(udp, SOL_SOCKET, SO_MARK, &mark, sizeof mark);
        else if (!strcmp(family, "raw_socket")) close(socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_ICMP));
        else if (!strcmp(family, "kill")) kill(other, SIGCONT);
        else if (!strcmp(family, "sendto")) {
            sendto(udp, "x", 1, 0, (void *)&to, sizeof to);
            recv(rx, &byte, 1, MSG_DONTWAIT);
        } else if (!strcmp(family, "sendmsg_connected")) { /* no destination: no event, but a stop */
            sendmsg(connected, &plain, 0);
            recv(rx, &byte, 1, MSG_DONTWAIT);
        } else if (!strcmp(family, "unwatched")) {
            prctl(PR_GET_NAME, name);
            setsockopt(udp, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
            send(connected, "x", 1, 0);
            recv(rx, &byte, 1, MSG_DONTWAIT);
            prlimit(0, RLIMIT_NOFILE, NULL, &limit);
            kill(other, 0);
            close(socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
        } else if (strcmp(family, "none")) return 2;
    }
    kill(other, SIGKILL);
    waitpid(other, NULL, 0);
    unlink(path);
    return 0;
}
"#;

/// The families, in the order they are reported.
const FAMILIES: &[&str] = &[
    "utimensat",
    "ftruncate",
    "setxattr",
    "mknod",
    "memfd_create",
    "setgroups",
    "prctl",
    "setrlimit",
    "setsockopt",
    "raw_socket",
    "kill",
    "sendto",
    "sendmsg_connected",
    "unwatched",
];

/// A family's cost per call.
pub struct Cost {
    pub family: &'static str,
    pub stops_per_call: f64,
    pub events_per_call: f64,
}

/// The stops and events of one traced run of `family` (the program's
/// `none` family: its start and end only).
fn counted(tracer: &str, program: &Path, family: &str, calls: u64, dir: &Path) -> Result<(u64, u64), String> {
    let argv = [
        tracer.to_owned(),
        "trace".to_owned(),
        "--stats".to_owned(),
        "--probe-addr".to_owned(),
        String::new(),
        "--events-file".to_owned(),
        "/dev/null".to_owned(),
        "--".to_owned(),
        program.display().to_string(),
        family.to_owned(),
        calls.to_string(),
        dir.display().to_string(),
    ];
    let run = super::time_once(&argv)?;
    let stops = super::stop_count(&run.stats).ok_or("the tracer printed no --stats line")?;
    Ok((stops, run.stats.get("events").copied().unwrap_or(0)))
}

pub fn measure(tracer: &str, dir: &Path, calls: u64) -> Result<Vec<Cost>, String> {
    let program = compile(dir, "families", SOURCE)?;
    let scratch = scratch_dir(dir)?;
    let (base_stops, base_events) = counted(tracer, &program, "none", calls, &scratch)?;
    let per_call = |total: u64, base: u64| (total as f64 - base as f64) / calls as f64;
    let mut costs = Vec::new();
    for &family in FAMILIES {
        let (stops, events) = counted(tracer, &program, family, calls, &scratch)?;
        costs.push(Cost {
            family,
            stops_per_call: per_call(stops, base_stops),
            events_per_call: per_call(events, base_events),
        });
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(costs)
}

/// A directory of its own for the program's file (xattrs need a file
/// system that takes `user.*` ones: the target directory's, not /tmp's
/// tmpfs on every kernel).
fn scratch_dir(dir: &Path) -> Result<std::path::PathBuf, String> {
    let scratch = dir.join("families-scratch");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
    Ok(scratch)
}

pub fn report(costs: &[Cost], calls: u64) -> String {
    let mut out = format!("\n{ID}: stops and events per call of each family ({calls} calls, less a run of none)\n");
    out += &format!("{:<20} {:>14} {:>15}\n", "family", "stops/call", "events/call");
    for c in costs {
        out += &format!("{:<20} {:>14.2} {:>15.2}\n", c.family, c.stops_per_call, c.events_per_call);
    }
    out
}

pub fn json(costs: &[Cost], calls: u64) -> serde_json::Value {
    let families: BTreeMap<&str, serde_json::Value> = costs
        .iter()
        .map(|c| (c.family, json!({ "stops_per_call": c.stops_per_call, "events_per_call": c.events_per_call })))
        .collect();
    json!({ "calls": calls, "families": families })
}
