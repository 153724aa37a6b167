//! Which file an event names, and what stat says of it: device, inode and
//! mount id on open, exec and file events (issue 10), and the metadata
//! Datadog's agent takes, with the owner's names from the traced process's
//! own root (issue 11), in both tracing modes. The ground truth is stat(2)
//! of the same files by the test.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::{
    fixture_variant, require_root, retval, Run, Trace, CAP_CHOWN, CAP_SETGID, CAP_SETUID, CAP_SYS_ADMIN, CAP_SYS_CHROOT,
};
use serde_json::{json, Value};

/// The owner of the files under /data, named only in the root's own files.
const OWNER: (u32, u32) = (4242, 4343);

/// What the root's /etc/passwd is.
#[derive(Clone, Copy, PartialEq)]
enum Passwd {
    Regular,
    /// An absolute symlink, to be followed inside the root (the host has no
    /// /data/users).
    Symlink,
    /// A FIFO nobody writes to: reading it would block forever.
    Fifo,
}

/// A root the traced program is chroot'ed into: the static program as
/// /prog, its own /etc/passwd and /etc/group, and two files owned by OWNER.
struct Root {
    _dir: tempfile::TempDir,
    path: String,
    prog: std::fs::Metadata,
    file: std::fs::Metadata,
    gone: std::fs::Metadata,
}

fn build_root(passwd: Passwd) -> Root {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().canonicalize().unwrap().to_str().unwrap().to_owned();
    let at = |name: &str| format!("{path}/{name}");
    for sub in ["etc", "data"] {
        std::fs::create_dir(at(sub)).unwrap();
    }
    let users = "root:x:0:0::/:/prog\njailuser:x:4242:4343::/:/prog\n";
    match passwd {
        Passwd::Regular => std::fs::write(at("etc/passwd"), users).unwrap(),
        Passwd::Symlink => {
            std::fs::write(at("data/users"), users).unwrap();
            std::os::unix::fs::symlink("/data/users", at("etc/passwd")).unwrap();
        }
        Passwd::Fifo => nix::unistd::mkfifo(at("etc/passwd").as_str(), nix::sys::stat::Mode::S_IRUSR).unwrap(),
    }
    std::fs::write(at("etc/group"), "root:x:0:\njailgroup:x:4343:\n").unwrap();
    for (name, mode) in [("data/file", 0o640), ("data/gone", 0o600)] {
        std::fs::write(at(name), "x").unwrap();
        std::os::unix::fs::chown(at(name), Some(OWNER.0), Some(OWNER.1)).unwrap();
        std::fs::set_permissions(at(name), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::fs::copy(fixture_variant("owners", "static", &["-static"]), at("prog")).unwrap();
    let stat = |name: &str| std::fs::symlink_metadata(at(name)).unwrap();
    Root { prog: stat("prog"), file: stat("data/file"), gone: stat("data/gone"), path, _dir: dir }
}

/// The metadata an event should carry for a file stat(2) describes, as
/// protojson writes it (zero ids left out, 64-bit integers as strings).
fn metadata(stat: &std::fs::Metadata, user: Option<&str>, group: Option<&str>) -> Value {
    let nanos = |s: i64, ns: i64| (s * 1_000_000_000 + ns).to_string();
    let mut expected = json!({
        "mode": stat.mode(),
        "mtime": nanos(stat.mtime(), stat.mtime_nsec()),
        "ctime": nanos(stat.ctime(), stat.ctime_nsec()),
    });
    for (key, id) in [("uid", stat.uid()), ("gid", stat.gid())] {
        if id != 0 {
            expected[key] = json!(id);
        }
    }
    for (key, name) in [("user", user), ("group", group)] {
        if let Some(name) = name {
            expected[key] = json!(name);
        }
    }
    expected
}

/// The payload of `event`'s kind, checked to name `stat`'s file.
fn names_file<'a>(event: &'a Value, kind: &str, stat: &std::fs::Metadata) -> &'a Value {
    let payload = &event[kind];
    assert_eq!(payload["device"], stat.dev().to_string(), "{event:#}");
    assert_eq!(payload["inode"], stat.ino().to_string(), "{event:#}");
    assert!(payload["mount_id"].as_str().unwrap().parse::<u64>().is_ok(), "{event:#}");
    payload
}

/// Runs the program in `root` with `flags` (and `env`), in both modes.
fn in_both_modes(passwd: Passwd, flags: &[&str], env: Option<(&str, &str)>, check: impl Fn(&Root, &Run)) {
    for mode in [&[] as &[&str], &["--disable-seccomp"]] {
        let root = build_root(passwd);
        let flags: Vec<&str> = mode.iter().chain(flags).copied().collect();
        let mut trace = Trace::with_flags(&flags, &["chroot", &root.path, "/prog", "renamed", "4242"]);
        if let Some((name, value)) = env {
            trace.command().env(name, value);
        }
        let run = trace.run();
        eprintln!("flags {flags:?}");
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        check(&root, &run);
    }
}

#[test]
fn events_carry_the_file_s_identity_metadata_and_names_from_the_process_s_own_root() {
    if !require_root(&[CAP_SYS_CHROOT, CAP_CHOWN], "chroot, and give files an owner") {
        return;
    }
    assert!(!std::path::Path::new("/data/users").exists());
    for passwd in [Passwd::Regular, Passwd::Symlink] {
        in_both_modes(passwd, &[], None, check_identity_metadata_and_names);
    }
}

fn check_identity_metadata_and_names(root: &Root, run: &Run) {
    let file = format!("{}/data/file", root.path);
    let opens = run.opens_of(&file);
    assert_eq!(opens.len(), 2, "{:#?}", run.of("open"));
    let first = names_file(opens[0], "open", &root.file);
    assert_eq!(first["metadata"], metadata(&root.file, Some("jailuser"), Some("jailgroup")));
    // The program replaced /etc/passwd in between: read again.
    let second = names_file(opens[1], "open", &root.file);
    assert_eq!(second["metadata"], metadata(&root.file, Some("renamed"), Some("jailgroup")));

    // chown's ids named too; the metadata is the file's before the call.
    let chown = run.one("file", "operation", "FILE_OPERATION_CHOWN");
    let changed = names_file(chown, "file", &root.file);
    assert_eq!((&changed["user"], &changed["group"]), (&json!("renamed"), &json!("jailgroup")));
    assert_eq!(changed["metadata"], metadata(&root.file, Some("renamed"), Some("jailgroup")));

    let unlink = run.one("file", "path", &format!("{}/data/gone", root.path));
    assert_eq!(retval(unlink), 0);
    let gone = names_file(unlink, "file", &root.gone);
    assert_eq!(gone["metadata"], metadata(&root.gone, Some("jailuser"), Some("jailgroup")));

    // /prog, run by chroot then by itself: the file the kernel ran.
    let prog = format!("{}/prog", root.path);
    let execs: Vec<_> = run.of("exec").into_iter().filter(|e| e["exec"]["executable"] == prog.as_str()).collect();
    assert_eq!(execs.len(), 2, "{:#?}", run.of("exec"));
    let first = names_file(execs[0], "exec", &root.prog);
    assert_eq!(first["metadata"], metadata(&root.prog, Some("root"), Some("root")));
    // The new /etc/passwd has no uid 0: the root's files, not the host's, name the owner.
    let second = names_file(execs[1], "exec", &root.prog);
    assert_eq!(second["metadata"], metadata(&root.prog, None, Some("root")));
}

#[test]
fn a_fifo_at_etc_passwd_does_not_hang_the_tracer() {
    if !require_root(&[CAP_SYS_CHROOT, CAP_CHOWN], "chroot, and give files an owner") {
        return;
    }
    in_both_modes(Passwd::Fifo, &[], None, |root, run| {
        let file = format!("{}/data/file", root.path);
        let opens = run.opens_of(&file);
        assert_eq!(opens.len(), 2, "{:#?}", run.of("open"));
        for open in opens {
            let open = names_file(open, "open", &root.file);
            assert_eq!(open["metadata"], metadata(&root.file, None, Some("jailgroup")));
        }
    });
}

#[test]
fn disable_stats_leaves_the_metadata_out_and_keeps_the_identity() {
    if !require_root(&[CAP_SYS_CHROOT, CAP_CHOWN], "chroot, and give files an owner") {
        return;
    }
    let check = |root: &Root, run: &Run| {
        let opens = run.opens_of(&format!("{}/data/file", root.path));
        assert_eq!(opens.len(), 2, "{:#?}", run.of("open"));
        let unlink = run.one("file", "path", &format!("{}/data/gone", root.path));
        let exec = run.of("exec").into_iter().find(|e| e["exec"]["executable"] == format!("{}/prog", root.path));
        let events =
            [(opens[0], "open", &root.file), (unlink, "file", &root.gone), (exec.unwrap(), "exec", &root.prog)];
        for (event, kind, stat) in events {
            assert_eq!(names_file(event, kind, stat).get("metadata"), None, "{event:#}");
        }
        assert!(run.events.iter().all(|e| !e.to_string().contains("\"metadata\"")));
        let chown = &run.one("file", "operation", "FILE_OPERATION_CHOWN")["file"];
        assert_eq!((chown.get("user"), chown.get("group")), (None, None), "{chown:#}");
    };
    in_both_modes(Passwd::Regular, &["--disable-stats"], None, check);
    in_both_modes(Passwd::Regular, &[], Some(("DD_CWS_INSTRUMENTATION_STATS_DISABLED", "true")), check);
}

/// The mount id the kernel gives for an open file of this process.
fn mount_id_of(file: &std::fs::File) -> u64 {
    use std::os::fd::AsRawFd;
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", file.as_raw_fd())).unwrap();
    fdinfo.lines().find_map(|l| l.strip_prefix("mnt_id:")).unwrap().trim().parse().unwrap()
}

/// `path`'s path within its filesystem, from this process's mountinfo (the
/// test's own view: no bind mount on the way).
fn path_in_filesystem(path: &str) -> String {
    let id = mount_id_of(&std::fs::File::open(path).unwrap()).to_string();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mountinfo.lines().find(|l| l.split(' ').next() == Some(id.as_str())).unwrap();
    let fields: Vec<&str> = line.split(' ').collect();
    let (root, point) = (fields[3], fields[4]);
    let below = path.strip_prefix(point).unwrap().trim_start_matches('/');
    match (root, below) {
        (root, "") => root.to_owned(),
        ("/", below) => format!("/{below}"),
        (root, below) => format!("{root}/{below}"),
    }
}

/// Runs `script` (`$1`: a directory holding `real/bound` and an empty
/// `view`) under the tracer with `flags`, in both modes, and checks that
/// the open and the unlink of `view/bound`, through a private bind mount
/// of `real` on `view`, name the file and the bind's source.
fn through_a_private_bind_mount(flags: &[&str], script: &str) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap().to_str().unwrap().to_owned();
    // Others may enter it: the workload may run as another user.
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
    for mode in [&[] as &[&str], &["--disable-seccomp"]] {
        let _ = std::fs::remove_dir_all(format!("{base}/real"));
        let _ = std::fs::remove_dir(format!("{base}/view"));
        for sub in ["real", "view"] {
            std::fs::create_dir(format!("{base}/{sub}")).unwrap();
            std::fs::set_permissions(format!("{base}/{sub}"), std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        std::fs::write(format!("{base}/real/bound"), "x").unwrap();
        std::fs::set_permissions(format!("{base}/real/bound"), std::fs::Permissions::from_mode(0o666)).unwrap();
        let real = std::fs::metadata(format!("{base}/real/bound")).unwrap();
        let real_mount = mount_id_of(&std::fs::File::open(format!("{base}/real/bound")).unwrap());
        let source_root = path_in_filesystem(&format!("{base}/real"));

        let flags: Vec<&str> = mode.iter().chain(flags).copied().collect();
        let run = Trace::with_flags(&flags, &["sh", "-c", script, "sh", &base]).run();
        eprintln!("flags {flags:?}");
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        let through_view = format!("{base}/view/bound");
        let opens = run.opens_of(&through_view);
        assert_eq!(opens.len(), 1, "{:#?}", run.of("open"));
        let unlink = run.one("file", "path", &through_view);
        for (event, kind) in [(opens[0], "open"), (unlink, "file")] {
            let payload = names_file(event, kind, &real);
            // The bind is a mount of its own, showing `real`'s directory.
            assert_ne!(payload["mount_id"], real_mount.to_string(), "{event:#}");
            assert_eq!(payload["mount_root"], source_root.as_str(), "{event:#}");
            assert_eq!(payload["source_path"], format!("{source_root}/bound"), "{event:#}");
        }
        // A file outside any bind mount has no other path.
        let exec = &run.of("exec")[0]["exec"];
        assert!(exec["mount_root"].is_string() && exec.get("source_path").is_none(), "{exec:#}");
    }
}

#[test]
fn a_file_through_a_private_bind_mount_is_named_by_its_source_too() {
    if !require_root(&[CAP_SYS_ADMIN], "mount") {
        return;
    }
    let script = r#"cd "$1" && unshare -m sh -c 'mount --make-rprivate / && mount --bind real view && cat view/bound && rm view/bound'"#;
    through_a_private_bind_mount(&[], script);
}

#[test]
fn a_bind_mount_of_an_unprivileged_user_through_a_user_namespace_is_seen_through_too() {
    if !require_root(&[CAP_SETUID, CAP_SETGID], "run the workload as uid 1000") {
        return;
    }
    use std::os::unix::process::CommandExt;
    let probe = common::command("unshare").args(["-Ur", "true"]).uid(1000).gid(1000).status();
    if !probe.is_ok_and(|status| status.success()) {
        common::skip("needs user namespaces for unprivileged users (kernel.unprivileged_userns_clone)");
        return;
    }
    let script = r#"cd "$1" && unshare -Urm sh -c 'mount --bind real view && cat view/bound && rm view/bound'"#;
    through_a_private_bind_mount(&["--uid", "1000", "--gid", "1000"], script);
}

#[test]
fn a_memfd_program_is_identified_without_metadata() {
    for mode in [&[] as &[&str], &["--disable-seccomp"]] {
        let run = Trace::with_flags(mode, &[common::fixture("memfd_exec")]).run();
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        let fileless = run.one("exec", "executable", "/memfd:cws-fileless (deleted)");
        assert!(fileless["exec"]["inode"].as_str().unwrap().parse::<u64>().unwrap() > 0, "{fileless:#}");
        assert_eq!(fileless["exec"].get("metadata"), None, "{fileless:#}");
        // The program that made it is a file: its metadata is there.
        assert!(run.of("exec")[0]["exec"]["metadata"]["mode"].is_u64());
    }
}

/// The names follow every change of the workload's /etc/passwd, however
/// made: a bind mount over it (no inode changes: the mount table does), a
/// rewrite in place of the same size, its unmount.
#[test]
fn owner_names_follow_a_mount_over_etc_passwd_and_a_rewrite_in_place() {
    if !require_root(&[CAP_SYS_ADMIN, CAP_CHOWN], "mount, and give files an owner") {
        return;
    }
    let named = |file: &str, id: u32| {
        let ids = std::fs::read_to_string(file).unwrap_or_default();
        ids.lines().any(|l| l.split(':').nth(2) == Some(id.to_string().as_str()))
    };
    if named("/etc/passwd", OWNER.0) || named("/etc/group", OWNER.1) {
        common::skip("the host's /etc/passwd or /etc/group names the test's owner");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap().to_str().unwrap().to_owned();
    let owned = format!("{base}/owned");
    std::fs::write(&owned, "x").unwrap();
    std::os::unix::fs::chown(&owned, Some(OWNER.0), Some(OWNER.1)).unwrap();
    let stat = std::fs::metadata(&owned).unwrap();
    // Each step then a read of `owned`; dd rewrites the bound file's first
    // name in place, neither truncating nor changing its size.
    let script = r#"mount --make-rprivate / && cat "$1/owned" && mount --bind "$1/passwd" /etc/passwd && cat "$1/owned" && printf second | dd of=/etc/passwd conv=notrunc status=none && cat "$1/owned" && umount /etc/passwd && cat "$1/owned""#;
    for mode in [&[] as &[&str], &["--disable-seccomp"]] {
        std::fs::write(format!("{base}/passwd"), "firsts:x:4242:4343::/:/bin/sh\n").unwrap();
        let run = Trace::with_flags(mode, &["unshare", "-m", "sh", "-c", script, "sh", &base]).run();
        eprintln!("flags {mode:?}");
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        let opens = run.opens_of(&owned);
        assert_eq!(opens.len(), 4, "{:#?}", run.of("open"));
        let users: Vec<&Value> = opens.iter().map(|open| &names_file(open, "open", &stat)["metadata"]).collect();
        let expected = [None, Some("firsts"), Some("second"), None].map(|user| metadata(&stat, user, None));
        assert_eq!(users, expected.iter().collect::<Vec<_>>());
    }
}

/// An event reported after its process is gone (a supervised ftruncate
/// answered just before the program exits) still names the file's owner:
/// the thread's root is known from its earlier events, not looked up in a
/// /proc entry that is gone by then.
#[test]
fn a_call_just_before_the_exit_still_names_the_owner() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().canonicalize().unwrap().join("file");
    std::fs::write(&file, "0123456789").unwrap();
    let owner = nix::unistd::User::from_uid(nix::unistd::getuid()).unwrap().map(|user| user.name);
    assert!(owner.is_some(), "the test runs as a user with a name");
    let script = "for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do truncate -s 3 \"$0\"; done";
    for mode in [&[] as &[&str], &["--disable-seccomp"]] {
        let run = Trace::with_flags(mode, &["sh", "-c", script, file.to_str().unwrap()]).run();
        assert_eq!(run.code(), Some(0), "{}", run.stderr);
        let cuts = run.of("file");
        let cuts: Vec<_> = cuts.iter().filter(|e| e["syscall"] == "ftruncate").collect();
        assert_eq!(cuts.len(), 20, "{mode:?}: {:#?}", run.events);
        for cut in cuts {
            assert_eq!(cut["file"]["metadata"]["user"].as_str(), owner.as_deref(), "{mode:?}: {cut:#}");
        }
    }
}
