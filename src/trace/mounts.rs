//! Which directory of its filesystem a mount shows: `/` for a whole
//! filesystem, the source directory for a bind mount. A file reached
//! through a private bind mount has the mount's name in events; this says
//! where it really lies. Read from the traced thread's own
//! /proc/TID/mountinfo, once per mount: mounts are known by the unique id
//! statx gives (Linux 6.8+), which the kernel never reuses, unlike the
//! mount ids of mountinfo.

use std::collections::HashMap;

use nix::unistd::Pid;

use crate::trace::procfs::{self, FileId};

/// Largest mountinfo read; mounts past it are not found.
const MOUNTINFO_MAX: usize = 1 << 20;
/// Mounts remembered (each with two names of up to PATH_MAX: 2 MiB at
/// most); past this the cache starts over.
const KNOWN_MAX: usize = 256;

/// A mount as its namespace's mountinfo names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountView {
    /// The directory of the filesystem the mount shows.
    pub root: Vec<u8>,
    /// Where it is mounted, in the thread's view (relative to its root).
    pub point: Vec<u8>,
}

#[derive(Default)]
pub struct Mounts {
    known: HashMap<u64, Option<MountView>>,
}

impl Mounts {
    /// The mount `file` lies on, as thread `tid`'s mount namespace has it.
    pub fn view(&mut self, tid: Pid, file: &FileId) -> Option<&MountView> {
        let (unique, id) = (file.unique_mount_id?, file.mount_id?);
        if !self.known.contains_key(&unique) {
            if self.known.len() == KNOWN_MAX {
                self.known.clear();
            }
            let (mut mountinfo, cut) = procfs::read_bounded(&format!("/proc/{tid}/mountinfo"), MOUNTINFO_MAX)?;
            if cut {
                // The last line, cut, would name a shorter root.
                mountinfo.truncate(mountinfo.iter().rposition(|&b| b == b'\n').unwrap_or(0));
            }
            self.known.insert(unique, find(&mountinfo, id, file.device));
        }
        self.known.get(&unique)?.as_ref()
    }
}

/// The line of mount `id`: "id parent major:minor root point ...", names
/// with space, tab, newline and backslash written as octal escapes. The
/// device must be the file's: a mount id is reused once its mount is gone.
fn find(mountinfo: &[u8], id: u64, device: u64) -> Option<MountView> {
    let id = id.to_string();
    let line =
        mountinfo.split(|&b| b == b'\n').find(|line| line.split(|&b| b == b' ').next() == Some(id.as_bytes()))?;
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').take(5).collect();
    let [_, _, numbers, root, point] = fields[..] else { return None };
    let (major, minor) = std::str::from_utf8(numbers).ok()?.split_once(':')?;
    if libc::makedev(major.parse().ok()?, minor.parse().ok()?) != device {
        return None;
    }
    Some(MountView { root: unescape(root), point: unescape(point) })
}

/// mountinfo's `\ooo` escapes back to their bytes.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal =
            field.get(i + 1..i + 4).filter(|d| field[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                bytes.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8).wrapping_add(c - b'0')));
                i += 4;
            }
            None => {
                bytes.push(field[i]);
                i += 1;
            }
        }
    }
    bytes
}

/// A mount as a thread's mountinfo lists it, for checking what a mount or
/// umount2 call did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub id: u64,
    /// Where it is mounted, in the thread's view (relative to its root).
    pub point: Vec<u8>,
    pub fstype: Vec<u8>,
    pub source: Vec<u8>,
}

/// Every mount of thread `tid`'s namespace; None when mountinfo could not
/// be read whole.
pub fn listed(tid: Pid) -> Option<Vec<Listed>> {
    let (mountinfo, cut) = procfs::read_bounded(&format!("/proc/{tid}/mountinfo"), MOUNTINFO_MAX)?;
    if cut {
        return None;
    }
    mountinfo.split(|&b| b == b'\n').filter(|line| !line.is_empty()).map(parse_listed).collect()
}

/// "id parent major:minor root point options [optional...] - fstype source
/// superoptions".
fn parse_listed(line: &[u8]) -> Option<Listed> {
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let id = std::str::from_utf8(fields.first()?).ok()?.parse().ok()?;
    let point = unescape(fields.get(4)?);
    let dash = fields.iter().skip(6).position(|f| *f == b"-")? + 6;
    let fstype = unescape(fields.get(dash + 1)?);
    let source = unescape(fields.get(dash + 2)?);
    Some(Listed { id, point, fstype, source })
}

/// `path` (bytes) as reached through `view`'s source: its part below the
/// mount point joined to the mount's root. None when the path is not
/// below the mount point (another root's view of it: a chroot).
pub fn source_path(view: &MountView, path: &[u8]) -> Option<Vec<u8>> {
    let below = match path.strip_prefix(view.point.as_slice())? {
        rest if view.point == b"/" => rest,
        rest if rest.is_empty() || rest.starts_with(b"/") => rest,
        _ => return None,
    };
    let below = below.strip_prefix(b"/").unwrap_or(below);
    let mut source = view.root.clone();
    if !below.is_empty() {
        if source != b"/" {
            source.push(b'/');
        }
        source.extend_from_slice(below);
    }
    Some(source)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &[u8] = b"27 1 254:0 / / rw - ext4 /dev/vda rw\n\
        80 27 254:0 /srv/real\\040dir /tmp/view rw - ext4 /dev/vda rw\n";

    #[test]
    fn a_mount_is_found_by_id_and_device_and_its_names_unescaped() {
        let device = libc::makedev(254, 0);
        let view = find(MOUNTINFO, 80, device).unwrap();
        assert_eq!(view, MountView { root: b"/srv/real dir".to_vec(), point: b"/tmp/view".to_vec() });
        // A reused id of another filesystem's mount is not this one.
        assert_eq!(find(MOUNTINFO, 80, libc::makedev(8, 1)), None);
        assert_eq!(find(MOUNTINFO, 8, device), None);
    }

    #[test]
    fn a_listed_mount_has_its_point_type_and_source_past_the_optional_fields() {
        let line = b"81 27 0:52 / /tmp/a\\040b rw,relatime shared:1 master:2 - tmpfs my\\040src rw";
        let listed = parse_listed(line).unwrap();
        let expected =
            Listed { id: 81, point: b"/tmp/a b".to_vec(), fstype: b"tmpfs".to_vec(), source: b"my src".to_vec() };
        assert_eq!(listed, expected);
        assert_eq!(parse_listed(b"81 27 0:52 / /tmp/a rw"), None);
    }

    #[test]
    fn a_path_below_the_mount_point_is_found_under_the_mount_s_root() {
        let view = MountView { root: b"/srv/real".to_vec(), point: b"/tmp/view".to_vec() };
        assert_eq!(source_path(&view, b"/tmp/view/a/b"), Some(b"/srv/real/a/b".to_vec()));
        assert_eq!(source_path(&view, b"/tmp/view"), Some(b"/srv/real".to_vec()));
        assert_eq!(source_path(&view, b"/tmp/viewer/a"), None);
        let whole = MountView { root: b"/".to_vec(), point: b"/".to_vec() };
        assert_eq!(source_path(&whole, b"/etc/passwd"), Some(b"/etc/passwd".to_vec()));
    }
}
