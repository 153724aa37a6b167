//! Reading tracee memory.
//!
//! Reads use process_vm_readv with the remote range split at page ends: the
//! kernel stops at the first unreadable iovec, so a string that runs into an
//! unmapped page still yields what precedes it. Where process_vm_readv is
//! missing (CONFIG_CROSS_MEMORY_ATTACH off) or refused, /proc/PID/mem is used.

use std::fs::File;
use std::io::IoSliceMut;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::unistd::Pid;

use crate::trace::abi::{Abi, PAGE};

/// Remote iovecs per process_vm_readv call (well under IOV_MAX).
const MAX_IOVECS: usize = 64;

static VM_READV_BROKEN: AtomicBool = AtomicBool::new(false);

/// Why a read came back short or empty.
#[derive(Debug)]
pub struct Unreadable;

/// Highest user-space address on x86_64 (47-bit; 57-bit with 5-level
/// paging). Anything above is a hostile or corrupt pointer.
const USER_END: u64 = 1 << 57;

/// First address of the page after the one holding `addr`.
fn next_page(addr: u64) -> u64 {
    (addr | (PAGE as u64 - 1)) + 1
}

/// Fills as much of `buf` as is readable from `addr`; returns the byte count.
pub fn read(pid: Pid, addr: u64, buf: &mut [u8]) -> usize {
    let len = buf.len().min(USER_END.saturating_sub(addr) as usize);
    if len == 0 || addr == 0 {
        return 0;
    }
    let buf = &mut buf[..len];
    if !VM_READV_BROKEN.load(Ordering::Relaxed) {
        match read_vm(pid, addr, buf) {
            Ok(n) => return n,
            // The kernel lacks it: never try again.
            Err(Errno::ENOSYS) => VM_READV_BROKEN.store(true, Ordering::Relaxed),
            // Refused for this process only (an LSM, say): try /proc below.
            Err(Errno::EPERM) => {}
            Err(_) => return 0,
        }
    }
    read_proc_mem(pid, addr, buf)
}

/// `addr + buf.len()` stays below USER_END (checked by `read`).
fn read_vm(pid: Pid, addr: u64, buf: &mut [u8]) -> nix::Result<usize> {
    let mut remote = Vec::with_capacity(MAX_IOVECS.min(buf.len() / PAGE + 2));
    let mut base = addr;
    let end = addr + buf.len() as u64;
    while base < end && remote.len() < MAX_IOVECS {
        let page_end = next_page(base);
        let len = page_end.min(end) - base;
        remote.push(RemoteIoVec { base: base as usize, len: len as usize });
        base += len;
    }
    let wanted = (base - addr) as usize;
    process_vm_readv(pid, &mut [IoSliceMut::new(&mut buf[..wanted])], &remote)
}

fn read_proc_mem(pid: Pid, addr: u64, buf: &mut [u8]) -> usize {
    let Ok(file) = File::open(format!("/proc/{pid}/mem")) else { return 0 };
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], addr + done as u64) {
            Ok(0) | Err(_) => break,
            Ok(n) => done += n,
        }
    }
    done
}

/// A NUL-terminated string of at most `max` bytes. The flag says whether it
/// was cut at `max`.
pub fn read_cstring(pid: Pid, addr: u64, max: usize) -> Result<(Vec<u8>, bool), Unreadable> {
    let mut out = Vec::new();
    let mut at = addr;
    while out.len() < max {
        if at >= USER_END {
            return if out.is_empty() { Err(Unreadable) } else { Ok((out, true)) };
        }
        // One page at a time: most strings end in the page they start in.
        let chunk = (next_page(at) - at).min((max - out.len()) as u64) as usize;
        let start = out.len();
        out.resize(start + chunk, 0);
        let got = read(pid, at, &mut out[start..]);
        if let Some(nul) = out[start..start + got].iter().position(|&b| b == 0) {
            out.truncate(start + nul);
            return Ok((out, false));
        }
        if got < chunk {
            out.truncate(start + got);
            return if out.is_empty() { Err(Unreadable) } else { Ok((out, true)) };
        }
        at += chunk as u64;
    }
    Ok((out, true))
}

/// `count` pointer-sized words; fewer when memory ends.
pub fn read_words(pid: Pid, addr: u64, abi: Abi, count: usize) -> Vec<u64> {
    let size = abi.word_size();
    let mut raw = vec![0u8; size * count];
    let got = read(pid, addr, &mut raw) / size;
    raw.chunks_exact(size)
        .take(got)
        .map(|w| match size {
            4 => u64::from(u32::from_ne_bytes(w.try_into().expect("4-byte chunk"))),
            _ => u64::from_ne_bytes(w.try_into().expect("8-byte chunk")),
        })
        .collect()
}

/// A NULL-terminated array of strings (argv, envp): at most `max_entries`
/// entries of at most `max_len` bytes each. The flag says whether entries
/// were left out; `Err` means the array itself could not be read.
pub fn read_string_array(
    pid: Pid,
    addr: u64,
    abi: Abi,
    max_entries: usize,
    max_len: usize,
) -> Result<(Vec<Vec<u8>>, bool), Unreadable> {
    if addr == 0 {
        return Ok((Vec::new(), false));
    }
    let mut items = Vec::new();
    let mut at = addr;
    loop {
        let words = read_words(pid, at, abi, 64);
        if words.is_empty() {
            return if items.is_empty() { Err(Unreadable) } else { Ok((items, true)) };
        }
        for &ptr in &words {
            if ptr == 0 {
                return Ok((items, false));
            }
            if items.len() == max_entries {
                return Ok((items, true));
            }
            // An unreadable element is kept as empty so that positions stay true.
            items.push(read_cstring(pid, ptr, max_len).map(|(s, _)| s).unwrap_or_default());
        }
        at += (words.len() * abi.word_size()) as u64;
    }
}

/// The strings of a NULL-terminated array (argv, envp) from entry `skip`
/// on that `keep` selects, judged on and cut to their first `max_len`
/// bytes: at most `max_entries` of them, among at most `max_scan` entries.
pub fn select_from_array(
    pid: Pid,
    addr: u64,
    abi: Abi,
    skip: usize,
    (max_scan, max_len, max_entries): (usize, usize, usize),
    keep: impl Fn(&[u8]) -> bool,
) -> Vec<Vec<u8>> {
    let mut found = Vec::new();
    let mut at = addr.saturating_add((skip * abi.word_size()) as u64);
    let mut scanned = 0;
    while scanned < max_scan && found.len() < max_entries {
        let words = read_words(pid, at, abi, 64);
        for &ptr in &words {
            if ptr == 0 {
                return found;
            }
            match read_cstring(pid, ptr, max_len) {
                Ok((entry, _)) if keep(&entry) && found.len() < max_entries => found.push(entry),
                _ => {}
            }
        }
        if words.len() < 64 {
            break;
        }
        scanned += words.len();
        at = at.saturating_add((words.len() * abi.word_size()) as u64);
    }
    found
}

/// Bytes read up to a bound, and whether there were more.
pub type Bounded = (Vec<u8>, bool);

/// `len` bytes at `addr`, or fewer where memory ends being readable.
fn read_exact_or_less(pid: Pid, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let got = read(pid, addr + done as u64, &mut buf[done..]);
        if got == 0 {
            break;
        }
        done += got;
    }
    buf.truncate(done);
    buf
}

/// Where a new image's arguments and environment lie, from the words at
/// its stack pointer: `argc, argv[0..argc], 0, envp[..], 0, auxv pairs`.
#[derive(Debug, PartialEq)]
struct ExecLayout {
    /// Start of the argument strings (they run up to `env`).
    args: u64,
    /// Start of the environment strings (they run up to `end`).
    env: u64,
    /// AT_EXECFN: the file name the kernel copied right after them.
    end: u64,
}

/// None when the words are cut short (read more) or are not such a stack.
fn exec_layout(words: &[u64]) -> Option<ExecLayout> {
    const AT_NULL: u64 = 0;
    const AT_EXECFN: u64 = 31;
    let argc = usize::try_from(*words.first()?).ok()?;
    let argv = words.get(1..1 + argc)?;
    let env_at = argc.checked_add(2)?;
    let envc = words.get(env_at..)?.iter().position(|&w| w == 0)?;
    let envp = &words[env_at..env_at + envc];
    let mut auxv = words.get(env_at + envc + 1..)?.chunks_exact(2);
    let end = loop {
        match auxv.next()? {
            [AT_EXECFN, value] => break *value,
            [AT_NULL, _] => return None,
            _ => {}
        }
    };
    let args = argv.first().or(envp.first()).copied().unwrap_or(end);
    let env = envp.first().copied().unwrap_or(end);
    // The kernel lays the strings out in order, arguments first: anything
    // else is not a stack it built (an x32 image read with 8-byte words).
    let ordered = argv.iter().chain(envp).chain([&end]).try_fold(args, |at, &p| (p >= at).then_some(p));
    (ordered.is_some() && argv.iter().all(|&p| p < env)).then_some(ExecLayout { args, env, end })
}

/// A new image's argument and environment strings, as [`exec_strings`]
/// finds them.
pub struct ExecStrings {
    pub args: Bounded,
    pub env: Bounded,
    /// Where the whole environment lies, for a reader that wants more of
    /// it than the bound (`select_entries`).
    pub env_at: u64,
    pub env_len: u64,
    /// Where the kernel's own copy of the file name it was asked to run
    /// lies (AT_EXECFN, above the environment).
    pub execfn_at: u64,
}

/// A new image's argument and environment strings as the kernel copied
/// them onto its stack, read at its exec stop before it runs any of its own
/// code: the same bytes as /proc/PID/{cmdline,environ}, in two reads of
/// memory instead of two files. Each is at most `max` bytes, with a flag
/// saying whether it was cut. None when the stack is not as expected.
pub fn exec_strings(pid: Pid, sp: u64, abi: Abi, max: usize) -> Option<ExecStrings> {
    /// Enough for the pointers of any argv and envp we keep, and more.
    const STACK_READ_MAX: usize = 1 << 20;
    let mut count = 4 * PAGE / abi.word_size();
    let layout = loop {
        // One read: the stack ends a little above its strings, and a read
        // stops there.
        let words = read_words(pid, sp, abi, count);
        match exec_layout(&words) {
            Some(layout) => break layout,
            None if words.len() == count && count * abi.word_size() < STACK_READ_MAX => count *= 4,
            None => return None,
        }
    };
    let (args_len, env_len) = ((layout.env - layout.args) as usize, (layout.end - layout.env) as usize);
    let located =
        |args, env| ExecStrings { args, env, env_at: layout.env, env_len: env_len as u64, execfn_at: layout.end };
    if args_len <= max && env_len <= max {
        // Contiguous: one read for both.
        let mut both = read_exact_or_less(pid, layout.args, args_len + env_len);
        if both.len() != args_len + env_len {
            return None;
        }
        let env = both.split_off(args_len);
        return Some(located((both, false), (env, false)));
    }
    let strings = |from: u64, len: usize| {
        let bytes = read_exact_or_less(pid, from, len.min(max));
        (bytes.len() == len.min(max)).then_some((bytes, len > max))
    };
    Some(located(strings(layout.args, args_len)?, strings(layout.env, env_len)?))
}

/// The entries of a NUL-separated list of `len` bytes that `keep` selects,
/// judged on and cut to their first `max_len` bytes, at most `max_entries`
/// of them: a few entries found in a list too long to keep whole, read a
/// chunk at a time through `read_at(offset, buf)` (which returns how much
/// it read; 0 ends the list).
pub fn select_entries(
    mut read_at: impl FnMut(u64, &mut [u8]) -> usize,
    len: u64,
    max_len: usize,
    max_entries: usize,
    keep: impl Fn(&[u8]) -> bool,
) -> Vec<Vec<u8>> {
    const CHUNK: usize = 64 * 1024;
    let mut buf = vec![0u8; CHUNK];
    let mut found = Vec::new();
    // The first `max_len` bytes of the entry being read.
    let mut current = Vec::new();
    let mut offset = 0;
    while offset < len && found.len() < max_entries {
        let got = read_at(offset, &mut buf[..CHUNK.min((len - offset) as usize)]);
        if got == 0 {
            break;
        }
        for &byte in &buf[..got] {
            if byte != 0 {
                if current.len() < max_len {
                    current.push(byte);
                }
            } else if keep(&current) && found.len() < max_entries {
                found.push(std::mem::take(&mut current));
            } else {
                current.clear();
            }
        }
        offset += got as u64;
    }
    if !current.is_empty() && keep(&current) && found.len() < max_entries {
        found.push(current);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exec_stack_gives_where_arguments_and_environment_lie() {
        // argc=2, argv, 0, envp (1), 0, auxv: AT_PAGESZ, AT_EXECFN, AT_NULL.
        let words = [2, 100, 105, 0, 110, 0, 6, 4096, 31, 120, 0, 0];
        assert_eq!(exec_layout(&words), Some(ExecLayout { args: 100, env: 110, end: 120 }));
        let no_env = [1, 100, 0, 0, 31, 108, 0, 0];
        assert_eq!(exec_layout(&no_env), Some(ExecLayout { args: 100, env: 108, end: 108 }));
        assert_eq!(exec_layout(&words[..7]), None, "cut short: read more");
        let unordered = [2, 105, 100, 0, 110, 0, 31, 120, 0, 0];
        assert_eq!(exec_layout(&unordered), None);
        let no_execfn = [1, 100, 0, 0, 6, 4096, 0, 0];
        assert_eq!(exec_layout(&no_execfn), None);
    }

    #[test]
    fn reads_strings_across_pages_and_stops_at_unmapped_memory() {
        let me = Pid::this();
        // A string that straddles a page boundary.
        let mut buf = vec![b'x'; 3 * PAGE];
        let start = PAGE - (buf.as_ptr() as usize % PAGE) + PAGE - 5;
        buf[start + 10] = 0;
        let (s, cut) = read_cstring(me, buf.as_ptr() as u64 + start as u64, 4096).unwrap();
        assert_eq!((s.len(), cut), (10, false));
        let (s, cut) = read_cstring(me, buf.as_ptr() as u64 + start as u64, 4).unwrap();
        assert_eq!((s, cut), (b"xxxx".to_vec(), true));
        assert!(read_cstring(me, 8, 16).is_err());
        // Hostile pointers near the top of the address space read nothing.
        assert!(read_cstring(me, u64::MAX - 7, 16).is_err());
        assert_eq!(read(me, u64::MAX - 3, &mut [0u8; 64]), 0);
        assert!(read_words(me, u64::MAX - 8, Abi::X86_64, 4).is_empty());
    }

    #[test]
    fn selected_entries_are_found_across_chunks_and_cut() {
        let mut list = Vec::new();
        for i in 0..20_000 {
            list.extend_from_slice(format!("V{i}=x\0").as_bytes());
            if i % 7000 == 6999 {
                list.extend_from_slice(b"LD_PRELOAD=/evil.so\0");
            }
        }
        list.extend_from_slice(b"LD_AUDIT=unterminated");
        let read_at = |offset: u64, buf: &mut [u8]| {
            let rest = &list[offset as usize..];
            let n = rest.len().min(buf.len());
            buf[..n].copy_from_slice(&rest[..n]);
            n
        };
        let keep = |entry: &[u8]| entry.starts_with(b"LD_");
        let found = select_entries(read_at, list.len() as u64, 12, 10, keep);
        assert_eq!(found, [b"LD_PRELOAD=/".to_vec(), b"LD_PRELOAD=/".to_vec(), b"LD_AUDIT=unt".to_vec()]);
        assert_eq!(select_entries(read_at, list.len() as u64, 12, 1, keep).len(), 1);
    }

    #[test]
    fn proc_mem_fallback_reads_the_same_bytes() {
        let data = b"through /proc/PID/mem";
        let mut buf = [0u8; 21];
        assert_eq!(read_proc_mem(Pid::this(), data.as_ptr() as u64, &mut buf), data.len());
        assert_eq!(&buf, data);
        assert_eq!(read_proc_mem(Pid::this(), 8, &mut buf), 0);
    }

    #[test]
    fn reads_pointer_arrays() {
        let me = Pid::this();
        let strings = [c"a".as_ptr(), c"bc".as_ptr(), std::ptr::null()];
        let (items, cut) = read_string_array(me, strings.as_ptr() as u64, Abi::X86_64, 10, 10).unwrap();
        assert_eq!((items, cut), (vec![b"a".to_vec(), b"bc".to_vec()], false));
        let (items, cut) = read_string_array(me, strings.as_ptr() as u64, Abi::X86_64, 1, 10).unwrap();
        assert_eq!((items, cut), (vec![b"a".to_vec()], true));
    }
}
