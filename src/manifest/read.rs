//! Reading a manifest file: opened once, never blocking, only a regular file, size-capped; and
//! parser messages cut down so that an error never repeats more than a short excerpt of the file.

use std::io::Read;
use std::path::Path;

use rustix::fs::{FileType, Mode, OFlags};

use super::{MAX_MANIFEST_BYTES, ManifestError};

/// How a manifest file was reached, which decides how it may be opened and how it is named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Claimed by the daemon into a job folder it owns (`<watch>/.work/<id>/NAME`). The name was
    /// chosen by a producer, who may have swapped a symlink in for it: a link is never followed.
    /// Errors name the manifest by its file name, as dropped.
    Claimed,
    /// A path an operator named on the command line (`concatd once`): links are followed (the
    /// operator chose them), and errors name the path as given.
    Given,
}

impl Origin {
    /// How errors name the manifest at `path`.
    pub fn shown(self, path: &Path) -> &Path {
        match self {
            Self::Claimed => path.file_name().map_or(path, Path::new),
            Self::Given => path,
        }
    }
}

/// Read the manifest at `path` as text. Opened once with `O_NONBLOCK` (a FIFO must not stall a
/// job slot, a shutdown or a restart) and, for [`Origin::Claimed`], `O_NOFOLLOW`; then checked to
/// be a regular file by `fstat` on that very descriptor and read only through it, so nothing can
/// be swapped in between the check and the read.
pub fn read_text(path: &Path, origin: Origin) -> Result<String, ManifestError> {
    let shown = origin.shown(path);
    let read_err = |e: std::io::Error| ManifestError::Read {
        path: shown.to_owned(),
        source: e,
    };
    let mut flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
    if origin == Origin::Claimed {
        flags |= OFlags::NOFOLLOW;
    }
    let fd = match rustix::fs::open(path, flags, Mode::empty()) {
        Ok(fd) => fd,
        // O_NOFOLLOW on a symlink: ELOOP.
        Err(rustix::io::Errno::LOOP) if origin == Origin::Claimed => {
            return Err(ManifestError::NotRegular {
                path: shown.to_owned(),
                what: "a symbolic link",
            });
        }
        Err(e) => return Err(read_err(e.into())),
    };
    let stat = rustix::fs::fstat(&fd).map_err(|e| read_err(e.into()))?;
    let kind = FileType::from_raw_mode(stat.st_mode);
    if kind != FileType::RegularFile {
        return Err(ManifestError::NotRegular {
            path: shown.to_owned(),
            what: describe(kind),
        });
    }
    let size = u64::try_from(stat.st_size).unwrap_or(0);
    if size > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooBig {
            path: shown.to_owned(),
            size,
        });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    // `take` guards against a file that grows after the size check.
    std::fs::File::from(fd)
        .take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooBig {
            path: shown.to_owned(),
            size: bytes.len() as u64,
        });
    }
    String::from_utf8(bytes).map_err(|_| ManifestError::Read {
        path: shown.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"),
    })
}

fn describe(kind: FileType) -> &'static str {
    match kind {
        FileType::Directory => "a folder",
        FileType::Symlink => "a symbolic link",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        _ => "not a file",
    }
}

/// At most this many characters of a quoted value (or of any one word) of the input are kept
/// in an error message.
pub const EXCERPT_CHARS: usize = 40;

/// A short, quoted, escaped excerpt of `text` for an error message: `'…'`.
pub fn excerpt(text: &str) -> String {
    let mut out = String::from("'");
    for (i, ch) in text.chars().enumerate() {
        if i == EXCERPT_CHARS {
            out.push('…');
            break;
        }
        push_escaped(&mut out, ch);
    }
    out.push('\'');
    out
}

/// A parser's message is cut after this many characters.
const MESSAGE_CHARS: usize = 300;

/// A parser's error message made safe to show: control characters escaped (one line), every
/// quoted value (`` `…` `` or `"…"`) and every unbroken run of characters cut to
/// [`EXCERPT_CHARS`], the whole cut to a few hundred characters. Parsers quote what they did not
/// expect (a key, a string value); this keeps a manifest's contents out of results and logs
/// beyond a short excerpt.
pub fn tidy(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(MESSAGE_CHARS * 2));
    // Inside a quote: its closing character and the characters kept so far.
    let mut quote: Option<(char, usize)> = None;
    let mut escaped = false;
    let mut word = 0usize;
    for (shown, ch) in message.chars().enumerate() {
        if shown >= MESSAGE_CHARS {
            out.push('…');
            break;
        }
        match quote {
            Some((close, kept)) => {
                let closes = ch == close && !escaped;
                escaped = !escaped && ch == '\\' && close == '"';
                if closes {
                    out.push(ch);
                    quote = None;
                    word = 0;
                    continue;
                }
                if kept < EXCERPT_CHARS {
                    push_escaped(&mut out, ch);
                } else if kept == EXCERPT_CHARS {
                    out.push('…');
                }
                quote = Some((close, kept + 1));
            }
            None => {
                if ch.is_whitespace() {
                    word = 0;
                } else {
                    word += 1;
                }
                if word <= EXCERPT_CHARS {
                    push_escaped(&mut out, ch);
                } else if word == EXCERPT_CHARS + 1 {
                    out.push('…');
                }
                if ch == '`' || ch == '"' {
                    quote = Some((ch, 0));
                    escaped = false;
                }
            }
        }
    }
    out
}

/// [`tidy`], and then any run of the result still found in `input` (a quoted key that itself
/// holds a quote mark fools the quote tracking of [`tidy`]) cut short. Windows of 41 characters
/// are looked up at every 16th position (a few lookups, whatever the input's size), so no more
/// than about 40 characters in a row of `input` survive.
pub fn tidy_against(message: &str, input: &str) -> String {
    const WINDOW: usize = EXCERPT_CHARS + 1;
    const STRIDE: usize = 16;
    const KEEP: usize = 24;
    let chars: Vec<char> = tidy(message).chars().collect();
    let mut echoed = vec![false; chars.len()];
    let mut start = 0;
    while start + WINDOW <= chars.len() {
        let window: String = chars[start..start + WINDOW].iter().collect();
        if input.contains(&window) {
            echoed[start..start + WINDOW].fill(true);
        }
        start += STRIDE;
    }
    let mut out = String::with_capacity(chars.len() * 2);
    let mut i = 0;
    while i < chars.len() {
        if echoed[i] {
            let end = (i..chars.len())
                .find(|&j| !echoed[j])
                .unwrap_or(chars.len());
            out.extend(&chars[i..(i + KEEP).min(end)]);
            out.push('…');
            i = end;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

fn push_escaped(out: &mut String, ch: char) {
    if ch.is_control() || matches!(ch, '\u{2028}' | '\u{2029}') {
        out.extend(ch.escape_default());
    } else {
        out.push(ch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tidy_cuts_quotes_and_words_and_escapes_controls() {
        let long = "k".repeat(200);
        let t = tidy(&format!("unknown field `{long}`, expected one of `output`"));
        assert!(
            t.starts_with(&format!("unknown field `{}…`", "k".repeat(40))),
            "{t}"
        );
        assert!(t.ends_with("expected one of `output`"), "{t}");
        let t = tidy("invalid type: string \"a\\\"b\nc\", expected a boolean");
        assert_eq!(t, "invalid type: string \"a\\\"b\\nc\", expected a boolean");
        let t = tidy(&format!("bare {long} word"));
        assert_eq!(t, format!("bare {}… word", "k".repeat(40)));
        assert!(tidy(&"a b ".repeat(1000)).chars().count() <= MESSAGE_CHARS + 1);
    }

    #[test]
    fn tidy_against_cuts_echoes_that_fool_the_quote_tracking() {
        let key = format!("opath\":\"b\",\"size\":1,`{}", "a".repeat(80));
        let message = format!("unknown field `{key}`, expected one of `output`");
        let input = format!("{{\"{key}\": 1}}");
        let t = tidy_against(&message, &input);
        let chars: Vec<char> = t.chars().collect();
        for w in chars.windows(48) {
            assert!(!input.contains(&w.iter().collect::<String>()), "{t}");
        }
        assert!(t.ends_with("expected one of `output`"), "{t}");
    }

    #[test]
    fn fifos_and_symlinks_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("f.json");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, Mode::from_raw_mode(0o600)).unwrap();
        for origin in [Origin::Claimed, Origin::Given] {
            let e = read_text(&fifo, origin).unwrap_err();
            assert!(
                matches!(e, ManifestError::NotRegular { what: "a FIFO", .. }),
                "{e}"
            );
        }
        let real = dir.path().join("real.json");
        std::fs::write(&real, "{}").unwrap();
        let link = dir.path().join("l.json");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = read_text(&link, Origin::Claimed).unwrap_err();
        assert_eq!(
            e.to_string(),
            "manifest l.json is not a regular file: it is a symbolic link"
        );
        assert_eq!(read_text(&link, Origin::Given).unwrap(), "{}");
        let e = read_text(dir.path(), Origin::Given).unwrap_err();
        assert!(
            matches!(
                e,
                ManifestError::NotRegular {
                    what: "a folder",
                    ..
                }
            ),
            "{e}"
        );
    }
}
