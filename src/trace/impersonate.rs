//! Opening and creating files with a tracee's file-system credentials and
//! creation mask, on the tracer's own thread: the kernel then grants or
//! refuses, and creates, exactly what it would for the tracee.
//!
//! Linux keeps credentials per thread; the raw setfsuid, setfsgid,
//! setgroups and capset calls change only the calling thread's (libc's
//! wrappers would change every thread of the tracer). What is switched is
//! what a path walk and an open check: the fs ids, the supplementary
//! groups and the effective capabilities. Switching back happens when
//! [`Borrowed`] is dropped, before the thread does anything else.
//!
//! `unsafe` here is those raw calls, on integers and plain structs.

use nix::errno::Errno;

use crate::proto::Credentials;

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// The credentials a path walk and an open use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsCredentials {
    fsuid: u32,
    fsgid: u32,
    groups: Vec<u32>,
    effective: u64,
}

impl FsCredentials {
    /// As /proc/TID/status gives them; None when a field is missing.
    pub fn from_status(credentials: &Credentials) -> Option<FsCredentials> {
        Some(FsCredentials {
            fsuid: credentials.fsuid?,
            fsgid: credentials.fsgid?,
            groups: credentials.groups.clone(),
            effective: credentials.cap_effective?,
        })
    }
}

/// The calling thread's own credentials, and its permitted and
/// inheritable capabilities (kept as they are while borrowing).
pub struct Own {
    credentials: FsCredentials,
    permitted: u64,
    inheritable: u64,
}

impl Own {
    /// The calling thread's, as the kernel has them now.
    pub fn current() -> Option<Own> {
        let caps = capget().ok()?;
        let groups = getgroups().ok()?;
        let credentials = FsCredentials {
            fsuid: fs_id(libc::SYS_setfsuid),
            fsgid: fs_id(libc::SYS_setfsgid),
            groups,
            effective: caps.0,
        };
        Some(Own { credentials, permitted: caps.1, inheritable: caps.2 })
    }

    /// Takes `target`'s credentials until the result is dropped; only what
    /// differs is changed. Fails (and leaves the thread as it was) where
    /// the thread may not: a tracer without CAP_SETUID and CAP_SETGID, a
    /// user namespace that denies setgroups, or capabilities it does not
    /// hold.
    pub fn become_like(&self, target: &FsCredentials) -> Result<Borrowed<'_>, Errno> {
        if target.effective & !self.permitted != 0 {
            return Err(Errno::EPERM);
        }
        let own = &self.credentials;
        let mut borrowed = Borrowed { own: self, changed: Changed::default() };
        if target.groups != own.groups {
            setgroups(&target.groups)?;
            borrowed.changed.groups = true;
        }
        if target.fsgid != own.fsgid {
            borrowed.changed.fsgid = true;
            set_fs_id(libc::SYS_setfsgid, target.fsgid)?;
        }
        if target.fsuid != own.fsuid {
            borrowed.changed.fsuid = true;
            set_fs_id(libc::SYS_setfsuid, target.fsuid)?;
        }
        // Changing the fs uid to or from 0 adds or drops capabilities of
        // its own: the effective set is written last, whole.
        borrowed.changed.effective = true;
        capset(target.effective, self.permitted, self.inheritable)?;
        Ok(borrowed)
    }

    /// Whether the thread opens files as `target` would without changing
    /// anything. CAP_SYS_PTRACE, which the workload never has, is left out:
    /// it only decides access to other processes (/proc), which no
    /// supervised open reaches.
    pub fn is_like(&self, target: &FsCredentials) -> bool {
        const CAP_SYS_PTRACE: u64 = 1 << 19;
        let own = &self.credentials;
        (own.fsuid, own.fsgid, &own.groups) == (target.fsuid, target.fsgid, &target.groups)
            && own.effective & !CAP_SYS_PTRACE == target.effective & !CAP_SYS_PTRACE
    }
}

/// The calling thread's file-creation mask, made its own (its fs_struct
/// unshared from the tracer's other threads), so that taking on a tracee's
/// changes nothing else. The kernel applies it to a file the thread
/// creates, or the directory's default ACL instead, as for the tracee's
/// own call.
pub struct Mask(std::cell::Cell<u32>);

impl Mask {
    /// None where the thread cannot have a mask of its own.
    pub fn own() -> Option<Mask> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS).ok()?;
        let current = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        nix::sys::stat::umask(current);
        Some(Mask(std::cell::Cell::new(current.bits())))
    }

    /// Takes on `mask` (as /proc/TID/status gives a tracee's).
    pub fn set(&self, mask: u32) {
        let mask = mask & 0o777;
        if self.0.get() != mask {
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask));
            self.0.set(mask);
        }
    }
}

/// What a [`Borrowed`] changed, to be put back.
#[derive(Default)]
struct Changed {
    groups: bool,
    fsgid: bool,
    fsuid: bool,
    effective: bool,
}

/// The tracee's credentials, held by the calling thread until dropped.
pub struct Borrowed<'a> {
    own: &'a Own,
    changed: Changed,
}

impl Drop for Borrowed<'_> {
    fn drop(&mut self) {
        let (own, changed) = (self.own, &self.changed);
        let mine = &own.credentials;
        // The effective set first: it holds CAP_SETUID and CAP_SETGID again.
        let caps = || capset(mine.effective, own.permitted, own.inheritable);
        let restored = (if changed.effective { caps() } else { Ok(()) })
            .and_then(|()| if changed.fsuid { set_fs_id(libc::SYS_setfsuid, mine.fsuid) } else { Ok(()) })
            .and_then(|()| if changed.fsgid { set_fs_id(libc::SYS_setfsgid, mine.fsgid) } else { Ok(()) })
            .and_then(|()| if changed.groups { setgroups(&mine.groups) } else { Ok(()) })
            .and_then(|()| if changed.fsuid || changed.fsgid { caps() } else { Ok(()) });
        if restored.is_err() {
            // The thread would go on with the tracee's rights: nothing it
            // could do afterwards would be what it means to do.
            crate::log::log!("cannot take back the tracer's own credentials; stopping");
            std::process::abort();
        }
    }
}

/// The thread's fs uid or gid: the raw call with an invalid id changes
/// nothing and returns the current one.
fn fs_id(call: libc::c_long) -> u32 {
    // SAFETY: setfsuid/setfsgid take an integer; u32::MAX is never a valid id.
    unsafe { libc::syscall(call, u32::MAX) as u32 }
}

/// setfsuid and setfsgid report no error: success is the id being in place.
fn set_fs_id(call: libc::c_long, id: u32) -> Result<(), Errno> {
    // SAFETY: setfsuid/setfsgid take an integer.
    unsafe { libc::syscall(call, id) };
    if fs_id(call) == id {
        Ok(())
    } else {
        Err(Errno::EPERM)
    }
}

fn setgroups(groups: &[u32]) -> Result<(), Errno> {
    // SAFETY: `groups` is valid for reads of its length; the raw call acts
    // on the calling thread only.
    let rc = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    Errno::result(rc).map(drop)
}

fn getgroups() -> Result<Vec<u32>, Errno> {
    // SAFETY: a count of 0 asks for the number of groups only.
    let count = Errno::result(unsafe { libc::syscall(libc::SYS_getgroups, 0, std::ptr::null_mut::<u32>()) })?;
    let mut groups = vec![0u32; count as usize];
    // SAFETY: `groups` is valid for writes of `count` ids.
    let got = Errno::result(unsafe { libc::syscall(libc::SYS_getgroups, count, groups.as_mut_ptr()) })?;
    groups.truncate(got as usize);
    Ok(groups)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling thread's (effective, permitted, inheritable) sets.
fn capget() -> Result<(u64, u64, u64), Errno> {
    let mut header = CapHeader { version: CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: a version-3 header and two data structs, as capget wants.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    Errno::result(rc)?;
    let join = |low: u32, high: u32| u64::from(low) | u64::from(high) << 32;
    Ok((
        join(data[0].effective, data[1].effective),
        join(data[0].permitted, data[1].permitted),
        join(data[0].inheritable, data[1].inheritable),
    ))
}

fn capset(effective: u64, permitted: u64, inheritable: u64) -> Result<(), Errno> {
    let mut header = CapHeader { version: CAPABILITY_VERSION_3, pid: 0 };
    let half = |set: u64, high: bool| if high { (set >> 32) as u32 } else { set as u32 };
    let data = [false, true].map(|high| CapData {
        effective: half(effective, high),
        permitted: half(permitted, high),
        inheritable: half(inheritable, high),
    });
    // SAFETY: a version-3 header and two data structs, as capset wants; pid
    // 0 is the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    Errno::result(rc).map(drop)
}
