//! CRC-64/NVME, S3's full-object checksum (`x-amz-checksum-crc64nvme`), and its combination.
//!
//! A server-side concatenation never reads the copied bytes, yet S3 can verify the whole object's
//! CRC64NVME at `CompleteMultipartUpload` if it is sent. CRCs are linear, so the CRC of `A‖B` follows
//! from `crc(A)`, `crc(B)` and `|B|` alone ([`combine`]): the sources' stored checksums and the
//! uploaded bytes' own CRC give the output's without a byte of the copies passing through.
//!
//! The bytes are hashed by `crc-fast` (carry-less multiplication, several GiB/s); [`combine`] is
//! ours: `crc(A‖B) = crc(A)·x^(8|B|) ⊕ crc(B)` modulo the polynomial (init and xorout are equal
//! here, so they cancel), with `x^(8|B|)` built from a table of `x^(2^k)` in O(log |B|)
//! multiplications, each of 64 shifts. `crc-fast` has a combine too, but by 64×64 matrix
//! squaring: 100 × slower measured here (`combine_speed`), and a job may combine a million
//! sources.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// The CRC-64/NVME polynomial 0xAD93D23594C93659, bit-reflected (the CRC is computed LSB first).
const POLY: u64 = 0x9A6C_9329_AC4B_C9B5;
/// Initial register and final xor, both all ones.
#[cfg(test)]
const INIT: u64 = u64::MAX;
/// `1` as a reflected polynomial: the top bit holds x^0.
const ONE: u64 = 1 << 63;

/// `x^(2^k) mod POLY` for k in 0..64, reflected.
const X2N: [u64; 64] = {
    let mut table = [0u64; 64];
    let mut p = ONE >> 1; // x^1
    let mut k = 0;
    while k < 64 {
        table[k] = p;
        p = mul(p, p);
        k += 1;
    }
    table
};

/// `a·b mod POLY`, both reflected.
const fn mul(a: u64, mut b: u64) -> u64 {
    let mut m = ONE;
    let mut p = 0;
    while m != 0 {
        if a & m != 0 {
            p ^= b;
        }
        m >>= 1;
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
    p
}

/// `x^(8n) mod POLY`: the shift that appending `n` bytes applies to a register.
fn shift_bytes(n: u64) -> u64 {
    let mut p = ONE;
    let mut n = n;
    // n bytes are 8n = n·2^3 bits: start at x^(2^3).
    let mut k = 3;
    while n != 0 {
        if n & 1 != 0 {
            p = mul(X2N[k & 63], p);
        }
        n >>= 1;
        k += 1;
    }
    p
}

/// The CRC-64/NVME of `data`.
pub fn checksum(data: &[u8]) -> u64 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, data)
}

/// The CRC-64/NVME of `A‖B` from `crc_a = crc(A)`, `crc_b = crc(B)` and `len_b = |B|`.
pub fn combine(crc_a: u64, crc_b: u64, len_b: u64) -> u64 {
    mul(shift_bytes(len_b), crc_a) ^ crc_b
}

/// The CRC-64/NVME of `n` zero bytes, without reading them (the tests' cross-check of
/// [`combine`] over lengths too large to materialise).
#[cfg(test)]
pub fn zeros(n: u64) -> u64 {
    // The register starts at INIT and zero bytes only shift it; the final xor is INIT again.
    mul(shift_bytes(n), INIT) ^ INIT
}

/// A CRC-64/NVME computed as the bytes arrive.
#[derive(Clone)]
pub struct Crc64 {
    digest: crc_fast::Digest,
    len: u64,
}

impl Default for Crc64 {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Crc64 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Crc64")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl Crc64 {
    pub fn new() -> Self {
        Crc64 {
            digest: crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme),
            len: 0,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.digest.update(data);
        self.len += data.len() as u64;
    }

    /// Bytes seen so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The CRC of the bytes seen so far (more may follow).
    pub fn finish(&self) -> u64 {
        self.digest.finalize()
    }
}

/// The `x-amz-checksum-crc64nvme` form: base64 of the 8 big-endian bytes.
pub fn to_base64(crc: u64) -> String {
    STANDARD.encode(crc.to_be_bytes())
}

/// Parses the `x-amz-checksum-crc64nvme` form; `None` unless it is exactly 8 bytes of base64.
/// (A multipart object's composite checksum, `…-N`, is not a CRC of the object: also `None`.)
pub fn from_base64(text: &str) -> Option<u64> {
    let bytes = STANDARD.decode(text.trim()).ok()?;
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic bytes, distinct per position.
    fn data(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn check_value() {
        assert_eq!(checksum(b"123456789"), 0xAE8B_1486_0A79_9888);
        assert_eq!(checksum(b""), 0);
        let mut c = Crc64::new();
        c.update(b"1234");
        c.update(b"");
        c.update(b"56789");
        assert_eq!(c.finish(), 0xAE8B_1486_0A79_9888);
        assert_eq!(c.len(), 9);
    }

    #[test]
    fn combine_matches_the_whole_buffer_at_random_splits() {
        let buf = data(3 << 20, 7);
        let whole = checksum(&buf);
        let mut x = 12345u64;
        for _ in 0..200 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let cut = (x >> 20) as usize % (buf.len() + 1);
            let (a, b) = buf.split_at(cut);
            assert_eq!(
                combine(checksum(a), checksum(b), b.len() as u64),
                whole,
                "cut {cut}"
            );
        }
        // Empty sides.
        assert_eq!(combine(whole, checksum(b""), 0), whole);
        assert_eq!(combine(checksum(b""), whole, buf.len() as u64), whole);
    }

    #[test]
    fn combine_folds_many_parts_of_tens_of_mib() {
        // 24 MiB in parts of uneven sizes, some empty, folded left to right.
        let buf = data(24 << 20, 11);
        let whole = checksum(&buf);
        let mut sizes = vec![0usize, 1, 5 << 20, 0, 3, (7 << 20) + 13, 65536, 1 << 20];
        let used: usize = sizes.iter().sum();
        sizes.push(buf.len() - used);
        let mut at = 0;
        let mut acc = checksum(b"");
        let mut streamed = Crc64::new();
        for n in sizes {
            let part = &buf[at..at + n];
            acc = combine(acc, checksum(part), n as u64);
            streamed.update(part);
            at += n;
        }
        assert_eq!(acc, whole);
        assert_eq!(streamed.finish(), whole);
    }

    #[test]
    fn zeros_without_data_match_zeros_with_data() {
        let buf = vec![0u8; 4 << 20];
        for n in [
            0usize,
            1,
            7,
            8,
            1000,
            65537,
            1 << 20,
            (3 << 20) + 5,
            4 << 20,
        ] {
            assert_eq!(zeros(n as u64), checksum(&buf[..n]), "{n} zero bytes");
        }
    }

    #[test]
    fn combine_over_5_gib_agrees_with_crc_fast_and_itself() {
        // 5 GiB of zeros appended to "123456789", never materialised: our combine against
        // crc-fast's (a different method: GF(2) matrix squaring), and two halves against one.
        let five = 5u64 << 30;
        let head = checksum(b"123456789");
        let ours = combine(head, zeros(five), five);
        let theirs =
            crc_fast::checksum_combine(crc_fast::CrcAlgorithm::Crc64Nvme, head, zeros(five), five);
        assert_eq!(ours, theirs);
        let half = five / 2;
        assert_eq!(combine(zeros(half), zeros(half), half), zeros(five));
        assert_eq!(
            combine(combine(head, zeros(half), half), zeros(half), half),
            ours
        );
        // And random data after 5 GiB of zeros.
        let tail = data(100_000, 3);
        let got = combine(zeros(five), checksum(&tail), tail.len() as u64);
        let want = crc_fast::checksum_combine(
            crc_fast::CrcAlgorithm::Crc64Nvme,
            zeros(five),
            checksum(&tail),
            tail.len() as u64,
        );
        assert_eq!(got, want);
    }

    #[test]
    fn base64_form() {
        let crc = 0xAE8B_1486_0A79_9888;
        let text = to_base64(crc);
        assert_eq!(text, "rosUhgp5mIg=");
        assert_eq!(from_base64(&text), Some(crc));
        assert_eq!(to_base64(0), "AAAAAAAAAAA=");
        assert_eq!(from_base64("AAAAAAAAAAA="), Some(0));
        assert_eq!(from_base64("rosUhgp5mIg"), None, "unpadded");
        assert_eq!(from_base64("AAAA"), None, "3 bytes");
        assert_eq!(from_base64("rosUhgp5mIg=-2"), None, "composite");
        assert_eq!(from_base64("not base64!"), None);
    }

    #[test]
    #[ignore = "a timing, for release builds: cargo test --release --lib crc64 -- --ignored"]
    fn combine_speed() {
        let n = 100_000u64;
        let started = std::time::Instant::now();
        let mut acc = 0;
        for i in 0..n {
            acc = combine(acc, i, (i << 20) | 12345);
        }
        let ours = started.elapsed();
        let started = std::time::Instant::now();
        let mut theirs = 0;
        for i in 0..n {
            theirs = crc_fast::checksum_combine(
                crc_fast::CrcAlgorithm::Crc64Nvme,
                theirs,
                i,
                (i << 20) | 12345,
            );
        }
        let took = started.elapsed();
        assert_eq!(acc, theirs);
        eprintln!("{n} combines: ours {ours:?}, crc-fast's {took:?}");
    }
}
