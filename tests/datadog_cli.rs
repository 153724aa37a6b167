//! Datadog's command line: `inject`, `spawn`, `trace selftests`, `--debug`
//! and the flags kept for compatibility, each against what the kernel shows.

mod common;

use std::os::fd::AsRawFd;
use std::process::Output;

use common::{binary, retval, Trace};

fn run(args: &[&str]) -> Output {
    common::command(binary()).args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Whether descriptor `fd`, which the tool inherits, is open in the shell
/// that `subcommand` runs in its place.
fn inherited_fd_open(subcommand: &[&str], fd: i32) -> String {
    use std::os::unix::process::CommandExt;
    let script = format!("if [ -e /proc/$$/fd/{fd} ]; then echo open; else echo closed; fi");
    let file = tempfile::tempfile().unwrap();
    let source = file.as_raw_fd();
    let mut command = common::command(binary());
    command.args(subcommand).args(["sh", "-c", &script]);
    // SAFETY: dup2 is async-signal-safe. It makes the inherited descriptor
    // in the child only (dup2 clears close-on-exec), so that no other
    // test's children inherit it.
    unsafe {
        command.pre_exec(move || match libc::dup2(source, fd) {
            -1 => Err(std::io::Error::last_os_error()),
            _ => Ok(()),
        });
    }
    let output = command.output().unwrap();
    drop(file);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    text(&output.stdout)
}

#[test]
fn spawn_closes_inherited_descriptors_above_2_and_inject_keeps_them() {
    assert_eq!(inherited_fd_open(&["inject", "--session-type", "k8s", "--"], 42), "open\n");
    assert_eq!(inherited_fd_open(&["spawn"], 42), "closed\n");
}

#[test]
fn inject_and_spawn_exec_in_place_with_argv_and_path_lookup() {
    for subcommand in [&["inject", "--session-type", "ssh", "--data", "session-1", "--"][..], &["spawn"]] {
        let mut args = subcommand.to_vec();
        args.extend(["sh", "-c", "echo $$ $0 $1", "zero", "--one"]);
        let child = common::command(binary()).args(&args).stdout(std::process::Stdio::piped()).spawn().unwrap();
        let pid = child.id();
        let output = child.wait_with_output().unwrap();
        // The same process: exec'd in place, not forked.
        assert_eq!((output.status.code(), text(&output.stdout)), (Some(0), format!("{pid} zero --one\n")));
    }
    let missing = run(&["spawn", "no-such-program-anywhere", "--help"]);
    assert_eq!(
        (missing.status.code(), text(&missing.stderr)),
        (Some(127), "cws-instrumentation: no-such-program-anywhere: command not found\n".to_owned())
    );
    let bad_type = run(&["inject", "--session-type", "telnet", "--", "true"]);
    assert_eq!(bad_type.status.code(), Some(2));
    // Too much data is reported, and the command still runs.
    let data = "x".repeat(1025);
    let long = run(&["inject", "--session-type", "k8s", "--data", &data, "--", "sh", "-c", "exit 3"]);
    assert_eq!(
        (long.status.code(), text(&long.stderr)),
        (
            Some(3),
            "cws-instrumentation: inject: --data is 1025 bytes, more than 1024; running the command anyway\n".into()
        )
    );
}

#[test]
fn selftests_exec_and_create_then_remove_a_file_as_the_tracer_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("open.test");
    let path_text = path.to_str().unwrap();
    let args = ["trace", "selftests", "--exec", "--exec.path", "/bin/echo", "--exec.args", "a  b", "--open"];
    let mut command: Vec<&str> = vec![binary()];
    command.extend(args);
    command.extend(["--open.path", path_text]);
    let run = Trace::new(&command).run();
    assert_eq!((run.code(), run.stdout.as_str()), (Some(0), "a b\n"), "{}", run.stderr);

    let exec = run.one("exec", "path", &common::real_path("/bin/echo"));
    assert_eq!(exec["exec"]["args"], serde_json::json!(["/bin/echo", "a", "b"]));
    let opens = run.opens_of(path_text);
    assert_eq!(opens.len(), 1, "{opens:#?}");
    let created = libc::O_RDONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC;
    assert_eq!(
        (opens[0]["open"]["flags"].as_i64(), opens[0]["open"]["mode"].as_i64()),
        (Some(created.into()), Some(0o400))
    );
    assert!(retval(opens[0]) >= 0);
    let unlink = run.one("file", "path", path_text);
    assert_eq!((unlink["file"]["operation"].as_str(), retval(unlink)), (Some("FILE_OPERATION_UNLINK"), 0));
    assert!(!path.exists());

    // An existing file is only opened, and stays.
    std::fs::write(&path, "kept").unwrap();
    let output = run_selftest_open(path_text);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "kept");
    let run = Trace::new(&[binary(), "trace", "selftests", "--open", "--open.path", path_text]).run();
    let opens = run.opens_of(path_text);
    let seen: Vec<(i64, i64)> = opens.iter().map(|o| (o["open"]["flags"].as_i64().unwrap(), retval(o))).collect();
    assert_eq!(seen.len(), 2, "{opens:#?}");
    assert_eq!(seen[0], (created.into(), -i64::from(libc::EEXIST)));
    assert_eq!(seen[1].0, i64::from(libc::O_RDONLY | libc::O_CLOEXEC));
    assert!(seen[1].1 >= 0);
    assert!(run.of("file").is_empty(), "{:#?}", run.of("file"));
}

fn run_selftest_open(path: &str) -> Output {
    run(&["trace", "selftests", "--open", "--open.path", path])
}

#[test]
fn a_failed_selftest_is_one_line_and_status_1() {
    let output = run_selftest_open("/nonexistent-dir/open.test");
    assert_eq!(
        (output.status.code(), text(&output.stderr)),
        (
            Some(1),
            "cws-instrumentation: selftest open /nonexistent-dir/open.test: ENOENT: No such file or directory\n".into()
        )
    );
}

#[test]
fn debug_prints_every_event_as_json_on_stderr() {
    let run = Trace::with_flags(&["--debug"], &["sh", "-c", "exit 0"]).run();
    assert_eq!(run.code(), Some(0));
    let printed: Vec<serde_json::Value> = run
        .stderr
        .lines()
        .map(|line| {
            let json = line.strip_prefix("cws-instrumentation: sending message: ").unwrap_or_else(|| panic!("{line}"));
            serde_json::from_str(json).unwrap()
        })
        .collect();
    assert!(!printed.is_empty());
    assert_eq!(printed, run.events);
}

#[test]
fn datadog_flags_and_environment_defaults_are_accepted() {
    let flags = [
        "--disable-stats",
        "--disable-proc-scan",
        "--proc-scan-rate",
        "1s",
        "--pid-per-tracer",
        "4",
        "--uid",
        "-1",
        "--gid",
        "-1",
        "--async",
    ];
    let mut trace = Trace::with_flags(&flags, &["id", "-u"]);
    trace.command().env("DD_CWS_INSTRUMENTATION_STATS_DISABLED", "true");
    let run = trace.run();
    assert_eq!((run.code(), run.stdout.clone()), (Some(0), format!("{}\n", nix::unistd::getuid())), "{}", run.stderr);
    assert_eq!(run.stderr, "");
}

#[test]
fn a_proc_scan_rate_that_is_not_a_duration_is_a_warning_as_in_datadog() {
    let run = Trace::with_flags(&["--proc-scan-rate", "1m30s"], &["true"]).run();
    assert_eq!((run.code(), run.stderr.as_str()), (Some(0), ""));
    let warning =
        "cws-instrumentation: proc scan rate: \"soon\" is not a duration (like 500ms or 1m30s); scanning every 500ms\n";
    let by_env = common::command(binary())
        .args(["trace", "--probe-addr", "", "--", "true"])
        .env("DD_CWS_INSTRUMENTATION_PROC_SCAN_RATE", "soon")
        .output()
        .unwrap();
    assert_eq!((by_env.status.code(), text(&by_env.stderr)), (Some(0), warning.to_owned()));
    let run = Trace::with_flags(&["--proc-scan-rate", "soon"], &["true"]).run();
    assert_eq!((run.code(), run.stderr.as_str()), (Some(0), warning));
}
