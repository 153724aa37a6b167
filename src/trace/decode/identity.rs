//! The one reader of "which file, and what stat says of it" for every event
//! that names a file (open, exec, file changes): device, inode and mount id
//! always, with the directory its mount shows (a bind mount's source), and
//! with file stats on (no `--disable-stats`) its mode, owner, times and the
//! owner's names in the tracee's own root.

use crate::proto::{self, FileMetadata};
use crate::text;
use crate::trace::decode::context::Ctx;
use crate::trace::mounts;
use crate::trace::procfs::FileId;

/// What an event says of a file; all zero and None when there was none.
#[derive(Default)]
pub struct FileFacts {
    pub device: u64,
    pub inode: u64,
    pub mount_id: Option<u64>,
    pub metadata: Option<FileMetadata>,
    pub mount_root: String,
    pub source_path: String,
}

/// The events that name a file carry its facts in the same fields.
pub trait CarriesFacts {
    fn with_facts(self, facts: FileFacts) -> Self;
}

macro_rules! carries_facts {
    ($($event:ty),*) => {$(
        impl CarriesFacts for $event {
            fn with_facts(self, facts: FileFacts) -> Self {
                let FileFacts { device, inode, mount_id, metadata, mount_root, source_path } = facts;
                Self { device, inode, mount_id, metadata, mount_root, source_path, ..self }
            }
        }
    )*};
}

carries_facts!(proto::OpenEvent, proto::ExecEvent, proto::FileEvent);

/// The facts of `file`, named `path` in the event. A memfd's metadata is
/// left out, as Datadog does: it lives on no filesystem a rule could name.
pub fn facts(cx: &mut Ctx<'_>, file: Option<FileId>, path: &str) -> FileFacts {
    let Some(file) = file else { return FileFacts::default() };
    let memfd = path.starts_with("/memfd:");
    let metadata = match (file.stat, cx.names.as_deref_mut()) {
        (Some(stat), Some(names)) if !memfd => {
            let (user, group) = names.lookup(cx.tid, Some(stat.uid), Some(stat.gid));
            Some(FileMetadata {
                mode: stat.mode,
                uid: stat.uid,
                gid: stat.gid,
                user,
                group,
                mtime: stat.mtime,
                ctime: stat.ctime,
            })
        }
        _ => None,
    };
    let view = cx.mounts.view(cx.tid, &file);
    let mount_root = view.map(|v| text::lossless(&v.root)).unwrap_or_default();
    // Only a bind mount's files have another path; the event's is escaped text.
    let source = view
        .filter(|v| v.root != b"/")
        .zip(text::bytes(path))
        .and_then(|(view, path)| mounts::source_path(view, &path));
    let source_path = source.map(|p| text::lossless(&p)).unwrap_or_default();
    FileFacts { device: file.device, inode: file.inode, mount_id: file.mount_id, metadata, mount_root, source_path }
}

/// The names of the ids a chown asks for (-1: unchanged, no name), with
/// file stats on.
pub fn requested_owner_names(cx: &mut Ctx<'_>, uid: Option<i64>, gid: Option<i64>) -> (Option<String>, Option<String>) {
    let id = |value: Option<i64>| value.and_then(|v| u32::try_from(v).ok());
    match cx.names.as_deref_mut() {
        Some(names) if id(uid).or(id(gid)).is_some() => names.lookup(cx.tid, id(uid), id(gid)),
        _ => (None, None),
    }
}
