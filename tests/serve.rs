//! gRPC export end to end: `trace` streaming to a real `serve` on loopback.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Instant;

use common::{binary, Trace, DEADLINE};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tonic_health::pb::health_check_response::ServingStatus;

/// A running sidecar and its log lines.
struct Sidecar {
    child: Child,
    address: String,
    log: Receiver<String>,
}

impl Drop for Sidecar {
    /// A failed test must not leave its sidecar running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sidecar {
    fn start(listen: &str, output: &Path) -> Sidecar {
        Sidecar::start_with(listen, output, |_| {})
    }

    /// With more flags or environment, set by `configure`.
    fn start_with(listen: &str, output: &Path, configure: impl FnOnce(&mut Command)) -> Sidecar {
        let mut command = Command::new(binary());
        command.args(["serve", "--listen", listen, "--output"]).arg(output);
        command.stdin(Stdio::null()).stderr(Stdio::piped());
        configure(&mut command);
        let mut child = command.spawn().unwrap();
        let (tx, log) = std::sync::mpsc::channel();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let first = log.recv_timeout(DEADLINE).expect("the sidecar says where it listens");
        let address = first.strip_prefix("cws-instrumentation: listening on ").expect("a listening line").to_owned();
        Sidecar { child, address, log }
    }

    /// Waits for a log line containing `text`.
    fn wait_for(&self, text: &str) -> String {
        self.lines_until(|line| line.contains(text)).pop().unwrap_or_else(|| panic!("sidecar never logged {text:?}"))
    }

    /// Every log line up to the first that is `wanted`, that one last (none
    /// when it never came).
    fn lines_until(&self, wanted: impl Fn(&str) -> bool) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(line) = self.log.recv_timeout(DEADLINE) {
            let found = wanted(&line);
            lines.push(line);
            if found {
                return lines;
            }
        }
        Vec::new()
    }

    /// SIGTERM, and the sidecar's exit status.
    fn stop(&mut self) -> Option<i32> {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).unwrap();
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(started.elapsed() < DEADLINE, "the sidecar did not stop on SIGTERM");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

/// The complete lines of the sidecar's output (one may be half written).
fn read_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
    complete.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Sidecar lines of one session, without the fields the sidecar adds.
fn session_events(lines: &[Value], session: &str) -> Vec<Value> {
    lines
        .iter()
        .filter(|l| l["session_id"] == session)
        .map(|l| {
            let mut event = l.clone();
            for added in ["session_id", "container_id", "sequence"] {
                event.as_object_mut().unwrap().remove(added);
            }
            event
        })
        .collect()
}

/// Once the tracer said goodbye and the sidecar stopped cleanly, its output
/// holds exactly `events`, the tracer's own events file, as one session.
fn assert_delivered(sidecar: &mut Sidecar, output: &Path, events: &[Value]) {
    sidecar.wait_for("goodbye");
    assert_eq!(sidecar.stop(), Some(0));
    let lines = read_lines(output);
    assert_eq!(sessions(&lines).len(), 1, "one session");
    assert_eq!(session_events(&lines, &sessions(&lines)[0]), events);
}

fn sessions(lines: &[Value]) -> Vec<String> {
    let mut sessions: Vec<String> = lines.iter().map(|l| l["session_id"].as_str().unwrap().to_owned()).collect();
    sessions.dedup();
    sessions
}

fn traced(address: &str, extra: &[&str], command: &[&str]) -> Trace {
    let mut flags = vec!["--probe-addr", address, "--stats"];
    flags.extend_from_slice(extra);
    Trace::with_flags(&flags, command)
}

fn output_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("agent.jsonl")
}

#[test]
fn events_reach_the_sidecar_as_the_events_file_has_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut sidecar = Sidecar::start("127.0.0.1:0", &output_path(&dir));
    let run = traced(&sidecar.address, &[], &["sh", "-c", "cat /etc/hostname >/dev/null; exit 3"]).run();
    assert_eq!(run.code(), Some(3));
    let goodbye = sidecar.wait_for("goodbye");
    assert!(goodbye.contains(" exit code 3 events "), "{goodbye}");
    assert_eq!(sidecar.stop(), Some(0));

    let lines = read_lines(&output_path(&dir));
    let session = &sessions(&lines)[0];
    assert_eq!(session_events(&lines, session), run.events, "the same events, in the same order");
    let sequences: Vec<u64> = lines.iter().map(|l| l["sequence"].as_u64().unwrap()).collect();
    assert_eq!(sequences, (0..run.events.len() as u64).collect::<Vec<_>>());
    assert!(run.stderr.contains("undelivered=0 "), "{}", run.stderr);
}

#[test]
fn two_tracers_share_one_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let mut sidecar = Sidecar::start("127.0.0.1:0", &output_path(&dir));
    let mut first = traced(&sidecar.address, &[], &["sh", "-c", "cat /etc/hostname >/dev/null"]);
    let mut second = traced(&sidecar.address, &[], &["sh", "-c", "cat /etc/passwd >/dev/null; exit 1"]);
    let (a, b) = (first.spawn(), second.spawn());
    let (a, b) = (first.finish(a), second.finish(b));
    assert_eq!((a.code(), b.code()), (Some(0), Some(1)));
    sidecar.wait_for("goodbye");
    sidecar.wait_for("goodbye");
    assert_eq!(sidecar.stop(), Some(0));

    let lines = read_lines(&output_path(&dir));
    let mut ids = sessions(&lines);
    ids.sort();
    ids.dedup();
    let first_args = |events: &Vec<Value>| events[0]["exec"]["args"].to_string();
    let mut by_session: Vec<Vec<Value>> = ids.iter().map(|s| session_events(&lines, s)).collect();
    by_session.sort_by_key(first_args);
    let mut runs = vec![a.events, b.events];
    runs.sort_by_key(first_args);
    assert_eq!(by_session, runs);
}

#[test]
fn a_restarted_sidecar_gets_every_event_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let output = output_path(&dir);
    let sidecar = Sidecar::start("127.0.0.1:0", &output);
    let address = sidecar.address.clone();
    // Events keep coming for a while: 60 opens, 20 ms apart.
    let script = "for i in $(seq 1 60); do cat /etc/hostname >/dev/null; sleep 0.02; done";
    let mut trace = traced(&address, &["--flush-timeout", "30s"], &["sh", "-c", script]);
    let endpoint = MetadataEndpoint::start();
    trace.command().env("ECS_CONTAINER_METADATA_URI_V4", &endpoint.uri);
    let child = trace.spawn();
    // Kill it mid-run, once some events are written.
    let started = Instant::now();
    while read_lines(&output).len() < 50 {
        assert!(started.elapsed() < DEADLINE, "no events reached the sidecar");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    drop(sidecar); // SIGKILL: no chance to flush or say anything
    let mut sidecar = Sidecar::start(&address, &output);
    let run = trace.finish(child);
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    sidecar.wait_for("goodbye");
    assert_eq!(sidecar.stop(), Some(0));

    let lines = read_lines(&output);
    let session = &sessions(&lines)[0];
    assert_eq!(session_events(&lines, session), run.events, "every event once, in order");
    // At least one reconnect (a connect racing the dying sidecar may add one).
    let reconnects: u64 =
        run.stderr.split("reconnects=").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!(reconnects >= 1, "{}", run.stderr);
    let mut requests = endpoint.requests();
    requests.sort();
    assert_eq!(requests, ["/v4/abc", "/v4/abc/task"], "the metadata is read once, not again on reconnect");
}

#[test]
fn without_a_sidecar_the_workload_runs_and_the_loss_is_counted() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let address = format!("127.0.0.1:{port}");
    let flags = ["--connect-timeout", "200ms", "--flush-timeout", "200ms"];
    let run = traced(&address, &flags, &["sh", "-c", "echo ran; exit 5"]).run();
    assert_eq!((run.code(), run.stdout.as_str()), (Some(5), "ran\n"));
    let held = format!("no agent answered at {address} within 200ms; starting the workload anyway");
    assert!(run.stderr.contains(&held), "{}", run.stderr);
    let undelivered = format!("undelivered={} ", run.events.len());
    assert!(run.stderr.contains(&undelivered), "{}", run.stderr);
    assert!(run.stderr.contains(&format!("{} events were not delivered", run.events.len())), "{}", run.stderr);
}

#[test]
fn by_default_the_workload_waits_for_the_agent_and_async_does_not() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let address = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();

    // --async: runs at once, no waiting, and no warning about it.
    let flags = ["--async", "--flush-timeout", "200ms"];
    let run = traced(&address, &flags, &["sh", "-c", "echo ran"]).run();
    assert_eq!(run.stdout, "ran\n");
    assert!(!run.stderr.contains("not reachable after"), "{}", run.stderr);

    // Default: held until the agent is up.
    let mut trace = traced(&address, &["--connect-timeout", "120s"], &["sh", "-c", "echo ran"]);
    trace.command().stderr(Stdio::piped());
    let mut child = trace.spawn();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("cannot reach the agent"), "{line}");
    // The tracer is trying: the workload must not have been started yet.
    let tracer = child.id();
    let tasks = std::fs::read_dir(format!("/proc/{tracer}/task")).unwrap();
    for task in tasks {
        let children = std::fs::read_to_string(task.unwrap().path().join("children")).unwrap();
        assert_eq!(children, "", "the workload started before the agent was up");
    }
    let mut sidecar = Sidecar::start(&address, &output_path(&dir));
    let run = trace.finish(child);
    assert_eq!(run.stdout, "ran\n");
    let lines = read_lines(&output_path(&dir));
    assert_eq!(lines[0]["exec"]["args"], serde_json::json!(["sh", "-c", "echo ran"]), "the first exec was streamed");
    assert_eq!(sidecar.stop(), Some(0));
}

#[test]
fn a_malformed_peer_does_not_disturb_other_streams() {
    let dir = tempfile::tempdir().unwrap();
    let mut sidecar = Sidecar::start("127.0.0.1:0", &output_path(&dir));
    let mut garbage = std::net::TcpStream::connect(&sidecar.address).unwrap();
    garbage.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nthis is not a gRPC stream at all\n").unwrap();
    let run = traced(&sidecar.address, &[], &["sh", "-c", "cat /etc/hostname >/dev/null"]).run();
    assert_eq!(run.code(), Some(0));
    assert_delivered(&mut sidecar, &output_path(&dir), &run.events);
}

#[test]
fn a_unix_socket_carries_the_stream_too() {
    let dir = tempfile::tempdir().unwrap();
    let socket = format!("unix:{}", dir.path().join("agent.sock").display());
    let mut sidecar = Sidecar::start(&socket, &output_path(&dir));
    assert_eq!(sidecar.address, socket);
    let run = traced(&socket, &[], &["sh", "-c", "cat /etc/hostname >/dev/null"]).run();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    assert_delivered(&mut sidecar, &output_path(&dir), &run.events);
}

#[test]
fn a_large_backlog_is_sent_in_batches_the_sidecar_accepts() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let address = format!("127.0.0.1:{port}");
    // 40 execs with 356 arguments of 350 bytes: about 5 MiB of events,
    // buffered while no agent listens, then sent at once.
    let script =
        "a=$(head -c 350 /dev/zero | tr '\\0' x); i=0; while [ $i -lt 356 ]; do set -- \"$@\" $a; i=$((i+1)); done; \
                  j=0; while [ $j -lt 40 ]; do /bin/true \"$@\"; j=$((j+1)); done; echo done";
    let mut trace = traced(&address, &["--async", "--flush-timeout", "60s"], &["sh", "-c", script]);
    // A bare environment: few events besides the execs (no library search),
    // so that one batch of that many events would be several MiB.
    trace.command().env_clear().env("PATH", "/usr/bin:/bin");
    let mut child = trace.spawn();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "done\n");
    let dir = tempfile::tempdir().unwrap();
    let mut sidecar = Sidecar::start(&address, &output_path(&dir));
    let run = trace.finish(child);
    assert!(run.stderr.contains("undelivered=0 "), "{}", run.stderr);
    assert_delivered(&mut sidecar, &output_path(&dir), &run.events);
    assert_eq!(run.of("exec").iter().filter(|e| e["exec"]["args_truncated"] == true).count(), 40);
}

#[test]
fn events_dropped_for_a_full_buffer_are_announced_and_the_rest_keep_their_numbers() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let address = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    // Events while no agent listens (most dropped: the buffer holds 5), and
    // on until the agent has acknowledged the first and made room for more.
    let script = format!(
        "cat /etc/hostname >/dev/null; while [ ! -e {go} ]; do sleep 0.05; done; cat /etc/passwd >/dev/null",
        go = go.display()
    );
    let flags = ["--async", "--buffer-events", "5", "--flush-timeout", "60s"];
    let mut trace = traced(&address, &flags, &["sh", "-c", &script]);
    let child = trace.spawn();
    // Wait until the buffer has overflowed: its events file shows more than 5 events.
    let started = Instant::now();
    while std::fs::read_to_string(trace.events_path()).unwrap_or_default().lines().count() < 20 {
        assert!(started.elapsed() < DEADLINE, "the workload made no events");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let output = output_path(&dir);
    let mut sidecar = Sidecar::start(&address, &output);
    // The whole log up to the goodbye, every loss the sidecar heard of in it:
    // before the overflow's, the buffer may have announced failed opens that
    // execs pushed out.
    let overflow = |line: &str| loss_in(line).is_some_and(|(first, last)| (first..=last).contains(&5));
    let mut logged = sidecar.lines_until(overflow);
    let overflow_end = logged.last().and_then(|line| loss_in(line)).expect("the sidecar heard of the overflow").1;
    // Once an event after the overflow is out, the buffer made room again.
    let beyond = |line: &Value| line["sequence"].as_u64().is_some_and(|s| s > overflow_end);
    while !read_lines(&output).iter().any(beyond) {
        assert!(started.elapsed() < DEADLINE, "no event after the overflow was delivered");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::fs::write(&go, "").unwrap();
    let run = trace.finish(child);
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    logged.extend(sidecar.lines_until(|line| line.contains("goodbye")));
    assert!(logged.last().unwrap().contains("goodbye"), "a goodbye: {logged:?}");
    assert_eq!(sidecar.stop(), Some(0));
    let lost: Vec<(u64, u64)> = logged.iter().filter_map(|line| loss_in(line)).collect();
    let is_lost = |s: u64| lost.iter().any(|&(first, last)| (first..=last).contains(&s));
    let lines = read_lines(&output);
    let sequences: Vec<u64> = lines.iter().map(|l| l["sequence"].as_u64().unwrap()).collect();
    let expected: Vec<u64> = (0..run.events.len() as u64).filter(|&s| !is_lost(s)).collect();
    assert_eq!(sequences, expected, "what was not announced lost was delivered, once\n{}", run.stderr);
    // Each line is the event of its sequence, across the gaps too.
    let session = sessions(&lines)[0].clone();
    let numbered: Vec<Value> = expected.iter().map(|&s| run.events[s as usize].clone()).collect();
    assert_eq!(session_events(&lines, &session), numbered);
    let dropped = format!("{} events were not delivered", run.events.len() - expected.len());
    assert!(run.stderr.contains(&dropped), "{}", run.stderr);
}

/// The range of a sidecar's "the tracer dropped events FIRST..=LAST" line.
fn loss_in(line: &str) -> Option<(u64, u64)> {
    let (first, last) = line.split("the tracer dropped events ").nth(1)?.split_once("..=")?;
    Some((first.parse().ok()?, last.parse().ok()?))
}

#[test]
fn a_backlog_of_large_events_stays_within_the_memory_bound() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // 600 execs with 356 arguments of 350 bytes: about 75 MiB of events
    // encoded, for an agent that never answers.
    let script =
        "a=$(head -c 350 /dev/zero | tr '\\0' x); i=0; while [ $i -lt 356 ]; do set -- \"$@\" $a; i=$((i+1)); done; \
                  j=0; while [ $j -lt 600 ]; do /bin/true \"$@\"; j=$((j+1)); done; echo done; exit 3";
    let output = Command::new(common::binary())
        .args(["trace", "--probe-addr", &format!("127.0.0.1:{port}"), "--async", "--flush-timeout", "100ms", "--stats"])
        .args(["--", "sh", "-c", script])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!((output.status.code(), output.stdout.as_slice()), (Some(3), b"done\n".as_slice()), "{stderr}");
    let stats = stderr.lines().find_map(|l| l.split_once("stats: ")).expect("a stats line").1;
    let stat = |name: &str| -> u64 {
        let pair = stats.split(' ').find_map(|p| p.strip_prefix(&format!("{name}="))).expect(name);
        pair.parse().unwrap()
    };
    assert!(stat("events") + stat("dropped") > 600, "every exec was seen: {stats}");
    assert_eq!(stat("undelivered"), stat("events"), "nothing was acknowledged: {stats}");
    assert!(stat("peak_rss_kib") < 64 * 1024, "the tracer stayed under 64 MiB: {stats}");
}

mod raw_client {
    use super::*;
    use cws_instrumentation::proto::event_service_client::EventServiceClient;
    use cws_instrumentation::proto::{agent_message, tracer_message, AgentMessage, EventBatch, Hello, TracerMessage};

    /// Sends `messages` on one stream, then ends it; returns the sequences
    /// the sidecar acknowledged, or the status it ended the stream with.
    fn exchange(address: &str, messages: Vec<TracerMessage>) -> Result<Vec<u64>, String> {
        exchange_acks(address, messages).map_err(|(_, status)| status)
    }

    /// As `exchange`, with the acks that came before an error status.
    fn exchange_acks(address: &str, messages: Vec<TracerMessage>) -> Result<Vec<u64>, (Vec<u64>, String)> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let mut client = EventServiceClient::connect(format!("http://{address}"))
                .await
                .map_err(|e| (Vec::new(), e.to_string()))?;
            client = client.max_encoding_message_size(64 << 20);
            let stream = tokio_stream::iter(messages);
            let mut replies =
                client.stream_events(stream).await.map_err(|e| (Vec::new(), e.message().to_owned()))?.into_inner();
            let mut acks = Vec::new();
            loop {
                match replies.message().await {
                    Ok(Some(AgentMessage { message: Some(agent_message::Message::Ack(ack)) })) => {
                        acks.push(ack.sequence.expect("an explicit sequence"))
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(acks),
                    Err(status) => return Err((acks, format!("{:?}: {}", status.code(), status.message()))),
                }
            }
        })
    }

    fn hello(session: &str) -> TracerMessage {
        TracerMessage {
            message: Some(tracer_message::Message::Hello(Hello { session_id: session.into(), ..Default::default() })),
        }
    }

    /// `events` small open events numbered from `first_sequence`.
    fn batch_from(first_sequence: u64, events: usize) -> TracerMessage {
        let mut message = batch(events, 10);
        if let Some(tracer_message::Message::Batch(batch)) = &mut message.message {
            batch.first_sequence = first_sequence;
        }
        message
    }

    /// The sequences of `session` in the sidecar's output, in file order.
    fn sequences_of(output: &Path, session: &str) -> Vec<u64> {
        let lines = read_lines(output);
        lines.iter().filter(|l| l["session_id"] == session).map(|l| l["sequence"].as_u64().unwrap()).collect()
    }

    fn batch(events: usize, path_len: usize) -> TracerMessage {
        let event = cws_instrumentation::proto::Event {
            pid: 1,
            payload: Some(cws_instrumentation::proto::event::Payload::Open(cws_instrumentation::proto::OpenEvent {
                path: "x".repeat(path_len),
                ..Default::default()
            })),
            ..Default::default()
        };
        let batch = EventBatch { first_sequence: 0, events: vec![event; events] };
        TracerMessage { message: Some(tracer_message::Message::Batch(batch)) }
    }

    #[test]
    fn a_restarted_sidecar_writes_nothing_its_output_already_holds() {
        let dir = tempfile::tempdir().unwrap();
        let output = output_path(&dir);
        let mut sidecar = Sidecar::start("127.0.0.1:0", &output);
        assert_eq!(exchange(&sidecar.address, vec![hello("s"), batch_from(0, 10)]), Ok(vec![9]));
        assert_eq!(sidecar.stop(), Some(0));
        // As if the sidecar had died in the middle of a line.
        let mut file = std::fs::OpenOptions::new().append(true).open(&output).unwrap();
        file.write_all(b"{\"session_id\":\"s\",\"seq").unwrap();

        let mut sidecar = Sidecar::start("127.0.0.1:0", &output);
        // The tracer resends 5..=9, which were written, with 10..=14.
        assert_eq!(exchange(&sidecar.address, vec![hello("s"), batch_from(5, 10)]), Ok(vec![14]));
        assert_eq!(sidecar.stop(), Some(0));
        let text = std::fs::read_to_string(&output).unwrap();
        let sequences: Vec<u64> = text
            .lines()
            .map(|line| serde_json::from_str::<Value>(line).expect("no cut line is left")["sequence"].as_u64().unwrap())
            .collect();
        assert_eq!(sequences, (0..15).collect::<Vec<_>>());
    }

    #[test]
    fn peers_that_skip_hello_or_send_too_much_are_cut_off_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut sidecar = Sidecar::start("127.0.0.1:0", &output_path(&dir));
        // No Hello first.
        let refused = exchange(&sidecar.address, vec![batch(1, 10)]);
        assert_eq!(refused, Err("InvalidArgument: the first message must be a Hello".to_owned()));
        sidecar.wait_for("cut off: the first message must be a Hello");
        // A message over the 4 MiB limit, after a proper Hello.
        let too_big = exchange(&sidecar.address, vec![hello("big"), batch(5, 1 << 20)]);
        assert!(too_big.is_err(), "{too_big:?}");
        sidecar.wait_for("session \"big\": stream ended");
        // The sidecar serves others as before.
        let run = traced(&sidecar.address, &[], &["sh", "-c", "cat /etc/hostname >/dev/null"]).run();
        sidecar.wait_for("goodbye");
        assert_eq!(sidecar.stop(), Some(0));
        let lines = read_lines(&output_path(&dir));
        assert_eq!(sessions(&lines).len(), 1, "nothing was written for the refused peers");
        assert_eq!(session_events(&lines, &sessions(&lines)[0]), run.events);
    }

    #[test]
    fn batches_out_of_order_or_forged_take_nothing_from_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let output = output_path(&dir);
        let mut sidecar = Sidecar::start("127.0.0.1:0", &output);
        let address = sidecar.address.clone();
        // A later batch first, on its own stream; then the earlier one.
        assert_eq!(exchange(&address, vec![hello("s"), batch_from(10, 10)]), Ok(vec![19]));
        assert_eq!(exchange(&address, vec![hello("s"), batch_from(0, 10)]), Ok(vec![9]));
        // A forged batch far ahead in the live session.
        let far = 1_000_000_000_000;
        assert_eq!(exchange(&address, vec![hello("s"), batch_from(far, 1)]), Ok(vec![far]));
        // The session goes on: what it had not sent yet is written, not dropped.
        assert_eq!(exchange(&address, vec![hello("s"), batch_from(15, 10)]), Ok(vec![24]));
        assert_eq!(sidecar.stop(), Some(0));
        let expected: Vec<u64> = (10..20).chain(0..10).chain([far]).chain(20..25).collect();
        assert_eq!(sequences_of(&output, "s"), expected);
    }

    #[test]
    fn a_batch_that_goes_back_on_its_stream_is_refused_after_the_acks_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let output = output_path(&dir);
        let mut sidecar = Sidecar::start("127.0.0.1:0", &output);
        let refused = exchange_acks(&sidecar.address, vec![hello("s"), batch_from(10, 10), batch_from(0, 10)]);
        let why = "a batch at 0 goes back: this stream is at 20";
        assert_eq!(refused, Err((vec![19], format!("InvalidArgument: {why}"))));
        let logged = sidecar.wait_for("cut off: a batch at 0 goes back");
        assert!(logged.starts_with("cws-instrumentation: session \"s\" from 127.0.0.1:"), "{logged}");
        // Sent again on a stream of its own, the batch is written.
        assert_eq!(exchange(&sidecar.address, vec![hello("s"), batch_from(0, 10)]), Ok(vec![9]));
        assert_eq!(sidecar.stop(), Some(0));
        assert_eq!(sequences_of(&output, "s"), (10..20).chain(0..10).collect::<Vec<_>>());
    }

    #[test]
    fn hostile_session_ids_are_escaped_in_the_log_and_unusable_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let output = output_path(&dir);
        let mut sidecar = Sidecar::start("127.0.0.1:0", &output);
        let forged = "x\ncws-instrumentation: goodbye: session \"y\" exit code 0";
        assert_eq!(exchange(&sidecar.address, vec![hello(forged), batch_from(0, 1)]), Ok(vec![0]));
        let logged = sidecar.wait_for("hello: session ");
        assert!(logged.starts_with(&format!("cws-instrumentation: hello: session {forged:?} from ")), "{logged}");
        let unusable = "InvalidArgument: a session id must have 1 to 128 bytes".to_owned();
        assert_eq!(exchange(&sidecar.address, vec![hello(""), batch_from(0, 1)]), Err(unusable.clone()));
        assert_eq!(exchange(&sidecar.address, vec![hello(&"x".repeat(129)), batch_from(0, 1)]), Err(unusable));
        assert_eq!(sidecar.stop(), Some(0));
        let rest: Vec<String> = sidecar.log.try_iter().collect();
        assert!(rest.iter().all(|l| l.starts_with("cws-instrumentation: ") && !l.contains("goodbye")), "{rest:#?}");
        assert_eq!(sequences_of(&output, forged), vec![0], "the id is JSON-escaped in the output");
        assert_eq!(read_lines(&output).len(), 1);
    }

    /// A Hello whose session id is not UTF-8: what a decoder must refuse.
    #[derive(Clone, PartialEq, prost::Message)]
    struct RawHello {
        #[prost(bytes = "vec", tag = "2")]
        session_id: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct RawTracerMessage {
        #[prost(message, optional, tag = "1")]
        hello: Option<RawHello>,
    }

    #[test]
    fn an_undecodable_hello_gets_an_error_status() {
        let dir = tempfile::tempdir().unwrap();
        let mut sidecar = Sidecar::start("127.0.0.1:0", &output_path(&dir));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let status = runtime.block_on(async {
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", sidecar.address)).unwrap();
            let mut grpc = tonic::client::Grpc::new(endpoint.connect().await.unwrap());
            grpc.ready().await.unwrap();
            let hello = RawTracerMessage { hello: Some(RawHello { session_id: b"\xff\xfe".to_vec() }) };
            let path = tonic::codegen::http::uri::PathAndQuery::from_static("/cws.v1.EventService/StreamEvents");
            let codec = tonic_prost::ProstCodec::<RawTracerMessage, AgentMessage>::default();
            let request = tonic::Request::new(tokio_stream::iter(vec![hello]));
            let mut replies = grpc.streaming(request, path, codec).await.unwrap().into_inner();
            match replies.message().await {
                Ok(Some(reply)) => panic!("an answer to an undecodable Hello: {reply:?}"),
                Ok(None) => panic!("the stream ended with OK"),
                Err(status) => status,
            }
        });
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with("undecodable first message: "), "{status:?}");
        sidecar.wait_for("cut off: undecodable first message");
        assert_eq!(sidecar.stop(), Some(0));
        assert!(read_lines(&output_path(&dir)).is_empty());
    }

    #[test]
    fn an_output_that_cannot_be_written_turns_health_to_not_serving_and_streams_to_unavailable() {
        // /dev/full: every write fails with ENOSPC.
        let mut sidecar = Sidecar::start("127.0.0.1:0", Path::new("/dev/full"));
        let refused = exchange(&sidecar.address, vec![hello("s"), batch_from(0, 3)]);
        assert_eq!(refused, Err("Unavailable: cannot write events: No space left on device (os error 28)".to_owned()));
        sidecar
            .wait_for("cannot write events to /dev/full: No space left on device (os error 28); batches are refused");
        assert_eq!(health_of(&sidecar.address), [ServingStatus::NotServing, ServingStatus::NotServing]);
        assert_eq!(sidecar.stop(), Some(1), "the output was failing when it stopped");
    }

    /// A small tmpfs, unmounted when dropped.
    struct Tmpfs(tempfile::TempDir);

    impl Tmpfs {
        /// None (and why, on stderr) where mounting is not allowed.
        fn mount(size: &str) -> Option<Tmpfs> {
            let dir = tempfile::tempdir().unwrap();
            let status = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
                .arg(dir.path())
                .stderr(Stdio::null())
                .status();
            if !status.is_ok_and(|s| s.success()) {
                eprintln!("skipped: cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)");
                return None;
            }
            Some(Tmpfs(dir))
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
        }
    }

    /// Fills the filesystem of `dir` with one file; returns its path.
    fn fill(dir: &Path) -> PathBuf {
        let path = dir.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![b'f'; 1024];
        while file.write_all(&chunk).is_ok() {}
        path
    }

    #[test]
    fn a_full_disk_leaves_no_partial_line_and_serving_resumes_when_there_is_room() {
        let Some(tmpfs) = Tmpfs::mount("256k") else { return };
        let output = tmpfs.0.path().join("agent.jsonl");
        let mut sidecar = Sidecar::start("127.0.0.1:0", &output);
        let address = sidecar.address.clone();
        assert_eq!(exchange(&address, vec![hello("s"), batch_from(0, 10)]), Ok(vec![9]));
        let filler = fill(tmpfs.0.path());
        // About 36 KiB of lines: more than the room left in the output's last page.
        let full = "Unavailable: cannot write events: No space left on device (os error 28)".to_owned();
        assert_eq!(exchange(&address, vec![hello("s"), batch_from(10, 200)]), Err(full));
        sidecar.wait_for("No space left on device (os error 28); batches are refused (UNAVAILABLE)");
        assert_eq!(health_of(&address), [ServingStatus::NotServing, ServingStatus::NotServing]);
        let text = std::fs::read_to_string(&output).unwrap();
        assert!(text.ends_with('\n'), "a partial line was left: {:?}", &text[text.len().saturating_sub(80)..]);
        assert_eq!(sequences_of(&output, "s"), (0..10).collect::<Vec<_>>(), "exactly what was acknowledged");

        std::fs::remove_file(filler).unwrap();
        assert_eq!(exchange(&address, vec![hello("s"), batch_from(10, 200)]), Ok(vec![209]));
        sidecar.wait_for("written to");
        assert_eq!(health_of(&address), [ServingStatus::Serving, ServingStatus::Serving]);
        assert_eq!(sidecar.stop(), Some(0));
        assert_eq!(sequences_of(&output, "s"), (0..210).collect::<Vec<_>>());
    }
}

/// What the sidecar's health service says for "" and "cws.v1.EventService".
fn health_of(address: &str) -> Vec<ServingStatus> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}")).unwrap();
        let mut client = HealthClient::new(channel.connect().await.unwrap());
        let mut statuses = Vec::new();
        for service in ["", "cws.v1.EventService"] {
            let request = HealthCheckRequest { service: service.to_owned() };
            statuses.push(client.check(request).await.unwrap().into_inner().status());
        }
        statuses
    })
}

#[test]
fn the_sidecar_answers_the_standard_health_check() {
    let dir = tempfile::tempdir().unwrap();
    let mut sidecar = Sidecar::start("127.0.0.1:0", &output_path(&dir));
    assert_eq!(health_of(&sidecar.address), vec![ServingStatus::Serving, ServingStatus::Serving]);
    assert_eq!(sidecar.stop(), Some(0));
}

#[test]
fn an_agent_name_that_does_not_resolve_gets_a_clear_message_and_the_workload_runs() {
    let flags = ["--connect-timeout", "300ms", "--flush-timeout", "300ms"];
    let run = traced("no-such-agent.invalid:5678", &flags, &["sh", "-c", "echo ran; exit 3"]).run();
    assert_eq!((run.code(), run.stdout.as_str()), (Some(3), "ran\n"));
    let first = run.stderr.lines().next().unwrap_or("");
    assert!(
        first.starts_with("cws-instrumentation: cannot reach the agent at no-such-agent.invalid:5678: ")
            && first.contains("failed to lookup address information")
            && first.ends_with("; retrying"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains(&format!("undelivered={} ", run.events.len())), "{}", run.stderr);
}

/// A stand-in for the ECS task metadata endpoint v4 on loopback, serving
/// documents shaped like the AWS examples under `/v4/abc`.
struct MetadataEndpoint {
    uri: String,
    thread: std::thread::JoinHandle<Vec<String>>,
}

const DOCKER_ID: &str = "3f9c1a7e5b2d4c8e9a0b1c2d3e4f5a6b-2718281828";
const TASK_ARN: &str = "arn:aws:ecs:us-east-2:210987654321:task/payments/3f9c1a7e5b2d4c8e9a0b1c2d3e4f5a6b";

impl MetadataEndpoint {
    /// Answers one request per connection, in order, until `GET /end`.
    fn start() -> MetadataEndpoint {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let uri = format!("http://{}/v4/abc", listener.local_addr().unwrap());
        let container = serde_json::json!({
            "DockerId": DOCKER_ID,
            "Name": "api",
            "DockerName": "ecs-payments-api-12-api-9e8d7c6b5a4f3e2d1c00",
            "Image": "210987654321.dkr.ecr.us-east-2.amazonaws.com/payments-api:2.3.1",
            "ImageID": "sha256:7d2c4e6f8a0b1c3d5e7f9a1b3c5d7e9f0a2b4c6d8e0f1a3b5c7d9e1f2a4b6c8d",
            "Labels": {
                "com.amazonaws.ecs.cluster": "arn:aws:ecs:us-east-2:210987654321:cluster/payments",
                "com.amazonaws.ecs.container-name": "api",
                "com.amazonaws.ecs.task-arn": TASK_ARN,
                "com.amazonaws.ecs.task-definition-family": "payments-api",
                "com.amazonaws.ecs.task-definition-version": "12"
            },
            "DesiredStatus": "RUNNING",
            "KnownStatus": "RUNNING",
            "Limits": { "CPU": 2 },
            "CreatedAt": "2025-03-04T08:15:30.123456789Z",
            "StartedAt": "2025-03-04T08:15:31.987654321Z",
            "Type": "NORMAL",
            "ContainerARN": "arn:aws:ecs:us-east-2:210987654321:container/payments/3f9c1a7e/0c1d2e3f",
            "Networks": [{ "NetworkMode": "awsvpc", "IPv4Addresses": ["10.0.4.27"] }]
        })
        .to_string();
        let task = serde_json::json!({
            "Cluster": "arn:aws:ecs:us-east-2:210987654321:cluster/payments",
            "TaskARN": TASK_ARN,
            "Family": "payments-api",
            "Revision": "12",
            "DesiredStatus": "RUNNING",
            "KnownStatus": "RUNNING",
            "Containers": [{ "DockerId": DOCKER_ID, "Name": "api" }],
            "AvailabilityZone": "us-east-2a",
            "LaunchType": "FARGATE"
        })
        .to_string();
        let thread = std::thread::spawn(move || {
            let mut paths = Vec::new();
            for connection in listener.incoming() {
                let mut connection = connection.unwrap();
                let mut request = BufReader::new(connection.try_clone().unwrap());
                // The request line and headers, up to the blank line.
                let mut head = Vec::new();
                let mut line = String::new();
                while request.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    head.push(std::mem::take(&mut line));
                }
                let path = head.first().and_then(|l| l.split(' ').nth(1)).unwrap_or("").to_owned();
                let body = match path.as_str() {
                    "/end" => return paths,
                    "/v4/abc" => &container,
                    "/v4/abc/task" => &task,
                    _ => "{}",
                };
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                // A client that went away unanswered is the tracer's business.
                let _ = connection.write_all(response.as_bytes());
                paths.push(path);
            }
            paths
        });
        MetadataEndpoint { uri, thread }
    }

    /// Every path requested, in the order the connections came. Call once
    /// the tracer has exited: its connections are then all queued before
    /// the one that ends the server.
    fn requests(self) -> Vec<String> {
        let address = self.uri.trim_start_matches("http://").split('/').next().unwrap().to_owned();
        let mut end = std::net::TcpStream::connect(address).unwrap();
        end.write_all(b"GET /end HTTP/1.1\r\n\r\n").unwrap();
        self.thread.join().unwrap()
    }
}

#[test]
fn the_hello_carries_what_the_ecs_metadata_endpoint_says() {
    if !common::require_root(&[common::CAP_SYS_ADMIN], "give the tracer a cgroup namespace of its own") {
        return;
    }
    let endpoint = MetadataEndpoint::start();
    let dir = tempfile::tempdir().unwrap();
    let mut sidecar = Sidecar::start("127.0.0.1:0", &output_path(&dir));
    let mut trace = traced(&sidecar.address, &[], &["sh", "-c", "cat /etc/hostname >/dev/null; exit 2"]);
    trace.command().env("ECS_CONTAINER_METADATA_URI_V4", &endpoint.uri).env_remove("DD_CONTAINER_ID");
    // A cgroup namespace of its own shows the tracer `0::/`, as Fargate on
    // cgroup v2 does: no container id there, so the DockerId stands in.
    // SAFETY: unshare is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(trace.command(), || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP).map_err(std::io::Error::from)
        });
    }
    let run = trace.run();
    assert_eq!(run.code(), Some(2), "{}", run.stderr);
    assert!(!run.stderr.contains("ECS"), "{}", run.stderr);

    let hello = sidecar.wait_for("hello: ");
    assert!(hello.contains(&format!(" container {DOCKER_ID:?} pid namespace ")), "{hello}");
    let ecs = format!(
        r#" ecs cluster "arn:aws:ecs:us-east-2:210987654321:cluster/payments" task "{TASK_ARN}" container "api""#
    );
    assert!(hello.ends_with(&ecs), "{hello}");
    assert_delivered(&mut sidecar, &output_path(&dir), &run.events);
    let lines = read_lines(&output_path(&dir));
    assert!(lines.iter().all(|l| l["container_id"] == DOCKER_ID), "{lines:#?}");

    let mut requests = endpoint.requests();
    // Both documents at once: in whichever order they were accepted.
    requests.sort();
    assert_eq!(requests, ["/v4/abc", "/v4/abc/task"], "each document once");
}

#[test]
fn an_ecs_metadata_endpoint_that_refuses_or_never_answers_costs_one_warning_and_nothing_else() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // Never accepts: connections wait in its backlog, requests unanswered.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cases = [
        (format!("http://127.0.0.1:{port}/v4/abc"), "Connection refused"),
        (format!("http://{}/v4/abc", silent.local_addr().unwrap()), "no answer within 1s"),
    ];
    for (uri, reason) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut sidecar = Sidecar::start("127.0.0.1:0", &output_path(&dir));
        let mut trace = traced(&sidecar.address, &[], &["sh", "-c", "echo ran; cat /etc/hostname >/dev/null; exit 4"]);
        trace.command().env("ECS_CONTAINER_METADATA_URI_V4", &uri);
        let run = trace.run();
        assert_eq!((run.code(), run.stdout.as_str()), (Some(4), "ran\n"));
        let warnings: Vec<&str> = run.stderr.lines().filter(|l| l.contains("ECS")).collect();
        assert_eq!(warnings.len(), 1, "{}", run.stderr);
        assert!(
            warnings[0].starts_with(&format!("cws-instrumentation: cannot read ECS metadata at {uri}"))
                && warnings[0].contains(reason)
                && warnings[0].ends_with("; the Hello carries the URI only"),
            "{}",
            run.stderr
        );
        assert!(run.stderr.contains("undelivered=0 "), "{}", run.stderr);
        let hello = sidecar.wait_for("hello: ");
        assert!(!hello.contains(" ecs "), "{hello}");
        assert_delivered(&mut sidecar, &output_path(&dir), &run.events);
        assert_eq!(run.of("exec").len(), 2, "sh and cat");
    }
}

mod auth {
    use super::*;

    const TOKEN: &str = "tok-5f2a9c7e1b";
    const TOKEN_ENV: &str = "DD_CWS_INSTRUMENTATION_AUTH_TOKEN";

    #[test]
    fn a_sidecar_with_a_token_takes_only_streams_that_present_it() {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        let output = output_path(&dir);
        let mut sidecar = Sidecar::start_with("127.0.0.1:0", &output, |c| {
            c.arg("--auth-token-file").arg(&token_file);
        });
        let address = sidecar.address.clone();

        // Without a token, or with another: refused, nothing written.
        let flags = ["--connect-timeout", "300ms", "--flush-timeout", "300ms"];
        let mut wrong = traced(&address, &flags, &["sh", "-c", "echo ran; exit 3"]);
        wrong.command().env(TOKEN_ENV, "tok-5f2a9c7e1c");
        let run = wrong.run();
        assert_eq!((run.code(), run.stdout.as_str()), (Some(3), "ran\n"), "{}", run.stderr);
        let refused = format!(
            "stream to the agent at {address} failed: status Unauthenticated \"a valid token is required (authorization: Bearer TOKEN)\"; retrying"
        );
        assert!(run.stderr.lines().any(|l| l.ends_with(&refused)), "{}", run.stderr);
        assert!(run.stderr.contains(&format!("undelivered={} ", run.events.len())), "{}", run.stderr);
        sidecar.wait_for("refused: no valid token");

        // The token from the environment: the workload does not inherit it.
        let mut right = traced(&address, &[], &["sh", "-c", &format!("echo ${{{TOKEN_ENV}:-unset}}")]);
        right.command().env(TOKEN_ENV, TOKEN);
        let from_env = right.run();
        assert_eq!((from_env.code(), from_env.stdout.as_str()), (Some(0), "unset\n"), "{}", from_env.stderr);
        assert!(from_env.stderr.contains("undelivered=0 "), "{}", from_env.stderr);
        sidecar.wait_for("goodbye");

        // The token from a file.
        let flags = ["--auth-token-file".to_owned(), token_file.display().to_string()];
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let from_file = traced(&address, &flags, &["sh", "-c", "cat /etc/hostname >/dev/null"]).run();
        assert!(from_file.stderr.contains("undelivered=0 "), "{}", from_file.stderr);
        sidecar.wait_for("goodbye");
        assert_eq!(sidecar.stop(), Some(0));

        let lines = read_lines(&output);
        let mut delivered: Vec<Vec<Value>> = sessions(&lines).iter().map(|s| session_events(&lines, s)).collect();
        delivered.sort_by_key(|events| events.len());
        let mut expected = vec![from_env.events, from_file.events];
        expected.sort_by_key(|events| events.len());
        assert_eq!(delivered, expected, "only the two runs with the token were written");
        let text = std::fs::read_to_string(&output).unwrap();
        assert!(!text.contains(TOKEN), "the token reached the output");
        assert!(!text.contains(&format!("{TOKEN_ENV}=")), "the variable reached the workload's environment");
    }

    #[test]
    fn on_a_unix_socket_only_the_allowed_uids_may_stream() {
        let dir = tempfile::tempdir().unwrap();
        let socket = format!("unix:{}", dir.path().join("agent.sock").display());
        let own = nix::unistd::geteuid().as_raw();
        let other = own + 4242;
        let mut sidecar = Sidecar::start_with(&socket, &output_path(&dir), |c| {
            c.arg("--allow-uid").arg(other.to_string());
        });
        let flags = ["--connect-timeout", "300ms", "--flush-timeout", "300ms"];
        let run = traced(&socket, &flags, &["sh", "-c", "exit 7"]).run();
        assert_eq!(run.code(), Some(7), "{}", run.stderr);
        let denied = "failed: status PermissionDenied \"this user may not stream events here\"; retrying";
        assert!(run.stderr.lines().any(|l| l.ends_with(denied)), "{}", run.stderr);
        assert!(run.stderr.contains(&format!("undelivered={} ", run.events.len())), "{}", run.stderr);
        let refused = sidecar.wait_for("refused: its uid is not allowed");
        assert!(refused.starts_with(&format!("cws-instrumentation: uid {own} pid ")), "{refused}");
        assert_eq!(sidecar.stop(), Some(0));
        assert!(read_lines(&output_path(&dir)).is_empty());

        let mut sidecar = Sidecar::start_with(&socket, &output_path(&dir), |c| {
            c.arg("--allow-uid").arg(format!("{other},{own}"));
        });
        let run = traced(&socket, &[], &["sh", "-c", "cat /etc/hostname >/dev/null"]).run();
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        assert_delivered(&mut sidecar, &output_path(&dir), &run.events);
    }

    #[test]
    fn allowed_uids_need_a_unix_socket() {
        let output = Command::new(binary())
            .args(["serve", "--listen", "127.0.0.1:0", "--allow-uid", "0"])
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2));
        assert_eq!(
            String::from_utf8_lossy(&output.stderr),
            "cws-instrumentation: --allow-uid needs a unix socket (--listen unix:/path)\n"
        );
    }

    /// A test PKI made with the openssl command: a CA, a server certificate
    /// for 127.0.0.1, a client certificate, and a second CA nobody trusts.
    struct Pki(tempfile::TempDir);

    impl Pki {
        /// None (and why, on stderr) without the openssl command.
        fn new() -> Option<Pki> {
            let pki = Pki(tempfile::tempdir().unwrap());
            let made = pki.ca("ca")
                && pki.ca("other-ca")
                && pki.issue("ca", "server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
                && pki.issue("ca", "client", "extendedKeyUsage=clientAuth\n");
            if !made {
                eprintln!("skipped: cannot make certificates (is the openssl command installed?)");
                return None;
            }
            Some(pki)
        }

        fn path(&self, name: &str) -> String {
            self.0.path().join(name).display().to_string()
        }

        fn openssl(&self, args: &[&str]) -> bool {
            let status = Command::new("openssl").args(args).current_dir(self.0.path()).stderr(Stdio::null()).status();
            status.is_ok_and(|s| s.success())
        }

        fn key_and_request(&self, name: &str, extra: &[&str]) -> bool {
            let (key, subject) = (format!("{name}.key"), format!("/CN={name}"));
            let mut args = vec!["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
            args.extend_from_slice(&["-keyout", &key, "-subj", &subject]);
            args.extend_from_slice(extra);
            self.openssl(&args)
        }

        fn ca(&self, name: &str) -> bool {
            let pem = format!("{name}.pem");
            self.key_and_request(name, &["-x509", "-days", "2", "-out", &pem])
        }

        fn issue(&self, ca: &str, name: &str, extensions: &str) -> bool {
            let (csr, pem, ext) = (format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
            std::fs::write(self.0.path().join(&ext), extensions).unwrap();
            let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
            self.key_and_request(name, &["-out", &csr])
                && self.openssl(&[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    &ca_pem,
                    "-CAkey",
                    &ca_key,
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    &ext,
                    "-out",
                    &pem,
                ])
        }
    }

    #[test]
    fn tls_carries_the_stream_and_a_required_client_certificate_is_checked() {
        let Some(pki) = Pki::new() else { return };
        let dir = tempfile::tempdir().unwrap();
        let output = output_path(&dir);
        let mut sidecar = Sidecar::start_with("127.0.0.1:0", &output, |c| {
            c.args(["--tls-cert", &pki.path("server.pem"), "--tls-key", &pki.path("server.key")]);
            c.args(["--tls-client-ca", &pki.path("ca.pem")]);
        });
        let address = sidecar.address.clone();
        let quick = ["--connect-timeout", "300ms", "--flush-timeout", "300ms"];
        let refused = |flags: &[&str], why: &str| {
            let mut all = quick.to_vec();
            all.extend_from_slice(flags);
            let run = traced(&address, &all, &["sh", "-c", "exit 3"]).run();
            assert_eq!(run.code(), Some(3), "{}", run.stderr);
            assert!(run.stderr.contains(&format!("undelivered={} ", run.events.len())), "{why}: {}", run.stderr);
        };
        // Plain HTTP/2 to a TLS port; an authority the tracer does not trust;
        // no client certificate.
        // Plain gRPC: a TLS server is as silent as a Datadog agent until
        // spoken to, so `auto` would take it for one.
        refused(&["--probe-protocol", "grpc"], "without TLS");
        refused(&["--tls-ca", &pki.path("other-ca.pem")], "another CA");
        refused(&["--tls-ca", &pki.path("ca.pem")], "no client certificate");
        let client = ["--tls-ca", &pki.path("ca.pem"), "--tls-cert", &pki.path("client.pem")];
        let mut flags = client.to_vec();
        let key = pki.path("client.key");
        flags.extend_from_slice(&["--tls-key", &key]);
        let run = traced(&address, &flags, &["sh", "-c", "cat /etc/hostname >/dev/null"]).run();
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        assert!(run.stderr.contains("undelivered=0 "), "{}", run.stderr);
        assert_delivered(&mut sidecar, &output, &run.events);
    }

    #[test]
    fn an_untrusted_agent_certificate_is_named_as_the_reason() {
        let Some(pki) = Pki::new() else { return };
        let dir = tempfile::tempdir().unwrap();
        let mut sidecar = Sidecar::start_with("127.0.0.1:0", &output_path(&dir), |c| {
            c.args(["--tls-cert", &pki.path("server.pem"), "--tls-key", &pki.path("server.key")]);
        });
        let flags = ["--connect-timeout", "300ms", "--flush-timeout", "300ms", "--tls-ca", &pki.path("other-ca.pem")];
        let run = traced(&sidecar.address, &flags, &["sh", "-c", "exit 3"]).run();
        assert_eq!(run.code(), Some(3), "{}", run.stderr);
        let first = run.stderr.lines().next().unwrap_or("");
        assert!(
            first.starts_with(&format!("cws-instrumentation: cannot reach the agent at {}: ", sidecar.address))
                && first.contains("invalid peer certificate"),
            "{}",
            run.stderr
        );
        assert_eq!(sidecar.stop(), Some(0));
        assert!(read_lines(&output_path(&dir)).is_empty());
    }

    #[test]
    fn the_output_files_and_the_socket_are_for_their_owner() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let mut sidecar = Sidecar::start(&format!("unix:{}", socket.display()), &output_path(&dir));
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&output_path(&dir)), 0o600);
        assert_eq!(mode(&socket), 0o660);
        let address = format!("unix:{}", socket.display());
        let mut trace = traced(&address, &[], &["true"]);
        let child = trace.spawn();
        let run = trace.finish(child);
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        assert_eq!(mode(&trace.events_path()), 0o600, "the tracer's --events-file");
        assert_eq!(sidecar.stop(), Some(0));
    }
}

/// Datadog-protocol tracers on the same listener as gRPC ones.
mod datadog_tracers {
    use std::io::Read;
    use std::net::TcpStream;

    use serde_json::json;

    use super::*;

    const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/datadog-golden");

    /// The golden frames (Datadog's Go encoder) in order, with the values
    /// the agent decodes from each (`expected.jsonl`).
    fn golden() -> Vec<(Vec<u8>, Value)> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(GOLDEN)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|e| e == "bin"))
            .collect();
        names.sort();
        let expected = std::fs::read_to_string(format!("{GOLDEN}/expected.jsonl")).unwrap();
        let values: Vec<Value> = expected.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(names.len(), values.len());
        names.iter().map(|path| std::fs::read(path).unwrap()).zip(values).collect()
    }

    /// A golden timestamp (all in 2026-01-01T00:00, 1767225600 s) as protojson writes it.
    fn rfc3339(nanos: u64) -> String {
        let since = nanos - 1_767_225_600_000_000_000;
        assert!(since < 60_000_000_000, "a golden timestamp outside its minute: {nanos}");
        format!("2026-01-01T00:00:{:02}.{:09}+00:00", since / 1_000_000_000, since % 1_000_000_000)
    }

    fn family(number: &Value) -> &'static str {
        match number.as_u64() {
            Some(2) => "ADDRESS_FAMILY_INET",
            Some(10) => "ADDRESS_FAMILY_INET6",
            Some(1) => "ADDRESS_FAMILY_UNIX",
            other => panic!("no golden family {other:?}"),
        }
    }

    /// Drops what protojson leaves out: empty strings and arrays, zeros of
    /// plain (not optional) numbers, false, unspecified enums.
    fn without_defaults(object: Value, plain_numbers: &[&str]) -> Value {
        let Value::Object(map) = object else { panic!("an object") };
        let kept = map.into_iter().filter(|(key, value)| match value {
            Value::String(s) => !s.is_empty() && s != "PROTOCOL_UNSPECIFIED",
            Value::Array(a) => !a.is_empty(),
            Value::Bool(b) => *b,
            Value::Null => false,
            Value::Number(n) => !(plain_numbers.contains(&key.as_str()) && n.as_u64() == Some(0)),
            Value::Object(_) => true,
        });
        Value::Object(kept.collect())
    }

    fn protocol(number: &Value) -> &'static str {
        match number.as_u64() {
            Some(6) => "PROTOCOL_TCP",
            Some(0) => "PROTOCOL_UNSPECIFIED",
            other => panic!("no golden protocol {other:?}"),
        }
    }

    fn requested(ids: &[&Value]) -> Value {
        json!({"credentials": {"requested": ids.iter().map(|id| id.as_i64().unwrap().to_string()).collect::<Vec<_>>()}})
    }

    fn file(operation: &str, path: &Value, extra: Value) -> Value {
        let mut file = json!({"operation": format!("FILE_OPERATION_{operation}"), "path": path});
        file.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        json!({ "file": file })
    }

    /// The line `serve` writes for a golden syscall message, from the values
    /// the agent decodes (without session_id and sequence); None for types
    /// without an event of ours.
    fn line_for(message: &Value) -> Option<Value> {
        let m = &message["Syscall"];
        let (pid, retval) = (&m["PID"], m["Retval"].as_i64().unwrap().to_string());
        let mut line = json!({"container_id": m["ContainerID"], "pid": pid, "tid": pid,
            "timestamp": rfc3339(m["Timestamp"].as_u64().unwrap()), "retval": retval});
        let (syscall, payload) = match m["Type"].as_u64().unwrap() {
            1 => {
                let e = &m["Exec"];
                if e["PPID"] != 0 {
                    line["ppid"] = e["PPID"].clone();
                }
                let credentials = e["Credentials"]
                    .as_object()
                    .map(|c| json!({"uid": c["UID"], "gid": c["GID"], "euid": c["EUID"], "egid": c["EGID"]}));
                let exec = json!({"path": e["File"]["Filename"], "args": e["Args"], "args_truncated": e["ArgsTruncated"],
                    "envs": e["Envs"], "envs_truncated": e["EnvsTruncated"], "credentials": credentials});
                ("execve", json!({ "exec": without_defaults(exec, &[]) }))
            }
            2 => {
                line["pid"] = m["Fork"]["PPID"].clone();
                line["tid"] = m["Fork"]["PPID"].clone();
                line["retval"] = json!(pid.to_string());
                ("fork", json!({"fork": {"child_pid": pid}}))
            }
            3 => {
                let o = &m["Open"];
                let flags = o["Flags"].as_u64().unwrap();
                let creates = flags & (libc::O_CREAT | libc::O_TMPFILE) as u64 != 0;
                let mode = if creates { o["Mode"].as_u64().unwrap() & 0o7777 } else { 0 };
                (
                    "open",
                    json!({"open": without_defaults(json!({"path": o["Filename"], "flags": flags, "mode": mode}), &["mode"])}),
                )
            }
            4 => {
                line.as_object_mut().unwrap().remove("retval");
                let (code, cause) = (&m["Exit"]["Code"], m["Exit"]["Cause"].as_u64().unwrap());
                let exit = match cause {
                    0 => json!({"cause": "EXIT_CAUSE_EXITED", "code": code}),
                    1 => json!({"cause": "EXIT_CAUSE_SIGNALED", "signal": code, "core_dumped": true}),
                    _ => json!({"cause": "EXIT_CAUSE_SIGNALED", "signal": code}),
                };
                ("exit", json!({ "exit": exit }))
            }
            5 => ("setreuid", requested(&[&m["SetUID"]["UID"], &m["SetUID"]["EUID"]])),
            6 => ("setregid", requested(&[&m["SetGID"]["GID"], &m["SetGID"]["EGID"]])),
            7 => ("setfsuid", requested(&[&m["SetFSUID"]["FSUID"]])),
            8 => ("setfsgid", requested(&[&m["SetFSGID"]["FSGID"]])),
            9 => ("capset", requested(&[&m["Capset"]["Effective"], &m["Capset"]["Permitted"]])),
            10 => ("unlink", file("UNLINK", &m["Unlink"]["File"]["Filename"], json!({}))),
            11 => ("rmdir", file("RMDIR", &m["Rmdir"]["File"]["Filename"], json!({}))),
            12 => {
                let r = &m["Rename"];
                ("rename", file("RENAME", &r["OldFile"]["Filename"], json!({"target": r["NewFile"]["Filename"]})))
            }
            13 => ("mkdir", file("MKDIR", &m["Mkdir"]["Dir"]["Filename"], json!({"mode": m["Mkdir"]["Mode"]}))),
            14 => {
                let u = &m["Utimes"];
                let time = |ns: &Value| {
                    let ns = ns.as_u64().unwrap();
                    let (seconds, nanos) = (ns / 1_000_000_000, ns % 1_000_000_000);
                    let mut time = json!({"seconds": seconds.to_string()});
                    if nanos != 0 {
                        time["nanos"] = json!(nanos.to_string());
                    }
                    time
                };
                let times = json!({"access_time": time(&u["ATime"]), "modification_time": time(&u["MTime"])});
                ("utimes", file("UTIMES", &u["File"]["Filename"], times))
            }
            15 => {
                let l = &m["Link"];
                let (syscall, operation) = if l["Type"] == 1 { ("link", "LINK") } else { ("symlink", "SYMLINK") };
                (syscall, file(operation, &l["Link"]["Filename"], json!({"target": l["Target"]["Filename"]})))
            }
            16 => ("chmod", file("CHMOD", &m["Chmod"]["File"]["Filename"], json!({"mode": m["Chmod"]["Mode"]}))),
            17 => {
                let c = &m["Chown"];
                let ids = json!({"uid": c["UID"].to_string(), "gid": c["GID"].to_string()});
                ("chown", file("CHOWN", &c["File"]["Filename"], ids))
            }
            20 => ("chdir", json!({"chdir": {"path": m["Chdir"]["Dir"]["Filename"]}})),
            21 => {
                let n = &m["Mount"];
                ("mount", json!({"namespace": {"path": n["Target"], "source": n["Source"], "fstype": n["FSType"]}}))
            }
            22 => ("umount2", json!({"namespace": {"path": m["Umount"]["Path"]}})),
            kind @ (23..=25) => {
                let (key, syscall) =
                    [("Accept", "accept"), ("Connect", "connect"), ("Bind", "bind")][kind as usize - 23];
                let s = &m[key];
                let socket = if kind == 23 {
                    json!({"address": s["Addr"], "local_port": s["Port"], "family": family(&s["AddressFamily"])})
                } else {
                    json!({"address": s["Addr"], "port": s["Port"], "family": family(&s["AddressFamily"]),
                        "protocol": protocol(&s["Protocol"])})
                };
                (syscall, json!({ syscall: without_defaults(socket, &["port"]) }))
            }
            _ => return None,
        };
        line["syscall"] = json!(syscall);
        line.as_object_mut().unwrap().extend(payload.as_object().unwrap().clone());
        Some(line)
    }

    fn connect(address: &str) -> TcpStream {
        let stream = TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream
    }

    /// Waits for the sidecar to close `stream` (a read of 0, or a reset).
    fn assert_closed_by_sidecar(mut stream: TcpStream) {
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("the sidecar did not close the connection: {other:?}"),
        }
    }

    #[test]
    fn the_golden_frames_are_written_as_events_next_to_a_grpc_tracer_on_the_same_port() {
        let dir = tempfile::tempdir().unwrap();
        let mut sidecar = Sidecar::start("127.0.0.1:0", &output_path(&dir));
        let golden = golden();
        let mut datadog = connect(&sidecar.address);
        // Half the frames, a whole gRPC session, then the rest: both at once.
        let (first, rest) = golden.split_at(golden.len() / 2);
        for (frame, _) in first {
            datadog.write_all(frame).unwrap();
        }
        let hello = sidecar.wait_for("(Datadog protocol)");
        assert!(
            hello.contains(r#" container "8f1d2c3b4a5968778695a4b3c2d1e0f1-1234567890" pid namespace 4026531836 mode "wrapped" entrypoint ["python3", "app.py", "--port", "8080"]"#),
            "{hello}"
        );
        let run = traced(&sidecar.address, &[], &["sh", "-c", "cat /etc/hostname >/dev/null; exit 3"]).run();
        assert_eq!(run.code(), Some(3), "{}", run.stderr);
        for (frame, _) in rest {
            datadog.write_all(frame).unwrap();
        }
        drop(datadog);
        let ended = sidecar.wait_for("datadog session");
        assert!(
            ended.ends_with(": closed by the tracer; 32 events written, skipped: LoadModule 1, Prctl 1, Setrlimit 1, Setsockopt 2, Socket 1, UnloadModule 1"),
            "{ended}"
        );
        assert_eq!(sidecar.stop(), Some(0));

        let lines = read_lines(&output_path(&dir));
        let datadog_session = hello.split('"').nth(1).unwrap();
        let grpc_session = sessions(&lines).into_iter().find(|s| s != datadog_session).expect("the gRPC session");
        assert_eq!(session_events(&lines, &grpc_session), run.events, "the gRPC tracer's events, as always");
        let written: Vec<Value> = lines
            .iter()
            .filter(|l| l["session_id"] == datadog_session)
            .map(|l| {
                let mut line = l.clone();
                line.as_object_mut().unwrap().remove("session_id");
                line
            })
            .collect();
        let expected: Vec<Value> = golden.iter().skip(1).filter_map(|(_, message)| line_for(message)).collect();
        assert_eq!(written.len(), expected.len());
        for (sequence, (line, mut expected)) in written.into_iter().zip(expected).enumerate() {
            expected["sequence"] = json!(sequence);
            assert_eq!(line, expected);
        }
    }

    #[test]
    fn garbage_and_an_oversized_frame_close_only_their_own_connection() {
        let dir = tempfile::tempdir().unwrap();
        let mut sidecar = Sidecar::start("127.0.0.1:0", &output_path(&dir));
        let golden = golden();
        let mut tracer = connect(&sidecar.address);
        tracer.write_all(&golden[0].0).unwrap();
        tracer.write_all(&golden[1].0).unwrap();
        let hello = sidecar.wait_for("(Datadog protocol)");

        // A frame whose body is not msgpack (0xc1 is never used).
        let mut garbage = connect(&sidecar.address);
        garbage.write_all(&[1, 0, 0, 0, 0xc1]).unwrap();
        assert_closed_by_sidecar(garbage);
        let line = sidecar.wait_for("undecodable");
        assert!(line.contains(": cut off: undecodable message: ") && line.contains("0 events written"), "{line}");
        // One byte over the agent's limit: the header alone ends it.
        let mut oversized = connect(&sidecar.address);
        oversized.write_all(&(256 * 1024 + 1u32).to_le_bytes()).unwrap();
        assert_closed_by_sidecar(oversized);
        let line = sidecar.wait_for("over the");
        assert!(line.contains("cut off: a 262145 byte message is over the 262144 byte limit"), "{line}");

        // The first tracer goes on.
        tracer.write_all(&golden[2].0).unwrap();
        drop(tracer);
        let ended = sidecar.wait_for("closed by the tracer");
        assert!(ended.contains("; 2 events written, skipped: none"), "{ended}");
        assert_eq!(sidecar.stop(), Some(0));
        let lines = read_lines(&output_path(&dir));
        let session = hello.split('"').nth(1).unwrap();
        assert_eq!(sessions(&lines), [session]);
        let syscalls: Vec<&str> = lines.iter().map(|l| l["syscall"].as_str().unwrap()).collect();
        assert_eq!(syscalls, ["execve", "open"]);
    }

    #[test]
    fn hellos_goodbyes_and_messages_before_a_hello_are_taken_as_the_agent_takes_them() {
        use cws_instrumentation::datadog::frame::frame;
        use cws_instrumentation::datadog::msg::{
            ChdirSyscallMsg, ContainerContext, FileSyscallMsg, HelloMsg, Message, Payload, SyscallMsg,
        };
        let hello = |nsid, id: &str| {
            let container_context = Some(ContainerContext { id: id.into(), created_at: 1 });
            let mode = "attached".into();
            frame(Message::Hello(HelloMsg { nsid, container_context, entrypoint_args: None, mode })).unwrap()
        };
        let chdir = |container_id: &str, path: &str| {
            let dir = FileSyscallMsg { filename: path.into(), ..Default::default() };
            let message = SyscallMsg {
                pid: 9,
                span_context: None,
                timestamp: 1_767_225_600_000_000_000,
                retval: 0,
                container_id: container_id.into(),
                cgroup_id: String::new(),
                payload: Payload::Chdir(ChdirSyscallMsg { dir }),
                fake_socket: None,
            };
            frame(Message::Syscall(Box::new(message))).unwrap()
        };
        // {"Type": 3}: a Goodbye, which only the agent itself makes.
        let goodbye = vec![7, 0, 0, 0, 0x81, 0xa4, b'T', b'y', b'p', b'e', 3];
        let frames = [
            chdir("own", "/before-hello"),
            hello(0, "zero"),
            chdir("", "/after-nsid-0"),
            hello(5, "second"),
            hello(6, "third"),
            chdir("", "/after-second"),
            goodbye,
            chdir("", "/after-goodbye"),
            chdir("mine", "/own-container"),
        ];
        let dir = tempfile::tempdir().unwrap();
        let mut sidecar = Sidecar::start("127.0.0.1:0", &output_path(&dir));
        let mut tracer = connect(&sidecar.address);
        tracer.write_all(&frames.concat()).unwrap();
        drop(tracer);
        let first = sidecar.wait_for("(Datadog protocol)");
        assert!(first.ends_with(r#" container "zero" pid namespace 0 mode "attached" entrypoint none"#), "{first}");
        let second = sidecar.wait_for("(Datadog protocol)");
        assert!(second.ends_with(r#" container "second" pid namespace 5 mode "attached" entrypoint none"#), "{second}");
        let ended = sidecar.wait_for("datadog session");
        assert!(ended.ends_with("; 5 events written, skipped: none, 1 later Hellos ignored, 1 Goodbyes"), "{ended}");
        assert_eq!(sidecar.stop(), Some(0));
        let written: Vec<(String, String)> = read_lines(&output_path(&dir))
            .iter()
            .map(|l| (l["container_id"].as_str().unwrap().to_owned(), l["chdir"]["path"].as_str().unwrap().to_owned()))
            .collect();
        let expected = [
            ("own", "/before-hello"),
            ("zero", "/after-nsid-0"),
            ("second", "/after-second"),
            ("", "/after-goodbye"),
            ("mine", "/own-container"),
        ];
        assert_eq!(written, expected.map(|(c, p)| (c.to_owned(), p.to_owned())));
    }

    /// `--probe-protocol auto` opens with a Hello that offers gRPC: `serve`
    /// answers it with HTTP/2 (and so tells the tracer to speak gRPC) as soon
    /// as the frame is in, not after a silence. The probe's side is shut
    /// once it is written: a sidecar that waited for more, or for silence,
    /// would see the end of the stream and close without a word.
    #[test]
    fn our_tracers_probe_is_answered_with_http2_as_soon_as_it_is_read_with_or_without_a_token() {
        use cws_instrumentation::datadog::frame::frame;
        use cws_instrumentation::datadog::msg::{HelloMsg, Message};
        let probe = frame(Message::Probe(HelloMsg { nsid: 7, mode: "wrapped".into(), ..Default::default() })).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "a-token-for-this-test\n").unwrap();
        for token_required in [false, true] {
            let mut sidecar = Sidecar::start_with("127.0.0.1:0", &output_path(&dir), |c| {
                if token_required {
                    c.arg("--auth-token-file").arg(&token);
                }
            });
            let mut tracer = connect(&sidecar.address);
            tracer.write_all(&probe).unwrap();
            tracer.shutdown(std::net::Shutdown::Write).unwrap();
            let mut answer = Vec::new();
            tracer.read_to_end(&mut answer).unwrap();
            assert_eq!(
                answer,
                [0, 0, 0, 4, 0, 0, 0, 0, 0],
                "an empty SETTINGS frame; token required: {token_required}"
            );
            sidecar.wait_for("our tracer's protocol probe, answered in HTTP/2: gRPC is spoken here");
            assert_eq!(sidecar.stop(), Some(0));
        }
        assert!(read_lines(&output_path(&dir)).is_empty(), "a probe is no session: nothing written");
    }

    #[test]
    fn a_sidecar_that_requires_a_token_refuses_datadog_tracers_which_cannot_present_one() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "a-token-for-this-test\n").unwrap();
        let mut sidecar = Sidecar::start_with("127.0.0.1:0", &output_path(&dir), |c| {
            c.arg("--auth-token-file").arg(&token);
        });
        let mut tracer = connect(&sidecar.address);
        // The sidecar may refuse after the first frame: a later write can then
        // fail with a reset, which is the refusal itself.
        for (frame, _) in &golden()[..2] {
            if tracer.write_all(frame).is_err() {
                break;
            }
        }
        assert_closed_by_sidecar(tracer);
        sidecar.wait_for(": refused: a Datadog-protocol tracer cannot present the token this sidecar requires");
        assert_eq!(sidecar.stop(), Some(0));
        assert!(read_lines(&output_path(&dir)).is_empty());
    }
}

/// Our tracer in Datadog mode against `serve`.
mod datadog_mode {
    use std::net::TcpListener;

    use common::pid_of;
    use serde_json::json;

    use super::*;

    fn datadog_traced(address: &str, command: &[&str]) -> Trace {
        traced(address, &["--probe-protocol", "datadog", "--verbose"], command)
    }

    /// What of an event the Datadog protocol carries, and only that.
    fn carried(event: &Value) -> Value {
        let kind = ["exec", "fork", "exit", "open", "connect", "file", "chdir", "credentials", "bind", "accept"]
            .into_iter()
            .find(|kind| event.get(kind).is_some())
            .unwrap_or_else(|| panic!("a kind this test does not expect: {event}"));
        let payload = &event[kind];
        let detail = match kind {
            "exec" => json!([payload["path"], payload["args"]]),
            "fork" => json!(payload["child_pid"]),
            "exit" => json!([payload["code"], payload["signal"]]),
            "open" => json!([payload["path"], payload["flags"], event["retval"]]),
            "connect" => json!([payload["address"], payload["port"], payload["family"], event["retval"]]),
            _ => json!([payload["path"], event["retval"]]),
        };
        json!({"pid": event["pid"], "kind": kind, "detail": detail})
    }

    /// Whether Datadog's tracer sends an event of this kind with this
    /// return value (SPEC.md; `datadog::outbound` follows it).
    fn sent(event: &Value) -> bool {
        let retval = event["retval"].as_str().map_or(0, |r| r.parse::<i64>().unwrap());
        let refused = [-i64::from(libc::EACCES), -i64::from(libc::EPERM)].contains(&retval);
        if event.get("exec").is_some() {
            retval == 0
        } else if event.get("connect").is_some() {
            event["connect"]["family"] != "ADDRESS_FAMILY_UNIX"
                && (retval >= 0
                    || refused
                    || [libc::ECONNREFUSED, libc::ETIMEDOUT, libc::EINPROGRESS].contains(&(-retval as i32)))
        } else if event.get("fork").is_some() || event.get("exit").is_some() {
            true
        } else {
            retval >= 0 || refused
        }
    }

    #[test]
    fn a_workload_traced_in_datadog_mode_reaches_serve_as_its_events_file_has_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut sidecar = Sidecar::start("127.0.0.1:0", &output_path(&dir));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        // getsockname: the port the kernel gave the listener.
        let port = listener.local_addr().unwrap().port();
        let script =
            format!("exec 3<>/dev/tcp/127.0.0.1/{port}; cat /etc/hostname >/dev/null; /nonexistent/program; exit 7");
        let run = datadog_traced(&sidecar.address, &["bash", "-c", &script]).run();
        assert_eq!(run.code(), Some(7), "{}", run.stderr);
        let ended = sidecar.wait_for("datadog session");
        assert!(ended.contains(": closed by the tracer; "), "{ended}");
        assert_eq!(sidecar.stop(), Some(0));

        let lines = read_lines(&output_path(&dir));
        assert_eq!(sessions(&lines).len(), 1, "one connection, one session");
        let sequences: Vec<u64> = lines.iter().map(|l| l["sequence"].as_u64().unwrap()).collect();
        assert_eq!(sequences, (0..lines.len() as u64).collect::<Vec<_>>());
        let expected: Vec<Value> = run.events.iter().filter(|e| sent(e)).map(carried).collect();
        let written: Vec<Value> = lines.iter().map(carried).collect();
        assert_eq!(written, expected, "the events the agent carries, in order, as the events file has them");

        let connects: Vec<&Value> = lines.iter().filter(|l| l.get("connect").is_some()).collect();
        assert_eq!(connects.len(), 1, "{connects:?}");
        assert_eq!(
            (&connects[0]["connect"]["address"], &connects[0]["connect"]["port"]),
            (&json!("127.0.0.1"), &json!(port))
        );
        let exits: Vec<&Value> = lines.iter().filter(|l| l.get("exit").is_some()).collect();
        let root = pid_of(&run.events[0]);
        let root_exit = exits.iter().find(|l| pid_of(l) == root).expect("the root's exit");
        assert_eq!(root_exit["exit"]["code"], 7);

        // What Datadog mode did not send, by kind, as the events file counts it.
        let mut skipped = std::collections::BTreeMap::<String, u64>::new();
        for event in run.events.iter().filter(|e| !sent(e)) {
            *skipped.entry(carried(event)["kind"].as_str().unwrap().to_owned()).or_default() += 1;
        }
        assert!(skipped.get("exec") == Some(&1), "the failed exec: {skipped:?}");
        let by_kind: Vec<String> = skipped.iter().map(|(kind, count)| format!("{kind}:{count}")).collect();
        let total: u64 = skipped.values().sum();
        assert!(
            run.stderr.contains(&format!(" skipped={total} skipped_by_kind={}\n", by_kind.join(","))),
            "{}",
            run.stderr
        );
        let in_words: Vec<String> = skipped.iter().map(|(kind, count)| format!("{kind} {count}")).collect();
        assert!(
            run.stderr.contains(&format!(", {total} not sent to the Datadog agent ({})\n", in_words.join(", "))),
            "{}",
            run.stderr
        );
        drop(listener);
    }

    #[test]
    fn a_slow_ecs_metadata_endpoint_does_not_delay_the_hello_of_a_new_connection() {
        // Never accepts: the metadata read waits its full second, far past
        // the 100 ms after which serve takes a silent client for HTTP/2.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut sidecar = Sidecar::start("127.0.0.1:0", &output_path(&dir));
        let mut trace = datadog_traced(&sidecar.address, &["sh", "-c", "exit 5"]);
        trace.command().env("ECS_CONTAINER_METADATA_URI_V4", format!("http://{}/v4/x", silent.local_addr().unwrap()));
        let run = trace.run();
        assert_eq!(run.code(), Some(5), "{}", run.stderr);
        assert!(!run.stderr.contains("connection to the agent at"), "one connection, never given up: {}", run.stderr);
        let ended = sidecar.wait_for("datadog session");
        assert!(ended.contains(": closed by the tracer; "), "{ended}");
        assert_eq!(sidecar.stop(), Some(0));
        let lines = read_lines(&output_path(&dir));
        assert_eq!(sessions(&lines).len(), 1);
        assert_eq!(lines.len(), run.events.iter().filter(|e| sent(e)).count());
    }
}

/// ContainerID per process in Datadog mode, as `serve` writes it.
mod datadog_containers {
    use std::time::Duration;

    use common::{pid_of, require_root, skip, CAP_SYS_ADMIN};

    use super::*;

    /// A cgroup made for one test, removed at its end (it is empty by then).
    struct TestCgroup(PathBuf);

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    /// Where the cgroup v2 hierarchy is mounted, from mountinfo.
    fn cgroup2_mount() -> Option<PathBuf> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        mountinfo.lines().find_map(|line| {
            let (fields, filesystem) = line.split_once(" - ")?;
            let mount_point = fields.split(' ').nth(4)?;
            (filesystem.split(' ').next() == Some("cgroup2")).then(|| PathBuf::from(mount_point))
        })
    }

    /// Polls the sidecar's output until a line satisfies `found`.
    fn wait_for_line(output: &Path, found: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            if let Some(line) = read_lines(output).into_iter().find(&found) {
                return line;
            }
            assert!(started.elapsed() < DEADLINE, "the sidecar never wrote the line");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn exec_of(line: &Value, program: &str) -> bool {
        line["exec"]["args"][0] == program
    }

    #[test]
    fn a_process_that_moves_to_another_cgroup_carries_its_new_container_id_from_its_next_exec() {
        if !require_root(&[CAP_SYS_ADMIN], "move a process into a cgroup of its own") {
            return;
        }
        let Some(mount) = cgroup2_mount() else {
            return skip("needs a cgroup v2 hierarchy (none is mounted)");
        };
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let own = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap().trim_start_matches('/').to_owned();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let id = format!("{nanos:032x}{:032x}", std::process::id());
        let cgroup = TestCgroup(mount.join(own).join(format!("docker-{id}.scope")));
        if let Err(e) = std::fs::create_dir(&cgroup.0) {
            return skip(&format!("cannot create a cgroup in {}: {e}", mount.display()));
        }

        let dir = tempfile::tempdir().unwrap();
        let (moved, released) = (dir.path().join("moved"), dir.path().join("released"));
        for fifo in [&moved, &released] {
            nix::unistd::mkfifo(fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        }
        let output = dir.path().join("agent.jsonl");
        let mut sidecar = Sidecar::start("127.0.0.1:0", &output);
        // Each step waits on a FIFO, so that the tracer reads each cgroup
        // while the process is where the test says.
        let script = format!(
            "read go < {}; echo $$ > {}; exec cat {}",
            moved.display(),
            cgroup.0.join("cgroup.procs").display(),
            released.display()
        );
        let mut trace = traced(&sidecar.address, &["--probe-protocol", "datadog"], &["sh", "-c", &script]);
        let child = trace.spawn();

        let before = wait_for_line(&output, |l| exec_of(l, "sh"));
        let root = pid_of(&before);
        assert_ne!(before["container_id"], id.as_str(), "before the move: {before}");
        std::fs::write(&moved, "go\n").unwrap();
        let after = wait_for_line(&output, |l| exec_of(l, "cat"));
        assert_eq!((pid_of(&after), &after["container_id"]), (root, &Value::from(id.as_str())), "{after}");
        std::fs::write(&released, "").unwrap();

        let run = trace.finish(child);
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        sidecar.wait_for("datadog session");
        assert_eq!(sidecar.stop(), Some(0));
        let lines = read_lines(&output);
        let exec_at = lines.iter().position(|l| exec_of(l, "cat")).unwrap();
        for line in &lines[exec_at..] {
            assert_eq!(line["container_id"], id.as_str(), "every later event: {line}");
        }
        for line in &lines[..exec_at] {
            assert_eq!(line["container_id"], before["container_id"], "every earlier event: {line}");
        }
    }
}
