//! Who may call the API: socket peers by uid (`SO_PEERCRED`), TCP callers by bearer token.
//!
//! Tokens are never stored: `tokens_file` holds the SHA-256 of each (hex) with the rules it may
//! use, one per line (`<sha256 hex> <rule>[,<rule>…]`, or `<sha256 hex> *` for every rule; `#`
//! starts a comment). A presented token is hashed and compared with every line in constant time.
//! The file is read again whenever it changes (its inode, size, mtime or ctime differ from the
//! last read, checked on each request), so `concatd token` takes effect without a restart.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a caller may touch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Every rule (an allowed socket peer, or a `*` token).
    All,
    /// These rules only.
    Rules(BTreeSet<String>),
}

impl Access {
    pub fn allows(&self, rule: &str) -> bool {
        match self {
            Self::All => true,
            Self::Rules(r) => r.contains(rule),
        }
    }
}

/// The SHA-256 of a token, as hex: what a tokens file line starts with.
pub fn token_hash_hex(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// One line of a tokens file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    hash: [u8; 32],
    access: Access,
}

/// Parse a tokens file; lines that are not understood are skipped, their numbers returned (never
/// their text: a line may hold a token pasted by mistake).
fn parse(text: &str) -> (Vec<Entry>, Vec<usize>) {
    let mut entries = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(hash), Some(rules), None) = (parts.next(), parts.next(), parts.next()) else {
            bad.push(i + 1);
            continue;
        };
        let Some(hash) = unhex32(hash) else {
            bad.push(i + 1);
            continue;
        };
        let access = if rules == "*" {
            Access::All
        } else {
            let set: BTreeSet<String> = rules
                .split(',')
                .filter(|r| !r.is_empty())
                .map(str::to_owned)
                .collect();
            if set.is_empty() {
                bad.push(i + 1);
                continue;
            }
            Access::Rules(set)
        };
        entries.push(Entry { hash, access });
    }
    (entries, bad)
}

fn unhex32(text: &str) -> Option<[u8; 32]> {
    let b = text.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// What identifies a version of the tokens file.
type Stamp = (u64, u64, i64, i64, i64, i64);

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ))
}

/// Say so when the tokens file is open to group or others: whoever can write it can grant
/// themselves every rule, and a hand-made weak token can be guessed from its hash. Said when the
/// file is read (once per version), not refused: the admin decides.
fn warn_if_open(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(mode) = std::fs::metadata(path).map(|m| m.permissions().mode() & 0o777) else {
        return;
    };
    if mode & 0o022 != 0 {
        tracing::warn!(
            file = %path.display(), mode = %format!("{mode:04o}"),
            "tokens file is writable by group or others: they can add tokens for any rule; \
             chmod 600 it"
        );
    } else if mode & 0o044 != 0 {
        tracing::warn!(
            file = %path.display(), mode = %format!("{mode:04o}"),
            "tokens file is readable by group or others; chmod 600 it"
        );
    }
}

/// The tokens file, read again whenever it changes.
pub struct Tokens {
    path: Option<PathBuf>,
    /// The stamp of the version read (`None`: missing or unreadable) and its lines; `None`
    /// before the first read.
    cache: Mutex<Option<(Option<Stamp>, Vec<Entry>)>>,
}

impl Tokens {
    pub fn new(path: Option<PathBuf>) -> Self {
        let t = Self {
            path,
            cache: Mutex::new(None),
        };
        t.refresh();
        t
    }

    /// Reread the file if it changed since the last read.
    fn refresh(&self) {
        let Some(path) = &self.path else { return };
        let now = stamp(path);
        let mut cache = self.cache.lock().expect("tokens lock");
        // Unchanged (a missing file stays missing: said once, not on every request).
        if cache.as_ref().is_some_and(|(stamp, _)| *stamp == now) {
            return;
        }
        let entries = match std::fs::read_to_string(path) {
            Ok(text) => {
                let (entries, bad) = parse(&text);
                if !bad.is_empty() {
                    tracing::warn!(
                        file = %path.display(), lines = ?bad,
                        "tokens file: lines not of the form '<sha256 hex> <rule>[,<rule>...]' or \
                         '<sha256 hex> *' are ignored"
                    );
                }
                tracing::info!(file = %path.display(), tokens = entries.len(), "tokens read");
                warn_if_open(path);
                entries
            }
            Err(e) => {
                tracing::warn!(
                    file = %path.display(), error = %e,
                    "tokens file unreadable: no TCP caller is let in"
                );
                Vec::new()
            }
        };
        *cache = Some((now, entries));
    }

    /// What `token` may touch; `None` when it is not a known token. Every line is compared, in
    /// constant time, whatever matches.
    pub fn lookup(&self, token: &str) -> Option<Access> {
        self.refresh();
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cache = self.cache.lock().expect("tokens lock");
        let mut found = None;
        for e in cache.iter().flat_map(|(_, entries)| entries) {
            if bool::from(e.hash.ct_eq(&hash)) && found.is_none() {
                found = Some(e.access.clone());
            }
        }
        found
    }
}

/// A new random token: 32 bytes from the OS, hex.
pub fn new_token() -> std::io::Result<String> {
    let mut buf = [0u8; 32];
    let mut filled = 0;
    while filled < buf.len() {
        let n = rustix::rand::getrandom(&mut buf[filled..], rustix::rand::GetRandomFlags::empty())?;
        filled += n;
    }
    Ok(hex(&buf))
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(value: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(value).ok()?;
    let (scheme, token) = text.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_and_bad_ones_are_named_by_number() {
        let a = token_hash_hex("alpha");
        let b = token_hash_hex("beta");
        let text = format!("# tokens\n{a} r1,r2\n\n{b} *  # admin\nnothex r1\n{a}\n{a} ,\n");
        let (entries, bad) = parse(&text);
        assert_eq!(entries.len(), 2);
        assert_eq!(bad, vec![5, 6, 7]);
        assert!(entries[0].access.allows("r2") && !entries[0].access.allows("r3"));
        assert_eq!(entries[1].access, Access::All);
    }

    #[test]
    fn tokens_are_found_by_hash_and_the_file_is_reread_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let t1 = new_token().unwrap();
        let t2 = new_token().unwrap();
        assert_eq!(t1.len(), 64);
        assert_ne!(t1, t2);
        std::fs::write(&path, format!("{} r1\n", token_hash_hex(&t1))).unwrap();
        let tokens = Tokens::new(Some(path.clone()));
        assert!(tokens.lookup(&t1).unwrap().allows("r1"));
        assert!(tokens.lookup(&t2).is_none());
        assert!(
            tokens.lookup(&token_hash_hex(&t1)).is_none(),
            "the hash is not a token"
        );
        std::fs::write(
            &path,
            format!("{} r1\n{} *\n", token_hash_hex(&t1), token_hash_hex(&t2)),
        )
        .unwrap();
        assert_eq!(tokens.lookup(&t2), Some(Access::All));
    }

    #[test]
    fn bearer_header_values() {
        assert_eq!(bearer(b"Bearer abc"), Some("abc"));
        assert_eq!(bearer(b"bearer  abc "), Some("abc"));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer "), None);
    }
}
