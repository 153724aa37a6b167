//! How the program ends when it cannot do its job: one line on stderr and
//! an exit status a shell user recognises, distinct from any a workload is
//! likely to use on purpose.

/// Exit statuses of the tool itself (the workload's own status otherwise).
pub mod code {
    /// An action asked for failed (`trace selftests`).
    pub const FAILED: i32 = 1;
    /// The command line or an output path is unusable.
    pub const USAGE: i32 = 2;
    /// Tracing could not be set up (ptrace refused, fork failed, ...).
    pub const SETUP: i32 = 125;
    /// The entrypoint exists but cannot be executed.
    pub const NOT_EXECUTABLE: i32 = 126;
    /// The entrypoint does not exist.
    pub const NOT_FOUND: i32 = 127;
}

/// An error that ends the program: one line on stderr, and its exit status.
#[derive(Debug)]
pub struct ExitError {
    pub code: i32,
    pub message: String,
}

impl ExitError {
    pub fn new(code: i32, message: String) -> Self {
        ExitError { code, message }
    }

    pub fn usage(message: String) -> Self {
        ExitError::new(code::USAGE, message)
    }

    pub fn setup(message: String) -> Self {
        ExitError::new(code::SETUP, message)
    }
}
