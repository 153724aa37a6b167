//! What a file call sets besides its path, mode, owner and flags: the times
//! of the utime family, a truncate's length, an extended attribute (and the
//! capabilities a `security.capability` value grants), a mknod's device, a
//! memfd's name. Memory is read at entry, when the kernel reads it.

use crate::proto::{self, FileType};
use crate::text;
use crate::trace::abi::Abi;
use crate::trace::decode::context::{Call, Ctx};
use crate::trace::memory;

/// How a utime-family call lays out its two times in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeLayout {
    /// utime: `struct utimbuf`, seconds only.
    Utimbuf,
    /// utimes, futimesat: two `struct timeval`, microseconds.
    Timeval,
    /// utimensat: two `struct timespec`, nanoseconds or UTIME_NOW/UTIME_OMIT.
    Timespec,
    /// i386's utimensat_time64: 64-bit seconds and nanoseconds in that ABI too.
    Timespec64,
}

/// Where a truncate finds its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LengthArg {
    /// A `long` (`off_t`) argument.
    Long(usize),
    /// i386's truncate64 and ftruncate64: the low half in argument `index`,
    /// the high half in the next.
    Split(usize),
}

/// Where a setxattr finds the value it sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrValue {
    /// The value's address at `index`, its size next.
    Args(usize),
    /// setxattrat: a `struct xattr_args` {u64 value; u32 size; u32 flags}
    /// at `index` (the same in both ABIs).
    Struct(usize),
}

/// The `struct xattr_args` setxattrat reads (XATTR_ARGS_SIZE_VER0).
const XATTR_ARGS_SIZE: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detail {
    None,
    /// The times array at argument `index` (NULL: both now).
    Times(usize, TimeLayout),
    Length(LengthArg),
    /// The attribute's name at `name`, and setxattr's value.
    Xattr {
        name: usize,
        value: Option<XattrValue>,
    },
    /// mknod's device number argument.
    Device(usize),
    /// memfd_create's name argument.
    Name(usize),
}

/// `XATTR_NAME_MAX`, and memfd's 249 bytes fit too: longer names fail.
const NAME_MAX: usize = 255;
const CAPABILITY_XATTR: &str = "security.capability";
/// A version 3 `vfs_ns_cap_data`, the largest value the kernel takes.
const CAPS_SIZE_3: usize = 24;
const CAPS_SIZE_2: usize = 20;
const UTIME_NOW: i64 = (1 << 30) - 1;
const UTIME_OMIT: i64 = (1 << 30) - 2;

/// Reads at entry what the kernel reads then (names, times, the value of a
/// capability attribute); false when something could not be read.
pub fn entry(cx: &mut Ctx<'_>, call: &mut Call, detail: Detail) -> bool {
    match detail {
        Detail::Times(index, layout) => {
            let addr = call.args[index];
            if addr == 0 {
                return true;
            }
            let len = times_size(call.abi, layout);
            call.entry_bytes = cx.read_bytes(addr, len);
            call.entry_bytes.len() == len
        }
        Detail::Xattr { name, value } => {
            call.entry_target = read_name(cx, call.args[name]);
            if let Some(XattrValue::Struct(index)) = value {
                call.entry_bytes = cx.read_bytes(call.args[index], XATTR_ARGS_SIZE);
            }
            let Some(value) = value.map(|v| xattr_value(call, v)) else { return call.entry_target.is_some() };
            let Some((addr, size, _)) = value else { return false };
            if call.entry_target.as_deref() == Some(CAPABILITY_XATTR) {
                let bytes = cx.read_bytes(addr, size.min(CAPS_SIZE_3 as u64) as usize);
                call.entry_bytes.extend(bytes);
            }
            call.entry_target.is_some()
        }
        Detail::Name(index) => {
            call.entry_target = read_name(cx, call.args[index]);
            call.entry_target.is_some()
        }
        Detail::None | Detail::Length(_) | Detail::Device(_) => true,
    }
}

fn read_name(cx: &Ctx<'_>, addr: u64) -> Option<String> {
    let (raw, _) = memory::read_cstring(cx.tid, addr, NAME_MAX + 1).ok()?;
    Some(text::lossless(&raw))
}

/// The fields `detail` fills in `event`, from the arguments and what entry read.
pub fn fill(event: &mut proto::FileEvent, call: &Call, detail: Detail) {
    match detail {
        Detail::None => {}
        Detail::Times(index, layout) => {
            let times = if call.args[index] == 0 {
                let now = proto::FileTime { now: true, ..Default::default() };
                Some([now, now])
            } else {
                times(&call.entry_bytes, call.abi, layout)
            };
            [event.access_time, event.modification_time] = times.map_or([None, None], |t| t.map(Some));
        }
        Detail::Length(arg) => event.length = Some(length(call, arg)),
        Detail::Xattr { value, .. } => {
            event.name = call.entry_target.clone().unwrap_or_default();
            if let Some((value, (_, size, flags))) = value.and_then(|v| Some((v, xattr_value(call, v)?))) {
                event.value_size = Some(size);
                event.flags |= flags;
                if event.name == CAPABILITY_XATTR {
                    let skip = if let XattrValue::Struct(_) = value { XATTR_ARGS_SIZE } else { 0 };
                    event.capabilities = file_capabilities(call.entry_bytes.get(skip..).unwrap_or_default(), size);
                }
            }
        }
        Detail::Device(index) => {
            let mode = event.mode.unwrap_or(0);
            let file_type = file_type(mode);
            event.file_type = file_type as i32;
            // The kernel reads the number only for devices.
            if matches!(file_type, FileType::CharacterDevice | FileType::BlockDevice) {
                let (major, minor) = decode_device(call.args[index] as u32);
                (event.device_major, event.device_minor) = (Some(major), Some(minor));
            }
        }
        Detail::Name(_) => event.name = call.entry_target.clone().unwrap_or_default(),
    }
}

/// A setxattr's value: its address, its size and the XATTR_* flags that
/// come with it in a `struct xattr_args` (0 otherwise, the flags are then
/// an argument); None when the struct could not be read.
fn xattr_value(call: &Call, value: XattrValue) -> Option<(u64, u64, u32)> {
    match value {
        XattrValue::Args(index) => Some((call.args[index], call.args[index + 1] & word_mask(call.abi), 0)),
        XattrValue::Struct(_) => {
            let size = call.entry_u32(2)?;
            Some((call.entry_u64(0)?, u64::from(size), call.entry_u32(3)?))
        }
    }
}

fn word_mask(abi: Abi) -> u64 {
    match abi {
        Abi::I386 => u64::from(u32::MAX),
        _ => u64::MAX,
    }
}

fn word_size(abi: Abi, layout: TimeLayout) -> usize {
    if layout == TimeLayout::Timespec64 {
        8
    } else {
        abi.word_size()
    }
}

/// How many bytes of a times array are read: four words, the most a
/// layout takes.
pub fn times_size(abi: Abi, layout: TimeLayout) -> usize {
    4 * word_size(abi, layout)
}

/// The access and modification times, from the memory read at entry; None
/// when it could not be read whole.
fn times(bytes: &[u8], abi: Abi, layout: TimeLayout) -> Option<[proto::FileTime; 2]> {
    let time = |(seconds, nanos)| match nanos {
        UTIME_NOW => proto::FileTime { now: true, ..Default::default() },
        UTIME_OMIT => proto::FileTime { omit: true, ..Default::default() },
        nanos => proto::FileTime { seconds, nanos, ..Default::default() },
    };
    Some(timestamps(bytes, abi, layout)?.map(time))
}

/// The access and modification times as utimensat takes them: seconds,
/// and nanoseconds or UTIME_NOW or UTIME_OMIT (which microseconds times
/// a thousand never are); None when `bytes` are short.
pub fn timestamps(bytes: &[u8], abi: Abi, layout: TimeLayout) -> Option<[(i64, i64); 2]> {
    let size = word_size(abi, layout);
    // time_t and long are signed; 32-bit ones are sign-extended.
    let word = |i: usize| -> Option<i64> {
        let bytes = bytes.get(i * size..(i + 1) * size)?;
        Some(match size {
            4 => i64::from(i32::from_ne_bytes(bytes.try_into().ok()?)),
            _ => i64::from_ne_bytes(bytes.try_into().ok()?),
        })
    };
    let time = |i: usize| -> Option<(i64, i64)> {
        Some(match layout {
            // utimbuf holds the two times' seconds one after the other.
            TimeLayout::Utimbuf => (word(i)?, 0),
            TimeLayout::Timeval => (word(2 * i)?, word(2 * i + 1)?.saturating_mul(1000)),
            TimeLayout::Timespec | TimeLayout::Timespec64 => {
                let mut nanos = word(2 * i + 1)?;
                // A 32-bit caller's 64-bit tv_nsec: the kernel keeps its low half.
                if layout == TimeLayout::Timespec64 && abi == Abi::I386 {
                    nanos &= 0xffff_ffff;
                }
                (word(2 * i)?, nanos)
            }
        })
    };
    Some([time(0)?, time(1)?])
}

fn length(call: &Call, arg: LengthArg) -> i64 {
    match (arg, call.abi) {
        (LengthArg::Split(i), _) => (call.args[i] & 0xffff_ffff | call.args[i + 1] << 32) as i64,
        (LengthArg::Long(i), Abi::I386) => i64::from(call.args[i] as u32 as i32),
        (LengthArg::Long(i), _) => call.args[i] as i64,
    }
}

/// A `security.capability` value as the kernel takes it (vfs_cap_data
/// revision 2, 20 bytes, or vfs_ns_cap_data revision 3, 24 bytes; the
/// kernel refuses anything else): little-endian words.
fn file_capabilities(value: &[u8], size: u64) -> Option<proto::FileCapabilities> {
    let word = |i: usize| Some(u32::from_le_bytes(value.get(i * 4..i * 4 + 4)?.try_into().ok()?));
    let magic = word(0)?;
    let version = magic >> 24;
    let expected_size = match version {
        2 => CAPS_SIZE_2,
        3 => CAPS_SIZE_3,
        _ => return None,
    };
    if size != expected_size as u64 || value.len() != expected_size {
        return None;
    }
    let set = |low: usize| Some(u64::from(word(low)?) | u64::from(word(low + 2)?) << 32);
    Some(proto::FileCapabilities {
        version,
        permitted: set(1)?,
        inheritable: set(2)?,
        effective: magic & 1 != 0,
        root_uid: if version == 3 { word(5) } else { None },
    })
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        0 | libc::S_IFREG => FileType::Regular,
        libc::S_IFIFO => FileType::Fifo,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharacterDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::Other,
    }
}

/// mknod's 32-bit device number as the kernel decodes it (new_decode_dev).
fn decode_device(dev: u32) -> (u32, u32) {
    ((dev & 0xfff00) >> 8, (dev & 0xff) | ((dev >> 12) & 0xfff00))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words32(words: &[i32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    fn words64(words: &[i64]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    fn at(seconds: i64, nanos: i64) -> proto::FileTime {
        proto::FileTime { seconds, nanos, ..Default::default() }
    }

    #[test]
    fn times_decode_per_layout_and_abi_with_now_and_omit() {
        let now = proto::FileTime { now: true, ..Default::default() };
        let omit = proto::FileTime { omit: true, ..Default::default() };
        assert_eq!(times(&words64(&[5, 6]), Abi::X86_64, TimeLayout::Utimbuf), Some([at(5, 0), at(6, 0)]));
        assert_eq!(times(&words32(&[-1, 6]), Abi::I386, TimeLayout::Utimbuf), Some([at(-1, 0), at(6, 0)]));
        assert_eq!(
            times(&words32(&[1, 2, 3, 4]), Abi::I386, TimeLayout::Timeval),
            Some([at(1, 2000), at(3, 4000)]),
            "microseconds, not nanoseconds"
        );
        let spec = words64(&[1, UTIME_OMIT, 3, UTIME_NOW]);
        assert_eq!(times(&spec, Abi::X86_64, TimeLayout::Timespec), Some([omit, now]));
        assert_eq!(times(&spec, Abi::I386, TimeLayout::Timespec64), Some([omit, now]));
        let high_garbage = words64(&[7, 8 | 1 << 32, 9, 10]);
        assert_eq!(times(&high_garbage, Abi::I386, TimeLayout::Timespec64), Some([at(7, 8), at(9, 10)]));
        assert_eq!(times(&words32(&[1, 2, 3]), Abi::I386, TimeLayout::Timespec), None, "cut short");
    }

    #[test]
    fn capability_values_decode_as_the_kernel_takes_them() {
        let v2: Vec<u8> = [0x0200_0001u32, 1 << 13, 4, 1, 0].iter().flat_map(|w| w.to_le_bytes()).collect();
        let caps = file_capabilities(&v2, 20).unwrap();
        assert_eq!((caps.version, caps.permitted, caps.inheritable, caps.effective), (2, 1 << 13 | 1 << 32, 4, true));
        assert_eq!(caps.root_uid, None);
        let v3: Vec<u8> = [0x0300_0000u32, 1, 0, 0, 0, 100_000].iter().flat_map(|w| w.to_le_bytes()).collect();
        let caps = file_capabilities(&v3, 24).unwrap();
        assert_eq!((caps.version, caps.effective, caps.root_uid), (3, false, Some(100_000)));
        assert_eq!(file_capabilities(&v3[..20], 20), None, "a version 3 header needs 24 bytes");
        assert_eq!(file_capabilities(&v2, 24), None, "the size passed is the kernel's test");
    }

    #[test]
    fn setxattrat_takes_size_flags_and_capabilities_from_its_struct() {
        let caps: Vec<u8> = [0x0200_0000u32, 1, 0, 0, 0].iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut entry_bytes = [0x1000u64.to_ne_bytes().as_slice(), &20u32.to_ne_bytes(), &2u32.to_ne_bytes()].concat();
        entry_bytes.extend(&caps);
        let entry = crate::trace::abi::SyscallEntry { abi: Abi::I386, nr: 463, args: [3, 0, 0x100, 0, 0x2000, 16] };
        let call = Call { entry_bytes, ..Call::new("setxattrat", &entry, std::time::SystemTime::now()) };
        let call = Call { entry_target: Some(CAPABILITY_XATTR.to_owned()), ..call };
        let mut event = proto::FileEvent { flags: 0x100, ..Default::default() };
        fill(&mut event, &call, Detail::Xattr { name: 3, value: Some(XattrValue::Struct(4)) });
        assert_eq!((event.value_size, event.flags), (Some(20), 0x100 | 2), "XATTR_REPLACE joins AT_SYMLINK_NOFOLLOW");
        assert_eq!(event.capabilities.map(|c| (c.version, c.permitted)), Some((2, 1)));
    }

    #[test]
    fn devices_and_file_types_decode_as_the_kernel_does() {
        assert_eq!(decode_device(libc::makedev(1, 3) as u32), (1, 3));
        assert_eq!(decode_device(0x0012_3456), (0x234, 0x156));
        assert_eq!(file_type(0o644), FileType::Regular);
        assert_eq!(file_type(libc::S_IFIFO | 0o600), FileType::Fifo);
        assert_eq!(file_type(libc::S_IFDIR), FileType::Other);
    }
}
