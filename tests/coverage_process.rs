//! Process control and network calls without connect(2) (issue 11): prctl,
//! resource limits, signals, modules, bpf, raw and packet sockets, socket
//! options and sends to a destination. The `procnet` fixture makes each
//! call from x86_64 and i386, succeeding and failing, with calls between
//! them that must not be events, and prints what it got and what the kernel
//! says afterwards; each test compares the exact events with that, in both
//! seccomp and full-ptrace modes.

mod common;

use common::{real_path, retval, Made, Terminal, Trace};
use serde_json::Value;

const MODES: [&[&str]; 2] = [&[], &["--disable-seccomp"]];

/// A protojson number (64-bit ones are strings; zero values are left out).
fn num(value: &Value) -> i64 {
    match value {
        Value::Null => 0,
        Value::String(s) => s.parse::<i128>().map(|v| v as i64).expect("a number"),
        Value::Number(n) => n.as_i64().or_else(|| n.as_u64().map(|u| u as i64)).expect("an integer"),
        other => panic!("not a number: {other}"),
    }
}

fn abi(i386: bool) -> &'static str {
    if i386 {
        "ABI_I386"
    } else {
        "ABI_X86_64"
    }
}

/// The event's syscall, abi and retval.
fn call(event: &Value) -> (String, String, i64) {
    (event["syscall"].as_str().unwrap().to_owned(), event["abi"].as_str().unwrap().to_owned(), retval(event))
}

#[test]
fn prctl_options_that_change_a_process_are_events_with_their_arguments_by_name() {
    for mode in MODES {
        let made = Made::new("procnet", mode, &["prctl"]);
        let events = made.events("prctl", &["prctl"]);
        let got: Vec<_> = events
            .iter()
            .map(|e| {
                let p = &e["prctl"];
                (call(e), num(&p["option"]), num(&p["arg2"]), p["arg2_name"].clone(), p["arg3_name"].clone())
            })
            .collect();
        let at = |label: &str, i386: bool, option: i64, arg2: i64, arg2_name: &str, arg3_name: &str| {
            let name = |n: &str| if n.is_empty() { Value::Null } else { Value::from(n) };
            (
                ("prctl".to_owned(), abi(i386).to_owned(), made.num(label, 0)),
                option,
                arg2,
                name(arg2_name),
                name(arg3_name),
            )
        };
        let name_at = events[0]["prctl"].clone();
        let expected = vec![
            at("set_name", false, 15, num(&name_at["arg2"]), "", ""),
            at("set_name_fault", false, 15, 8, "", ""),
            at("keepcaps_bad", false, 8, 5, "", ""),
            at("ambient_raise", false, 47, 2, "PR_CAP_AMBIENT_RAISE", "CAP_NET_RAW"),
            at("capbset_drop", false, 24, 13, "CAP_NET_RAW", ""),
            at("no_new_privs", false, 38, 1, "", ""),
            at("i386_set_name", true, 15, num(&events[6]["prctl"]["arg2"]), "", ""),
            at("i386_dumpable_bad", true, 4, 7, "", ""),
            at("i386_set_name_high_bits", true, 15, num(&events[8]["prctl"]["arg2"]), "", ""),
        ];
        assert_eq!(got, expected, "{mode:?}: {events:#?}");
        // The names are the kernel's (PR_GET_NAME), never a read that failed.
        assert_eq!(events[0]["prctl"]["new_name"], made.word("set_name", 1));
        assert_eq!(events[0]["prctl"]["option_name"], "PR_SET_NAME");
        assert_eq!(events[0]["unverified"], Value::Null);
        assert_eq!(events[1]["partial"], true);
        assert_eq!(events[6]["prctl"]["new_name"], made.word("i386_set_name", 1));
        assert_eq!(events[5]["prctl"]["option_name"], "PR_SET_NO_NEW_PRIVS");
        // The name the kernel read (low 32 bits of the pointer), not a decoy.
        assert_eq!(made.word("i386_set_name_high_bits", 1), "cws-real");
        assert_eq!(events[8]["prctl"]["new_name"], "cws-real", "{:#?}", events[8]);
        assert!(events[8]["unverified"].is_null(), "{:#?}", events[8]);
        assert_eq!(made.num("no_new_privs", 1), 1);
        // PR_SET_SECCOMP stays a seccomp event; nothing else of prctl is.
        assert!(made.run.of("seccomp").is_empty());
    }
}

#[test]
fn resource_limits_report_resource_limits_and_target_as_the_kernel_then_has_them() {
    for mode in MODES {
        let made = Made::new("procnet", mode, &["rlimit"]);
        let events = made.events("rlimit", &["setrlimit", "prlimit64"]);
        let pid = common::pid_of(events[0]);
        let got: Vec<_> = events
            .iter()
            .map(|e| {
                let r = &e["rlimit"];
                (call(e), r["resource_name"].clone(), num(&r["soft"]) as u64, num(&r["hard"]) as u64, num(&r["pid"]))
            })
            .collect();
        let limit = |label: &str, syscall: &str, i386: bool, resource: &str| {
            let line = &made.lines[label];
            let (soft, hard): (u64, u64) = (line[1].parse().unwrap(), line[2].parse().unwrap());
            ((syscall.to_owned(), abi(i386).to_owned(), made.num(label, 0)), Value::from(resource), soft, hard, pid)
        };
        let refused = (
            ("setrlimit".to_owned(), abi(false).to_owned(), made.num("setrlimit_bad", 0)),
            Value::from("RLIMIT_NOFILE"),
            600,
            512,
            pid,
        );
        let expected = vec![
            limit("setrlimit", "setrlimit", false, "RLIMIT_NOFILE"),
            limit("prlimit64", "prlimit64", false, "RLIMIT_CORE"),
            refused,
            limit("i386_setrlimit", "setrlimit", true, "RLIMIT_FSIZE"),
            limit("i386_prlimit64", "prlimit64", true, "RLIMIT_STACK"),
        ];
        assert_eq!(got, expected, "{mode:?}: {events:#?}");
        assert!(events.iter().all(|e| e["unverified"].is_null() && e["partial"].is_null()), "{events:#?}");
    }
}

#[test]
fn signals_to_other_processes_are_events_and_probes_and_signals_to_oneself_are_not() {
    for mode in MODES {
        let made = Made::new("procnet", mode, &["signals"]);
        let events = made.events("signal", &["kill", "tkill", "tgkill", "pidfd_send_signal"]);
        let got: Vec<_> = events
            .iter()
            .map(|e| {
                let s = &e["signal"];
                (call(e), num(&s["pid"]), num(&s["tid"]), num(&s["signal"]), s["signal_name"].clone())
            })
            .collect();
        // The target and the signal it died of, as waitpid has them.
        let death = |label: &str, syscall: &str, i386: bool, pid: bool, tid: bool| {
            let (target, signal) = (made.num(label, 1), made.num(label, 2));
            let name = nix::sys::signal::Signal::try_from(signal as i32).unwrap().as_str();
            let call = (syscall.to_owned(), abi(i386).to_owned(), made.num(label, 0));
            (call, if pid { target } else { 0 }, if tid { target } else { 0 }, signal, Value::from(name))
        };
        let none = (
            ("kill".to_owned(), abi(false).to_owned(), made.num("kill_none", 0)),
            0x3fff_ffff,
            0,
            15,
            "SIGTERM".into(),
        );
        let expected = vec![
            death("kill", "kill", false, true, false),
            death("tkill", "tkill", false, false, true),
            death("tgkill", "tgkill", false, true, true),
            death("pidfd_send_signal", "pidfd_send_signal", false, true, false),
            none,
            death("i386_kill", "kill", true, true, false),
            death("i386_tgkill", "tgkill", true, true, true),
            death("i386_tkill", "tkill", true, false, true),
            death("i386_pidfd_send_signal", "pidfd_send_signal", true, true, false),
        ];
        assert_eq!(got, expected, "{mode:?}: {events:#?}");
        assert!(events[3]["signal"]["pidfd"].is_number(), "{:#?}", events[3]);
    }
}

#[test]
fn module_loads_and_unloads_report_names_parameters_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("cws_fake.ko");
    for mode in MODES {
        let made = Made::new("procnet", mode, &["modules", image.to_str().unwrap()]);
        let events = made.events("module", &["init_module", "finit_module", "delete_module"]);
        let got: Vec<_> = events
            .iter()
            .map(|e| {
                let m = &e["module"];
                (call(e), m["name"].clone(), m["args"].clone(), m["path"].clone(), num(&m["length"]), num(&m["flags"]))
            })
            .collect();
        let length = made.num("init_module", 1);
        let path = Value::from(real_path(image.to_str().unwrap()));
        let at =
            |label: &str, syscall: &str, i386: bool| (syscall.to_owned(), abi(i386).to_owned(), made.num(label, 0));
        let expected = vec![
            (at("init_module", "init_module", false), "cws_fake".into(), "debug=1".into(), Value::Null, length, 0),
            (at("finit_module", "finit_module", false), "cws_fake".into(), "debug=2".into(), path.clone(), 0, 0),
            (
                at("delete_module", "delete_module", false),
                "cws_no_such_module".into(),
                Value::Null,
                Value::Null,
                0,
                2048,
            ),
            (
                at("i386_delete_module", "delete_module", true),
                "cws_i386_module".into(),
                Value::Null,
                Value::Null,
                0,
                2048,
            ),
            (at("i386_init_module", "init_module", true), "cws_fake".into(), "debug=3".into(), Value::Null, length, 0),
            (at("i386_finit_module", "finit_module", true), "cws_fake".into(), "debug=3".into(), path.clone(), 0, 0),
        ];
        assert_eq!(got, expected, "{mode:?}: {events:#?}");
    }
}

#[test]
fn bpf_commands_are_events_by_name() {
    for mode in MODES {
        let made = Made::new("procnet", mode, &["bpf"]);
        let events = made.events("bpf", &["bpf"]);
        let got: Vec<_> =
            events.iter().map(|e| (call(e), num(&e["bpf"]["command"]), e["bpf"]["command_name"].clone())).collect();
        let at = |label: &str, i386: bool| ("bpf".to_owned(), abi(i386).to_owned(), made.num(label, 0));
        let expected = vec![
            (at("map_create", false), 0, Value::from("BPF_MAP_CREATE")),
            (at("prog_load_fault", false), 5, Value::from("BPF_PROG_LOAD")),
            (at("i386_bad_command", true), 999, Value::Null),
        ];
        assert_eq!(got, expected, "{mode:?}: {events:#?}");
    }
}

#[test]
fn raw_and_packet_sockets_and_traffic_shaping_options_are_events_ordinary_ones_are_not() {
    for mode in MODES {
        let made = Made::new("procnet", mode, &["sockets"]);
        let sockets = made.events("socket", &["socket"]);
        let got: Vec<_> = sockets
            .iter()
            .map(|e| {
                let s = &e["socket"];
                (call(e), num(&s["family"]), num(&s["type"]) & 0xf, num(&s["protocol"]))
            })
            .collect();
        // Family and type as the socket has them (SO_DOMAIN, SO_TYPE); the
        // protocol as SO_PROTOCOL has it, but for a packet socket (the
        // kernel keeps no protocol there: it was ETH_P_ALL).
        let socket = |label: &str, i386: bool, protocol: Option<i64>| {
            let call = ("socket".to_owned(), abi(i386).to_owned(), made.num(label, 0));
            (call, made.num(label, 1), made.num(label, 2), protocol.unwrap_or_else(|| made.num(label, 3)))
        };
        let expected = vec![
            socket("socket_packet", false, Some(i64::from((libc::ETH_P_ALL as u16).to_be()))),
            socket("socket_raw", false, None),
            // Refused (EINVAL): as passed.
            (("socket".to_owned(), abi(false).to_owned(), made.num("socket_raw_bad", 0)), 2, 3, 1000),
            socket("i386_socket_raw", true, None),
            socket("i386_socketcall_raw", true, None),
        ];
        assert_eq!(got, expected, "{mode:?}: {sockets:#?}");
        assert_eq!(sockets[0]["socket"]["family_name"], "AF_PACKET");

        let options = made.events("setsockopt", &["setsockopt"]);
        let got: Vec<_> = options
            .iter()
            .map(|e| {
                let o = &e["setsockopt"];
                (call(e), o["option_name"].clone(), num(&o["value"]), o["name"].clone(), o["socket_family"].clone())
            })
            .collect();
        let kind = Value::from(made.num("udp_kind", 1));
        let at = |label: &str, i386: bool| ("setsockopt".to_owned(), abi(i386).to_owned(), made.num(label, 0));
        let raw_family = Value::from(made.num("socket_raw", 1));
        let expected = vec![
            (at("attach_filter", false), "SO_ATTACH_FILTER".into(), 0, Value::Null, kind.clone()),
            (at("attach_filter_badf", false), "SO_ATTACH_FILTER".into(), 0, Value::Null, Value::Null),
            (at("so_mark", false), "SO_MARK".into(), 7, Value::Null, kind.clone()),
            (at("bindtodevice", false), "SO_BINDTODEVICE".into(), 0, "lo".into(), kind.clone()),
            (at("reuseport_cbpf", false), "SO_ATTACH_REUSEPORT_CBPF".into(), 0, Value::Null, kind.clone()),
            (at("hdrincl", false), "IP_HDRINCL".into(), 1, Value::Null, raw_family),
            (at("i386_so_mark", true), "SO_MARK".into(), 9, Value::Null, kind.clone()),
            (at("i386_socketcall_so_mark", true), "SO_MARK".into(), 9, Value::Null, kind),
        ];
        assert_eq!(got, expected, "{mode:?}: {options:#?}");
        // The program as passed: LD W ABS 12, RET 0xffff.
        let filter = &options[0]["setsockopt"];
        // [0x20, 0, 0, 0, 12, 0, 0, 0, 0x06, 0, 0, 0, 0xff, 0xff, 0, 0] in base64, as protojson writes bytes.
        assert_eq!(filter["filter"], "IAAAAAwAAAAGAAAA//8AAA==");
        assert_eq!(filter["filter_instructions"], 2);
        // A reuseport group's program too, as passed.
        let reuseport = &options[4]["setsockopt"];
        assert_eq!((&reuseport["filter"], &reuseport["filter_instructions"]), (&filter["filter"], &Value::from(2)));
        assert_eq!(made.num("reuseport_cbpf", 0), 0, "the group took the program");
        // Checked against the program the socket has (SO_GET_FILTER).
        assert!(options[0]["unverified"].is_null(), "{:#?}", options[0]);
        assert_eq!(num(&filter["socket_type"]), made.num("udp_kind", 2));
        assert_eq!(num(&filter["socket_protocol"]), made.num("udp_kind", 3));
    }
}

#[test]
fn datagrams_and_fast_open_sent_to_a_destination_are_connect_events() {
    for mode in MODES {
        let made = Made::new("procnet", mode, &["sockets"]);
        let sends = made.events("connect", &["sendto", "sendmsg", "sendmmsg"]);
        let got: Vec<_> = sends
            .iter()
            .map(|e| {
                let c = &e["connect"];
                let checked = e["unverified"].is_null();
                (call(e), c["address"].clone(), num(&c["port"]), c["protocol"].clone(), num(&c["send_flags"]), checked)
            })
            .collect();
        // Where each datagram arrived (the receiver's own port) and the
        // port the fast open connection was accepted on.
        let datagram = |label: &str, syscall: &str, i386: bool, port: i64| {
            let call = (syscall.to_owned(), abi(i386).to_owned(), made.num(label, 0));
            (call, Value::from("127.0.0.1"), port, Value::from("PROTOCOL_UDP"), 0, false)
        };
        let first = made.num("sendto", 2);
        let mut failed = datagram("sendto_badf", "sendto", false, made.num("sendto_badf", 1));
        failed.3 = Value::Null;
        let fastopen = (
            ("sendto".to_owned(), abi(false).to_owned(), made.num("fastopen", 0)),
            Value::from("127.0.0.1"),
            made.num("fastopen", 1),
            Value::from("PROTOCOL_TCP"),
            0x2000_0000,
            true,
        );
        let expected = vec![
            datagram("sendto", "sendto", false, first),
            datagram("sendmsg", "sendmsg", false, made.num("sendmsg", 2)),
            datagram("sendmmsg_first", "sendmmsg", false, made.num("sendmmsg_first", 2)),
            datagram("sendmmsg_second", "sendmmsg", false, made.num("sendmmsg_second", 2)),
            failed,
            fastopen,
            datagram("i386_sendto", "sendto", true, made.num("i386_sendto", 2)),
            datagram("i386_socketcall_sendto", "sendto", true, made.num("i386_socketcall_sendto", 2)),
            datagram("i386_sendmsg", "sendmsg", true, made.num("i386_sendmsg", 2)),
            datagram("i386_socketcall_sendmsg", "sendmsg", true, made.num("i386_socketcall_sendmsg", 2)),
            // Both messages go to the same place: one event.
            datagram("i386_sendmmsg", "sendmmsg", true, made.num("i386_sendmmsg", 2)),
        ];
        assert_eq!(got, expected, "{mode:?}: {sends:#?}");
        for label in [
            "sendto",
            "sendmsg",
            "i386_sendto",
            "i386_socketcall_sendto",
            "i386_sendmsg",
            "i386_socketcall_sendmsg",
            "i386_sendmmsg",
        ] {
            assert_eq!(made.num(label, 1), 1, "{label}: the datagram arrived");
        }
    }
}

#[test]
fn exec_events_carry_the_controlling_terminal() {
    let mut trace = Trace::new(&["sh", "-c", "tty; exec setsid sh -c 'cut -d\" \" -f7 /proc/$$/stat'"]);
    let (child, terminal) = Terminal::spawn(&mut trace);
    let run = trace.finish(child);
    let lines = terminal.rest();
    let tty = lines.iter().find(|l| l.starts_with("/dev/pts/")).unwrap_or_else(|| panic!("{lines:#?}"));
    assert!(lines.iter().any(|l| l == "0"), "the new session has no terminal: {lines:#?}");
    let exec_of = |program: &str| {
        run.of("exec").into_iter().find(|e| e["exec"]["args"][0] == program).unwrap_or_else(|| panic!("{program}"))
    };
    assert_eq!(exec_of("tty")["exec"]["tty"], tty.as_str());
    assert_eq!(exec_of("setsid")["exec"]["tty"], tty.as_str());
    assert_eq!(exec_of("cut")["exec"]["tty"], Value::Null);
}
