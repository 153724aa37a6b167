//! `setup` and `health`: the init container's job and the image's health
//! check.
//!
//! `setup --cws-volume-mount DIR` puts a copy of this very binary at
//! DIR/cws-instrumentation, where the application container (which mounts
//! the same volume) runs it as its entrypoint. The copy is written under a
//! temporary name in DIR and renamed into place, so the application never
//! sees a half-written binary, and a second run simply replaces it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::exit::ExitError;

pub const BINARY_NAME: &str = "cws-instrumentation";

pub fn setup(dir: &Path) -> Result<i32, ExitError> {
    let shown = dir.display();
    match fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => return Err(bad(format!("{shown} is not a directory"))),
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(bad(format!("{shown} does not exist (is the volume mounted there?)")))
        }
        Err(e) => return Err(bad(explain(dir, &e))),
    }
    copy_self(dir).map_err(|e| bad(explain(dir, &e)))?;
    Ok(0)
}

fn bad(message: String) -> ExitError {
    ExitError::usage(format!("setup: {message}"))
}

fn explain(dir: &Path, error: &io::Error) -> String {
    let shown = dir.display();
    match error.raw_os_error() {
        Some(libc::EROFS) => format!("{shown} is mounted read-only; mount the volume read-write in the init container"),
        Some(libc::EACCES | libc::EPERM) => format!(
            "cannot write to {shown}: permission denied; run the init container as user 0 (\"user\": \"0\" on ECS, runAsUser: 0 on Kubernetes)"
        ),
        _ => format!("cannot install into {shown}: {error}"),
    }
}

fn copy_self(dir: &Path) -> io::Result<()> {
    let mut source = File::open("/proc/self/exe")?;
    let target = dir.join(BINARY_NAME);
    let temporary = dir.join(format!(".{BINARY_NAME}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut copy = OpenOptions::new().write(true).create_new(true).mode(0o755).open(&temporary)?;
        io::copy(&mut source, &mut copy)?;
        // The mode asked at creation went through the umask.
        copy.set_permissions(fs::Permissions::from_mode(0o755))?;
        copy.sync_all()?;
        fs::rename(&temporary, &target)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    result
}

pub fn health() -> i32 {
    use std::io::Write;
    // As the published image does: "OK", no newline.
    let _ = io::stdout().write_all(b"OK");
    0
}
