//! Where later paths lead and who controls a process (issue 11): unshare,
//! setns, mount, umount2 (and i386's umount), chroot, pivot_root, ptrace,
//! seccomp, userfaultfd and io_uring_setup. The `nscalls` fixture makes each
//! call from x86_64 and i386, succeeding and failing, and prints what it got
//! and what the kernel says afterwards (mountinfo, /proc/PID/root, the
//! namespace inodes, the errno); each test compares the exact events with
//! that, in both seccomp and full-ptrace modes.

mod common;

use common::{retval, Made};
use serde_json::Value;

const MODES: [&[&str]; 2] = [&[], &["--disable-seccomp"]];

fn abi(i386: bool) -> &'static str {
    if i386 {
        "ABI_I386"
    } else {
        "ABI_X86_64"
    }
}

/// A protojson number (64-bit ones are strings; zero values are left out).
fn num(value: &Value) -> i64 {
    match value {
        Value::Null => 0,
        Value::String(s) => s.parse().expect("a number"),
        Value::Number(n) => n.as_i64().expect("an integer"),
        other => panic!("not a number: {other}"),
    }
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_owned()
}

fn names(value: &Value) -> Vec<String> {
    value.as_array().map_or_else(Vec::new, |a| a.iter().map(text).collect())
}

/// A namespace event as compared: call, abi, retval, path, source, fstype,
/// flag names, setns's namespace.
type Ns = (String, String, i64, String, String, String, Vec<String>, String);

fn ns_of(event: &Value) -> Ns {
    let ns = &event["namespace"];
    (
        text(&event["syscall"]),
        text(&event["abi"]),
        retval(event),
        text(&ns["path"]),
        text(&ns["source"]),
        text(&ns["fstype"]),
        names(&ns["flag_names"]),
        text(&ns["namespace"]),
    )
}

#[test]
fn mounts_roots_and_namespaces_are_events_with_flags_by_name_as_the_kernel_did_them() {
    if !common::require_root(&[common::CAP_SYS_ADMIN, common::CAP_SYS_CHROOT], "mount, unshare and chroot") {
        return;
    }
    for mode in MODES {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap().to_str().unwrap().to_owned();
        let made = Made::new("nscalls", mode, &["mounts", &base]);
        let events = made.run.of("namespace");
        let got: Vec<Ns> = events.iter().map(|e| ns_of(e)).collect();
        let at = |name: &str| format!("{base}/{name}");
        let strings = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let ns = |label: &str, syscall: &str, i386: bool, texts: [&str; 3], flags: &[&str], namespace: &str| {
            let [path, source, fstype] = texts.map(str::to_owned);
            let call = (syscall.to_owned(), abi(i386).to_owned(), made.num(label, 0));
            (call.0, call.1, call.2, path, source, fstype, strings(flags), namespace.to_owned())
        };
        let mnt = format!("mnt:[{}]", made.num("setns", 2));
        let expected = vec![
            ns("unshare", "unshare", false, ["", "", ""], &["CLONE_NEWNS"], ""),
            // Every bit the kernel was given, the upper half too.
            ns("unshare_bad", "unshare", false, ["", "", ""], &["0x80000000", "0x10000000000"], ""),
            ns("private", "mount", false, ["/", "none", ""], &["MS_REC", "MS_PRIVATE"], ""),
            ns(
                "mount_tmpfs",
                "mount",
                false,
                [&at("mnt"), "cws-tmpfs", "tmpfs"],
                &["MS_MGC_VAL", "MS_NOSUID", "MS_NODEV"],
                "",
            ),
            // A bind mount's source is a path, made absolute.
            ns("mount_bind", "mount", false, [&at("view"), &at("src"), ""], &["MS_BIND"], ""),
            ns("mount_missing", "mount", false, [&at("missing"), "cws-tmpfs", "tmpfs"], &[], ""),
            ns("umount_bind", "umount2", false, [&at("view"), "", ""], &["MNT_DETACH"], ""),
            ns("umount_tmpfs", "umount2", false, [&at("mnt"), "", ""], &["UMOUNT_NOFOLLOW"], ""),
            ns("umount_bad", "umount2", false, [&at("src"), "", ""], &[], ""),
            ns("i386_mount", "mount", true, [&at("i386"), "cws-i386", "tmpfs"], &["MS_RDONLY"], ""),
            ns("i386_umount2", "umount2", true, [&at("i386"), "", ""], &["MNT_DETACH"], ""),
            ns("i386_mount_again", "mount", true, [&at("i386"), "cws-i386", "tmpfs"], &["MS_RDONLY"], ""),
            ns("i386_umount", "umount", true, [&at("i386"), "", ""], &[], ""),
            ns("i386_umount2_bad", "umount2", true, [&at("missing"), "", ""], &[], ""),
            ns("setns", "setns", false, ["", "", ""], &["CLONE_NEWNS"], &mnt),
            ns("setns_bad", "setns", false, ["", "", ""], &["CLONE_NEWNET"], &mnt),
            ns("i386_setns", "setns", true, ["", "", ""], &["CLONE_NEWNS"], &mnt),
            ns("i386_unshare", "unshare", true, ["", "", ""], &["CLONE_NEWUTS"], ""),
            // The root as the kernel gave it (/proc/PID/root, read by the fixture's parent).
            ns("chroot", "chroot", false, [made.word("chroot", 1), "", ""], &[], ""),
            ns("chroot_missing", "chroot", false, [&at("missing"), "", ""], &[], ""),
            ns("i386_chroot", "chroot", true, [made.word("i386_chroot", 1), "", ""], &[], ""),
            ns("pivot_root_bad", "pivot_root", false, [&at("src"), &at("src"), ""], &[], ""),
            ns("i386_pivot_root_bad", "pivot_root", true, [&at("src"), &at("src"), ""], &[], ""),
            ns("newroot_mount", "mount", false, [&at("newroot"), "cws-root", "tmpfs"], &[], ""),
            ns("pivot_root", "pivot_root", false, [&at("newroot"), &at("newroot/old"), ""], &[], ""),
        ];
        assert_eq!(got, expected, "{mode:?}: {events:#?}");

        // What the kernel did, as the fixture saw it afterwards.
        let errno = |label: &str, errno: i32| assert_eq!(made.num(label, 0), -i64::from(errno), "{label}");
        for label in ["unshare", "private", "mount_tmpfs", "mount_bind", "umount_bind", "umount_tmpfs", "setns"] {
            assert_eq!(made.num(label, 0), 0, "{label}");
        }
        assert_ne!(made.num("unshare", 1), made.num("unshare", 2), "a new mount namespace");
        assert_ne!(made.num("i386_unshare", 1), made.num("i386_unshare", 2), "a new UTS namespace");
        let tmpfs = &made.lines["mount_tmpfs"];
        assert_eq!(tmpfs[1..4], [at("mnt"), "tmpfs".into(), "cws-tmpfs".into()]);
        assert!(tmpfs[4].split(',').any(|o| o == "nosuid") && tmpfs[4].split(',').any(|o| o == "nodev"));
        assert_eq!(made.num("mount_bind", 1), 1, "the view shows the source");
        assert_eq!(made.num("umount_bind", 1), 0, "the view is its own directory again");
        assert_eq!(made.word("umount_tmpfs", 1), "-", "nothing is mounted there any more");
        let i386 = &made.lines["i386_mount"];
        assert_eq!(i386[1..4], [at("i386"), "tmpfs".into(), "cws-i386".into()]);
        assert!(i386[4].split(',').any(|o| o == "ro"));
        assert_eq!(made.word("i386_umount2", 1), "-");
        assert_eq!(made.word("i386_umount", 1), "-");
        assert_eq!(made.word("chroot", 1), at("jail"));
        assert_eq!(made.word("i386_chroot", 1), at("jail"));
        assert_eq!(made.num("pivot_root", 1), 1, "`/` is the new root");
        errno("unshare_bad", libc::EINVAL);
        errno("mount_missing", libc::ENOENT);
        errno("umount_bad", libc::EINVAL);
        errno("i386_umount2_bad", libc::ENOENT);
        errno("setns_bad", libc::EINVAL);
        errno("chroot_missing", libc::ENOENT);
        errno("pivot_root_bad", libc::EBUSY);
        errno("i386_pivot_root_bad", libc::EBUSY);
        let setns = events.iter().find(|e| e["syscall"] == "setns").unwrap();
        assert!(setns["namespace"]["fd"].is_number(), "{setns:#}");
    }
}

#[test]
fn ptrace_seccomp_userfaultfd_and_io_uring_attempts_are_events_with_their_results() {
    for mode in MODES {
        let made = Made::new("nscalls", mode, &["control"]);
        let call = |e: &Value| (text(&e["syscall"]), text(&e["abi"]), retval(e));
        let at =
            |label: &str, syscall: &str, i386: bool| (syscall.to_owned(), abi(i386).to_owned(), made.num(label, 0));

        let ptraces = made.run.of("ptrace");
        let got: Vec<_> = ptraces
            .iter()
            .map(|e| {
                (call(e), text(&e["ptrace"]["request_name"]), num(&e["ptrace"]["request"]), num(&e["ptrace"]["pid"]))
            })
            .collect();
        let child = made.num("ptrace_attach", 1);
        let expected = vec![
            (at("ptrace_traceme", "ptrace", false), "PTRACE_TRACEME".to_owned(), 0, 0),
            (at("ptrace_attach", "ptrace", false), "PTRACE_ATTACH".to_owned(), 16, child),
            (at("ptrace_peek", "ptrace", false), "PTRACE_PEEKDATA".to_owned(), 2, child),
            (at("i386_ptrace_seize", "ptrace", true), "PTRACE_SEIZE".to_owned(), 0x4206, child),
            (at("i386_ptrace_unknown", "ptrace", true), String::new(), 0x7777, child),
        ];
        assert_eq!(got, expected, "{mode:?}: {ptraces:#?}");
        // The workload is traced already: the kernel refuses.
        assert_eq!(made.num("ptrace_traceme", 0), -i64::from(libc::EPERM));
        assert!(made.num("ptrace_attach", 0) < 0 && made.num("i386_ptrace_seize", 0) < 0);

        let filters = made.run.of("seccomp");
        let got: Vec<_> = filters
            .iter()
            .map(|e| {
                let s = &e["seccomp"];
                let partial = e["partial"].as_bool().unwrap_or(false);
                (call(e), text(&s["operation_name"]), num(&s["flags"]), s["instructions"].as_i64(), partial)
            })
            .collect();
        let expected = vec![
            (at("seccomp_avail", "seccomp", false), "SECCOMP_GET_ACTION_AVAIL".to_owned(), 0, None, false),
            // The program could not be read, nor by the kernel.
            (at("seccomp_fault", "seccomp", false), "SECCOMP_SET_MODE_FILTER".to_owned(), 0, None, true),
            (
                at("seccomp_bad_flags", "seccomp", false),
                "SECCOMP_SET_MODE_FILTER".to_owned(),
                0x4000_0000,
                Some(1),
                false,
            ),
            (at("seccomp_filter", "seccomp", false), "SECCOMP_SET_MODE_FILTER".to_owned(), 0, Some(1), false),
            (at("prctl_seccomp", "prctl", false), "SECCOMP_SET_MODE_FILTER".to_owned(), 0, Some(1), false),
            (at("i386_seccomp_filter", "seccomp", true), "SECCOMP_SET_MODE_FILTER".to_owned(), 0, Some(1), false),
            (at("i386_seccomp_avail", "seccomp", true), "SECCOMP_GET_ACTION_AVAIL".to_owned(), 0, None, false),
        ];
        assert_eq!(got, expected, "{mode:?}: {filters:#?}");
        for label in ["seccomp_avail", "seccomp_filter", "prctl_seccomp", "i386_seccomp_filter", "i386_seccomp_avail"] {
            assert_eq!(made.num(label, 0), 0, "{label}");
        }
        assert_eq!(made.num("seccomp_fault", 0), -i64::from(libc::EFAULT));
        assert_eq!(made.num("seccomp_bad_flags", 0), -i64::from(libc::EINVAL));

        // Refused by the tracer, whatever the kernel would have said.
        let uffds = made.run.of("userfaultfd");
        let got: Vec<_> =
            uffds.iter().map(|e| (call(e), num(&e["userfaultfd"]["flags"]), e["denied"].is_string())).collect();
        let expected = vec![
            (at("userfaultfd", "userfaultfd", false), i64::from(libc::O_CLOEXEC | libc::O_NONBLOCK), true),
            (at("i386_userfaultfd", "userfaultfd", true), i64::from(libc::O_CLOEXEC), true),
        ];
        assert_eq!(got, expected, "{mode:?}: {uffds:#?}");
        assert_eq!(made.num("userfaultfd", 0), -i64::from(libc::EPERM));
        assert_eq!(made.num("i386_userfaultfd", 0), -i64::from(libc::EPERM));

        let rings = made.run.of("io_uring");
        let got: Vec<_> =
            rings.iter().map(|e| (call(e), num(&e["io_uring"]["entries"]), num(&e["io_uring"]["flags"]))).collect();
        let expected = vec![
            (at("io_uring_setup", "io_uring_setup", false), 4, 16 /* IORING_SETUP_CLAMP */),
            (at("io_uring_setup_bad", "io_uring_setup", false), 0, 16),
            (at("i386_io_uring_setup", "io_uring_setup", true), 8, 0),
        ];
        assert_eq!(got, expected, "{mode:?}: {rings:#?}");
        assert_eq!(made.num("io_uring_setup_bad", 0), -i64::from(libc::EINVAL));
    }
}
