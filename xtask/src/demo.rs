//! `cargo xtask demo`: the README's first command. Builds the tracer and runs
//! a small shell script under it with `--verbose`, offline: an exec, opens,
//! a file written, read and removed, two forks, exits and a connect to a
//! listener on loopback, one line each.
//!
//! The tracer runs as a user would run it: with the user's environment, not
//! the one `cargo run` gave this program (its LD_LIBRARY_PATH alone would
//! add a dozen failed opens to every exec).

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workload: every kind of event in a screenful of lines. `PORT` is the
/// listener's.
const SCRIPT: &str = "echo hello > note.txt; cat note.txt; rm note.txt; echo bye > /dev/tcp/127.0.0.1/PORT";

pub fn demo() -> Result<(), String> {
    let tracer = crate::build("cws-instrumentation", &["--release", "--locked", "--bin", "cws-instrumentation"], &[])?;
    let dir = crate::target_subdir("demo")?;
    // The connect's peer; what it receives is not the point.
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot listen on loopback: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    std::thread::spawn(move || {
        if let Ok((mut peer, _)) = listener.accept() {
            let _ = peer.read_to_end(&mut Vec::new());
        }
    });

    let script = SCRIPT.replace("PORT", &port.to_string());
    let mut command = Command::new(&tracer);
    command.args(["trace", "--verbose", "--probe-addr", "", "--", "bash", "-c", &script]).current_dir(&dir);
    let target_dir = crate::target_dir()?;
    let mut cargo_dirs = vec![target_dir.as_path()];
    let sysroot = sysroot();
    cargo_dirs.extend(sysroot.as_deref());
    for (name, value) in std::env::vars_os() {
        match cleaned(&name, &value, &cargo_dirs) {
            Some(kept) if kept == value => {}
            Some(kept) => {
                command.env(&name, kept);
            }
            None => {
                command.env_remove(&name);
            }
        }
    }
    // The C locale needs no files: the programs' opens are their own.
    command.env("LC_ALL", "C");

    let args: Vec<String> = command.get_args().map(|a| quote(&a.to_string_lossy())).collect();
    let shown = |path: &Path| quote(&path.display().to_string());
    eprintln!("xtask: cd {} && LC_ALL=C {} {}", shown(&dir), shown(&tracer), args.join(" "));
    let status = command.status().map_err(|e| format!("cannot run {}: {e}", tracer.display()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("the traced script failed: {status}"))
    }
}

/// What `cargo run` added to the environment, taken back out: the value
/// to keep, or None to remove the variable.
fn cleaned(name: &OsStr, value: &OsStr, cargo_dirs: &[&Path]) -> Option<OsString> {
    let name = name.to_string_lossy();
    if name == "CARGO" || name.starts_with("CARGO_") {
        return None;
    }
    if name != "LD_LIBRARY_PATH" {
        return Some(value.to_owned());
    }
    let kept: Vec<_> = std::env::split_paths(value)
        .filter(|entry| !entry.as_os_str().is_empty() && !cargo_dirs.iter().any(|dir| entry.starts_with(dir)))
        .collect();
    if kept.is_empty() {
        return None;
    }
    std::env::join_paths(kept).ok()
}

/// The toolchain's sysroot, whose libraries `cargo run` puts in
/// LD_LIBRARY_PATH.
fn sysroot() -> Option<PathBuf> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let output = Command::new(rustc).args(["--print", "sysroot"]).output().ok().filter(|o| o.status.success())?;
    let sysroot = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    (!sysroot.is_empty()).then(|| sysroot.into())
}

/// `text` as one shell word.
fn quote(text: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:@%+,".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_s_variables_and_library_paths_are_taken_out() {
        let target = Path::new("/src/target");
        let sysroot = Path::new("/home/u/.rustup/toolchains/stable");
        let dirs = [target, sysroot];
        let clean = |name: &str, value: &str| cleaned(OsStr::new(name), OsStr::new(value), &dirs);
        assert_eq!(clean("CARGO", "/bin/cargo"), None);
        assert_eq!(clean("CARGO_PKG_NAME", "xtask"), None);
        assert_eq!(clean("HOME", "/home/u"), Some("/home/u".into()));
        assert_eq!(
            clean("LD_LIBRARY_PATH", "/src/target/debug/deps:/opt/lib:/home/u/.rustup/toolchains/stable/lib"),
            Some("/opt/lib".into())
        );
        assert_eq!(clean("LD_LIBRARY_PATH", "/src/target/debug/deps:/src/target/debug"), None);
    }

    #[test]
    fn words_are_quoted_for_the_shell() {
        assert_eq!(quote("--verbose"), "--verbose");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("echo hi > x"), "'echo hi > x'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}
