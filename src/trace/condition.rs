//! Conditions on a syscall's arguments that both the seccomp filter and the
//! engine check: registers only, never memory the workload could rewrite.
//! Below the syscall table and the decoders, so that a decoder family can
//! own the conditions of its rows.

/// A test of one argument, as the filter can make it: registers only, never
/// memory the workload could rewrite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgTest {
    /// The argument's low 32 bits (an int, as the kernel reads it) are one of these.
    OneOf(usize, &'static [u32]),
    /// The argument's low 32 bits, masked, equal the value.
    Masked(usize, u32, u32),
    /// The argument is not 0 (a pointer that is not NULL): all 64 bits, or
    /// an i386 call's low 32, as the kernel takes them.
    NonZero(usize),
}

impl ArgTest {
    pub fn passes(self, args: &[u64; 6]) -> bool {
        let low = |index: usize| args[index] as u32;
        match self {
            ArgTest::OneOf(index, values) => values.contains(&low(index)),
            ArgTest::Masked(index, mask, value) => low(index) & mask == value,
            ArgTest::NonZero(index) => args[index] != 0,
        }
    }
}

/// When a call stops: any of the clauses, each passing when all its tests do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct When(pub &'static [&'static [ArgTest]]);

impl When {
    pub fn passes(self, args: &[u64; 6]) -> bool {
        self.0.iter().any(|clause| clause.iter().all(|test| test.passes(args)))
    }
}
