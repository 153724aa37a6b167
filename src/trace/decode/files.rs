//! Calls that change files without opening them: unlink, rmdir, rename,
//! mkdir, link, symlink, chmod, chown, the utime family, truncate, xattr
//! changes, mknod, memfd_create and their `*at`, `f*` and i386 forms. Each
//! table entry says which argument means what (`FileCall`); what a call sets
//! besides path, mode, owner and flags is its [`Detail`].

use crate::proto::{self, event::Payload, FileOperation};
use crate::text;
use crate::trace::decode::context::{Call, Ctx, Next, AT_FDCWD, PATH_MAX};
use crate::trace::decode::creds::id_arg;
use crate::trace::decode::file_detail::{self, Detail, LengthArg, TimeLayout, XattrValue};
use crate::trace::decode::identity::{self, CarriesFacts};
use crate::trace::decode::open;
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
    /// `At`, but a NULL path names the directory descriptor's own file
    /// (utimensat, futimesat: how futimens works).
    AtOrFd(usize, usize),
    /// No path argument: the descriptor the call returns (memfd_create).
    Returned,
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
    /// Whether a final symlink is followed (lchown: the symlink itself).
    follows: bool,
    flags: Option<usize>,
    detail: Detail,
}

impl FileCall {
    pub const fn new(operation: FileOperation, path: PathArg) -> FileCall {
        FileCall {
            operation,
            path,
            target: None,
            mode: None,
            owner: None,
            narrow_ids_on_i386: false,
            follows: true,
            flags: None,
            detail: Detail::None,
        }
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

    /// The call acts on a final symlink itself (lchown).
    pub const fn symlink_itself(self) -> FileCall {
        FileCall { follows: false, ..self }
    }

    pub const fn flags(self, index: usize) -> FileCall {
        FileCall { flags: Some(index), ..self }
    }

    /// The times array at `index`, laid out as `layout`.
    pub const fn times(self, index: usize, layout: TimeLayout) -> FileCall {
        FileCall { detail: Detail::Times(index, layout), ..self }
    }

    pub const fn length(self, length: LengthArg) -> FileCall {
        FileCall { detail: Detail::Length(length), ..self }
    }

    /// The attribute name at `name`, and setxattr's value.
    pub const fn xattr(self, name: usize, value: Option<XattrValue>) -> FileCall {
        FileCall { detail: Detail::Xattr { name, value }, ..self }
    }

    /// mknod's device number at `index`.
    pub const fn device(self, index: usize) -> FileCall {
        FileCall { detail: Detail::Device(index), ..self }
    }

    /// memfd_create's name at `index`.
    pub const fn name(self, index: usize) -> FileCall {
        FileCall { detail: Detail::Name(index), ..self }
    }
}

/// What a name call did, as the tracer performed it (`supervise/names.rs`).
pub struct Named {
    pub retval: i64,
    /// The name the call's path argument means (rename's old name, link's
    /// and symlink's new one), as the tracer walked it.
    pub path: Option<String>,
    /// rename's new name, link's existing file, symlink's contents.
    pub target: Option<String>,
    /// The file removed, renamed or linked to, as its name named it just
    /// before the call; the file made, just after.
    pub file: Option<FileId>,
    /// Why `file` could not be confirmed, or None.
    pub unverified: Option<String>,
}

/// What the tracer needs to make a file call itself (`supervise/names.rs`).
impl FileCall {
    pub fn operation(&self) -> FileOperation {
        self.operation
    }

    pub fn path_arg(&self) -> PathArg {
        self.path
    }

    pub fn target_arg(&self) -> Option<PathArg> {
        self.target
    }

    pub fn mode_arg(&self) -> Option<usize> {
        self.mode
    }

    pub fn flags_arg(&self) -> Option<usize> {
        self.flags
    }

    /// The uid argument; the gid follows it.
    pub fn owner_arg(&self) -> Option<usize> {
        self.owner
    }

    pub fn follows(&self) -> bool {
        self.follows
    }

    /// The utime family's times argument, and its layout.
    pub fn times_arg(&self) -> Option<(usize, TimeLayout)> {
        match self.detail {
            Detail::Times(index, layout) => Some((index, layout)),
            _ => None,
        }
    }

    /// An attribute call's name argument, and where setxattr's value is.
    pub fn xattr_args(&self) -> Option<(usize, Option<XattrValue>)> {
        match self.detail {
            Detail::Xattr { name, value } => Some((name, value)),
            _ => None,
        }
    }

    /// A truncate's length argument.
    pub fn length_arg(&self) -> Option<LengthArg> {
        match self.detail {
            Detail::Length(length) => Some(length),
            _ => None,
        }
    }

    /// mknod's device number argument.
    pub fn device_arg(&self) -> Option<usize> {
        match self.detail {
            Detail::Device(index) => Some(index),
            _ => None,
        }
    }
}

/// The path and the file it names now, for the file acted on.
fn read_file_arg(cx: &mut Ctx<'_>, call: &Call, arg: PathArg) -> Option<(String, Option<FileId>)> {
    match arg {
        PathArg::Path(i) => cx.read_file(AT_FDCWD, call.args[i]),
        PathArg::At(dirfd, i) => cx.read_file(call.fd(dirfd), call.args[i]),
        PathArg::Fd(i) => Some((cx.fd_path(call.fd(i))?, procfs::fd_file(cx.tid, call.fd(i)))),
        PathArg::Text(_) => read_path_arg(cx, call, arg).map(|text| (text, None)),
        PathArg::AtOrFd(dirfd, i) if call.args[i] == 0 => read_file_arg(cx, call, PathArg::Fd(dirfd)),
        PathArg::AtOrFd(dirfd, i) => read_file_arg(cx, call, PathArg::At(dirfd, i)),
        PathArg::Returned => None,
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
        PathArg::AtOrFd(..) | PathArg::Returned => read_file_arg(cx, call, arg).map(|(path, _)| path),
    }
}

/// Paths are read at entry, when the kernel reads them: after an unlink or
/// rename there is nothing left to ask /proc about.
pub fn entry(cx: &mut Ctx<'_>, call: &mut Call, spec: FileCall) -> Next {
    let (path, file) = read_file_arg(cx, call, spec.path).unzip();
    let target = spec.target.map(|t| read_path_arg(cx, call, t));
    let path_missing = path.is_none() && spec.path != PathArg::Returned;
    call.partial |= path_missing || target.as_ref().is_some_and(Option::is_none);
    call.entry_path = path;
    call.entry_file = file.flatten();
    call.entry_target = target.flatten();
    call.partial |= !file_detail::entry(cx, call, spec.detail);
    Next::Exit
}

pub fn exit(cx: &mut Ctx<'_>, call: &Call, retval: i64, spec: FileCall) {
    let flags = spec.flags.map_or(0, |i| call.args[i] as u32);
    // Another task sharing the memory or descriptor table may have changed
    // the argument while the call ran; another process writing the memory
    // (a shared mapping, process_vm_writev) may have too, which the tracer
    // cannot rule out, so a call that changes a name is checked whatever
    // the sharing.
    let shared = cx.procs.tables_shared(cx.tid);
    let checked = shared || (retval >= 0 && changes_a_name(spec.operation, flags));
    // Read again at exit: to check what the call did, or because a created
    // file has an identity only now.
    let again = match spec.path {
        PathArg::Returned => None,
        _ if checked || (call.entry_file.is_none() && retval >= 0) => read_file_arg(cx, call, spec.path),
        _ => None,
    };
    let (returned_path, file) = match (spec.path, call.entry_file) {
        (PathArg::Returned, _) if retval >= 0 => (cx.fd_path(retval as i32), procfs::fd_file(cx.tid, retval as i32)),
        (_, None) if retval >= 0 => (None, again.as_ref().and_then(|(_, file)| *file)),
        (_, file) => (None, file),
    };
    // A returned descriptor is named by the kernel, not by an argument.
    let unverified = match spec.path {
        PathArg::Returned => None,
        _ if checked => unverified(cx, call, spec, retval, flags, again),
        _ => None,
    };
    let path = returned_path.or_else(|| call.entry_path.clone()).unwrap_or_default();
    let target = spec.target.and(call.entry_target.clone());
    let event = file_event(cx, call, spec, path, target, file);
    let event = cx.call_event(call, retval, call.partial, Payload::File(event));
    cx.sink.emit(proto::Event { unverified: unverified.unwrap_or_default(), ..event });
}

/// The event of a file call the tracer made itself. Nothing in it is read
/// from the workload but its registers: the names are the ones the tracer
/// walked and acted on.
pub fn supervised(cx: &mut Ctx<'_>, call: &Call, spec: FileCall, named: &Named) {
    let path = named.path.clone().unwrap_or_default();
    let event = file_event(cx, call, spec, path, named.target.clone(), named.file);
    let event = cx.call_event(call, named.retval, named.path.is_none(), Payload::File(event));
    cx.sink.emit(proto::Event { unverified: named.unverified.clone().unwrap_or_default(), ..event });
}

/// A file call's event: `path` acted on (the file there being `file`), and
/// `target`; the rest from the call's register arguments.
fn file_event(
    cx: &mut Ctx<'_>,
    call: &Call,
    spec: FileCall,
    path: String,
    target: Option<String>,
    file: Option<FileId>,
) -> proto::FileEvent {
    let flags = spec.flags.map_or(0, |i| call.args[i] as u32);
    // unlinkat(AT_REMOVEDIR) is an rmdir.
    let removes_dir = spec.operation == FileOperation::Unlink && flags & libc::AT_REMOVEDIR as u32 != 0;
    let id = |i: usize| id_arg(call, call.args[i], spec.narrow_ids_on_i386);
    let facts = identity::facts(cx, file, &path);
    let (uid, gid) = (spec.owner.map(id), spec.owner.map(|i| id(i + 1)));
    let (user, group) = identity::requested_owner_names(cx, uid, gid);
    let mut event = proto::FileEvent {
        operation: if removes_dir { FileOperation::Rmdir } else { spec.operation } as i32,
        path,
        target: target.unwrap_or_default(),
        mode: spec.mode.map(|i| call.args[i] as u32),
        uid,
        gid,
        flags,
        user,
        group,
        ..Default::default()
    }
    .with_facts(facts);
    file_detail::fill(&mut event, call, spec.detail);
    event
}

/// While another task shares the caller's memory or descriptor table, the
/// paths read at entry may not be what the kernel read a moment later: it
/// can rewrite a string, or put another directory at a directory
/// descriptor. They are read and resolved again at exit, and a successful
/// call's effect is looked for in the kernel's state: a removed name no
/// longer names the file it named at entry, a renamed file is at its new
/// name, a link names its target's file, a created name exists. Why the
/// event cannot be confirmed, or None.
fn unverified(
    cx: &mut Ctx<'_>,
    call: &Call,
    spec: FileCall,
    retval: i64,
    flags: u32,
    again: Option<(String, Option<FileId>)>,
) -> Option<String> {
    const RACE: &str = "another task sharing the memory or the descriptor table, or another process writing the \
                        memory, changed the argument while the call ran, and which one the kernel used is not known";
    let (path, file) = again.unzip();
    if path != call.entry_path {
        let now = path.unwrap_or_else(|| "unreadable".to_owned());
        return Some(format!("path: read at the call's entry; at its exit it named {now}: {RACE}"));
    }
    let target = spec.target.map(|t| read_file_arg(cx, call, t));
    if let Some(target) = &target {
        if target.as_ref().map(|(text, _)| text) != call.entry_target.as_ref() {
            let now = target.as_ref().map_or("unreadable", |(text, _)| text.as_str());
            return Some(format!("target: read at the call's entry; at its exit it was {now}: {RACE}"));
        }
    }
    if retval < 0 {
        return Some(open::FAILED_UNVERIFIABLE.to_owned());
    }
    let file = file.flatten();
    let target_file = target.flatten().and_then(|(_, file)| file);
    let confirmed = match spec.operation {
        _ if !changes_a_name(spec.operation, flags) => {
            return Some(
                "path: read from the workload's memory; another task sharing the memory or the descriptor table \
                 could have changed it before the kernel read it, and this call leaves no change of a name to \
                 check it against"
                    .to_owned(),
            )
        }
        FileOperation::Unlink | FileOperation::Rmdir => {
            call.entry_file.is_some_and(|removed| !file.is_some_and(|now| now.is(&removed)))
        }
        FileOperation::Rename => call.entry_file.zip(target_file).is_some_and(|(moved, now)| now.is(&moved)),
        FileOperation::Link => file.zip(target_file).is_some_and(|(linked, now)| now.is(&linked)),
        _ => call.entry_file.is_none() && file.is_some(),
    };
    (!confirmed).then(|| {
        "path: the kernel's state after the call does not show its effect on the file this path named: another \
         task sharing the memory or the descriptor table, or another process writing the memory, may have changed \
         the argument while the call ran"
            .to_owned()
    })
}

/// Whether a successful call leaves an effect on names that the kernel's
/// state shows after it: a name removed, renamed, linked or created. A mode,
/// owner, time, length or attribute the file may have had already, and a
/// link that follows a symlink to some file, leave none to look for.
fn changes_a_name(operation: FileOperation, flags: u32) -> bool {
    match operation {
        FileOperation::Unlink | FileOperation::Rmdir | FileOperation::Rename => true,
        FileOperation::Link => flags & libc::AT_SYMLINK_FOLLOW as u32 == 0,
        FileOperation::Mkdir | FileOperation::Symlink | FileOperation::Mknod => true,
        _ => false,
    }
}
