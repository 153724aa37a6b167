//! The tracer's own messages on stderr. The workload shares that stderr, so
//! each message is written with a single write(2): it cannot be split by the
//! workload's output (`eprintln!` may write a line in several pieces).

use std::fmt;
use std::io::Write;

/// Writes "cws-instrumentation: MESSAGE\n" at once.
pub fn line(message: fmt::Arguments<'_>) {
    let text = format!("cws-instrumentation: {message}\n");
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// An error and its sources, as one line: "outer: cause: root cause".
pub fn causes(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    message
}

/// `log!("...", args)`: one line on stderr, prefixed with the program name.
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log::line(format_args!($($arg)*))
    };
}
pub(crate) use log;
