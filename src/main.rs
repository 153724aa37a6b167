//! The `cws-instrumentation` binary; see the library's documentation.

fn main() -> std::process::ExitCode {
    cws_instrumentation::command::main()
}
