//! Test data: deterministic bytes that differ from seed to seed, and the digests tests compare
//! what arrived with.

use sha2::{Digest as _, Sha256};

/// `len` bytes from a xorshift generator seeded with `seed`: the same for the same seed, different
/// for another, never repeating within a chunk, so a byte moved, lost or sent twice changes the
/// digest.
pub fn test_bytes(len: usize, seed: u64) -> Vec<u8> {
    // Spread over all 64 bits (an odd factor maps seeds one to one); xorshift needs a state ≠ 0.
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of `data`, in lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_depend_on_the_seed_only() {
        assert_eq!(test_bytes(1000, 5), test_bytes(1000, 5));
        assert_ne!(test_bytes(1000, 5), test_bytes(1000, 9));
        assert_ne!(test_bytes(1000, 2), test_bytes(1000, 3));
        assert_ne!(test_bytes(1000, 0), test_bytes(1000, 1));
        assert_eq!(test_bytes(10, 5), test_bytes(1000, 5)[..10]);
    }

    #[test]
    fn digests_are_lowercase_hex() {
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
