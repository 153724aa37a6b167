//! Code for the kernel itself: module loads and unloads, and bpf(2).

use std::os::unix::fs::FileExt;

use crate::proto::{self, event::Payload};
use crate::text;
use crate::trace::decode::context::{Call, Ctx, Next};
use crate::trace::memory;
use crate::trace::procfs;

/// Which module call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleCall {
    /// init_module(image, len, params)
    Init,
    /// finit_module(fd, params, flags)
    Finit,
    /// delete_module(name, flags)
    Delete,
}

/// Module parameters read (the kernel takes any length).
const PARAMS_MAX: usize = 4096;
/// MODULE_NAME_LEN.
const MODULE_NAME_LEN: usize = 56;
/// Section headers read from an image: modules have a few dozen sections.
const SECTIONS_MAX: usize = 1024;
/// Section name table read.
const SECTION_NAMES_MAX: usize = 64 * 1024;
const THIS_MODULE: &[u8] = b".gnu.linkonce.this_module";

/// (parameters address, name address or image, flags) by call.
pub fn module_entry(cx: &mut Ctx<'_>, call: &mut Call, module: ModuleCall) -> Next {
    let [a0, a1, a2, ..] = call.args;
    match module {
        ModuleCall::Init => {
            call.entry_target = read_text(cx, call, a2, PARAMS_MAX);
            let read = |offset: u64, buf: &mut [u8]| match offset.checked_add(buf.len() as u64) {
                Some(end) if end <= a1 => memory::read(cx.tid, a0.wrapping_add(offset), buf),
                _ => 0,
            };
            call.entry_path = elf_module_name(read).map(|n| text::lossless(&n));
        }
        ModuleCall::Finit => {
            call.entry_target = read_text(cx, call, a1, PARAMS_MAX);
            call.entry_path = file_module_name(cx, a0 as i32).map(|n| text::lossless(&n));
        }
        ModuleCall::Delete => call.entry_path = read_text(cx, call, a0, MODULE_NAME_LEN - 1),
    }
    Next::Exit
}

/// A string argument, marked partial when unreadable.
fn read_text(cx: &Ctx<'_>, call: &mut Call, addr: u64, max: usize) -> Option<String> {
    match memory::read_cstring(cx.tid, addr, max) {
        Ok((raw, _)) => Some(text::lossless(&raw)),
        Err(_) => {
            call.partial = true;
            None
        }
    }
}

/// The name in a module file the tracee passed by descriptor: a regular
/// file only (a FIFO or socket is never read), through a copy of the
/// descriptor so that its offset is not moved.
fn file_module_name(cx: &Ctx<'_>, fd: i32) -> Option<Vec<u8>> {
    let file = std::fs::File::from(procfs::descriptor_copy(cx.tid, cx.tgid(), fd)?);
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    elf_module_name(|offset, buf| file.read_at(buf, offset).unwrap_or(0))
}

/// The module name in an ELF image's `.gnu.linkonce.this_module` section
/// (the `struct module`'s name field), from a few bounded reads: the ELF
/// header, the section headers, the section names, the name itself.
/// `read(offset, buf)` fills what it can and says how much.
fn elf_module_name(read: impl Fn(u64, &mut [u8]) -> usize) -> Option<Vec<u8>> {
    let exact = |offset: u64, len: usize| {
        let mut buf = vec![0u8; len];
        (read(offset, &mut buf) == len).then_some(buf)
    };
    let header = exact(0, 64)?;
    if &header[..4] != b"\x7fELF" || header[5] != 1 {
        return None;
    }
    let wide = match header[4] {
        1 => false,
        2 => true,
        _ => return None,
    };
    let u16_at = |b: &[u8], at: usize| u64::from(u16::from_le_bytes([b[at], b[at + 1]]));
    let u32_at = |b: &[u8], at: usize| u64::from(u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes")));
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let word_at = |b: &[u8], at: usize| if wide { u64_at(b, at) } else { u32_at(b, at) };
    // e_shoff, e_shentsize, e_shnum, e_shstrndx.
    let (shoff, entsize, count, names_index) = match wide {
        true => (u64_at(&header, 0x28), u16_at(&header, 0x3a), u16_at(&header, 0x3c), u16_at(&header, 0x3e)),
        false => (u32_at(&header, 0x20), u16_at(&header, 0x2e), u16_at(&header, 0x30), u16_at(&header, 0x32)),
    };
    // The kernel takes only its own section header size; a larger one
    // would make the read below as large as the image says.
    let (entsize, count) = (entsize as usize, (count as usize).min(SECTIONS_MAX));
    if entsize != if wide { 64 } else { 40 } || names_index as usize >= count {
        return None;
    }
    let sections = exact(shoff, entsize * count)?;
    let section = |i: usize| &sections[i * entsize..(i + 1) * entsize];
    // sh_offset, sh_size.
    let place =
        |s: &[u8]| if wide { (word_at(s, 0x18), word_at(s, 0x20)) } else { (word_at(s, 0x10), word_at(s, 0x14)) };
    let (names_at, names_len) = place(section(names_index as usize));
    let names = exact(names_at, (names_len as usize).min(SECTION_NAMES_MAX))?;
    let this_module = (0..count).map(section).find(|s| {
        let name_at = u32_at(s, 0) as usize;
        names.get(name_at..).is_some_and(|n| n.starts_with(THIS_MODULE) && n.get(THIS_MODULE.len()) == Some(&0))
    })?;
    // The name follows `state` and the `list` head in `struct module`.
    let name_offset = if wide { 24 } else { 12 };
    let mut name = vec![0u8; MODULE_NAME_LEN];
    let got = read(place(this_module).0.checked_add(name_offset)?, &mut name);
    name.truncate(got);
    let end = name.iter().position(|&b| b == 0)?;
    name.truncate(end);
    Some(name)
}

pub fn module_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64, module: ModuleCall) {
    let [a0, a1, a2, ..] = call.args;
    let (path, flags, length) = match module {
        ModuleCall::Init => (String::new(), 0, a1),
        ModuleCall::Finit => (cx.fd_path(a0 as i32).unwrap_or_default(), a2, 0),
        ModuleCall::Delete => (String::new(), a1, 0),
    };
    let event = proto::ModuleEvent {
        name: call.entry_path.clone().unwrap_or_default(),
        args: call.entry_target.clone().unwrap_or_default(),
        path,
        flags,
        length,
    };
    cx.emit_call(call, retval, false, Payload::Module(event));
}

fn bpf_command_name(command: i32) -> &'static str {
    const COMMANDS: [&str; 37] = [
        "BPF_MAP_CREATE",
        "BPF_MAP_LOOKUP_ELEM",
        "BPF_MAP_UPDATE_ELEM",
        "BPF_MAP_DELETE_ELEM",
        "BPF_MAP_GET_NEXT_KEY",
        "BPF_PROG_LOAD",
        "BPF_OBJ_PIN",
        "BPF_OBJ_GET",
        "BPF_PROG_ATTACH",
        "BPF_PROG_DETACH",
        "BPF_PROG_TEST_RUN",
        "BPF_PROG_GET_NEXT_ID",
        "BPF_MAP_GET_NEXT_ID",
        "BPF_PROG_GET_FD_BY_ID",
        "BPF_MAP_GET_FD_BY_ID",
        "BPF_OBJ_GET_INFO_BY_FD",
        "BPF_PROG_QUERY",
        "BPF_RAW_TRACEPOINT_OPEN",
        "BPF_BTF_LOAD",
        "BPF_BTF_GET_FD_BY_ID",
        "BPF_TASK_FD_QUERY",
        "BPF_MAP_LOOKUP_AND_DELETE_ELEM",
        "BPF_MAP_FREEZE",
        "BPF_BTF_GET_NEXT_ID",
        "BPF_MAP_LOOKUP_BATCH",
        "BPF_MAP_LOOKUP_AND_DELETE_BATCH",
        "BPF_MAP_UPDATE_BATCH",
        "BPF_MAP_DELETE_BATCH",
        "BPF_LINK_CREATE",
        "BPF_LINK_UPDATE",
        "BPF_LINK_GET_FD_BY_ID",
        "BPF_LINK_GET_NEXT_ID",
        "BPF_ENABLE_STATS",
        "BPF_ITER_CREATE",
        "BPF_LINK_DETACH",
        "BPF_PROG_BIND_MAP",
        "BPF_TOKEN_CREATE",
    ];
    usize::try_from(command).ok().and_then(|c| COMMANDS.get(c)).copied().unwrap_or("")
}

pub fn bpf_exit(cx: &mut Ctx<'_>, call: &Call, retval: i64) {
    let command = call.args[0] as i32;
    let event =
        proto::BpfEvent { command, command_name: bpf_command_name(command).to_owned(), size: call.args[2] as u32 };
    cx.emit_call(call, retval, false, Payload::Bpf(event));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64-bit relocatable ELF with a section name table and a
    /// `.gnu.linkonce.this_module` section naming `name`.
    pub fn module_image(name: &[u8]) -> Vec<u8> {
        let names = b"\0.shstrtab\0.gnu.linkonce.this_module\0";
        let mut image = vec![0u8; 64];
        image[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let names_at = image.len();
        image.extend_from_slice(names);
        let module_at = image.len();
        image.extend_from_slice(&[0u8; 24]);
        image.extend_from_slice(name);
        image.resize(module_at + 24 + MODULE_NAME_LEN, 0);
        let shoff = image.len();
        let section = |name: u32, offset: usize, size: usize| {
            let mut s = vec![0u8; 64];
            s[0..4].copy_from_slice(&name.to_le_bytes());
            s[0x18..0x20].copy_from_slice(&(offset as u64).to_le_bytes());
            s[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            s
        };
        image.extend(section(0, 0, 0));
        image.extend(section(1, names_at, names.len()));
        image.extend(section(11, module_at, 24 + MODULE_NAME_LEN));
        image[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        image[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        image[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        image[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        image
    }

    fn read_from(image: &[u8]) -> impl Fn(u64, &mut [u8]) -> usize + '_ {
        |offset, buf| {
            let Some(rest) = usize::try_from(offset).ok().and_then(|o| image.get(o..)) else { return 0 };
            let n = rest.len().min(buf.len());
            buf[..n].copy_from_slice(&rest[..n]);
            n
        }
    }

    #[test]
    fn module_names_come_from_the_this_module_section() {
        let image = module_image(b"cws_fake");
        assert_eq!(elf_module_name(read_from(&image)).as_deref(), Some(&b"cws_fake"[..]));
        // Cut before the section headers, or not ELF: no name, no panic.
        assert_eq!(elf_module_name(read_from(&image[..image.len() - 10])), None);
        assert_eq!(
            elf_module_name(read_from(b"not an ELF image at all, but long enough to hold a header.......")),
            None
        );
        let mut hostile = image.clone();
        hostile[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(elf_module_name(read_from(&hostile)), None);
        let mut huge_headers = image.clone();
        huge_headers[0x3a..0x3c].copy_from_slice(&u16::MAX.to_le_bytes());
        assert_eq!(elf_module_name(read_from(&huge_headers)), None);
    }
}
