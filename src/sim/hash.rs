//! A stable 64-bit hash (FNV-1a) for answers and prompt-cache keys.
//!
//! std's `DefaultHasher` may change between Rust releases; the simulator's
//! answers must not, so the hash is spelled out here.

const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

/// An FNV-1a hasher that can be fed in pieces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fnv64(u64);

impl Fnv64 {
    pub(crate) fn new() -> Self {
        Fnv64(OFFSET_BASIS)
    }

    /// Continues a chain from an earlier hash (prefix hashes build on each other).
    pub(crate) fn resume(state: u64) -> Self {
        Fnv64(state)
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) -> &mut Self {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(PRIME);
        }
        self
    }

    pub(crate) fn finish(&self) -> u64 {
        self.0
    }
}

/// Spreads the bits of a hash so that nearby inputs (0, 1, 2...) give unrelated outputs.
pub(crate) fn mix(mut x: u64) -> u64 {
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_published_fnv1a_test_vectors() {
        assert_eq!(Fnv64::new().finish(), 0xcbf2_9ce4_8422_2325);
        assert_eq!(Fnv64::new().write(b"a").finish(), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(
            Fnv64::new().write(b"foobar").finish(),
            0x8594_4171_f739_67e8
        );
    }

    #[test]
    fn feeding_in_pieces_equals_feeding_at_once() {
        let whole = Fnv64::new().write(b"foobar").finish();
        let first = Fnv64::new().write(b"foo").finish();
        assert_eq!(Fnv64::resume(first).write(b"bar").finish(), whole);
    }
}
