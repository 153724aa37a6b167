//! Calls that change files without opening them: unlink, rmdir, rename,
//! mkdir, link, symlink, chmod, chown and their `*at`, `f*` and i386 forms.
//! Each table entry says which argument means what (`FileCall`).

use crate::proto::{self, event::Payload, FileOperation};
use crate::text;
use crate::trace::decode::context::{Call, Ctx, Next, AT_FDCWD, PATH_MAX};
use crate::trace::decode::creds::id_arg;
use crate::trace::decode::identity;
use crate::trace::memory;
use crate::trace::procfs::{self, FileId};

/// Where a file call finds a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathArg {
    /// A path argument, against the cwd.
    Path(usize),
    /// A directory descriptor argument and a path argument.
    At(usize, usize),
    /// A descriptor argument: its path.
    Fd(usize),
    /// Text kept as given (a symlink's contents).
    Text(usize),
}

/// Which arguments of a file call mean what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileCall {
    operation: FileOperation,
    path: PathArg,
    target: Option<PathArg>,
    mode: Option<usize>,
    /// The uid argument; the gid follows it.
    owner: Option<usize>,
    /// Through i386, the owner ids are 16-bit (chown, lchown, fchown).
    narrow_ids_on_i386: bool,
    flags: Option<usize>,
}

impl FileCall {
    pub const fn new(operation: FileOperation, path: PathArg) -> FileCall {
        FileCall { operation, path, target: None, mode: None, owner: None, narrow_ids_on_i386: false, flags: None }
    }

    /// rename's new name, link's existing file, symlink's contents.
    pub const fn target(self, target: PathArg) -> FileCall {
        FileCall { target: Some(target), ..self }
    }

    pub const fn mode(self, index: usize) -> FileCall {
        FileCall { mode: Some(index), ..self }
    }

    /// Owner ids at `index` and `index + 1`.
    pub const fn owner(self, index: usize) -> FileCall {
        FileCall { owner: Some(index), ..self }
    }

    pub const fn narrow_ids_on_i386(self) -> FileCall {
        FileCall { narrow_ids_on_i386: true, ..self }
    }

    pub const fn flags(self, index: usize) -> FileCall {
        FileCall { flags: Some(index), ..self }
    }
}

/// The path and the file it names now, for the file acted on.
fn read_file_arg(cx: &mut Ctx<'_>, call: &Call, arg: PathArg) -> Option<(String, Option<FileId>)> {
    match arg {
        PathArg::Path(i) => cx.read_file(AT_FDCWD, call.args[i]),
        PathArg::At(dirfd, i) => cx.read_file(call.fd(dirfd), call.args[i]),
        PathArg::Fd(i) => Some((cx.fd_path(call.fd(i))?, procfs::fd_file(cx.tid, call.fd(i)))),
        PathArg::Text(_) => read_path_arg(cx, call, arg).map(|text| (text, None)),
    }
}

fn read_path_arg(cx: &mut Ctx<'_>, call: &Call, arg: PathArg) -> Option<String> {
    match arg {
        PathArg::Path(i) => cx.read_path(AT_FDCWD, call.args[i]),
        // With AT_EMPTY_PATH and "", this is the descriptor's own path.
        PathArg::At(dirfd, i) => cx.read_path(call.fd(dirfd), call.args[i]),
        PathArg::Fd(i) => cx.fd_path(call.fd(i)),
        PathArg::Text(i) => {
            let (raw, _) = memory::read_cstring(cx.tid, call.args[i], PATH_MAX).ok()?;
            Some(text::lossless(&raw))
        }
    }
}

/// Paths are read at entry, when the kernel reads them: after an unlink or
/// rename there is nothing left to ask /proc about.
pub fn entry(cx: &mut Ctx<'_>, call: &mut Call, spec: FileCall) -> Next {
    let (path, file) = read_file_arg(cx, call, spec.path).unzip();
    let target = spec.target.map(|t| read_path_arg(cx, call, t));
    call.partial |= path.is_none() || target.as_ref().is_some_and(Option::is_none);
    call.entry_path = path;
    call.entry_file = file.flatten();
    call.entry_target = target.flatten();
    Next::Exit
}

pub fn exit(cx: &mut Ctx<'_>, call: &Call, retval: i64, spec: FileCall) {
    let flags = spec.flags.map_or(0, |i| call.args[i] as u32);
    // unlinkat(AT_REMOVEDIR) is an rmdir.
    let removes_dir = spec.operation == FileOperation::Unlink && flags & libc::AT_REMOVEDIR as u32 != 0;
    let id = |i: usize| id_arg(call, call.args[i], spec.narrow_ids_on_i386);
    // A file the call created has an identity only now.
    let file = match call.entry_file {
        None if retval >= 0 => read_file_arg(cx, call, spec.path).and_then(|(_, file)| file),
        file => file,
    };
    let path = call.entry_path.clone().unwrap_or_default();
    let facts = identity::facts(cx, file, &path);
    let (uid, gid) = (spec.owner.map(id), spec.owner.map(|i| id(i + 1)));
    let (user, group) = identity::requested_owner_names(cx, uid, gid);
    let event = proto::FileEvent {
        operation: if removes_dir { FileOperation::Rmdir } else { spec.operation } as i32,
        path,
        target: call.entry_target.clone().unwrap_or_default(),
        mode: spec.mode.map(|i| call.args[i] as u32),
        uid,
        gid,
        flags,
        device: facts.device,
        inode: facts.inode,
        mount_id: facts.mount_id,
        metadata: facts.metadata,
        mount_root: facts.mount_root,
        source_path: facts.source_path,
        user,
        group,
    };
    cx.emit_call(call, retval, call.partial, Payload::File(event));
}
