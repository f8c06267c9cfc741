//! Streaming the items of one source list, every line and every element bounded.
//!
//! A list may hold millions of sources, so it is never read whole; and a list with no newline
//! (or one enormous JSON string) must not become one enormous allocation: a text line is read at
//! most [`MAX_LIST_ITEM_BYTES`] at a time, and the JSON form is read through [`Bounded`], which
//! refuses to hand the parser more than that many bytes for any one element.

use std::cell::Cell;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::rc::Rc;

use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};

use super::{Location, ManifestError, SourceSpec, read::tidy, read::tidy_against};

/// The longest line (text form) or element (JSON form) of a source list, in bytes.
pub const MAX_LIST_ITEM_BYTES: usize = 64 << 10;

/// Stream the items of one source list: a JSON array, or one source per line (blank lines and
/// lines starting with `#` skipped; a line starting with `{` is one JSON object item).
pub fn stream_list<E, F>(reader: Box<dyn Read + Send>, name: &str, f: &mut F) -> Result<(), E>
where
    E: From<ManifestError>,
    F: FnMut(SourceSpec) -> Result<(), E>,
{
    let list_err = |message: String| {
        E::from(ManifestError::List {
            list: name.to_owned(),
            message,
        })
    };
    let mut reader = BufReader::with_capacity(256 << 10, reader);
    let first = loop {
        let buf = reader.fill_buf().map_err(|e| list_err(e.to_string()))?;
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => {
                let b = buf[i];
                reader.consume(i);
                break Some(b);
            }
            None if buf.is_empty() => break None,
            None => {
                let len = buf.len();
                reader.consume(len);
            }
        }
    };
    match first {
        None => Ok(()),
        Some(b'[') => stream_array(reader, f, &list_err),
        Some(_) => {
            let mut line = Vec::new();
            let mut number = 0u64;
            loop {
                line.clear();
                number += 1;
                // One byte more than the cap: a line that fills it has no end in sight.
                let read = (&mut reader)
                    .take(MAX_LIST_ITEM_BYTES as u64 + 1)
                    .read_until(b'\n', &mut line)
                    .map_err(|e| list_err(format!("line {number}: {e}")))?;
                if read == 0 {
                    return Ok(());
                }
                if line.len() > MAX_LIST_ITEM_BYTES {
                    return Err(list_err(format!(
                        "line {number} is longer than 64 KiB (the limit of one list line)"
                    )));
                }
                let Ok(text) = std::str::from_utf8(&line) else {
                    return Err(list_err(format!("line {number} is not UTF-8 text")));
                };
                let item = text.trim();
                if item.is_empty() || item.starts_with('#') {
                    continue;
                }
                let spec = if item.starts_with('{') {
                    serde_json::from_str(item).map_err(|e| {
                        list_err(format!(
                            "line {number}: {}",
                            tidy_against(&e.to_string(), item)
                        ))
                    })?
                } else {
                    SourceSpec::at(Location::from_text(item))
                };
                f(spec)?;
            }
        }
    }
}

fn stream_array<R: Read, E, F>(
    reader: R,
    f: &mut F,
    list_err: &dyn Fn(String) -> E,
) -> Result<(), E>
where
    F: FnMut(SourceSpec) -> Result<(), E>,
{
    let state = Rc::new(State::default());
    let bounded = Bounded {
        inner: reader,
        state: Rc::clone(&state),
    };
    let mut failure = None;
    let mut de = serde_json::Deserializer::from_reader(bounded);
    let seed = EachSeed {
        state: &state,
        f: &mut |spec| match f(spec) {
            Ok(()) => true,
            Err(e) => {
                failure = Some(e);
                false
            }
        },
    };
    let parsed = seed.deserialize(&mut de).and_then(|()| {
        // Whatever follows the array is not an element: no cap but the end of the file.
        state.limit.set(u64::MAX);
        de.end()
    });
    match (failure, parsed) {
        (Some(e), _) => Err(e),
        (None, Err(_)) if state.over.get() => Err(list_err(format!(
            "element {} is longer than 64 KiB (the limit of one list element)",
            state.element.get()
        ))),
        (None, Err(e)) => Err(list_err(tidy(&e.to_string()))),
        (None, Ok(())) => Ok(()),
    }
}

/// Shared between the reader under the JSON parser and the visitor above it.
#[derive(Default)]
struct State {
    /// Bytes handed to the parser so far.
    pos: Cell<u64>,
    /// The parser may not read past this position (the end of the current element's allowance).
    limit: Cell<u64>,
    /// The 1-based number of the element being read.
    element: Cell<u64>,
    /// The limit was hit.
    over: Cell<bool>,
}

impl State {
    fn start_element(&self, number: u64) {
        self.element.set(number);
        self.limit.set(
            self.pos
                .get()
                .saturating_add(MAX_LIST_ITEM_BYTES as u64 + 1),
        );
    }
}

/// A reader that fails once the parser asks for more than the current element's allowance.
struct Bounded<R> {
    inner: R,
    state: Rc<State>,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let s = &self.state;
        let room = s.limit.get().saturating_sub(s.pos.get());
        if room == 0 {
            s.over.set(true);
            return Err(std::io::Error::other("list element too long"));
        }
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        s.pos.set(s.pos.get() + n as u64);
        Ok(n)
    }
}

/// Deserializes a JSON array one element at a time, handing each to `f` (which returns false to
/// stop), so the array is never held in memory.
struct EachSeed<'a> {
    state: &'a State,
    f: &'a mut dyn FnMut(SourceSpec) -> bool,
}

impl<'de> DeserializeSeed<'de> for EachSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.state.start_element(1);
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for EachSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of sources")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut number = 1;
        while let Some(spec) = seq.next_element::<SourceSpec>()? {
            if !(self.f)(spec) {
                return Err(de::Error::custom("stopped"));
            }
            number += 1;
            self.state.start_element(number);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(bytes: Vec<u8>) -> Result<Vec<SourceSpec>, ManifestError> {
        let mut out = Vec::new();
        stream_list(Box::new(std::io::Cursor::new(bytes)), "l", &mut |s| {
            out.push(s);
            Ok::<(), ManifestError>(())
        })?;
        Ok(out)
    }

    #[test]
    fn lists_as_lines_and_json_arrays() {
        let lines =
            collect(b"a\n\n# note\n  b  \n{\"path\":\"c\",\"offset\":1}\n".to_vec()).unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1].location, Location::Path("b".into()));
        assert_eq!(lines[2].offset, Some(1));
        let json = collect(b"  [\"a\", {\"url\":\"http://h/b\"}]".to_vec()).unwrap();
        assert_eq!(json.len(), 2);
        assert!(collect(b"[\"a\", 3]".to_vec()).is_err());
        assert!(collect(Vec::new()).unwrap().is_empty());
    }

    #[test]
    fn lines_and_elements_are_bounded_exactly() {
        let fits = "x".repeat(MAX_LIST_ITEM_BYTES - 1);
        assert_eq!(collect(format!("{fits}\n").into_bytes()).unwrap().len(), 1);
        let e = collect(format!("a\n{fits}yy\n").into_bytes()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "source list l: line 2 is longer than 64 KiB (the limit of one list line)"
        );
        // Many elements, each within the cap, however long the whole list.
        let item = format!("\"{}\"", "z".repeat(MAX_LIST_ITEM_BYTES - 100));
        let many = format!("[{}]", vec![item.as_str(); 40].join(", "));
        assert_eq!(collect(many.into_bytes()).unwrap().len(), 40);
        let over = format!("[\"a\", \"{}\"]", "z".repeat(MAX_LIST_ITEM_BYTES + 1));
        let e = collect(over.into_bytes()).unwrap_err();
        assert!(
            e.to_string().contains("element 2 is longer than 64 KiB"),
            "{e}"
        );
    }
}
