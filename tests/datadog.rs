//! `trace` against a Datadog agent: a small receiver of the agent's eBPF-less
//! protocol (its framing, decoded with the crate's own inbound decoder),
//! written from the spec. It never writes, as the agent never does. And
//! `--probe-protocol auto` telling it from `serve`.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::{fixture, Run, Trace, DEADLINE};
use cws_instrumentation::datadog::frame::MAX_BODY;
use cws_instrumentation::datadog::msg::{HelloMsg, Message, Payload, Received, SyscallMsg, EXIT_CAUSE_EXITED};
use cws_instrumentation::datadog::outbound;
use cws_instrumentation::proto::Event;

/// What one connection carried.
#[derive(Default)]
struct Connection {
    messages: Vec<Message>,
    largest_body: usize,
    /// Set when the tracer ended the connection (Ok) or sent what the agent
    /// drops a connection for (Err).
    ended: Option<Result<(), String>>,
}

/// What the receiver does besides reading.
#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    Keep,
    /// Closes the first connection right after its Hello.
    DropFirstAfterHello,
}

struct Receiver {
    address: String,
    connections: Arc<Mutex<Vec<Arc<Mutex<Connection>>>>>,
}

impl Receiver {
    fn start(behaviour: Behaviour, ready: Option<PathBuf>) -> Receiver {
        Receiver::on(TcpListener::bind("127.0.0.1:0").unwrap(), behaviour, ready)
    }

    /// `ready` is created once a connection that is kept open has said Hello.
    fn on(listener: TcpListener, behaviour: Behaviour, ready: Option<PathBuf>) -> Receiver {
        let address = listener.local_addr().unwrap().to_string();
        let connections: Arc<Mutex<Vec<Arc<Mutex<Connection>>>>> = Arc::default();
        let all = Arc::clone(&connections);
        std::thread::spawn(move || {
            for (index, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { return };
                let connection = Arc::new(Mutex::new(Connection::default()));
                all.lock().unwrap().push(Arc::clone(&connection));
                let drop_it = behaviour == Behaviour::DropFirstAfterHello && index == 0;
                let ready = ready.clone().filter(|_| !drop_it);
                std::thread::spawn(move || {
                    let ended = read_connection(stream, &connection, drop_it, ready);
                    connection.lock().unwrap().ended = Some(ended);
                });
            }
        });
        Receiver { address, connections }
    }

    /// Every connection, once each has ended.
    fn finished(&self) -> Vec<Connection> {
        let started = Instant::now();
        loop {
            let all = self.connections.lock().unwrap().clone();
            if all.iter().all(|c| c.lock().unwrap().ended.is_some()) {
                return all.iter().map(|c| std::mem::take(&mut *c.lock().unwrap())).collect();
            }
            assert!(started.elapsed() < DEADLINE, "a connection never ended");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

/// Reads frames as the agent does: a 4-byte little-endian length, at most
/// 256 KiB of msgpack.
fn read_connection(
    mut stream: TcpStream,
    connection: &Mutex<Connection>,
    drop_after_hello: bool,
    ready: Option<PathBuf>,
) -> Result<(), String> {
    loop {
        let mut header = [0u8; 4];
        let got = stream.read(&mut header).map_err(|e| e.to_string())?;
        if got == 0 {
            return Ok(());
        }
        stream.read_exact(&mut header[got..]).map_err(|e| format!("a header cut after {got} bytes: {e}"))?;
        let len = u32::from_le_bytes(header) as usize;
        if len == 0 || len > MAX_BODY {
            return Err(format!("a frame of {len} bytes"));
        }
        let mut body = vec![0; len];
        stream.read_exact(&mut body).map_err(|e| format!("a body cut: {e}"))?;
        let message = match Message::decode(&body) {
            Ok(Received::Message(message)) => message,
            other => return Err(format!("not a tracer's message: {other:?}")),
        };
        // The agent takes the probe's Hello for a Hello: the key offering
        // gRPC is one it does not know.
        let hello = matches!(message, Message::Hello(_) | Message::Probe(_));
        let mut seen = connection.lock().unwrap();
        seen.largest_body = seen.largest_body.max(len);
        seen.messages.push(message);
        drop(seen);
        if hello && drop_after_hello {
            return Ok(());
        }
        if let (true, Some(ready)) = (hello, &ready) {
            std::fs::write(ready, "").unwrap();
        }
    }
}

fn hello_of(connection: &Connection) -> &HelloMsg {
    match connection.messages.first() {
        Some(Message::Hello(hello) | Message::Probe(hello)) => hello,
        other => panic!("a connection opened with {other:?}, not a Hello"),
    }
}

fn syscalls(connections: &[Connection]) -> Vec<SyscallMsg> {
    let all = connections.iter().flat_map(|c| c.messages.iter().skip(1));
    all.map(|m| match m {
        Message::Syscall(syscall) => (**syscall).clone(),
        Message::Hello(hello) | Message::Probe(hello) => panic!("a second Hello on one connection: {hello:?}"),
    })
    .collect()
}

/// The events of the `--events-file` as the crate's model.
fn model(run: &Run) -> Vec<Event> {
    run.events.iter().map(|e| serde_json::from_value(e.clone()).expect("an event")).collect()
}

fn traced(address: &str, flags: &[&str], command: &[String]) -> Trace {
    let mut all = vec!["--probe-addr", address, "--stats"];
    all.extend_from_slice(flags);
    Trace::with_flags(&all, command)
}

/// The messages the tracer sends for the events of `run`, each with its
/// process's cgroup: the workload runs in the test's own, whose container
/// (when it names one) stands before the Hello's.
fn expected_messages(run: &Run, hello: &HelloMsg) -> Vec<SyscallMsg> {
    let own = cws_instrumentation::context::cgroup_of("self").expect("this process's cgroup");
    let hello_container = hello.container_context.as_ref().map(|c| c.id.clone()).unwrap_or_default();
    let container = if own.container_id.is_empty() { hello_container } else { own.container_id };
    let messages = model(run).into_iter().filter_map(|event| outbound::syscall(&event, &container));
    messages.map(|message| SyscallMsg { cgroup_id: own.path.clone(), ..message }).collect()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn a_datadog_agent_gets_every_event_it_has_a_type_for_in_order() {
    let receiver = Receiver::start(Behaviour::Keep, None);
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = target.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let read_me = dir.path().join("read-me");
    std::fs::write(&read_me, "x").unwrap();
    let script = r#""$1" "$2"; "$3" tcp "$4"; "$5" >/dev/null; cat "$6" >/dev/null; exit 3"#;
    let (files, net, creds) = (fixture("files"), fixture("net"), fixture("creds"));
    let command = vec![
        "sh".to_owned(),
        "-c".into(),
        script.into(),
        "sh".into(),
        files.display().to_string(),
        dir.path().display().to_string(),
        net.display().to_string(),
        port.to_string(),
        creds.display().to_string(),
        read_me.display().to_string(),
    ];
    let run = traced(&receiver.address, &[], &command).run();
    assert_eq!(run.code(), Some(3), "{}", run.stderr);
    assert!(run.stderr.contains("is a Datadog agent"), "{}", run.stderr);
    assert!(run.stderr.contains("undelivered=0 "), "{}", run.stderr);
    let connections = receiver.finished();
    assert_eq!(connections.len(), 1, "{}", run.stderr);
    assert_eq!(connections[0].ended, Some(Ok(())));
    // The probe's Hello is the one the agent keeps: the exporter went on
    // after it, on the same connection (`syscalls` refuses a second Hello).
    assert!(matches!(connections[0].messages.first(), Some(Message::Probe(_))), "{}", run.stderr);

    let hello = hello_of(&connections[0]);
    let nsid = std::fs::metadata("/proc/self/ns/pid").unwrap().ino();
    assert_eq!((hello.nsid, hello.mode.as_str()), (nsid, "wrapped"));
    assert_eq!(hello.entrypoint_args.as_ref(), Some(&command));
    let container = hello.container_context.clone().expect("a container context");
    assert!(container.created_at > 0);

    // Every event the agent has a type for, in the order the tracer saw them.
    let received = syscalls(&connections);
    let expected = expected_messages(&run, hello);
    assert_eq!(received, expected);

    // And against the kernel's own facts.
    let root = run.of("exec")[0]["pid"].as_u64().unwrap() as u32;
    let has = |found: &dyn Fn(&SyscallMsg) -> bool| received.iter().any(found);
    assert!(has(&|m| matches!(&m.payload, Payload::Exec(e) if e.file.filename == files.display().to_string())));
    let read_me_path = read_me.canonicalize().unwrap().display().to_string();
    assert!(has(&|m| matches!(&m.payload, Payload::Open(o) if o.file.filename == read_me_path)));
    assert!(has(&|m| matches!(&m.payload, Payload::Connect(c)
        if c.socket.port == port && c.socket.addr == Some(target.local_addr().unwrap().ip()))));
    let d = dir.path().canonicalize().unwrap().join("d");
    assert!(has(&|m| matches!(&m.payload, Payload::Mkdir(k) if k.dir.filename == d.display().to_string())));
    assert!(has(&|m| matches!(&m.payload, Payload::Unlink(u)
        if u.file.filename == d.join("moved").display().to_string())));
    assert!(has(&|m| matches!(&m.payload, Payload::SetUid(ids) if (ids.uid, ids.euid) == (1000, 1001))));
    assert!(has(&|m| matches!(&m.payload, Payload::SetGid(ids) if (ids.gid, ids.egid) == (1000, 1000))));
    let children: Vec<u32> = received.iter().filter(|m| matches!(m.payload, Payload::Fork(_))).map(|m| m.pid).collect();
    assert_eq!(children.len(), 4, "one fork per command of the script");
    assert!(children.iter().all(|child| has(&|m| m.pid == *child && matches!(m.payload, Payload::Exec(_)))));
    let last = received.last().expect("messages");
    assert_eq!(last.pid, root);
    assert!(matches!(&last.payload, Payload::Exit(e) if e.code == 3 && e.cause == EXIT_CAUSE_EXITED));
    assert!(received.iter().all(|m| m.container_id == container.id));
}

#[test]
fn mounts_reach_the_agent_as_datadog_sends_them_a_bind_mount_as_bind() {
    if !common::require_root(&[common::CAP_SYS_ADMIN, common::CAP_SYS_CHROOT], "mount, unshare and chroot") {
        return;
    }
    let receiver = Receiver::start(Behaviour::Keep, None);
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap().display().to_string();
    let command = vec![fixture("nscalls").display().to_string(), "mounts".into(), base.clone()];
    let run = traced(&receiver.address, &[], &command).run();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    let connections = receiver.finished();
    let received = syscalls(&connections);
    assert_eq!(received, expected_messages(&run, hello_of(&connections[0])));

    let at = |name: &str| format!("{base}/{name}");
    let mounts: Vec<[String; 3]> = received
        .iter()
        .filter_map(|m| match &m.payload {
            Payload::Mount(k) => Some([k.source.clone(), k.target.clone(), k.fs_type.clone()]),
            _ => None,
        })
        .collect();
    let mount = |source: &str, target: &str, fstype: &str| [source.to_owned(), target.to_owned(), fstype.to_owned()];
    // The mount that failed with ENOENT is not sent, as by Datadog's tracer.
    let expected = [
        mount("none", "/", ""),
        mount("cws-tmpfs", &at("mnt"), "tmpfs"),
        mount(&at("src"), &at("view"), "bind"),
        mount("cws-i386", &at("i386"), "tmpfs"),
        mount("cws-i386", &at("i386"), "tmpfs"),
        mount("cws-root", &at("newroot"), "tmpfs"),
    ];
    assert_eq!(mounts, expected);
    let umounts: Vec<&str> = received
        .iter()
        .filter_map(|m| match &m.payload {
            Payload::Umount(u) => Some(u.path.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(umounts, [at("view"), at("mnt"), at("i386"), at("i386")]);
}

#[test]
fn after_the_agent_drops_the_connection_the_tracer_reconnects_with_a_hello_first() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let marker = dir.path().join("marker");
    std::fs::write(&marker, "").unwrap();
    let receiver = Receiver::start(Behaviour::DropFirstAfterHello, Some(ready.clone()));
    // The workload waits until the second connection has said Hello.
    let script = r#"while [ ! -e "$1" ]; do sleep 0.01; done; cat "$2"; exit 5"#;
    let command = strings(&["sh", "-c", script, "sh"])
        .into_iter()
        .chain([ready.display().to_string(), marker.display().to_string()])
        .collect::<Vec<_>>();
    let run = traced(&receiver.address, &["--probe-protocol", "datadog"], &command).run();
    assert_eq!(run.code(), Some(5), "{}", run.stderr);
    // Closed or reset, depending on whether the receiver had unread bytes.
    let failed = format!("connection to the agent at {} failed: ", receiver.address);
    assert!(run.stderr.lines().any(|l| l.contains(&failed) && l.ends_with("; retrying")), "{}", run.stderr);
    let connections = receiver.finished();
    assert!(connections.len() >= 2, "{}", run.stderr);
    let first = hello_of(&connections[0]);
    assert!(connections.iter().all(|c| hello_of(c) == first), "the same Hello on every connection");
    let last = connections.last().unwrap();
    let marker_path = marker.canonicalize().unwrap().display().to_string();
    let opened = last.messages.iter().any(|m| {
        matches!(m, Message::Syscall(s) if matches!(&s.payload, Payload::Open(o) if o.file.filename == marker_path))
    });
    assert!(opened, "the open after the reconnect came on the new connection");
    assert!(
        matches!(last.messages.last(), Some(Message::Syscall(s)) if matches!(&s.payload, Payload::Exit(e) if e.code == 5))
    );
}

#[test]
fn no_frame_is_over_256_kib_whatever_the_arguments_and_environment() {
    let receiver = Receiver::start(Behaviour::Keep, None);
    let args: Vec<String> = (0..400).map(|i| format!("{i:03}{}", "a".repeat(700))).collect();
    let mut command = vec!["/bin/true".to_owned()];
    command.extend(args);
    let mut trace = traced(&receiver.address, &["--probe-protocol", "datadog"], &command);
    for i in 0..400 {
        trace.command().env(format!("LARGE_{i:03}"), "e".repeat(700));
    }
    let run = trace.run();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    let connections = receiver.finished();
    assert_eq!(connections[0].ended, Some(Ok(())), "the agent took every frame");
    assert!(connections[0].largest_body <= MAX_BODY);
    // The Hello lost entrypoint arguments from the end; the exec was cut and says so.
    let hello_args = hello_of(&connections[0]).entrypoint_args.clone().unwrap_or_default();
    assert!(hello_args.len() < command.len() && command.starts_with(&hello_args), "{}", hello_args.len());
    let received = syscalls(&connections);
    let exec = received.iter().find_map(|m| match &m.payload {
        Payload::Exec(exec) => Some(exec.clone()),
        _ => None,
    });
    let exec = exec.expect("the exec");
    assert!(exec.args_truncated && exec.envs_truncated, "{exec:?}");
}

/// Starts `serve` on loopback; its address, the child, and the rest of
/// its log.
fn serve(output: &std::path::Path) -> (String, std::process::Child, impl BufRead) {
    let mut child = Command::new(common::binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--output"])
        .arg(output)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    log.read_line(&mut first).unwrap();
    let address = first.trim().strip_prefix("cws-instrumentation: listening on ").expect("a listening line");
    (address.to_owned(), child, log)
}

#[test]
fn auto_speaks_grpc_to_serve() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("agent.jsonl");
    let (address, mut sidecar, mut log) = serve(&output);
    let run = traced(&address, &[], &strings(&["sh", "-c", "cat /etc/hostname >/dev/null; exit 4"])).run();
    let _ = sidecar.kill();
    let _ = sidecar.wait();
    let mut said = String::new();
    log.read_to_string(&mut said).unwrap();
    assert_eq!(run.code(), Some(4), "{}", run.stderr);
    assert!(run.stderr.contains(&format!("the agent at {address} speaks gRPC")), "{}", run.stderr);
    // Decided on `serve`'s answer to the probe's Hello, not on its silence.
    assert!(said.contains("our tracer's protocol probe, answered in HTTP/2"), "{said}");
    assert!(run.stderr.contains("undelivered=0 "), "{}", run.stderr);
    let lines = std::fs::read_to_string(&output).unwrap();
    assert_eq!(lines.lines().count(), run.events.len(), "serve wrote every event");
}

#[test]
fn auto_waits_for_an_agent_that_is_not_there_yet_and_then_recognises_it() {
    // A port nobody listens on, until the receiver takes it.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let address = format!("127.0.0.1:{port}");
    let mut trace = traced(&address, &[], &strings(&["sh", "-c", "cat /etc/hostname >/dev/null; exit 6"]));
    let mut child = trace.spawn();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    while !said.contains("cannot reach the agent at") {
        assert!(stderr.read_line(&mut said).unwrap() > 0, "the tracer ended first: {said}");
    }
    let receiver = Receiver::on(TcpListener::bind(&address).unwrap(), Behaviour::Keep, None);
    let rest = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).unwrap();
        text
    });
    let run = trace.finish(child);
    said.push_str(&rest.join().unwrap());
    assert_eq!(run.code(), Some(6), "{said}");
    assert!(said.contains("is a Datadog agent"), "{said}");
    assert!(said.contains("undelivered=0 "), "{said}");
    let connections = receiver.finished();
    let expected = expected_messages(&run, hello_of(&connections[0]));
    assert_eq!(syscalls(&connections), expected, "every event, the first ones too, after the Hello");
}
