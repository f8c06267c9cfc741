//! Manifests: JSON or YAML, string or object sources, the COS aliases, and lazily streamed
//! source lists.
//!
//! A manifest itself is at most [`MAX_MANIFEST_BYTES`] and read whole. Source lists are not: they
//! are streamed item by item ([`Manifest::for_each_source`]) every time the job walks its sources,
//! so a job of 1,000,000 parts never holds 1,000,000 parsed items at once. This module knows
//! nothing of where sources live: opening a list is the caller's business.

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// Manifests larger than this are refused before they are parsed.
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// Where one source lives, as the manifest wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local path; relative paths are joined to the rule's `source_root`.
    Path(String),
    /// `http://`, `https://` or `s3://` URL.
    Url(String),
}

impl Location {
    /// A string source: URLs are recognised by their `scheme://`.
    pub fn from_text(text: &str) -> Self {
        if text.contains("://") {
            Self::Url(text.to_owned())
        } else {
            Self::Path(text.to_owned())
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Path(p) => f.write_str(p),
            Self::Url(u) => crate::source::Redacted(u).fmt(f),
        }
    }
}

/// One source of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSpec {
    pub location: Location,
    /// Start of the byte range taken from the source.
    pub offset: Option<u64>,
    /// Length of the byte range; to the end of the source when absent.
    pub length: Option<u64>,
    /// Expected length of the bytes taken.
    pub size: Option<u64>,
    /// Expected BLAKE3 of the bytes taken.
    pub blake3: Option<blake3::Hash>,
}

/// `expect`: what the whole output must be.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expect {
    pub size: Option<u64>,
    pub blake3: Option<blake3::Hash>,
}

/// A parsed manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The manifest's file name (the `manifest` field of results).
    pub name: String,
    pub path: PathBuf,
    /// The output path, relative to the rule's `output_root` (not yet checked).
    pub output: String,
    pub sources: Vec<SourceSpec>,
    pub source_lists: Vec<Location>,
    pub expect: Expect,
    pub overwrite: Option<bool>,
    /// Things worth a log line but not an error (COS's `bucket`/`region` are ignored).
    pub notes: Vec<String>,
}

/// Why a manifest (or one of its source lists) cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "manifest {path} is {size} bytes; the limit is 64 MiB (put long lists in source_lists)"
    )]
    TooBig { path: PathBuf, size: u64 },
    #[error("manifest {path} is not valid {format}: {message}")]
    Syntax {
        path: PathBuf,
        format: &'static str,
        message: String,
    },
    #[error("manifest {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("source list {list}: {message}")]
    List { list: String, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    #[serde(alias = "key")]
    output: Option<String>,
    #[serde(default, alias = "sourceList")]
    sources: Vec<SourceSpec>,
    #[serde(default, alias = "sourceConfigList")]
    source_lists: Vec<ListItem>,
    #[serde(default)]
    expect: Option<RawExpect>,
    overwrite: Option<bool>,
    bucket: Option<String>,
    region: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExpect {
    size: Option<u64>,
    blake3: Option<String>,
}

/// A `source_lists` entry: a string, or an object with `url` (COS) or `path`.
#[derive(Deserialize)]
#[serde(untagged)]
enum ListItem {
    Text(String),
    Object(ListObject),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListObject {
    url: Option<String>,
    path: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    path: Option<String>,
    url: Option<String>,
    offset: Option<u64>,
    length: Option<u64>,
    size: Option<u64>,
    blake3: Option<String>,
}

fn parse_hash<E: de::Error>(text: &str) -> Result<blake3::Hash, E> {
    blake3::Hash::from_hex(text.trim())
        .map_err(|_| E::custom(format!("blake3 '{text}' is not 64 hex digits")))
}

impl<'de> Deserialize<'de> for SourceSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SourceSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a path or URL, or an object with `path` or `url`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SourceSpec, E> {
                if v.trim().is_empty() {
                    return Err(E::custom("empty source"));
                }
                Ok(SourceSpec {
                    location: Location::from_text(v),
                    offset: None,
                    length: None,
                    size: None,
                    blake3: None,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<SourceSpec, A::Error> {
                let raw = RawSource::deserialize(de::value::MapAccessDeserializer::new(map))?;
                let location = match (raw.path, raw.url) {
                    (Some(p), None) if !p.is_empty() => Location::Path(p),
                    (None, Some(u)) if !u.is_empty() => Location::Url(u),
                    (Some(_), Some(_)) => {
                        return Err(de::Error::custom("a source has `path` or `url`, not both"));
                    }
                    _ => {
                        return Err(de::Error::custom(
                            "a source needs a non-empty `path` or `url`",
                        ));
                    }
                };
                Ok(SourceSpec {
                    location,
                    offset: raw.offset,
                    length: raw.length,
                    size: raw.size,
                    blake3: raw.blake3.as_deref().map(parse_hash).transpose()?,
                })
            }
        }
        d.deserialize_any(V)
    }
}

impl Manifest {
    /// Read and parse the manifest at `path` (YAML for `.yaml`/`.yml`, JSON otherwise).
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let read_err = |source| ManifestError::Read {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let size = file.metadata().map_err(read_err)?.len();
        if size > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooBig {
                path: path.to_owned(),
                size,
            });
        }
        let mut text = String::new();
        // `take` guards against a file that grows after the size check.
        file.take(MAX_MANIFEST_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooBig {
                path: path.to_owned(),
                size: text.len() as u64,
            });
        }
        Self::parse(&text, path)
    }

    /// Parse manifest text; `path` decides the format and names the manifest in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ManifestError> {
        let yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        let raw: RawManifest = if yaml {
            crate::yaml::from_str(text).map_err(|e| ManifestError::Syntax {
                path: path.to_owned(),
                format: "YAML",
                message: e.to_string(),
            })?
        } else {
            serde_json::from_str(text).map_err(|e| ManifestError::Syntax {
                path: path.to_owned(),
                format: "JSON",
                message: e.to_string(),
            })?
        };
        let invalid = |message: &str| ManifestError::Invalid {
            path: path.to_owned(),
            message: message.to_owned(),
        };
        let output = raw
            .output
            .filter(|o| !o.is_empty())
            .ok_or_else(|| invalid("`output` is missing"))?;
        if raw.sources.is_empty() && raw.source_lists.is_empty() {
            return Err(invalid("no sources: give `sources` or `source_lists`"));
        }
        let mut source_lists = Vec::with_capacity(raw.source_lists.len());
        for item in raw.source_lists {
            source_lists.push(match item {
                ListItem::Text(t) => Location::from_text(&t),
                ListItem::Object(ListObject {
                    url: Some(u),
                    path: None,
                }) => Location::Url(u),
                ListItem::Object(ListObject {
                    url: None,
                    path: Some(p),
                }) => Location::Path(p),
                ListItem::Object(_) => {
                    return Err(invalid("a source_lists entry needs `path` or `url`"));
                }
            });
        }
        let expect = match raw.expect {
            None => Expect::default(),
            Some(e) => Expect {
                size: e.size,
                blake3: e
                    .blake3
                    .as_deref()
                    .map(parse_hash::<serde_json::Error>)
                    .transpose()
                    .map_err(|e| invalid(&format!("expect: {e}")))?,
            },
        };
        let mut notes = Vec::new();
        for (key, value) in [("bucket", raw.bucket), ("region", raw.region)] {
            if let Some(v) = value {
                notes.push(format!("COS key `{key}` ({v}) ignored"));
            }
        }
        Ok(Manifest {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: path.to_owned(),
            output,
            sources: raw.sources,
            source_lists,
            expect,
            overwrite: raw.overwrite,
            notes,
        })
    }

    /// Walk every source in order: `sources`, then each list of `source_lists`, streamed.
    /// `f` gets the 1-based source number and the item. `open_list` opens a list's bytes.
    pub fn for_each_source<E, O, F>(&self, mut open_list: O, mut f: F) -> Result<u64, E>
    where
        E: From<ManifestError>,
        O: FnMut(&Location) -> Result<Box<dyn Read + Send>, E>,
        F: FnMut(u64, &SourceSpec) -> Result<(), E>,
    {
        let mut n = 0u64;
        for spec in &self.sources {
            n += 1;
            f(n, spec)?;
        }
        for list in &self.source_lists {
            let reader = open_list(list)?;
            stream_list(reader, &list.to_string(), &mut |spec| {
                n += 1;
                f(n, &spec)
            })?;
        }
        Ok(n)
    }
}

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
        Some(b'[') => {
            let mut failure = None;
            let mut de = serde_json::Deserializer::from_reader(reader);
            let seed = EachSeed {
                f: &mut |spec| match f(spec) {
                    Ok(()) => true,
                    Err(e) => {
                        failure = Some(e);
                        false
                    }
                },
            };
            let parsed = seed.deserialize(&mut de).and_then(|()| de.end());
            match (failure, parsed) {
                (Some(e), _) => Err(e),
                (None, Err(e)) => Err(list_err(e.to_string())),
                (None, Ok(())) => Ok(()),
            }
        }
        Some(_) => {
            let mut line = String::new();
            let mut number = 0u64;
            loop {
                line.clear();
                number += 1;
                let read = reader
                    .read_line(&mut line)
                    .map_err(|e| list_err(format!("line {number}: {e}")))?;
                if read == 0 {
                    return Ok(());
                }
                let item = line.trim();
                if item.is_empty() || item.starts_with('#') {
                    continue;
                }
                let spec = if item.starts_with('{') {
                    serde_json::from_str(item)
                        .map_err(|e| list_err(format!("line {number}: {e}")))?
                } else {
                    SourceSpec {
                        location: Location::from_text(item),
                        offset: None,
                        length: None,
                        size: None,
                        blake3: None,
                    }
                };
                f(spec)?;
            }
        }
    }
}

/// Deserializes a JSON array one element at a time, handing each to `f` (which returns false to
/// stop), so the array is never held in memory.
struct EachSeed<'a> {
    f: &'a mut dyn FnMut(SourceSpec) -> bool,
}

impl<'de> DeserializeSeed<'de> for EachSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for EachSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of sources")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(spec) = seq.next_element::<SourceSpec>()? {
            if !(self.f)(spec) {
                return Err(de::Error::custom("stopped"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, name: &str) -> Result<Manifest, ManifestError> {
        Manifest::parse(text, Path::new(name))
    }

    #[test]
    fn json_with_every_source_form() {
        let hash = blake3::hash(b"x").to_hex();
        let m = parse(
            &format!(
                r#"{{"output":"o.bin","sources":["a.bin",{{"path":"b.bin","size":3,"blake3":"{hash}"}},
                {{"path":"c","offset":4,"length":5}},{{"url":"https://h/x"}},"s3://b/k"],
                "source_lists":["l.txt"],"expect":{{"size":9}},"overwrite":true}}"#
            ),
            "m.json",
        )
        .unwrap();
        assert_eq!(m.output, "o.bin");
        assert_eq!(m.sources.len(), 5);
        assert_eq!(m.sources[1].blake3.unwrap().to_hex(), hash);
        assert_eq!(m.sources[2].offset, Some(4));
        assert_eq!(m.sources[3].location, Location::Url("https://h/x".into()));
        assert_eq!(m.sources[4].location, Location::Url("s3://b/k".into()));
        assert_eq!(m.expect.size, Some(9));
        assert_eq!(m.overwrite, Some(true));
    }

    #[test]
    fn yaml_and_cos_aliases() {
        let m = parse(
            "key: out/x\nbucket: b-123\nregion: ap-guangzhou\nsourceList:\n  - url: https://h/a\nsourceConfigList:\n  - url: https://h/list.txt\n",
            "m.yaml",
        )
        .unwrap();
        assert_eq!(m.output, "out/x");
        assert_eq!(m.sources[0].location, Location::Url("https://h/a".into()));
        assert_eq!(
            m.source_lists[0],
            Location::Url("https://h/list.txt".into())
        );
        assert_eq!(m.notes.len(), 2);
    }

    #[test]
    fn unknown_keys_and_empty_sources_are_refused() {
        let e = parse(r#"{"output":"o","sources":["a"],"colour":1}"#, "m.json").unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
        let e = parse(
            r#"{"output":"o","sources":[{"path":"a","sise":1}]}"#,
            "m.json",
        )
        .unwrap_err();
        assert!(e.to_string().contains("sise"), "{e}");
        let e = parse(r#"{"output":"o","sources":[]}"#, "m.json").unwrap_err();
        assert!(e.to_string().contains("no sources"), "{e}");
        let e = parse("output: o\noutput: p\nsources: [a]\n", "m.yaml").unwrap_err();
        assert!(matches!(e, ManifestError::Syntax { .. }), "{e}");
    }

    fn collect(text: &str) -> Result<Vec<SourceSpec>, ManifestError> {
        let mut out = Vec::new();
        stream_list(
            Box::new(std::io::Cursor::new(text.to_owned())),
            "l",
            &mut |s| {
                out.push(s);
                Ok::<(), ManifestError>(())
            },
        )?;
        Ok(out)
    }

    #[test]
    fn lists_as_lines_and_json_arrays() {
        let lines = collect("a\n\n# note\n  b  \n{\"path\":\"c\",\"offset\":1}\n").unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1].location, Location::Path("b".into()));
        assert_eq!(lines[2].offset, Some(1));
        let json = collect("  [\"a\", {\"url\":\"http://h/b\"}]").unwrap();
        assert_eq!(json.len(), 2);
        assert!(collect("[\"a\", 3]").is_err());
        assert!(collect("").unwrap().is_empty());
    }
}
