//! User and group names as the traced process's own system has them: its
//! root's /etc/passwd and /etc/group, not the tracer's. Both files are the
//! workload's to write: a FIFO, a device, a symlink out of its root or a
//! huge file must neither stall nor fool the tracer thread.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, Mode, SFlag};
use nix::unistd::Pid;

use crate::text;

/// Largest database read; a longer one is read up to here (its entries
/// past the cut are not known).
const DATABASE_MAX: usize = 1 << 20;
/// Databases kept: a workload that chroots into many roots cycles them.
const CACHED_MAX: usize = 8;

/// Which database.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Database {
    Passwd,
    Group,
}

impl Database {
    fn path(self) -> &'static str {
        match self {
            Database::Passwd => "etc/passwd",
            Database::Group => "etc/group",
        }
    }
}

/// A database as read: which file it was, in what state, and its id → name
/// map (the first entry of an id wins, as getpwuid and getgrgid do).
struct Loaded {
    /// st_dev, st_ino, size, mtime and ctime (s, ns): a changed file
    /// differs in one of them, and is read again.
    version: [i64; 7],
    names: HashMap<u32, String>,
    last_used: u64,
}

/// The databases read so far, per file.
#[derive(Default)]
pub struct Names {
    loaded: Vec<Loaded>,
    uses: u64,
}

impl Names {
    /// The names of `uid` and `gid` in thread `tid`'s root, as its
    /// /etc/passwd and /etc/group say now.
    pub fn lookup(&mut self, tid: Pid, uid: u32, gid: u32) -> (Option<String>, Option<String>) {
        let directory = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let Ok(root) = nix::fcntl::open(format!("/proc/{tid}/root").as_str(), directory, Mode::empty()) else {
            return (None, None);
        };
        (self.name(&root, Database::Passwd, uid), self.name(&root, Database::Group, gid))
    }

    fn name(&mut self, root: &OwnedFd, database: Database, id: u32) -> Option<String> {
        // Opened without reading (O_PATH: a FIFO or device is not opened for
        // real), its symlinks kept inside the workload's root, then looked at.
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let file = openat2(root, database.path(), how).ok()?;
        let stat = fstat(&file).ok()?;
        if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return None;
        }
        let version = [
            stat.st_dev as i64,
            stat.st_ino as i64,
            stat.st_size,
            stat.st_mtime,
            stat.st_mtime_nsec,
            stat.st_ctime,
            stat.st_ctime_nsec,
        ];
        self.uses += 1;
        let index = match self.loaded.iter().position(|l| l.version == version) {
            Some(index) => index,
            None => {
                let names = parse(&read_regular(&file)?);
                if self.loaded.len() == CACHED_MAX {
                    let oldest = (0..self.loaded.len()).min_by_key(|&i| self.loaded[i].last_used)?;
                    self.loaded.swap_remove(oldest);
                }
                self.loaded.push(Loaded { version, names, last_used: 0 });
                self.loaded.len() - 1
            }
        };
        let loaded = &mut self.loaded[index];
        loaded.last_used = self.uses;
        loaded.names.get(&id).cloned()
    }
}

/// Up to `DATABASE_MAX` bytes of a file opened O_PATH and known to be a
/// regular file: reopened through its descriptor, so it is the same file.
fn read_regular(file: &OwnedFd) -> Option<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let flags = libc::O_NONBLOCK | libc::O_NOCTTY;
    let opened = std::fs::OpenOptions::new().read(true).custom_flags(flags).open(path).ok()?;
    let mut bytes = Vec::new();
    opened.take(DATABASE_MAX as u64).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

/// `name:password:id:...` lines (both files start so); a line cut by the
/// read bound, and lines that do not parse, are left out.
fn parse(bytes: &[u8]) -> HashMap<u32, String> {
    let complete = match bytes.iter().rposition(|&b| b == b'\n') {
        Some(end) if bytes.len() == DATABASE_MAX => &bytes[..end],
        _ => bytes,
    };
    let mut names = HashMap::new();
    for line in complete.split(|&b| b == b'\n') {
        let mut fields = line.split(|&b| b == b':');
        // Both files put the id third (passwd's fourth field is the gid).
        let (Some(name), Some(_), Some(id)) = (fields.next(), fields.next(), fields.next()) else { continue };
        let Some(id) = std::str::from_utf8(id).ok().and_then(|id| id.parse::<u32>().ok()) else { continue };
        if name.is_empty() || name.starts_with(b"#") {
            continue;
        }
        names.entry(id).or_insert_with(|| text::lossless(name));
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_map_ids_to_names_first_one_winning() {
        let passwd = b"root:x:0:0:root:/root:/bin/sh\nalias:x:0:0::/:/bin/sh\n# note\nbad:x:nan:0\n\xffname:x:1000:1000::/:/bin/sh";
        let names = parse(passwd);
        assert_eq!(names.get(&0).map(String::as_str), Some("root"));
        assert_eq!(names.get(&1000).map(String::as_str), Some(r"\xffname"));
        assert_eq!(names.len(), 2);
    }

    #[test]
    fn a_line_cut_by_the_read_bound_is_left_out() {
        // "c:x:35:" cut after its first digit.
        let mut bytes = b"a:x:1:1\nb:x:2:2\n".to_vec();
        bytes.resize(DATABASE_MAX - 6, b'#');
        bytes.extend_from_slice(b"\nc:x:3");
        let names = parse(&bytes);
        assert_eq!((names.len(), names.get(&2).map(String::as_str)), (2, Some("b")));
    }
}
