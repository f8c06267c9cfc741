//! Escaping of logged text, so that no value can start a line or carry a terminal sequence.
//!
//! Manifest names, source paths, URLs and error messages come from whoever drops a manifest; a
//! newline in one would forge a line of `<rule>.log`, an ESC or a C1 CSI would drive the terminal
//! of whoever runs `concatd logs`. Every field of every event passes through [`Escaped`]: in the
//! rule files (the sifting layer) and on stderr ([`EscapedFields`], for the daemon and the
//! foreground commands alike), whichever module logs it.
//!
//! Escapes: `\\` `\n` `\r` `\t`, other C0 controls and DEL as `\xNN`, C1 controls and the Unicode
//! line and paragraph separators as `\u{NNNN}`. The backslash itself is escaped, so a logged
//! `\n` always means an escaped newline, never a name that spelled one out.

use std::borrow::Cow;
use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

/// Whether `c` is written escaped.
fn needs_escape(c: char) -> bool {
    matches!(c, '\\' | '\0'..='\x1f' | '\x7f' | '\u{80}'..='\u{9f}' | '\u{2028}' | '\u{2029}')
}

/// The escaped form of `c` (one that [`needs_escape`]).
fn write_escape(c: char, out: &mut impl fmt::Write) -> fmt::Result {
    match c {
        '\\' => out.write_str("\\\\"),
        '\n' => out.write_str("\\n"),
        '\r' => out.write_str("\\r"),
        '\t' => out.write_str("\\t"),
        '\0'..='\x7f' => write!(out, "\\x{:02x}", c as u32),
        _ => write!(out, "\\u{{{:x}}}", c as u32),
    }
}

/// A [`fmt::Write`] adapter that escapes everything written through it.
pub struct Escaped<W>(pub W);

impl<W: fmt::Write> fmt::Write for Escaped<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, c) in s.char_indices().filter(|&(_, c)| needs_escape(c)) {
            self.0.write_str(&s[plain..i])?;
            write_escape(c, &mut self.0)?;
            plain = i + c.len_utf8();
        }
        self.0.write_str(&s[plain..])
    }
}

/// `text` with every control character escaped (borrowed when there is none).
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    let _ = Escaped(&mut out).write_str(text);
    Cow::Owned(out)
}

/// Append `text` to `out`, escaped.
pub fn push_escaped(out: &mut String, text: &str) {
    let _ = Escaped(out).write_str(text);
}

/// The fields formatter of the stderr subscribers: like tracing-subscriber's default
/// (`message`, then `name=value` separated by spaces), every value escaped. It formats span
/// fields (`job{manifest=…}:`) as well as event fields.
#[derive(Debug, Default, Clone, Copy)]
pub struct EscapedFields;

impl<'w> FormatFields<'w> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = StderrVisitor {
            out: writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct StderrVisitor<'w> {
    out: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl StderrVisitor<'_> {
    fn field(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if self.result.is_err() {
            return;
        }
        let sep = if self.first { "" } else { " " };
        self.first = false;
        self.result = match field.name() {
            "message" => {
                write!(self.out, "{sep}").and_then(|()| write!(Escaped(&mut self.out), "{value}"))
            }
            name => write!(self.out, "{sep}{name}=")
                .and_then(|()| write!(Escaped(&mut self.out), "{value}")),
        };
    }
}

impl Visit for StderrVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, format_args!("{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, format_args!("{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_backslashes_are_escaped_and_the_rest_kept() {
        assert_eq!(escape("plain név ✓"), Cow::Borrowed("plain név ✓"));
        assert_eq!(
            escape("a\nb\r\tc\\n\x1b[31m\u{9b}2J\x7f\0\u{85}\u{2028}"),
            r"a\nb\r\tc\\n\x1b[31m\u{9b}2J\x7f\x00\u{85}\u{2028}"
        );
    }

    #[test]
    fn no_escaped_text_holds_a_control_character() {
        let all: String = (0u32..0x3000).filter_map(char::from_u32).collect();
        let out = escape(&all);
        assert!(
            !out.chars()
                .any(|c| c.is_control() || c == '\u{2028}' || c == '\u{2029}')
        );
    }
}
