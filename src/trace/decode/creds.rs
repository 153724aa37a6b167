//! Credential changes: set*uid, set*gid, setfs*id, capset and setgroups.
//! The event carries what was asked and what the kernel has afterwards.

use crate::proto::{self, event::Payload};
use crate::trace::abi::Abi;
use crate::trace::decode::context::{Call, Ctx, Next};
use crate::trace::procfs;

/// Which credential call, for what its arguments mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredCall {
    /// set*id: `count` ids (1 for setuid, 2 for setreuid, 3 for setresuid).
    /// `narrow_on_i386`: through i386 the call takes 16-bit ids (the calls
    /// without the "32" suffix).
    Ids { count: usize, narrow_on_i386: bool },
    /// capset(header, data): masks in memory.
    Capset,
    /// setgroups(size, list): the new supplementary groups in memory; through
    /// i386, `setgroups` takes 16-bit ids (`setgroups32` 32-bit ones).
    Groups { narrow_on_i386: bool },
}

/// NGROUPS_MAX: the kernel refuses a longer list (EINVAL) without reading it.
const GROUPS_MAX: usize = 65536;

/// capset's masks are in memory, read at entry as the kernel reads them.
/// Version 3 headers carry two 32-bit halves of each.
pub fn entry(cx: &mut Ctx<'_>, call: &mut Call, cred: CredCall) -> Next {
    match cred {
        CredCall::Capset => call.entry_bytes = cx.read_bytes(call.args[1], 24),
        CredCall::Groups { narrow_on_i386 } => {
            let count = call.args[0] as i32;
            if (0..=GROUPS_MAX as i32).contains(&count) {
                let len = count as usize * group_width(call, narrow_on_i386);
                call.entry_bytes = cx.read_bytes(call.args[1], len);
                call.partial |= call.entry_bytes.len() < len;
            }
        }
        CredCall::Ids { .. } => {}
    }
    Next::Exit
}

/// The thread's credentials after the call, from the kernel: what set*id
/// changed is what matters, not the arguments (-1 means "unchanged", and
/// setfs*id reports failure only through its return value).
pub fn exit(cx: &mut Ctx<'_>, call: &Call, retval: i64, cred: CredCall) {
    let credentials = procfs::status(cx.tid).map(|s| s.credentials);
    let (requested, unreadable) = requested(call, cred);
    let partial = credentials.is_none() || unreadable;
    let event = proto::CredentialsEvent { credentials, requested };
    cx.emit_call(call, retval, partial, Payload::Credentials(event));
}

/// The ids a set*id call passed, or capset's masks; the flag says the masks
/// could not be read.
fn requested(call: &Call, cred: CredCall) -> (Vec<i64>, bool) {
    match cred {
        // What entry could read (partial already says when it was cut).
        CredCall::Groups { narrow_on_i386 } => {
            let width = group_width(call, narrow_on_i386);
            // Little-endian ids of 2 or 4 bytes, as x86 stores them.
            let group =
                |id: &[u8]| id_value(id.iter().rev().fold(0, |value, &byte| value << 8 | u64::from(byte)), width == 2);
            (call.entry_bytes.chunks_exact(width).map(group).collect(), false)
        }
        CredCall::Capset => {
            let word = |i| call.entry_u32(i);
            // struct __user_cap_data_struct { effective, permitted, inheritable } × 2.
            let masks: Option<Vec<i64>> =
                (0..3).map(|set| Some(i64::from(word(set)?) | i64::from(word(3 + set).unwrap_or(0)) << 32)).collect();
            masks.map_or((Vec::new(), true), |m| (m, false))
        }
        CredCall::Ids { count, narrow_on_i386 } => {
            (call.args[..count].iter().map(|&a| id_arg(call, a, narrow_on_i386)).collect(), false)
        }
    }
}

/// Bytes per group id in setgroups' list.
fn group_width(call: &Call, narrow_on_i386: bool) -> usize {
    if narrow_on_i386 && call.abi == Abi::I386 {
        2
    } else {
        4
    }
}

/// A user or group id argument, -1 for "unchanged".
pub fn id_arg(call: &Call, raw: u64, narrow_on_i386: bool) -> i64 {
    id_value(raw, narrow_on_i386 && call.abi == Abi::I386)
}

/// An id as the kernel reads it: all ones is -1 ("unchanged", or in a
/// list an id it refuses), a 16-bit one included (low2highuid); any other
/// value is that id, up to 4294967294.
fn id_value(raw: u64, narrow: bool) -> i64 {
    let (id, all_ones) = match narrow {
        true => (u64::from(raw as u16), u64::from(u16::MAX)),
        false => (u64::from(raw as u32), u64::from(u32::MAX)),
    };
    if id == all_ones {
        -1
    } else {
        id as i64
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::trace::abi::SyscallEntry;

    fn call(abi: Abi, args: [u64; 6], entry_bytes: Vec<u8>) -> Call {
        let entry = SyscallEntry { abi, nr: 0, args };
        Call { entry_bytes, ..Call::new("test", &entry, SystemTime::now()) }
    }

    #[test]
    fn requested_credentials_keep_minus_one_whatever_the_id_width() {
        let unchanged = u64::from(u32::MAX);
        let setresuid = CredCall::Ids { count: 3, narrow_on_i386: true };
        assert_eq!(
            requested(&call(Abi::X86_64, [unchanged, 0, 1000, 0, 0, 0], vec![]), setresuid),
            (vec![-1, 0, 1000], false)
        );
        // i386's setreuid takes 16-bit ids; setuid32 32-bit ones.
        let setreuid = CredCall::Ids { count: 2, narrow_on_i386: true };
        assert_eq!(requested(&call(Abi::I386, [0xffff, 5, 0, 0, 0, 0], vec![]), setreuid), (vec![-1, 5], false));
        assert_eq!(requested(&call(Abi::I386, [40000, 0, 0, 0, 0, 0], vec![]), setreuid).0, [40000, 0]);
        let setuid = CredCall::Ids { count: 1, narrow_on_i386: true };
        assert_eq!(requested(&call(Abi::X86_64, [3_000_000_000, 0, 0, 0, 0, 0], vec![]), setuid).0, [3_000_000_000]);
        let setuid32 = CredCall::Ids { count: 1, narrow_on_i386: false };
        assert_eq!(requested(&call(Abi::I386, [0xffff, 0, 0, 0, 0, 0], vec![]), setuid32), (vec![0xffff], false));

        let halves: Vec<u8> = [1u32, 2, 4, 8, 0, 0].iter().flat_map(|w| w.to_ne_bytes()).collect();
        let capset = call(Abi::X86_64, [0; 6], halves);
        assert_eq!(requested(&capset, CredCall::Capset), (vec![1 | 8 << 32, 2, 4], false));
        let unreadable = call(Abi::X86_64, [0; 6], vec![]);
        assert_eq!(requested(&unreadable, CredCall::Capset), (vec![], true));

        let groups: Vec<u8> = [1u16, 0xffff, 7, 0].iter().flat_map(|g| g.to_ne_bytes()).collect();
        let setgroups = CredCall::Groups { narrow_on_i386: true };
        assert_eq!(requested(&call(Abi::I386, [4, 0, 0, 0, 0, 0], groups.clone()), setgroups).0, [1, -1, 7, 0]);
        assert_eq!(requested(&call(Abi::X86_64, [2, 0, 0, 0, 0, 0], groups), setgroups).0, [0xffff_0001, 7]);
    }
}
