//! `trace --pid ... --pid-per-tracer N`: more pids than N are traced by
//! several tracer processes, N pids each, as Datadog's does: this program
//! again, with the same options, each with its share of the pids. Their
//! events files are the one asked for with `.1`, `.2`... appended (one
//! file cannot take two writers).

use std::ffi::{OsStr, OsString};
use std::os::unix::process::ExitStatusExt;

use crate::cli::TraceArgs;
use crate::exit::ExitError;
use crate::log::log;
use crate::trace::{self, Inheritance};

/// Whether the pids are more than one tracer may take.
pub fn needed(args: &TraceArgs) -> bool {
    args.datadog.pid_per_tracer.is_some_and(|per| args.datadog.pids.len() as u64 > per)
}

/// Starts the tracers, passes them the signals the tracer gets, and waits
/// for them all. The status is the first of theirs that is not 0.
pub fn run(args: &TraceArgs) -> Result<i32, ExitError> {
    let per = args.datadog.pid_per_tracer.unwrap_or(u64::MAX).max(1) as usize;
    let program = std::env::current_exe().map_err(|e| ExitError::setup(format!("cannot find this program: {e}")))?;
    // Before the children exist, so that no signal meant for them is lost.
    Inheritance::capture().map_err(|e| ExitError::setup(format!("cannot block signals: {e}")))?;
    let mut children = Vec::new();
    let mut status = 0;
    for (index, pids) in args.datadog.pids.chunks(per).enumerate() {
        let mut command = std::process::Command::new(&program);
        command.arg("trace").args(shared_options(std::env::args_os().skip(2), index + 1));
        for pid in pids {
            command.arg(format!("--pid={pid}"));
        }
        match command.spawn() {
            Ok(child) => children.push(child),
            Err(e) => {
                log!("cannot start a tracer for pids {pids:?}: {e}");
                status = crate::exit::code::SETUP;
            }
        }
    }
    let pids: Vec<u32> = children.iter().map(std::process::Child::id).collect();
    trace::forward_signals(&pids).map_err(|e| ExitError::setup(format!("cannot start the signal thread: {e}")))?;
    for mut child in children {
        let code = match child.wait() {
            Ok(exit) => exit.code().unwrap_or_else(|| 128 + exit.signal().unwrap_or(0)),
            Err(_) => crate::exit::code::SETUP,
        };
        if status == 0 {
            status = code;
        }
    }
    Ok(status)
}

/// The options of `trace` (its arguments after `trace`) but the pids and
/// their split, with tracer `index`'s own events file.
fn shared_options(options: impl Iterator<Item = OsString>, index: usize) -> Vec<OsString> {
    let mut shared = Vec::new();
    let mut options = options.peekable();
    while let Some(option) = options.next() {
        let text = option.to_string_lossy();
        let (name, inline_value) = match text.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name.to_owned(), Some(OsString::from(value))),
            _ => (text.into_owned(), None),
        };
        match name.as_str() {
            "--pid" | "--pid-per-tracer" => {
                if inline_value.is_none() {
                    options.next();
                }
            }
            "--events-file" => {
                let path = inline_value.or_else(|| options.next()).unwrap_or_default();
                shared.push(OsString::from("--events-file"));
                shared.push(numbered(&path, index));
            }
            _ => shared.push(option),
        }
    }
    shared
}

fn numbered(path: &OsStr, index: usize) -> OsString {
    let mut numbered = path.to_owned();
    numbered.push(format!(".{index}"));
    numbered
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_but_the_pids_is_shared_and_events_files_are_numbered() {
        let options = ["--verbose", "--pid", "1", "--pid=2", "--pid-per-tracer", "1", "--events-file", "e.json"];
        let shared = shared_options(options.iter().map(OsString::from), 2);
        assert_eq!(shared, ["--verbose", "--events-file", "e.json.2"]);
        let shared =
            shared_options(["--events-file=x", "--pid-per-tracer=3", "--probe-addr", ""].iter().map(OsString::from), 1);
        assert_eq!(shared, ["--events-file", "x.1", "--probe-addr", ""]);
    }
}
