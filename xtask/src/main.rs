//! `cargo xtask <task>`: the project's chores, in Rust so they run wherever
//! cargo does.
//!
//! - `ci`: what CI checks: formatting, clippy with warnings denied, tests.

use std::process::{Command, ExitCode};

fn cargo(args: &[&str]) -> bool {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("xtask: cargo {}", args.join(" "));
    Command::new(cargo).args(args).status().is_ok_and(|s| s.success())
}

fn ci() -> bool {
    cargo(&["fmt", "--all", "--", "--check"])
        && cargo(&["clippy", "--all-targets", "--workspace", "--", "-D", "warnings"])
        && cargo(&["test"])
}

fn main() -> ExitCode {
    let task = std::env::args().nth(1);
    let ok = match task.as_deref() {
        Some("ci") => ci(),
        _ => {
            eprintln!("usage: cargo xtask ci");
            return ExitCode::from(2);
        }
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
