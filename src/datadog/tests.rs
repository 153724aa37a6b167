//! The codec against Datadog's own encoder (the golden frames in
//! tests/data/datadog-golden), the agent's limits, and hostile input.

use std::net::IpAddr;
use std::path::PathBuf;

use serde_json::Value as Json;

use super::frame::{frame, read_frame, FrameError, TooLarge, MAX_BODY};
use super::msg::*;
use super::wire::{DecodeError, Int, Writer};
use super::{inbound, outbound};
use crate::proto::{self, event::Payload as Ours, AddressFamily, Event, ExitCause, FileOperation, Protocol};

// ---- the golden frames ----------------------------------------------------------

struct Golden {
    name: String,
    frame: Vec<u8>,
    json: Json,
}

fn golden() -> Vec<Golden> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/datadog-golden");
    let mut bins: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("golden directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    bins.sort();
    let expected = std::fs::read_to_string(dir.join("expected.jsonl")).expect("expected.jsonl");
    let lines: Vec<&str> = expected.lines().collect();
    assert_eq!(bins.len(), lines.len(), "one expected.jsonl line per frame");
    bins.iter()
        .zip(lines)
        .map(|(path, line)| Golden {
            name: path.file_stem().unwrap().to_string_lossy().into_owned(),
            frame: std::fs::read(path).expect("golden frame"),
            json: serde_json::from_str(line).expect("golden json"),
        })
        .collect()
}

fn golden_named(name: &str) -> Golden {
    golden().into_iter().find(|g| g.name == name).expect("golden frame by name")
}

fn golden_syscall(name: &str) -> SyscallMsg {
    match message_from_json(&golden_named(name).json) {
        Message::Syscall(syscall) => *syscall,
        Message::Hello(_) | Message::Probe(_) => panic!("{name} is a Hello"),
    }
}

// The values of expected.jsonl (Go's encoding/json of the decoded Message, nil
// pointers with omitempty left out) as our structs.

fn u(v: &Json, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

fn i(v: &Json, key: &str) -> i64 {
    v[key].as_i64().unwrap_or_else(|| panic!("{key} in {v}"))
}

fn s(v: &Json, key: &str) -> String {
    v[key].as_str().unwrap_or_else(|| panic!("{key} in {v}")).to_owned()
}

fn b(v: &Json, key: &str) -> bool {
    v[key].as_bool().unwrap_or_else(|| panic!("{key} in {v}"))
}

fn strings(v: &Json, key: &str) -> Option<Vec<String>> {
    v[key].as_array().map(|items| items.iter().map(|i| i.as_str().expect("string").to_owned()).collect())
}

fn credentials(v: &Json) -> Option<Credentials> {
    (!v.is_null()).then(|| Credentials {
        uid: u(v, "UID") as u32,
        user: s(v, "User"),
        euid: u(v, "EUID") as u32,
        euser: s(v, "EUser"),
        gid: u(v, "GID") as u32,
        group: s(v, "Group"),
        egid: u(v, "EGID") as u32,
        egroup: s(v, "EGroup"),
    })
}

fn file(v: &Json) -> FileSyscallMsg {
    FileSyscallMsg {
        filename: s(v, "Filename"),
        ctime: u(v, "CTime"),
        mtime: u(v, "MTime"),
        mode: u(v, "Mode") as u32,
        inode: u(v, "Inode"),
        credentials: credentials(&v["Credentials"]),
    }
}

fn socket(v: &Json) -> MsgSocketInfo {
    let addr = s(v, "Addr");
    MsgSocketInfo {
        address_family: u(v, "AddressFamily") as u16,
        addr: (!addr.is_empty()).then(|| addr.parse::<IpAddr>().expect("IP text")),
        port: u(v, "Port") as u16,
    }
}

fn base64(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let sextets: Vec<u32> = text
        .bytes()
        .filter(|&c| c != b'=')
        .map(|c| ALPHABET.iter().position(|&a| a == c).expect("base64") as u32)
        .collect();
    sextets
        .chunks(4)
        .flat_map(|chunk| {
            let bits = chunk.iter().enumerate().fold(0u32, |acc, (i, &s)| acc | s << (18 - 6 * i));
            bits.to_be_bytes()[1..chunk.len()].to_vec()
        })
        .collect()
}

fn payload_from_json(kind: i64, v: &Json) -> Payload {
    let key = |k: &str| &v[k];
    match kind {
        1 => {
            let e = key("Exec");
            Payload::Exec(ExecSyscallMsg {
                file: file(&e["File"]),
                args: strings(e, "Args"),
                args_truncated: b(e, "ArgsTruncated"),
                envs: strings(e, "Envs"),
                envs_truncated: b(e, "EnvsTruncated"),
                tty: s(e, "TTY"),
                credentials: credentials(&e["Credentials"]),
                ppid: u(e, "PPID") as u32,
                from_procfs: b(e, "FromProcFS"),
            })
        }
        2 => Payload::Fork(ForkSyscallMsg { ppid: u(key("Fork"), "PPID") as u32 }),
        3 => {
            let o = key("Open");
            Payload::Open(OpenSyscallMsg { file: file(o), flags: u(o, "Flags") as u32 })
        }
        4 => {
            let e = key("Exit");
            Payload::Exit(ExitSyscallMsg { code: u(e, "Code") as u32, cause: u(e, "Cause") as u32 })
        }
        5 => {
            let m = key("SetUID");
            Payload::SetUid(SetUidSyscallMsg {
                uid: i(m, "UID") as i32,
                user: s(m, "User"),
                euid: i(m, "EUID") as i32,
                euser: s(m, "EUser"),
            })
        }
        6 => {
            let m = key("SetGID");
            Payload::SetGid(SetGidSyscallMsg {
                gid: i(m, "GID") as i32,
                group: s(m, "Group"),
                egid: i(m, "EGID") as i32,
                egroup: s(m, "EGroup"),
            })
        }
        7 => {
            let m = key("SetFSUID");
            Payload::SetFsUid(SetFsUidSyscallMsg { fsuid: i(m, "FSUID") as i32, fsuser: s(m, "FSUser") })
        }
        8 => {
            let m = key("SetFSGID");
            Payload::SetFsGid(SetFsGidSyscallMsg { fsgid: i(m, "FSGID") as i32, fsgroup: s(m, "FSGroup") })
        }
        9 => {
            let m = key("Capset");
            Payload::Capset(CapsetSyscallMsg { effective: u(m, "Effective"), permitted: u(m, "Permitted") })
        }
        10 => Payload::Unlink(UnlinkSyscallMsg { file: file(&key("Unlink")["File"]) }),
        11 => Payload::Rmdir(RmdirSyscallMsg { file: file(&key("Rmdir")["File"]) }),
        12 => {
            let m = key("Rename");
            Payload::Rename(RenameSyscallMsg { old_file: file(&m["OldFile"]), new_file: file(&m["NewFile"]) })
        }
        13 => {
            let m = key("Mkdir");
            Payload::Mkdir(MkdirSyscallMsg { dir: file(&m["Dir"]), mode: u(m, "Mode") as u32 })
        }
        14 => {
            let m = key("Utimes");
            Payload::Utimes(UtimesSyscallMsg { file: file(&m["File"]), atime: u(m, "ATime"), mtime: u(m, "MTime") })
        }
        15 => {
            let m = key("Link");
            Payload::Link(LinkSyscallMsg {
                link_type: u(m, "Type") as u8,
                target: file(&m["Target"]),
                link: file(&m["Link"]),
            })
        }
        16 => {
            let m = key("Chmod");
            Payload::Chmod(ChmodSyscallMsg { file: file(&m["File"]), mode: u(m, "Mode") as u32 })
        }
        17 => {
            let m = key("Chown");
            Payload::Chown(ChownSyscallMsg {
                file: file(&m["File"]),
                uid: i(m, "UID") as i32,
                user: s(m, "User"),
                gid: i(m, "GID") as i32,
                group: s(m, "Group"),
            })
        }
        18 => {
            let m = key("LoadModule");
            Payload::LoadModule(LoadModuleSyscallMsg {
                file: file(&m["File"]),
                loaded_from_memory: b(m, "LoadedFromMemory"),
                name: s(m, "Name"),
                args: s(m, "Args"),
            })
        }
        19 => Payload::UnloadModule(UnloadModuleSyscallMsg { name: s(key("UnloadModule"), "Name") }),
        20 => Payload::Chdir(ChdirSyscallMsg { dir: file(&key("Chdir")["Dir"]) }),
        21 => {
            let m = key("Mount");
            Payload::Mount(MountSyscallMsg { source: s(m, "Source"), target: s(m, "Target"), fs_type: s(m, "FSType") })
        }
        22 => Payload::Umount(UmountSyscallMsg { path: s(key("Umount"), "Path") }),
        23 => {
            let m = key("Accept");
            Payload::Accept(AcceptSyscallMsg { socket: socket(m), socket_fd: i(m, "SocketFd") as i32 })
        }
        24 => {
            let m = key("Connect");
            Payload::Connect(ConnectSyscallMsg { socket: socket(m), protocol: u(m, "Protocol") as u16 })
        }
        25 => {
            let m = key("Bind");
            Payload::Bind(BindSyscallMsg { socket: socket(m), protocol: u(m, "Protocol") as u16 })
        }
        26 => {
            let m = key("Setsockopt");
            Payload::Setsockopt(SetsockoptSyscallMsg {
                socket_family: u(m, "SocketFamily") as u16,
                socket_protocol: u(m, "SocketProtocol") as u16,
                socket_type: u(m, "SocketType") as u16,
                level: u(m, "Level") as u32,
                opt_name: u(m, "OptName") as u32,
                filter: m["Filter"].as_str().map(base64),
                filter_len: u(m, "FilterLen") as u16,
            })
        }
        27 => {
            let m = key("Setrlimit");
            Payload::Setrlimit(SetrlimitSyscallMsg {
                resource: Int(i(m, "Resource")),
                cur_limit: u(m, "CurLimit"),
                max_limit: u(m, "MaxLimit"),
                pid: u(m, "Pid") as u32,
            })
        }
        28 => {
            let m = key("Prctl");
            Payload::Prctl(PrctlSyscallMsg {
                option: Int(i(m, "Option")),
                arg2: u(m, "Arg2"),
                new_name: s(m, "NewName"),
            })
        }
        29 => {
            let m = key("Socket");
            Payload::Socket(SocketSyscallMsg {
                domain: Int(i(m, "Domain")),
                socket_type: Int(i(m, "Type")),
                protocol: Int(i(m, "Protocol")),
            })
        }
        other => panic!("syscall type {other} in the golden frames"),
    }
}

fn message_from_json(v: &Json) -> Message {
    match i(v, "Type") {
        1 => {
            let h = &v["Hello"];
            let c = &h["ContainerContext"];
            Message::Hello(HelloMsg {
                nsid: u(h, "NSID"),
                container_context: (!c.is_null())
                    .then(|| ContainerContext { id: s(c, "ID"), created_at: u(c, "CreatedAt") }),
                entrypoint_args: strings(h, "EntrypointArgs"),
                mode: s(h, "Mode"),
            })
        }
        2 => {
            let m = &v["Syscall"];
            let span = &m["SpanContext"];
            let fake = &m["FakeSocket"];
            Message::Syscall(Box::new(SyscallMsg {
                pid: u(m, "PID") as u32,
                span_context: (!span.is_null()).then(|| SpanContext {
                    span_id: u(span, "SpanID"),
                    trace_id: TraceId { lo: u(&span["TraceID"], "Lo"), hi: u(&span["TraceID"], "Hi") },
                }),
                timestamp: u(m, "Timestamp"),
                retval: i(m, "Retval"),
                container_id: s(m, "ContainerID"),
                cgroup_id: s(m, "CGroupID"),
                payload: payload_from_json(i(m, "Type"), m),
                fake_socket: (!fake.is_null()).then(|| FakeSocketMsg {
                    address_family: u(fake, "AddressFamily") as u16,
                    protocol: u(fake, "Protocol") as u16,
                    socket_type: u(fake, "SocketType") as u16,
                }),
            }))
        }
        other => panic!("message type {other} in the golden frames"),
    }
}

fn first_difference(ours: &[u8], theirs: &[u8]) -> String {
    let at = ours.iter().zip(theirs).position(|(a, b)| a != b).unwrap_or(ours.len().min(theirs.len()));
    let around =
        |bytes: &[u8]| format!("{:02x?}", &bytes[at.saturating_sub(8).min(bytes.len())..(at + 8).min(bytes.len())]);
    format!("first difference at frame byte {at}: ours {} golden {}", around(ours), around(theirs))
}

#[test]
fn every_golden_frame_is_encoded_byte_for_byte_from_its_values() {
    let goldens = golden();
    assert_eq!(goldens.len(), 40);
    for g in &goldens {
        let ours = frame(message_from_json(&g.json)).expect("fits");
        assert!(ours == g.frame, "{}: {}", g.name, first_difference(&ours, &g.frame));
    }
}

#[test]
fn every_golden_frame_decodes_to_the_values_the_agent_reads() {
    for g in golden() {
        let length = u32::from_le_bytes(g.frame[..4].try_into().unwrap()) as usize;
        assert_eq!(length, g.frame.len() - 4, "{}", g.name);
        let decoded = Message::decode(&g.frame[4..]);
        assert_eq!(decoded, Ok(Received::Message(message_from_json(&g.json))), "{}", g.name);
    }
}

#[test]
fn the_golden_frames_cover_hello_and_every_syscall_type() {
    let mut types: Vec<i32> = golden()
        .iter()
        .filter_map(|g| match message_from_json(&g.json) {
            Message::Syscall(m) => Some(m.payload.syscall_type()),
            Message::Hello(_) | Message::Probe(_) => None,
        })
        .collect();
    types.sort();
    types.dedup();
    assert_eq!(types, (1..=29).collect::<Vec<_>>());
}

// ---- what the agent accepts besides what Go writes -------------------------------

/// A body written by hand with rmp, the way another encoder could write it.
fn compact(build: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut body = Vec::new();
    build(&mut body);
    body
}

fn key(body: &mut Vec<u8>, k: &str) {
    rmp::encode::write_str(body, k).unwrap();
}

#[test]
fn compact_integers_any_key_order_unknown_keys_and_nested_embedded_structs_decode() {
    let body = compact(|w| {
        rmp::encode::write_map_len(w, 4).unwrap();
        key(w, "SeqNum");
        rmp::encode::write_uint(w, 12).unwrap();
        key(w, "Syscall");
        rmp::encode::write_map_len(w, 5).unwrap();
        key(w, "Open");
        rmp::encode::write_map_len(w, 2).unwrap();
        key(w, "FileSyscallMsg");
        rmp::encode::write_map_len(w, 1).unwrap();
        key(w, "Filename");
        rmp::encode::write_bin(w, b"/etc/passwd").unwrap();
        key(w, "Flags");
        rmp::encode::write_uint(w, 2).unwrap();
        key(w, "PID");
        rmp::encode::write_uint(w, 7).unwrap();
        key(w, "Retval");
        rmp::encode::write_sint(w, -13).unwrap();
        key(w, "Type");
        rmp::encode::write_uint(w, 3).unwrap();
        // Another payload, for another type: read, then left aside.
        key(w, "Exit");
        rmp::encode::write_map_len(w, 0).unwrap();
        key(w, "Type");
        rmp::encode::write_uint(w, 2).unwrap();
        key(w, "Hello");
        rmp::encode::write_nil(w).unwrap();
    });
    let open =
        OpenSyscallMsg { file: FileSyscallMsg { filename: "/etc/passwd".into(), ..Default::default() }, flags: 2 };
    let expected = SyscallMsg {
        pid: 7,
        span_context: None,
        timestamp: 0,
        retval: -13,
        container_id: String::new(),
        cgroup_id: String::new(),
        payload: Payload::Open(open),
        fake_socket: None,
    };
    assert_eq!(Message::decode(&body), Ok(Received::Message(Message::Syscall(Box::new(expected)))));
}

#[test]
fn messages_the_agent_crashes_on_or_ignores_are_told_apart() {
    let message = |message_type: u64, hello: bool, syscall: Option<(u64, &str)>| {
        compact(|w| {
            rmp::encode::write_map_len(w, 3).unwrap();
            key(w, "Type");
            rmp::encode::write_uint(w, message_type).unwrap();
            key(w, "Hello");
            if hello {
                rmp::encode::write_map_len(w, 0).unwrap();
            } else {
                rmp::encode::write_nil(w).unwrap();
            }
            key(w, "Syscall");
            match syscall {
                Some((syscall_type, payload)) => {
                    rmp::encode::write_map_len(w, 2).unwrap();
                    key(w, "Type");
                    rmp::encode::write_uint(w, syscall_type).unwrap();
                    key(w, payload);
                    rmp::encode::write_nil(w).unwrap();
                }
                None => rmp::encode::write_nil(w).unwrap(),
            }
        })
    };
    assert_eq!(Message::decode(&message(1, false, None)), Err(DecodeError::MissingHello));
    assert_eq!(Message::decode(&message(2, false, None)), Err(DecodeError::MissingSyscall));
    assert_eq!(Message::decode(&message(2, false, Some((1, "Exec")))), Err(DecodeError::MissingPayload(1)));
    assert_eq!(Message::decode(&message(2, false, Some((22, "Umount")))), Err(DecodeError::MissingPayload(22)));
    assert_eq!(Message::decode(&message(2, false, Some((30, "Future")))), Ok(Received::UnknownSyscall(30)));
    assert_eq!(Message::decode(&message(2, false, Some((0, "Exec")))), Ok(Received::UnknownSyscall(0)));
    assert_eq!(Message::decode(&message(3, false, None)), Ok(Received::Goodbye));
    assert_eq!(Message::decode(&message(9, false, None)), Ok(Received::UnknownMessage(9)));
    let empty_hello = HelloMsg::default();
    assert_eq!(Message::decode(&message(1, true, None)), Ok(Received::Message(Message::Hello(empty_hello))));
    // A wrong type for a field is an error, as in the agent.
    let float_type = compact(|w| {
        rmp::encode::write_map_len(w, 1).unwrap();
        key(w, "Type");
        rmp::encode::write_f64(w, 1.0).unwrap();
    });
    assert_eq!(Message::decode(&float_type), Err(DecodeError::Unexpected { expected: "an integer", found: 0xcb }));
}

#[test]
fn the_probe_is_the_golden_hello_with_one_more_envelope_key_which_only_true_makes_a_probe() {
    let golden = golden_named("01-hello");
    let Message::Hello(hello) = message_from_json(&golden.json) else { panic!("not a hello") };
    let probe = frame(Message::Probe(hello.clone())).unwrap();
    // The agent reads the Hello it would read from Datadog's tracer, and
    // skips the key it does not know.
    let key = [&[0xaa][..], b"OffersGRPC"].concat();
    let mut expected = [&golden.frame[4..], &key, &[0xc3]].concat();
    expected[0] = 0x84;
    assert_eq!(probe[4..], expected);
    assert_eq!(u32::from_le_bytes(probe[..4].try_into().unwrap()) as usize, expected.len());
    assert_eq!(Message::decode(&probe[4..]), Ok(Received::Message(Message::Probe(hello.clone()))));
    for not_true in [0xc2, 0xc0, 0x01] {
        let body = [&expected[..expected.len() - 1], &[not_true]].concat();
        assert_eq!(Message::decode(&body), Ok(Received::Message(Message::Hello(hello.clone()))), "{not_true:#x}");
    }
    // Skipped whatever it holds, as by the agent.
    let body = [&expected[..expected.len() - 1], &[0x91, 0xc3]].concat();
    assert_eq!(Message::decode(&body), Ok(Received::Message(Message::Hello(hello))));
}

// ---- hostile input ----------------------------------------------------------------

/// xorshift64*: reproducible noise without a dependency.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn every_cut_golden_body_is_an_error() {
    for g in golden() {
        let body = &g.frame[4..];
        for len in 0..body.len() {
            assert_eq!(Message::decode(&body[..len]), Err(DecodeError::Truncated), "{} cut at {len}", g.name);
        }
    }
}

#[test]
fn random_and_mutated_bodies_never_panic() {
    let goldens = golden();
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    for _ in 0..20_000 {
        let len = (noise.next() % 600) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| noise.next() as u8).collect();
        let _ = Message::decode(&bytes);
    }
    for g in &goldens {
        for _ in 0..500 {
            let mut body = g.frame[4..].to_vec();
            for _ in 0..=noise.next() % 4 {
                let at = (noise.next() % body.len() as u64) as usize;
                body[at] = noise.next() as u8;
            }
            let _ = Message::decode(&body);
        }
    }
}

#[test]
fn forged_lengths_are_errors_without_allocating_them() {
    // An Exec whose Args claims 2^32 - 1 entries, and a key claiming 4 GiB.
    let args = compact(|w| {
        rmp::encode::write_map_len(w, 2).unwrap();
        key(w, "Type");
        rmp::encode::write_uint(w, 2).unwrap();
        key(w, "Syscall");
        rmp::encode::write_map_len(w, 2).unwrap();
        key(w, "Type");
        rmp::encode::write_uint(w, 1).unwrap();
        key(w, "Exec");
        rmp::encode::write_map_len(w, 1).unwrap();
        key(w, "Args");
        rmp::encode::write_array_len(w, u32::MAX).unwrap();
    });
    assert_eq!(Message::decode(&args), Err(DecodeError::Truncated));
    assert_eq!(Message::decode(&[0x81, 0xdb, 0xff, 0xff, 0xff, 0xff]), Err(DecodeError::Truncated));
    assert_eq!(Message::decode(&[0xdf, 0xff, 0xff, 0xff, 0xff]), Err(DecodeError::Truncated));
    // Not a map at all.
    assert!(matches!(Message::decode(&[0x93, 1, 2, 3]), Err(DecodeError::Unexpected { expected: "a map", .. })));
    assert_eq!(Message::decode(&[]), Err(DecodeError::Truncated));
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().build().expect("runtime")
}

fn read_all(mut stream: &[u8]) -> Vec<Result<Option<Vec<u8>>, String>> {
    runtime().block_on(async {
        let mut frames = Vec::new();
        loop {
            let next = read_frame(&mut stream).await.map_err(|e| e.to_string());
            let end = !matches!(next, Ok(Some(_)));
            frames.push(next);
            if end {
                return frames;
            }
        }
    })
}

#[test]
fn frames_are_read_back_to_back_and_a_clean_end_is_none() {
    let goldens = golden();
    let stream: Vec<u8> = goldens.iter().flat_map(|g| g.frame.clone()).collect();
    let frames = read_all(&stream);
    assert_eq!(frames.len(), goldens.len() + 1);
    for (read, g) in frames.iter().zip(&goldens) {
        assert_eq!(read.as_ref().ok().and_then(Option::as_ref), Some(&g.frame[4..].to_vec()), "{}", g.name);
    }
    assert_eq!(frames.last(), Some(&Ok(None)));
}

#[test]
fn frames_cut_short_empty_or_over_the_limit_are_errors() {
    let hello = golden_named("01-hello").frame;
    let last = |stream: &[u8]| read_all(stream).pop().expect("one result");
    assert_eq!(last(&hello[..2]), Err(FrameError::TruncatedHeader(2).to_string()));
    assert_eq!(last(&hello[..40]), Err(FrameError::TruncatedBody { expected: 182, got: 36 }.to_string()));
    assert_eq!(last(&[0, 0, 0, 0]), Err(FrameError::Empty.to_string()));
    let over = (MAX_BODY as u32 + 1).to_le_bytes();
    assert_eq!(last(&over), Err(FrameError::TooLarge(MAX_BODY as u32 + 1).to_string()));
    assert_eq!(last(&[0xff; 4]), Err(FrameError::TooLarge(u32::MAX).to_string()));
    // Exactly the limit is a frame.
    let mut limit = (MAX_BODY as u32).to_le_bytes().to_vec();
    limit.resize(4 + MAX_BODY, 0xc0);
    assert_eq!(read_all(&limit)[0].as_ref().map(|f| f.as_ref().map(Vec::len)), Ok(Some(MAX_BODY)));
}

// ---- the 256 KiB bound -------------------------------------------------------------

fn exec_message(args: Vec<String>, envs: Vec<String>) -> Message {
    Message::Syscall(Box::new(SyscallMsg {
        pid: 7,
        span_context: None,
        timestamp: 1,
        retval: 0,
        container_id: "c".repeat(64),
        cgroup_id: String::new(),
        payload: Payload::Exec(ExecSyscallMsg {
            file: FileSyscallMsg { filename: format!("/{}", "p".repeat(4000)), ..Default::default() },
            args: Some(args),
            envs: Some(envs),
            ..Default::default()
        }),
        fake_socket: None,
    }))
}

fn entries(prefix: &str, count: usize) -> Vec<String> {
    // 352 bytes and "...": the longest entry Datadog's tracer keeps.
    (0..count).map(|n| format!("{prefix}{n:05}={}...", "x".repeat(352 - prefix.len() - 6))).collect()
}

fn decoded_exec(frame: &[u8]) -> ExecSyscallMsg {
    match Message::decode(&frame[4..]) {
        Ok(Received::Message(Message::Syscall(syscall))) => match syscall.payload {
            Payload::Exec(exec) => exec,
            other => panic!("not an exec: {other:?}"),
        },
        other => panic!("not an exec: {other:?}"),
    }
}

#[test]
fn an_exec_over_the_limit_loses_environment_entries_from_the_end_first() {
    // Datadog's bounds (356 entries of each) and a 4 KiB path fit whole...
    let whole = decoded_exec(&frame(exec_message(entries("A", 356), entries("E", 356))).expect("fits"));
    assert!(!whole.args_truncated && !whole.envs_truncated);
    // ...more environment does not.
    let (args, envs) = (entries("A", 356), entries("E", 400));
    let framed = frame(exec_message(args.clone(), envs.clone())).expect("fits once cut");
    assert!(framed.len() - 4 <= MAX_BODY);
    let exec = decoded_exec(&framed);
    let kept = exec.envs.expect("envs");
    assert!(exec.envs_truncated && !exec.args_truncated);
    assert_eq!(exec.args.as_ref(), Some(&args));
    assert!(kept.len() < envs.len() && kept[..] == envs[..kept.len()]);
    // No more was cut than needed: one more entry would not fit.
    let mut one_more = exec_message(args, envs[..=kept.len()].to_vec());
    if let Message::Syscall(syscall) = &mut one_more {
        if let Payload::Exec(exec) = &mut syscall.payload {
            exec.envs_truncated = true;
        }
    }
    assert!(body_len(&one_more) > MAX_BODY);
}

fn body_len(message: &Message) -> usize {
    let mut w = Writer::default();
    message.encode(&mut w);
    w.into_bytes().len()
}

#[test]
fn an_exec_whose_arguments_alone_are_over_the_limit_loses_them_too() {
    let framed = frame(exec_message(entries("A", 1000), entries("E", 10))).expect("fits once cut");
    assert!(framed.len() - 4 <= MAX_BODY);
    let exec = decoded_exec(&framed);
    assert!(exec.envs_truncated && exec.args_truncated);
    assert_eq!(exec.envs, Some(vec![]));
    assert_eq!(exec.args.as_deref(), Some(&entries("A", 1000)[..exec.args.as_ref().unwrap().len()]));
}

#[test]
fn a_body_of_exactly_the_limit_is_kept_whole_and_one_byte_more_is_cut() {
    let base = frame(exec_message(vec![], vec![String::new()])).unwrap().len() - 4;
    // An entry over 64 KiB has a 5-byte header (str32), the empty one 1.
    let exact = "e".repeat(MAX_BODY - base - 4);
    let framed = frame(exec_message(vec![], vec![exact.clone()])).unwrap();
    assert_eq!(framed.len() - 4, MAX_BODY);
    assert_eq!(decoded_exec(&framed).envs, Some(vec![exact.clone()]));
    let framed = frame(exec_message(vec![], vec![exact + "e"])).unwrap();
    let exec = decoded_exec(&framed);
    assert_eq!((exec.envs, exec.envs_truncated), (Some(vec![]), true));
}

#[test]
fn a_hello_loses_entrypoint_arguments_and_other_messages_are_refused() {
    let hello = HelloMsg {
        nsid: 1,
        container_context: Some(ContainerContext::default()),
        entrypoint_args: Some(entries("A", 1000)),
        mode: MODE_WRAPPED.into(),
    };
    let framed = frame(Message::Hello(hello)).expect("fits once cut");
    assert!(framed.len() - 4 <= MAX_BODY);
    match Message::decode(&framed[4..]) {
        Ok(Received::Message(Message::Hello(h))) => {
            let kept = h.entrypoint_args.expect("args");
            assert!(!kept.is_empty() && kept[..] == entries("A", 1000)[..kept.len()]);
        }
        other => panic!("not a hello: {other:?}"),
    }
    let mut open = golden_syscall("03-open");
    if let Payload::Open(o) = &mut open.payload {
        o.file.filename = "/".repeat(MAX_BODY);
    }
    assert!(matches!(frame(Message::Syscall(Box::new(open))), Err(TooLarge { body }) if body > MAX_BODY));
}

// ---- our events as Datadog messages ---------------------------------------------------

const CONTAINER: &str = "8f1d2c3b4a5968778695a4b3c2d1e0f1-1234567890";

fn event(pid: u32, timestamp_ns: u64, retval: Option<i64>, syscall: &str, payload: Ours) -> Event {
    Event {
        pid,
        tid: pid,
        ppid: 1,
        timestamp: Some(pbjson_types::Timestamp {
            seconds: (timestamp_ns / 1_000_000_000) as i64,
            nanos: (timestamp_ns % 1_000_000_000) as i32,
        }),
        retval,
        syscall: syscall.into(),
        payload: Some(payload),
        ..Default::default()
    }
}

/// The golden message, less what we never know (the cgroup path).
fn golden_without_cgroup(name: &str) -> SyscallMsg {
    SyscallMsg { cgroup_id: String::new(), ..golden_syscall(name) }
}

#[test]
fn events_we_know_whole_give_the_golden_messages() {
    let connect = |address: &str, port, family: AddressFamily| {
        Ours::Connect(proto::ConnectEvent {
            address: address.into(),
            port,
            family: family as i32,
            protocol: Protocol::Tcp as i32,
            fd: Some(3),
            ..Default::default()
        })
    };
    let exit = |cause: ExitCause, code, signal| {
        Ours::Exit(proto::ExitEvent { cause: cause as i32, code, signal, core_dumped: false })
    };
    let caps =
        proto::Credentials { cap_effective: Some(2818844155), cap_permitted: Some(2818844155), ..Default::default() };
    let cases = [
        (
            "04-connect",
            event(7, 1767225600003000009, Some(-115), "connect", connect("10.0.2.15", 443, AddressFamily::Inet)),
        ),
        (
            "20-connect-ipv6",
            event(7, 1767225600107000321, Some(0), "connect", connect("2001:db8::10", 5432, AddressFamily::Inet6)),
        ),
        (
            "05-fork",
            event(
                7,
                1767225600004000012,
                Some(31),
                "clone",
                Ours::Fork(proto::ForkEvent { child_pid: 31, kind: 1, flags: 0 }),
            ),
        ),
        ("06-exit", event(31, 1767225600005000015, None, "exit", exit(ExitCause::Exited, Some(0), None))),
        ("18-exit-signaled", event(31, 1767225600105000315, None, "exit", exit(ExitCause::Signaled, None, Some(9)))),
        (
            "11-capset",
            event(
                7,
                1767225600010000030,
                Some(0),
                "capset",
                Ours::Credentials(proto::CredentialsEvent {
                    credentials: Some(caps),
                    requested: vec![2818844155, 2818844155, 0],
                }),
            ),
        ),
        (
            "12-bind",
            event(
                7,
                1767225600011000033,
                Some(0),
                "bind",
                Ours::Bind(proto::BindEvent {
                    address: "0.0.0.0".into(),
                    port: 8080,
                    family: AddressFamily::Inet as i32,
                    protocol: Protocol::Tcp as i32,
                    fd: Some(3),
                }),
            ),
        ),
        (
            "21-bind-unix",
            event(
                7,
                1767225600108000324,
                Some(0),
                "bind",
                Ours::Bind(proto::BindEvent {
                    address: "/run/app.sock".into(),
                    port: 0,
                    family: AddressFamily::Unix as i32,
                    protocol: Protocol::Unspecified as i32,
                    fd: Some(3),
                }),
            ),
        ),
        (
            "13-accept",
            event(
                7,
                1767225600012000036,
                Some(5),
                "accept4",
                Ours::Accept(proto::AcceptEvent {
                    address: "10.0.3.77".into(),
                    port: 51234,
                    family: AddressFamily::Inet as i32,
                    protocol: Protocol::Tcp as i32,
                    fd: Some(0),
                    local_port: 8080,
                }),
            ),
        ),
        (
            "34-mount",
            event(
                7,
                1767225600121000363,
                Some(-1),
                "mount",
                Ours::Namespace(proto::NamespaceEvent {
                    path: "/mnt/data".into(),
                    source: "/srv/data".into(),
                    flags: 0x1000 | 0x4000,
                    flag_names: vec!["MS_BIND".into(), "MS_REC".into()],
                    ..Default::default()
                }),
            ),
        ),
        (
            "35-umount",
            event(
                7,
                1767225600122000366,
                Some(-1),
                "umount2",
                Ours::Namespace(proto::NamespaceEvent { path: "/mnt/data".into(), ..Default::default() }),
            ),
        ),
    ];
    for (name, ours) in cases {
        let message = outbound::syscall(&ours, CONTAINER).unwrap_or_else(|| panic!("{name}: no message"));
        assert_eq!(message, golden_without_cgroup(name), "{name}");
    }
}

#[test]
fn file_events_keep_paths_modes_and_ids_without_file_metadata() {
    let file_event =
        |syscall: &str, operation: FileOperation, path: &str, target: &str, mode, ids: Option<(i64, i64)>| {
            let file = proto::FileEvent {
                operation: operation as i32,
                path: path.into(),
                target: target.into(),
                mode,
                uid: ids.map(|i| i.0),
                gid: ids.map(|i| i.1),
                ..Default::default()
            };
            outbound::syscall(&event(7, 5, Some(0), syscall, Ours::File(file)), "").map(|m| m.payload)
        };
    let named = |path: &str| FileSyscallMsg { filename: path.into(), ..Default::default() };
    assert_eq!(
        file_event("unlinkat", FileOperation::Rmdir, "/var/lib/app", "", None, None),
        Some(Payload::Rmdir(RmdirSyscallMsg { file: named("/var/lib/app") }))
    );
    assert_eq!(
        file_event("renameat2", FileOperation::Rename, "/tmp/a.tmp", "/tmp/a", None, None),
        Some(Payload::Rename(RenameSyscallMsg { old_file: named("/tmp/a.tmp"), new_file: named("/tmp/a") }))
    );
    assert_eq!(
        file_event("symlink", FileOperation::Symlink, "/tmp/current", "app.cfg", None, None),
        Some(Payload::Link(LinkSyscallMsg {
            link_type: LINK_SYMBOLIC,
            target: named("app.cfg"),
            link: named("/tmp/current")
        }))
    );
    assert_eq!(
        file_event("linkat", FileOperation::Link, "/tmp/b", "/tmp/a", None, None),
        Some(Payload::Link(LinkSyscallMsg { link_type: LINK_HARD, target: named("/tmp/a"), link: named("/tmp/b") }))
    );
    assert_eq!(
        file_event("mkdir", FileOperation::Mkdir, "/tmp/cache", "", Some(0o755), None),
        Some(Payload::Mkdir(MkdirSyscallMsg { dir: named("/tmp/cache"), mode: 0o755 }))
    );
    assert_eq!(
        file_event("fchmod", FileOperation::Chmod, "/tmp/a", "", Some(0o600), None),
        Some(Payload::Chmod(ChmodSyscallMsg { file: named("/tmp/a"), mode: 0o600 }))
    );
    assert_eq!(
        file_event("chown", FileOperation::Chown, "/tmp/a", "", None, Some((1000, -1))),
        Some(Payload::Chown(ChownSyscallMsg { file: named("/tmp/a"), uid: 1000, gid: -1, ..Default::default() }))
    );
    assert_eq!(
        file_event("unlink", FileOperation::Unlink, "/tmp/a", "", None, None),
        Some(Payload::Unlink(UnlinkSyscallMsg { file: named("/tmp/a") }))
    );
    for (syscall, operation) in [
        ("ftruncate", FileOperation::Truncate),
        ("setxattr", FileOperation::Setxattr),
        ("removexattr", FileOperation::Removexattr),
        ("mknodat", FileOperation::Mknod),
    ] {
        assert_eq!(file_event(syscall, operation, "/tmp/a", "", None, None), None, "{syscall}: no Datadog type");
    }
}

#[test]
fn utimes_send_nanoseconds_and_memfds_go_as_opens_of_memfd_names() {
    let sent = |file: proto::FileEvent, syscall: &str| {
        let called = 1_767_225_600_000_000_042;
        outbound::syscall(&event(7, called, Some(0), syscall, Ours::File(file)), "").map(|m| m.payload)
    };
    let time = |seconds, nanos| Some(proto::FileTime { seconds, nanos, ..Default::default() });
    let special = |now, omit| Some(proto::FileTime { now, omit, ..Default::default() });
    let named = |path: &str| FileSyscallMsg { filename: path.into(), ..Default::default() };
    let utimes = |access_time, modification_time| proto::FileEvent {
        operation: FileOperation::Utimes as i32,
        path: "/tmp/a".into(),
        access_time,
        modification_time,
        ..Default::default()
    };
    assert_eq!(
        sent(utimes(time(5, 6), time(-1, 0)), "utimensat"),
        Some(Payload::Utimes(UtimesSyscallMsg { file: named("/tmp/a"), atime: 5_000_000_006, mtime: 0 })),
        "before 1970: 0"
    );
    assert_eq!(
        sent(utimes(special(true, false), special(false, true)), "utimensat"),
        Some(Payload::Utimes(UtimesSyscallMsg { file: named("/tmp/a"), atime: 1_767_225_600_000_000_042, mtime: 0 })),
        "now is the call's time, omit 0"
    );
    assert_eq!(sent(utimes(None, None), "utimes"), None, "times unread: nothing true to send");
    let memfd = proto::FileEvent {
        operation: FileOperation::MemfdCreate as i32,
        path: "/memfd:x (deleted)".into(),
        name: "x".into(),
        flags: 1,
        ..Default::default()
    };
    assert_eq!(sent(memfd, "memfd_create"), Some(Payload::Open(OpenSyscallMsg { file: named("memfd:x"), flags: 1 })));
}

#[test]
fn execs_carry_the_program_argv_envp_flags_credentials_and_parent() {
    let exec = proto::ExecEvent {
        path: "/usr/bin/sh".into(),
        args: vec!["sh".into(), "-c".into(), "id".into()],
        args_truncated: false,
        envs: vec![],
        envs_truncated: true,
        cwd: "/".into(),
        credentials: Some(proto::Credentials {
            uid: Some(1000),
            gid: Some(1001),
            euid: Some(0),
            egid: Some(1001),
            ..Default::default()
        }),
        executable: "/usr/bin/dash".into(),
        ..Default::default()
    };
    let mut ours = event(31, 9, Some(0), "execve", Ours::Exec(exec.clone()));
    ours.ppid = 7;
    let message = outbound::syscall(&ours, CONTAINER).expect("exec");
    let expected = ExecSyscallMsg {
        file: FileSyscallMsg { filename: "/usr/bin/sh".into(), ..Default::default() },
        args: Some(exec.args.clone()),
        args_truncated: false,
        envs: Some(vec![]),
        envs_truncated: true,
        tty: String::new(),
        credentials: Some(Credentials { uid: 1000, euid: 0, gid: 1001, egid: 1001, ..Default::default() }),
        ppid: 7,
        from_procfs: false,
    };
    assert_eq!((message.pid, message.retval, message.payload), (31, 0, Payload::Exec(expected)));

    // A process found running (at attach, or by the /proc scan) is one the
    // agent did not see start: it links it to its parent by ppid.
    for found in [
        proto::ExecEvent { seen_at_attach: true, ..exec.clone() },
        proto::ExecEvent { from_procfs: true, ..exec.clone() },
    ] {
        let ours = event(31, 9, None, "", Ours::Exec(found));
        let Some(Payload::Exec(sent)) = outbound::syscall(&ours, CONTAINER).map(|m| m.payload) else { panic!("exec") };
        assert!(sent.from_procfs);
    }
    // An empty argv is nil, as Datadog's tracer sends it.
    let bare = Ours::Exec(proto::ExecEvent { args: vec![], ..exec.clone() });
    match outbound::syscall(&event(31, 9, Some(0), "execve", bare), CONTAINER).map(|m| m.payload) {
        Some(Payload::Exec(e)) => assert_eq!(e.args, None),
        other => panic!("{other:?}"),
    }
    // A failed exec is not sent: the agent would take it for done.
    assert_eq!(outbound::syscall(&event(31, 9, Some(-13), "execve", Ours::Exec(exec)), CONTAINER), None);
}

#[test]
fn credential_changes_send_the_kernel_ids_after_success_only() {
    let after = proto::Credentials {
        uid: Some(1000),
        euid: Some(1000),
        suid: Some(1000),
        fsuid: Some(1000),
        gid: Some(50),
        egid: Some(51),
        sgid: Some(52),
        fsgid: Some(53),
        ..Default::default()
    };
    let change = |syscall: &str, retval: i64, requested: Vec<i64>| {
        let credentials = proto::CredentialsEvent { credentials: Some(after.clone()), requested };
        outbound::syscall(&event(7, 1, Some(retval), syscall, Ours::Credentials(credentials)), "").map(|m| m.payload)
    };
    let set_uid = Some(Payload::SetUid(SetUidSyscallMsg { uid: 1000, euid: 1000, ..Default::default() }));
    assert_eq!(change("setuid", 0, vec![1000]), set_uid);
    assert_eq!(change("setresuid32", 0, vec![-1, 1000, -1]), set_uid);
    assert_eq!(
        change("setregid", 0, vec![50, 51]),
        Some(Payload::SetGid(SetGidSyscallMsg { gid: 50, egid: 51, ..Default::default() }))
    );
    // Refused: the agent would apply the ids it is sent.
    assert_eq!(change("setuid", -1, vec![0]), None);
    assert_eq!(change("capset", -1, vec![0, 0, 0]), None);
    // setfs*id has no failure but its return value: the kernel's ids are the truth.
    assert_eq!(
        change("setfsuid", 1000, vec![0]),
        Some(Payload::SetFsUid(SetFsUidSyscallMsg { fsuid: 1000, ..Default::default() }))
    );
    assert_eq!(
        change("setfsgid32", 53, vec![0]),
        Some(Payload::SetFsGid(SetFsGidSyscallMsg { fsgid: 53, ..Default::default() }))
    );
}

#[test]
fn events_the_agent_has_no_type_for_or_would_misread_are_none() {
    let open = || Ours::Open(proto::OpenEvent { path: "/lib/libc.so.6".into(), flags: Some(0), ..Default::default() });
    let send = |retval: i64, payload: Ours| outbound::syscall(&event(7, 1, Some(retval), "x", payload), "").is_some();
    assert!(send(3, open()));
    assert!(send(-13, open()));
    assert!(!send(-2, open()));
    let connect = |family: AddressFamily, address: &str| {
        Ours::Connect(proto::ConnectEvent {
            address: address.into(),
            port: 80,
            family: family as i32,
            protocol: 1,
            fd: Some(3),
            ..Default::default()
        })
    };
    assert!(send(-111, connect(AddressFamily::Inet, "127.0.0.1")));
    assert!(!send(-101, connect(AddressFamily::Inet, "127.0.0.1")));
    assert!(!send(0, connect(AddressFamily::Unix, "/run/agent.sock")));
    assert!(!send(0, connect(AddressFamily::Other, "")));
    // An address the agent could not parse would cost the connection.
    assert!(!send(0, connect(AddressFamily::Inet, "")));
    assert!(!send(0, connect(AddressFamily::Inet, "::1")));
    assert!(!send(0, Ours::IoUring(proto::IoUringEvent { entries: 8, flags: 0 })));
    let exit = Ours::Exit(proto::ExitEvent::default());
    assert!(!send(0, exit));
}

#[test]
fn the_hello_carries_mode_namespace_container_and_entrypoint() {
    let ours = proto::Hello {
        tracer_version: "0.1.0".into(),
        session_id: "00112233445566778899aabbccddeeff".into(),
        mode: proto::Mode::Wrapped as i32,
        pid_namespace: 4026531836,
        container: Some(proto::ContainerContext {
            id: CONTAINER.into(),
            created_at: Some(pbjson_types::Timestamp { seconds: 1767225595, nanos: 0 }),
            ..Default::default()
        }),
        entrypoint_args: vec!["python3".into(), "app.py".into(), "--port".into(), "8080".into()],
        hostname: "ip-10-0-1-23".into(),
        protocol_version: proto::PROTOCOL_VERSION,
    };
    let golden = golden_named("01-hello");
    assert_eq!(frame(Message::Hello(outbound::hello(&ours))), Ok(golden.frame));
    // Without a pid namespace: non-zero, and the same for the whole session.
    let unknown = proto::Hello { pid_namespace: 0, mode: proto::Mode::Attached as i32, ..ours.clone() };
    let hello = outbound::hello(&unknown);
    assert_ne!(hello.nsid, 0);
    assert_eq!(hello.nsid, outbound::hello(&unknown).nsid);
    assert_ne!(hello.nsid, outbound::hello(&proto::Hello { session_id: "other".into(), ..unknown }).nsid);
    assert_eq!((hello.mode.as_str(), hello.entrypoint_args), (MODE_ATTACHED, None));
}

// ---- Datadog messages as our events ---------------------------------------------------

fn inbound_event(name: &str) -> Option<Event> {
    inbound::event(&golden_syscall(name))
}

fn payload_of(name: &str) -> Ours {
    inbound_event(name).and_then(|e| e.payload).unwrap_or_else(|| panic!("{name}: no event"))
}

#[test]
fn golden_messages_become_our_events() {
    let exec = inbound_event("02-exec").expect("exec");
    assert_eq!((exec.pid, exec.tid, exec.ppid, exec.retval, exec.syscall.as_str()), (7, 7, 0, Some(0), "execve"));
    assert_eq!(exec.timestamp, Some(pbjson_types::Timestamp { seconds: 1767225600, nanos: 1000003 }));
    match exec.payload {
        Some(Ours::Exec(e)) => {
            assert_eq!(e.path, "/usr/local/bin/python3.12");
            assert_eq!(e.args, ["python3", "app.py", "--port", "8080"]);
            assert_eq!(e.envs.len(), 4);
            assert_eq!(e.credentials.and_then(|c| c.uid), Some(0));
        }
        other => panic!("{other:?}"),
    }
    let fork = inbound_event("05-fork").expect("fork");
    assert_eq!((fork.pid, fork.retval), (7, Some(31)));
    assert_eq!(fork.payload, Some(Ours::Fork(proto::ForkEvent { child_pid: 31, kind: 0, flags: 0 })));
    let signaled = inbound_event("18-exit-signaled").expect("exit");
    assert_eq!((signaled.pid, signaled.retval), (31, None));
    let expected = proto::ExitEvent { cause: ExitCause::Signaled as i32, signal: Some(9), ..Default::default() };
    assert_eq!(signaled.payload, Some(Ours::Exit(expected)));
    // An open with O_CREAT keeps the permission bits of Mode.
    assert_eq!(
        payload_of("19-open-spancontext"),
        Ours::Open(proto::OpenEvent {
            path: "/srv/data/report.csv".into(),
            flags: Some(577),
            mode: 0o644,
            ..Default::default()
        })
    );
    assert_eq!(
        payload_of("03-open"),
        Ours::Open(proto::OpenEvent { path: "/etc/passwd".into(), flags: Some(0o2000000), ..Default::default() })
    );
    assert_eq!(
        payload_of("20-connect-ipv6"),
        Ours::Connect(proto::ConnectEvent {
            address: "2001:db8::10".into(),
            port: 5432,
            family: AddressFamily::Inet6 as i32,
            protocol: Protocol::Tcp as i32,
            fd: None,
            ..Default::default()
        })
    );
    assert_eq!(
        payload_of("21-bind-unix"),
        Ours::Bind(proto::BindEvent {
            address: String::new(),
            port: 0,
            family: AddressFamily::Unix as i32,
            protocol: Protocol::Unspecified as i32,
            fd: None,
        })
    );
    assert_eq!(
        payload_of("13-accept"),
        Ours::Accept(proto::AcceptEvent {
            address: "10.0.3.77".into(),
            local_port: 8080,
            family: AddressFamily::Inet as i32,
            ..Default::default()
        })
    );
    let requested = |ids: Vec<i64>| Ours::Credentials(proto::CredentialsEvent { credentials: None, requested: ids });
    assert_eq!(payload_of("10-setuid"), requested(vec![1000, -1]));
    assert_eq!(inbound_event("10-setuid").map(|e| e.syscall), Some("setreuid".into()));
    assert_eq!(payload_of("11-capset"), requested(vec![2818844155, 2818844155]));
    let file = |operation: FileOperation, path: &str, target: &str| proto::FileEvent {
        operation: operation as i32,
        path: path.into(),
        target: target.into(),
        ..Default::default()
    };
    assert_eq!(payload_of("08-rename"), Ours::File(file(FileOperation::Rename, "/tmp/app.cfg.tmp", "/tmp/app.cfg")));
    assert_eq!(payload_of("26-rmdir"), Ours::File(file(FileOperation::Rmdir, "/var/lib/app", "")));
    assert_eq!(
        payload_of("28-link-symlink"),
        Ours::File(file(FileOperation::Symlink, "/tmp/current.cfg", "/tmp/app.cfg"))
    );
    assert_eq!(
        payload_of("29-link-hardlink"),
        Ours::File(file(FileOperation::Link, "/tmp/app.cfg.bak", "/tmp/app.cfg"))
    );
    let chown = proto::FileEvent { uid: Some(1000), gid: Some(-1), ..file(FileOperation::Chown, "/tmp/app.cfg", "") };
    assert_eq!(payload_of("30-chown"), Ours::File(chown));
    let mkdir = proto::FileEvent { mode: Some(0o755), ..file(FileOperation::Mkdir, "/tmp/cache", "") };
    assert_eq!(payload_of("25-mkdir"), Ours::File(mkdir));
    assert_eq!(payload_of("33-chdir"), Ours::Chdir(proto::ChdirEvent { path: "/srv/data".into() }));
    let mount = proto::NamespaceEvent {
        path: "/mnt/data".into(),
        source: "/srv/data".into(),
        fstype: "bind".into(),
        ..Default::default()
    };
    assert_eq!(payload_of("34-mount"), Ours::Namespace(mount));
    let umount = proto::NamespaceEvent { path: "/mnt/data".into(), ..Default::default() };
    assert_eq!(payload_of("35-umount"), Ours::Namespace(umount));
    let at = |seconds| Some(proto::FileTime { seconds, ..Default::default() });
    let utimes = proto::FileEvent {
        access_time: at(1_700_000_000),
        modification_time: at(1_700_000_000),
        ..file(FileOperation::Utimes, "/tmp/app.cfg", "")
    };
    assert_eq!(payload_of("27-utimes"), Ours::File(utimes));
}

#[test]
fn types_without_an_event_of_ours_are_none() {
    for name in ["31-loadmodule", "32-unloadmodule", "36-setsockopt-filter", "38-setrlimit", "39-prctl", "40-socket"] {
        assert_eq!(inbound_event(name), None, "{name}");
    }
}

#[test]
fn the_golden_hello_becomes_ours() {
    let Message::Hello(hello) = message_from_json(&golden_named("01-hello").json) else { panic!("not a hello") };
    let ours = inbound::hello(&hello);
    assert_eq!((ours.mode, ours.pid_namespace), (proto::Mode::Wrapped as i32, 4026531836));
    assert_eq!(ours.entrypoint_args, ["python3", "app.py", "--port", "8080"]);
    let container = ours.container.expect("container");
    assert_eq!(container.id, CONTAINER);
    assert_eq!(container.created_at, Some(pbjson_types::Timestamp { seconds: 1767225595, nanos: 0 }));
}

#[test]
fn process_control_and_socket_events_go_as_the_agent_s_types() {
    let send = |syscall: &str, retval: i64, payload: Ours| {
        outbound::syscall(&event(7, 1, Some(retval), syscall, payload), "").map(|m| m.payload)
    };
    let name = proto::PrctlEvent { option: 15, new_name: "worker".into(), ..Default::default() };
    assert_eq!(
        send("prctl", 0, Ours::Prctl(name)),
        Some(Payload::Prctl(PrctlSyscallMsg { option: Int(15), arg2: 0, new_name: "worker".into() }))
    );
    let limit = proto::RlimitEvent { resource: 7, soft: Some(64), hard: Some(u64::MAX), pid: 9, ..Default::default() };
    assert_eq!(
        send("prlimit64", 0, Ours::Rlimit(limit)),
        Some(Payload::Setrlimit(SetrlimitSyscallMsg { resource: Int(7), cur_limit: 64, max_limit: u64::MAX, pid: 9 }))
    );
    let filter = proto::SetsockoptEvent {
        level: 1,
        option: 26,
        socket_family: Some(17),
        socket_type: Some(3),
        socket_protocol: Some(768),
        filter: vec![0; 16],
        filter_instructions: Some(2),
        ..Default::default()
    };
    assert_eq!(
        send("setsockopt", 0, Ours::Setsockopt(filter.clone())),
        Some(Payload::Setsockopt(SetsockoptSyscallMsg {
            socket_family: 17,
            socket_protocol: 768,
            socket_type: 3,
            level: 1,
            opt_name: 26,
            filter: Some(vec![0; 16]),
            filter_len: 2,
        }))
    );
    // The socket's kind unknown: the agent would take zeros for fact.
    let unknown = proto::SetsockoptEvent { socket_family: None, ..filter };
    assert_eq!(send("setsockopt", 0, Ours::Setsockopt(unknown)), None);
    let load = proto::ModuleEvent { name: "evil".into(), path: "/tmp/evil.ko".into(), ..Default::default() };
    assert_eq!(
        send("finit_module", -1, Ours::Module(load.clone())),
        Some(Payload::LoadModule(LoadModuleSyscallMsg {
            file: FileSyscallMsg { filename: "/tmp/evil.ko".into(), ..Default::default() },
            loaded_from_memory: false,
            name: "evil".into(),
            args: String::new(),
        }))
    );
    assert_eq!(
        send("delete_module", 0, Ours::Module(load.clone())),
        Some(Payload::UnloadModule(UnloadModuleSyscallMsg { name: "evil".into() }))
    );
    // Failures other than EACCES and EPERM are not sent, as by Datadog's tracer.
    assert_eq!(send("init_module", -8, Ours::Module(load)), None);
    // A mount's own FSType when it is no bind; the other namespace calls have no type.
    let tmpfs = proto::NamespaceEvent {
        path: "/mnt".into(),
        source: "none".into(),
        fstype: "tmpfs".into(),
        ..Default::default()
    };
    let mount = MountSyscallMsg { source: "none".into(), target: "/mnt".into(), fs_type: "tmpfs".into() };
    assert_eq!(send("mount", 0, Ours::Namespace(tmpfs.clone())), Some(Payload::Mount(mount)));
    assert_eq!(send("mount", -16, Ours::Namespace(tmpfs.clone())), None);
    assert_eq!(send("chroot", 0, Ours::Namespace(tmpfs)), None);
    // A datagram is no connection; TCP Fast Open is.
    let to = |flags| {
        Ours::Connect(proto::ConnectEvent {
            address: "127.0.0.1".into(),
            port: 53,
            family: AddressFamily::Inet as i32,
            send_flags: flags,
            ..Default::default()
        })
    };
    assert_eq!(send("sendto", 12, to(0)), None);
    assert!(matches!(send("sendto", 12, to(0x2000_0000)), Some(Payload::Connect(_))));
    assert_eq!(send("kill", 0, Ours::Signal(proto::SignalEvent { pid: 1, signal: 9, ..Default::default() })), None);
}

#[test]
fn file_metadata_goes_as_datadog_s_tracer_sends_it() {
    let metadata = proto::FileMetadata {
        mode: 33188,
        user: Some("root".into()),
        group: Some("root".into()),
        mtime: Some(1766000000123456789),
        ctime: Some(1766000000123456789),
        ..Default::default()
    };
    let open = Ours::Open(proto::OpenEvent {
        path: "/etc/passwd".into(),
        flags: Some(0o2000000),
        inode: 786453,
        metadata: Some(metadata.clone()),
        ..Default::default()
    });
    let open = event(7, 1767225600002000006, Some(3), "openat", open);
    assert_eq!(outbound::syscall(&open, CONTAINER), Some(golden_without_cgroup("03-open")));
    let unlink = Ours::File(proto::FileEvent {
        operation: FileOperation::Unlink as i32,
        path: "/tmp/app.lock".into(),
        inode: 917505,
        metadata: Some(metadata.clone()),
        ..Default::default()
    });
    let unlink = event(7, 1767225600006000018, Some(0), "unlink", unlink);
    assert_eq!(outbound::syscall(&unlink, CONTAINER), Some(golden_without_cgroup("07-unlink")));
    // chown's User: the name of the uid asked for.
    let chown = Ours::File(proto::FileEvent {
        operation: FileOperation::Chown as i32,
        path: "/tmp/app.cfg".into(),
        uid: Some(1000),
        gid: Some(-1),
        user: Some("app".into()),
        inode: 917506,
        metadata: Some(proto::FileMetadata { mode: 33152, ..metadata }),
        ..Default::default()
    });
    let chown = event(7, 1767225600117000351, Some(0), "chown", chown);
    assert_eq!(outbound::syscall(&chown, CONTAINER), Some(golden_without_cgroup("30-chown")));
}
