//! `cargo xtask <task>`: the project's chores, in Rust so they run wherever
//! cargo does.
//!
//! - `ci`: what CI checks: formatting, clippy with warnings denied, tests.
//! - `dist`: the release binary, fully static (glibc, crt-static), stripped
//!   and LTO-built, at `target/dist/cws-instrumentation`.
//! - `bench [--quick] [--runs N]`: tracing overhead against native and
//!   strace, side by side, and `serve` ingest (see `bench/mod.rs`).
//! - `image`: a `FROM scratch` image holding only `/cws-instrumentation`,
//!   packaged from the `dist` binary with podman or buildah (works offline:
//!   there is no base image to pull).

mod bench;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const TARGET: &str = "x86_64-unknown-linux-gnu";
const IMAGE: &str = "cws-instrumentation:latest";

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(command: &mut Command) -> Result<(), String> {
    eprintln!("xtask: {command:?}");
    match command.status() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(format!("{command:?} failed: {status}")),
        Err(e) => Err(format!("cannot run {:?}: {e}", command.get_program())),
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

fn ci() -> Result<(), String> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args(["clippy", "--all-targets", "--workspace", "--", "-D", "warnings"]))?;
    run(cargo().args(["test"]))
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
    let root = root();
    run(cargo()
        .current_dir(&root)
        .args(["build", "--release", "--locked", "--bin", "cws-instrumentation", "--target", TARGET])
        // With an explicit --target the flag reaches only the binary, not
        // build scripts and proc macros (which cannot be static).
        .env("RUSTFLAGS", "-C target-feature=+crt-static"))?;
    let built = root.join("target").join(TARGET).join("release/cws-instrumentation");
    let dist = root.join("target/dist");
    std::fs::create_dir_all(&dist).map_err(|e| e.to_string())?;
    let out = dist.join("cws-instrumentation");
    // A rename, not a copy over it: the old binary may still be running.
    let staged = dist.join(".cws-instrumentation.new");
    std::fs::copy(&built, &staged).map_err(|e| format!("cannot copy {}: {e}", built.display()))?;
    std::fs::rename(&staged, &out).map_err(|e| format!("cannot replace {}: {e}", out.display()))?;
    let bytes = std::fs::read(&out).map_err(|e| e.to_string())?;
    if is_dynamic(&bytes)? {
        return Err(format!("{} is dynamically linked", out.display()));
    }
    println!("{} ({:.1} MiB, static)", out.display(), bytes.len() as f64 / (1024.0 * 1024.0));
    Ok(out)
}

fn image() -> Result<(), String> {
    let binary = dist()?;
    let context = root().join("target/image");
    std::fs::create_dir_all(&context).map_err(|e| e.to_string())?;
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
        Some("ci") => ci(),
        Some("dist") => dist().map(drop),
        Some("image") => image(),
        Some("bench") => bench::bench(&std::env::args().skip(2).collect::<Vec<_>>()),
        _ => {
            eprintln!("usage: cargo xtask ci|dist|image|bench [--quick] [--runs N]");
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
