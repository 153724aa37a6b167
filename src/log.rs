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

/// An error and its sources, as one line: "outer: cause: root cause". A
/// layer that only repeats what the message already ends with is left out
/// (hyper's connect errors wrap an error of the same text).
pub fn causes(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.ends_with(&text) {
            message = format!("{message}: {text}");
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn causes_read_outer_to_root_without_repeats() {
        let refused = Layer("Connection refused (os error 111)", None);
        let inner = Layer("tcp connect error", Some(Box::new(refused)));
        let outer = Layer("tcp connect error", Some(Box::new(inner)));
        let transport = Layer("transport error", Some(Box::new(outer)));
        assert_eq!(causes(&transport), "transport error: tcp connect error: Connection refused (os error 111)");
    }
}
