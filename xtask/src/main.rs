//! `cargo xtask <task>`: the project's chores, in Rust so they run wherever
//! cargo does.
//!
//! - `demo`: the tracer (release profile) on a small shell script, with
//!   `--verbose`: one line per event.
//! - `ci`: what CI checks: formatting, clippy with warnings denied, the
//!   static binary (`dist`), then every test, with that binary named in
//!   `CWS_STATIC_BINARY`; every failing step is reported.
//! - `dist`: the distributed binary (`dist` profile: fat LTO), fully static
//!   (glibc, crt-static) and stripped, at `TARGET_DIR/dist/cws-instrumentation`.
//! - `bench [--quick] [--runs N] [--only W0b,W1,W10] [--tracer PATH] [--stops-reference PATH] [--only-ingest]`: tracing
//!   overhead against native and strace, side by side, and `serve` ingest
//!   (see `bench/mod.rs`).
//! - `image`: a `FROM scratch` image holding only `/cws-instrumentation`,
//!   packaged from the `dist` binary with podman or buildah (works offline:
//!   there is no base image to pull).
//!
//! Where cargo builds is cargo's to say (`CARGO_TARGET_DIR`, config files):
//! built programs are taken from cargo's own report of what it built, and
//! the target directory from `cargo metadata`.

mod bench;
mod demo;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::OnceLock;

const TARGET: &str = "x86_64-unknown-linux-gnu";
const IMAGE: &str = "cws-instrumentation:latest";
/// Where `cargo xtask ci` tells the tests the static binary is.
const STATIC_BINARY_VARIABLE: &str = "CWS_STATIC_BINARY";

fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(root());
    command
}

fn run(command: &mut Command) -> Result<(), String> {
    eprintln!("xtask: {command:?}");
    match command.status() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(format!("{command:?} failed: {status}")),
        Err(e) => Err(format!("cannot run {:?}: {e}", command.get_program())),
    }
}

/// Runs `cargo test` with its output passed through as it comes, and adds
/// up the "test result" lines of every test binary: passed, failed.
fn run_tests(command: &mut Command) -> (Result<(), String>, u64, u64) {
    use std::io::{BufRead, BufReader};
    eprintln!("xtask: {command:?}");
    let mut child = match command.stdout(std::process::Stdio::piped()).spawn() {
        Ok(child) => child,
        Err(e) => return (Err(format!("cannot run {:?}: {e}", command.get_program())), 0, 0),
    };
    let (mut passed, mut failed) = (0, 0);
    let stdout = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            passed += count(result, "passed");
            failed += count(result, "failed");
        }
    }
    let result = match child.wait() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(format!("{command:?} failed: {status}")),
        Err(e) => Err(format!("waiting for {:?}: {e}", command.get_program())),
    };
    (result, passed, failed)
}

/// The number before `word` in "ok. 5 passed; 0 failed; ...".
fn count(result: &str, word: &str) -> u64 {
    result.split([';', '.']).find_map(|part| part.trim().strip_suffix(word)?.trim().parse().ok()).unwrap_or(0)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

/// Cargo's target directory, wherever `CARGO_TARGET_DIR` or a config file
/// puts it.
fn target_dir() -> Result<PathBuf, String> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        let output = cargo()
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot run cargo metadata: {e}"))?;
        if !output.status.success() {
            return Err(format!("cargo metadata failed: {}", output.status));
        }
        let metadata: serde_json::Value =
            serde_json::from_slice(&output.stdout).map_err(|e| format!("cargo metadata: {e}"))?;
        metadata["target_directory"]
            .as_str()
            .map(PathBuf::from)
            .ok_or_else(|| "cargo metadata names no target_directory".to_owned())
    })
    .clone()
}

/// A directory of ours under cargo's target directory.
fn target_subdir(name: &str) -> Result<PathBuf, String> {
    let dir = target_dir()?.join(name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Runs `cargo build ARGS` and returns the executable cargo reports it built
/// for the target `name` (a binary or an example): the file of this build,
/// wherever cargo put it.
fn build(name: &str, args: &[&str], env: &[(&str, &str)]) -> Result<PathBuf, String> {
    let mut command = cargo();
    command.arg("build").args(args).arg("--message-format=json-render-diagnostics").stdout(Stdio::piped());
    command.envs(env.iter().copied());
    eprintln!("xtask: {command:?}");
    let mut child = command.spawn().map_err(|e| format!("cannot run cargo: {e}"))?;
    let mut built = None;
    for line in std::io::BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.map_err(|e| format!("reading cargo's messages: {e}"))?;
        let Ok(message) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        if message["reason"] == "compiler-artifact" && message["target"]["name"] == name {
            if let Some(executable) = message["executable"].as_str() {
                built = Some(PathBuf::from(executable));
            }
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("cargo build of {name} failed: {status}"));
    }
    built.ok_or_else(|| format!("cargo built no executable named {name}"))
}

/// Every check, even after one fails: a failure must not hide the others.
fn ci() -> Result<(), String> {
    let mut failures = Vec::new();
    let mut check = |result: Result<(), String>| {
        if let Err(message) = result {
            eprintln!("xtask: {message}");
            failures.push(message);
        }
    };
    check(run(cargo().args(["fmt", "--all", "--", "--check"])));
    check(run(cargo().args(["clippy", "--all-targets", "--workspace", "--", "-D", "warnings"])));
    // The static binary is built once, here, for the tests that need it.
    let mut test = cargo();
    test.args(["test", "--workspace", "--no-fail-fast"]);
    match dist() {
        Ok(binary) => {
            test.env(STATIC_BINARY_VARIABLE, binary);
        }
        Err(message) => check(Err(message)),
    }
    let (result, passed, failed) = run_tests(&mut test);
    // One closing line for the whole suite: the last test binary's own line
    // (the doc tests, none) says nothing of the rest.
    println!("ci: {passed} passed, {failed} failed");
    check(result);
    match failures.len() {
        0 => Ok(()),
        n => Err(format!("{n} CI step(s) failed:\n  {}", failures.join("\n  "))),
    }
}

/// Whether an ELF executable asks for a dynamic loader (has PT_INTERP).
fn is_dynamic(elf: &[u8]) -> Result<bool, String> {
    let field = |at: usize, len: usize| -> Result<u64, String> {
        let bytes = elf.get(at..at + len).ok_or("truncated ELF file")?;
        Ok(bytes.iter().rev().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    };
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        return Err("not a 64-bit ELF file".into());
    }
    let (phoff, phentsize, phnum) = (field(0x20, 8)? as usize, field(0x36, 2)? as usize, field(0x38, 2)? as usize);
    for index in 0..phnum {
        if field(phoff + index * phentsize, 4)? == 3 {
            return Ok(true);
        }
    }
    Ok(false)
}

fn dist() -> Result<PathBuf, String> {
    let built = build(
        "cws-instrumentation",
        &["--profile", "dist", "--locked", "--bin", "cws-instrumentation", "--target", TARGET],
        // With an explicit --target the flag reaches only the binary, not
        // build scripts and proc macros (which cannot be static).
        &[("RUSTFLAGS", "-C target-feature=+crt-static")],
    )?;
    let dist = target_subdir("dist")?;
    let out = dist.join("cws-instrumentation");
    // A rename, not a copy over it: the old binary may still be running.
    let staged = dist.join(".cws-instrumentation.new");
    std::fs::copy(&built, &staged).map_err(|e| format!("cannot copy {}: {e}", built.display()))?;
    std::fs::rename(&staged, &out).map_err(|e| format!("cannot replace {}: {e}", out.display()))?;
    let bytes = std::fs::read(&out).map_err(|e| e.to_string())?;
    if is_dynamic(&bytes)? {
        return Err(format!("{} is dynamically linked", out.display()));
    }
    println!(
        "{} ({:.1} MiB, static, built as {})",
        out.display(),
        bytes.len() as f64 / (1024.0 * 1024.0),
        built.display()
    );
    Ok(out)
}

fn image() -> Result<(), String> {
    let binary = dist()?;
    let context = target_subdir("image")?;
    std::fs::copy(&binary, context.join("cws-instrumentation")).map_err(|e| e.to_string())?;
    std::fs::write(
        context.join("Containerfile"),
        "FROM scratch\nCOPY cws-instrumentation /cws-instrumentation\nCMD [\"/cws-instrumentation\", \"health\"]\n",
    )
    .map_err(|e| e.to_string())?;
    let builder = ["podman", "buildah"]
        .into_iter()
        .find(|tool| Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success()))
        .ok_or(
            "neither podman nor buildah is installed (Debian: apt-get install -y podman buildah fuse-overlayfs runc)",
        )?;
    let mut build = Command::new(builder);
    if builder == "buildah" {
        build.arg("bud");
    } else {
        build.arg("build");
    }
    run(build.args(["-t", IMAGE, "-f"]).arg(context.join("Containerfile")).arg(&context))?;
    println!("image {IMAGE}");
    Ok(())
}

fn main() -> ExitCode {
    let result = match std::env::args().nth(1).as_deref() {
        Some("demo") => demo::demo(),
        Some("ci") => ci(),
        Some("dist") => dist().map(drop),
        Some("image") => image(),
        Some("bench") => bench::bench(&std::env::args().skip(2).collect::<Vec<_>>()),
        _ => {
            eprintln!(
                "usage: cargo xtask demo|ci|dist|image|bench [--quick] [--runs N] [--only W0b,W1,W10] [--tracer PATH] [--stops-reference PATH] [--only-ingest]"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_come_from_libtest_s_result_line() {
        let line = "ok. 40 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 15.70s";
        assert_eq!((super::count(line, "passed"), super::count(line, "failed")), (40, 2));
        assert_eq!(super::count("FAILED. 3 passed; 1 failed; 0 ignored", "failed"), 1);
    }
}
