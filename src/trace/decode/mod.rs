//! Decoders: what each watched syscall means, turned into events. Decoders
//! never fail: what cannot be read is left out and the event is marked
//! `partial`.
//!
//! A [`Decoder`] is the typed identity of a table entry: its family and,
//! within the family, which call it is (which argument means what). Each
//! family lives in its own module; this one only dispatches.

mod context;
mod control;
mod creds;
mod exec;
mod file_detail;
mod files;
mod identity;
mod kernel;
mod namespaces;
mod net;
mod open;
mod process;
mod sends;
mod sockaddr;
mod sockopts;
mod tasks;

pub use context::{Call, Ctx, Next};
pub use control::{tracer_target_refused, SeccompCall, UffdCall};
pub use creds::CredCall;
pub use exec::{bound_args, bound_envs, split_nul, succeeded as exec_succeeded, ExecCall};
pub use file_detail::{times_size, timestamps, LengthArg, TimeLayout, XattrValue};
pub use files::{FileCall, Named, PathArg};
pub use kernel::ModuleCall;
pub use namespaces::NsCall;
pub use net::NetCall;
pub use open::OpenCall;
pub use process::{RlimitCall, SignalCall};
pub use sends::SendCall;
pub use sockopts::{RAW_SOCKETS, SOCKOPTS_WATCHED};
pub use tasks::ChdirCall;

use crate::trace::procfs::FileId;

/// What a table entry decodes as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoder {
    Exec(ExecCall),
    Open(OpenCall),
    IoUring,
    Net(NetCall),
    /// i386's multiplexed socket calls; becomes the `Net` call it stands for.
    Socketcall,
    File(FileCall),
    Credentials(CredCall),
    Clone,
    Chdir(ChdirCall),
    /// chroot, pivot_root, mount, umount2, unshare, setns.
    Namespace(NsCall),
    Ptrace,
    Seccomp(SeccompCall),
    Userfaultfd(UffdCall),
    /// prctl; PR_SET_SECCOMP becomes a `Seccomp` call.
    Prctl,
    Rlimit(RlimitCall),
    /// init_module, finit_module, delete_module.
    Module(ModuleCall),
    Bpf,
    /// Signals to other processes.
    Signal(SignalCall),
    /// Calls with no event that change what the tracer may do for the
    /// workload's supervised calls (`supervise/`).
    Confines(ConfiningCall),
}

/// A call that changes how the tracer may make the workload's calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfiningCall {
    /// The creation masks the tracer keeps may be stale.
    Umask,
    /// landlock_restrict_self: the thread's calls are confined in a way the
    /// tracer's own calls would not be.
    Landlock,
    /// fanotify_init: a content group's permission events could hold the
    /// tracer's own opens.
    Fanotify,
}

impl Decoder {
    /// At the syscall-entry stop, before the kernel acts: reads what will be
    /// gone afterwards, updates state that must change before the call runs,
    /// and says whether the exit stop is needed (a second stop: asked only
    /// when the result matters). May turn into the decoder of the call this
    /// one stands for (socketcall).
    pub fn entry(&mut self, cx: &mut Ctx<'_>, call: &mut Call) -> Next {
        match *self {
            Decoder::Exec(exec) => exec::entry(cx, call, exec),
            Decoder::Open(open) => open::entry(cx, call, open),
            Decoder::IoUring => open::io_uring_entry(cx, call),
            Decoder::Net(net) => net::entry(cx, call, net),
            Decoder::Socketcall => match net::unpack_socketcall(cx, call) {
                Some(net) => {
                    *self = Decoder::Net(net);
                    self.entry(cx, call)
                }
                None => Next::Done,
            },
            Decoder::File(spec) => files::entry(cx, call, spec),
            Decoder::Credentials(cred) => creds::entry(cx, call, cred),
            Decoder::Clone => tasks::clone_entry(cx, call),
            Decoder::Chdir(_) => Next::Exit,
            Decoder::Namespace(ns) => namespaces::entry(cx, call, ns),
            Decoder::Ptrace => control::ptrace_entry(cx, call),
            Decoder::Seccomp(seccomp) => control::seccomp_entry(cx, call, seccomp),
            Decoder::Userfaultfd(uffd) => control::userfaultfd_entry(cx, call, uffd),
            Decoder::Prctl if call.args[0] as u32 == process::PR_SET_SECCOMP as u32 => {
                *self = Decoder::Seccomp(SeccompCall::Prctl);
                self.entry(cx, call)
            }
            Decoder::Prctl => process::prctl_entry(cx, call),
            Decoder::Rlimit(rlimit) => process::rlimit_entry(cx, call, rlimit),
            Decoder::Module(module) => kernel::module_entry(cx, call, module),
            Decoder::Bpf | Decoder::Confines(_) => Next::Exit,
            Decoder::Signal(signal) => process::signal_entry(cx, call, signal),
        }
    }

    /// At the exit stop of a call whose entry asked for it.
    pub fn exit(self, cx: &mut Ctx<'_>, call: &Call, retval: i64) {
        match self {
            Decoder::Exec(exec) => exec::failed(cx, call, retval, exec),
            Decoder::Open(open) => open::exit(cx, call, retval, open),
            Decoder::IoUring => open::io_uring_exit(cx, call, retval),
            Decoder::Net(net) => net::exit(cx, call, retval, net),
            Decoder::File(spec) => files::exit(cx, call, retval, spec),
            Decoder::Credentials(cred) => creds::exit(cx, call, retval, cred),
            Decoder::Chdir(chdir) => tasks::chdir_exit(cx, call, retval, chdir),
            Decoder::Namespace(ns) => namespaces::exit(cx, call, retval, ns),
            Decoder::Ptrace => control::ptrace_exit(cx, call, retval),
            Decoder::Seccomp(seccomp) => control::seccomp_exit(cx, call, retval, seccomp),
            Decoder::Prctl => process::prctl_exit(cx, call, retval),
            Decoder::Rlimit(rlimit) => process::rlimit_exit(cx, call, retval, rlimit),
            Decoder::Module(module) => kernel::module_exit(cx, call, retval, module),
            Decoder::Bpf => kernel::bpf_exit(cx, call, retval),
            Decoder::Signal(signal) => process::signal_exit(cx, call, retval, signal),
            // Decoded whole at entry: they never ask for the exit stop.
            Decoder::Socketcall | Decoder::Clone | Decoder::Userfaultfd(_) => {}
            Decoder::Confines(_) => {}
        }
    }

    /// A call the tracer performed itself (`supervise/`), reported from
    /// what it did, never from the workload's memory.
    pub fn supervised(self, cx: &mut Ctx<'_>, call: &Call, outcome: Supervised<'_>) {
        match (self, outcome) {
            (Decoder::Open(open), outcome) => open::supervised(cx, call, open, outcome),
            (Decoder::File(spec), Supervised::Named(named)) => files::supervised(cx, call, spec, named),
            _ => {}
        }
    }
}

/// How a supervised call ended.
pub enum Supervised<'a> {
    /// An open: the thread got descriptor `fd`, the file being `id`, named
    /// `path`.
    Opened { fd: i32, id: Option<FileId>, path: Option<String> },
    /// An open failed with `errno`, walking `path`.
    Failed { errno: i32, path: Option<String> },
    /// A name call.
    Named(&'a Named),
}
