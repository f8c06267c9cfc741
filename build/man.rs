//! The man pages: clap_mangen renders the command line; docs/reference.md, turned into roff by
//! the small converter below (headings, paragraphs, lists, tables, code blocks, inline code and
//! bold), makes `man concatd` the whole reference.

use std::io::Write;
use std::path::Path;

/// Write `concatd.1` and one `concatd-COMMAND.1` per command into `dir`.
pub fn write_pages(
    cmd: &clap::Command,
    reference: &str,
    version: &str,
    dir: &Path,
) -> std::io::Result<()> {
    let date = "";
    let source = format!("concatd {version}");
    let man = |c: clap::Command| {
        clap_mangen::Man::new(c)
            .date(date)
            .source(source.clone())
            .manual("concatd manual")
    };
    for sub in commands(cmd) {
        let page = man(sub.clone());
        let mut file = std::fs::File::create(dir.join(page.get_filename()))?;
        page.render(&mut file)?;
        let see_also = ".SH \"SEE ALSO\"\n\\fBconcatd\\fR(1)\n";
        file.write_all(see_also.as_bytes())?;
    }
    let page = man(cmd.clone());
    let mut text = Vec::new();
    page.render_title(&mut text)?;
    page.render_name_section(&mut text)?;
    page.render_synopsis_section(&mut text)?;
    page.render_description_section(&mut text)?;
    page.render_options_section(&mut text)?;
    page.render_subcommands_section(&mut text)?;
    text.extend_from_slice(markdown_to_roff(reference).as_bytes());
    text.extend_from_slice(FILES.as_bytes());
    let subs: Vec<String> = commands(cmd)
        .map(|s| format!("\\fBconcatd\\-{}\\fR(1)", s.get_name()))
        .collect();
    writeln!(
        text,
        ".SH \"SEE ALSO\"\n{}, \\fBsystemd.exec\\fR(5), \\fBb3sum\\fR(1)",
        subs.join(", ")
    )?;
    page.render_version_section(&mut text)?;
    std::fs::write(dir.join("concatd.1"), text)
}

/// The commands that get a page (not clap's `help`, nor hidden ones).
fn commands(cmd: &clap::Command) -> impl Iterator<Item = &clap::Command> {
    cmd.get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
}

/// Where the Debian package puts things.
const FILES: &str = r#".SH FILES
.TP
\fI/etc/concatd/rules.yaml\fR
The rules file of the packaged service (a conffile: kept on upgrade when edited).
.TP
\fI/lib/systemd/system/concatd.service\fR
The hardened unit; folders outside \fI/var/lib/concatd\fR that rules write to must be added
with a drop\-in (\fBsystemctl edit concatd\fR, \fBReadWritePaths=\fR).
.TP
\fI/var/lib/concatd\fR
The default rule's folders: \fIinbox\fR (drop manifests here), \fIout\fR, \fIsources\fR.
.TP
\fI/var/log/concatd\fR
Per\-rule logs, \fIRULE.log\fR, rotated.
"#;

/// The roff for the markdown of docs/reference.md (the subset it uses). The first-level
/// heading (the document's title) is dropped: the page has its own.
pub fn markdown_to_roff(md: &str) -> String {
    let mut out = String::new();
    let mut lines = md.lines().peekable();
    let mut in_code = false;
    // The title and the introduction (which points at this page's own sources) are left out.
    while lines.next_if(|l| !l.starts_with("## ")).is_some() {}
    while let Some(line) = lines.next() {
        if line.starts_with("```") {
            out.push_str(if in_code {
                ".fi\n.RE\n"
            } else {
                ".PP\n.RS 4\n.nf\n"
            });
            in_code = !in_code;
            continue;
        }
        if in_code {
            out.push_str(&escape_line(&escape(line)));
            out.push('\n');
            continue;
        }
        let trimmed = line.trim();
        if let Some(h) = trimmed.strip_prefix("## ") {
            out.push_str(&format!(".SH \"{}\"\n", quote(&plain(h).to_uppercase())));
        } else if let Some(h) = trimmed.strip_prefix("### ") {
            out.push_str(&format!(".SS \"{}\"\n", quote(&plain(h))));
        } else if trimmed.starts_with('|') {
            let header = cells(trimmed);
            // The separator row.
            if lines.peek().is_some_and(|l| l.trim().starts_with("|-")) {
                lines.next();
            }
            while let Some(row) = lines.peek().filter(|l| l.trim().starts_with('|')) {
                out.push_str(&table_row(&header, &cells(row.trim())));
                lines.next();
            }
        } else if let Some(item) = trimmed.strip_prefix("- ") {
            out.push_str(".IP \\(bu 2\n");
            out.push_str(&escape_line(&inline(item)));
            out.push('\n');
        } else if trimmed.is_empty() {
            out.push_str(".PP\n");
        } else {
            out.push_str(&escape_line(&inline(trimmed)));
            out.push('\n');
        }
    }
    out
}

/// A table row as a tagged paragraph: the first cell the tag, the others the body (named by
/// their column, `meaning` aside, when there are several).
fn table_row(header: &[String], row: &[String]) -> String {
    let mut out = String::from(".TP\n");
    out.push_str(&escape_line(&inline(
        row.first().map_or("", String::as_str),
    )));
    out.push('\n');
    let mut body = Vec::new();
    for (i, cell) in row.iter().enumerate().skip(1) {
        if cell.is_empty() {
            continue;
        }
        let name = header.get(i).map_or("", String::as_str);
        if row.len() > 2 && !name.is_empty() && name != "meaning" {
            body.push(format!("{}: {}", inline(name), inline(cell)));
        } else {
            body.push(inline(cell));
        }
    }
    out.push_str(&escape_line(&body.join(". ")));
    out.push('\n');
    out
}

/// The cells of `| a | b |`, split on unescaped pipes outside code spans.
fn cells(row: &str) -> Vec<String> {
    let inner = row.trim().trim_start_matches('|');
    let inner = inner.strip_suffix('|').unwrap_or(inner);
    let mut cells = vec![String::new()];
    let mut in_code = false;
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                cells.last_mut().unwrap().push('|');
                chars.next();
            }
            '`' => {
                in_code = !in_code;
                cells.last_mut().unwrap().push(c);
            }
            '|' if !in_code => cells.push(String::new()),
            _ => cells.last_mut().unwrap().push(c),
        }
    }
    cells.into_iter().map(|c| c.trim().to_owned()).collect()
}

/// Inline markdown to roff: `code` and **bold** in bold, [text](link) as its text.
fn inline(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if let Some(after) = rest.strip_prefix('`')
            && let Some(end) = after.find('`')
        {
            out.push_str("\\fB");
            out.push_str(&escape(&after[..end]).replace('-', "\\-"));
            out.push_str("\\fR");
            rest = &after[end + 1..];
        } else if let Some(after) = rest.strip_prefix("**")
            && let Some(end) = after.find("**")
        {
            out.push_str("\\fB");
            out.push_str(&inline(&after[..end]));
            out.push_str("\\fR");
            rest = &after[end + 2..];
        } else if let Some(after) = rest.strip_prefix('[')
            && let Some(close) = after.find("](")
            && let Some(end) = after[close..].find(')')
        {
            out.push_str(&inline(&after[..close]));
            rest = &after[close + end + 1..];
        } else {
            out.push_str(&escape(&rest[..c.len_utf8()]));
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// Text without markup (for headings).
fn plain(text: &str) -> String {
    text.replace(['`', '*'], "")
}

/// Backslashes (the one character roff reads in running text) and non-ASCII characters (roff
/// input is not UTF-8: `\[uXXXX]` is what groff and mandoc both read).
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\e"),
            c if c.is_ascii() => out.push(c),
            c => out.push_str(&format!("\\[u{:04X}]", c as u32)),
        }
    }
    out
}

/// A line starting with `.` or `'` would be read as a request.
fn escape_line(line: &str) -> String {
    if line.starts_with('.') || line.starts_with('\'') {
        format!("\\&{line}")
    } else {
        line.to_owned()
    }
}

fn quote(text: &str) -> String {
    text.replace('"', "\\(dq")
}
