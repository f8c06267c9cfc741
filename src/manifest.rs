//! Manifests: JSON or YAML, string or object sources, the COS aliases, and lazily streamed
//! source lists.
//!
//! A manifest itself is at most [`MAX_MANIFEST_BYTES`] and read whole. Source lists are not: they
//! are streamed item by item ([`Manifest::for_each_source`]) every time the job walks its sources,
//! so a job of 1,000,000 parts never holds 1,000,000 parsed items at once. This module knows
//! nothing of where sources live: opening a list is the caller's business.

#[cfg(test)]
mod fuzz;
mod list;
mod read;

use std::fmt;
use std::io::Read;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

pub use list::stream_list;
pub use read::{Origin, read_text};
use read::{tidy, tidy_against};

/// Manifests larger than this are refused before they are parsed.
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// The most sources (and, apart, source lists) a manifest may hold inline. Each parsed source
/// takes memory for as long as the job runs, so a job's memory must not follow however many a
/// manifest's 64 MiB can spell out: longer lists belong in `source_lists`, which are streamed.
/// Enforced while the manifest is parsed, at the element past the limit.
pub const MAX_INLINE_SOURCES: usize = 100_000;

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
            Self::Url(u) => crate::redact::Redacted(u).fmt(f),
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
    /// How messages name the manifest: its file name as dropped, or the path given to `once`
    /// (see [`Origin::shown`]).
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

/// Why a manifest (or one of its source lists) cannot be used. `path` is the manifest as its
/// user knows it (see [`Origin::shown`]); messages quote at most a short excerpt of its text.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("manifest {path} is not a regular file: it is {what}")]
    NotRegular { path: PathBuf, what: &'static str },
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
    output: Option<String>,
    /// COS's name for `output`: an object key, relative to the bucket (so to `output_root`)
    /// even when written with a leading `/`.
    key: Option<String>,
    #[serde(default, alias = "sourceList", deserialize_with = "bounded")]
    sources: Vec<SourceSpec>,
    #[serde(default, alias = "sourceConfigList", deserialize_with = "bounded")]
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

/// A sequence of at most [`MAX_INLINE_SOURCES`] items, refused at the item past the limit
/// (before it is even parsed), so an over-long list never becomes a vector first.
fn bounded<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Inline,
{
    struct V<T>(PhantomData<T>);
    impl<'de, T: Deserialize<'de> + Inline> Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let hint = seq.size_hint().unwrap_or(0).min(1024);
            let mut items = Vec::with_capacity(hint);
            while let Some(item) = seq.next_element()? {
                if items.len() == MAX_INLINE_SOURCES {
                    return Err(de::Error::custom(T::TOO_MANY));
                }
                items.push(item);
            }
            Ok(items)
        }
    }
    d.deserialize_seq(V(PhantomData))
}

/// What the manifest says when it holds too many of these inline.
trait Inline {
    const TOO_MANY: &'static str;
}

impl Inline for SourceSpec {
    const TOO_MANY: &'static str = "more than 100000 inline sources (the limit of `sources`): \
                                    put long lists of sources in `source_lists`, which are streamed";
}

impl Inline for ListItem {
    const TOO_MANY: &'static str = "more than 100000 entries in `source_lists`";
}

fn parse_hash<E: de::Error>(text: &str) -> Result<blake3::Hash, E> {
    blake3::Hash::from_hex(text.trim()).map_err(|_| {
        E::custom(format!(
            "blake3 {} is not 64 hex digits",
            read::excerpt(text)
        ))
    })
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
                Ok(SourceSpec::at(Location::from_text(v)))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<SourceSpec, A::Error> {
                let raw = RawSource::deserialize(de::value::MapAccessDeserializer::new(map))?;
                let location = match (raw.path, raw.url) {
                    (Some(p), None) if is_url(&p) => {
                        return Err(de::Error::custom(format!(
                            "`path` {} is a URL: write remote sources as {{\"url\": \"…\"}}",
                            read::excerpt(&p)
                        )));
                    }
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

/// Whether `text` is a URL of a scheme concatd reads (`http`, `https`, `s3`): such a text given
/// as a `path` is a mistake to point out, not a file name to look for.
fn is_url(text: &str) -> bool {
    let lower = text.trim_start().to_ascii_lowercase();
    ["http://", "https://", "s3://"]
        .iter()
        .any(|scheme| lower.starts_with(scheme))
}

impl SourceSpec {
    /// A whole source at `location`, nothing expected of it.
    pub fn at(location: Location) -> Self {
        Self {
            location,
            offset: None,
            length: None,
            size: None,
            blake3: None,
        }
    }
}

impl Location {
    /// Why this location cannot be used, if it cannot: a path holding a NUL byte reaches no
    /// file (the system cuts it there), so it is refused when the manifest is read rather than
    /// failing later as an unreadable source.
    fn refusal(&self) -> Option<&'static str> {
        match self {
            Self::Path(p) if p.contains('\0') => Some("a path may not contain a NUL byte"),
            Self::Url(u) if u.contains('\0') => Some("a URL may not contain a NUL byte"),
            _ => None,
        }
    }
}

impl Manifest {
    /// Read and parse the manifest at `path` (YAML for `.yaml`/`.yml`, JSON otherwise), opened
    /// as `origin` allows (see [`Origin`]; a FIFO, a device or, when claimed, a symlink is
    /// refused, never waited on or followed).
    pub fn load(path: &Path, origin: Origin) -> Result<Self, ManifestError> {
        let text = read::read_text(path, origin)?;
        Self::parse(&text, origin.shown(path))
    }

    /// Parse manifest text; `path` decides the format and names the manifest in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ManifestError> {
        let yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        let invalid = |message: &str| ManifestError::Invalid {
            path: path.to_owned(),
            message: message.to_owned(),
        };
        let raw: RawManifest = if yaml {
            crate::yaml::from_str_quiet(text).map_err(|e| ManifestError::Syntax {
                path: path.to_owned(),
                format: "YAML",
                message: tidy_against(&e.to_string(), text),
            })?
        } else {
            // Errors name the field they are about as the manifest wrote it (`sources[3].size`,
            // or for the COS body `sourceList[2].url`), not only a line and column.
            let mut de = serde_json::Deserializer::from_str(text);
            serde_path_to_error::deserialize(&mut de).map_err(|e| {
                let field = e.path().to_string();
                let e = e.into_inner();
                let message = match field.as_str() {
                    "." | "" => e.to_string(),
                    _ => format!("{field}: {e}"),
                };
                match e.classify() {
                    // Well-formed JSON that is not a manifest (an unknown key, a wrong type, too
                    // many sources): the manifest is invalid, not its syntax.
                    serde_json::error::Category::Data => invalid(&tidy_against(&message, text)),
                    _ => ManifestError::Syntax {
                        path: path.to_owned(),
                        format: "JSON",
                        message: tidy_against(&message, text),
                    },
                }
            })?
        };
        let output = match (raw.output, raw.key) {
            (Some(_), Some(_)) => return Err(invalid("give `output` or COS's `key`, not both")),
            (Some(o), None) => o,
            // In COS a key is relative to its bucket, `/` or not: here, relative to output_root.
            (None, Some(k)) => k.trim_start_matches('/').to_owned(),
            (None, None) => String::new(),
        };
        if output.is_empty() {
            return Err(invalid("`output` is missing"));
        }
        if raw.sources.is_empty() && raw.source_lists.is_empty() {
            return Err(invalid("no sources: give `sources` or `source_lists`"));
        }
        for (i, spec) in raw.sources.iter().enumerate() {
            if let Some(why) = spec.location.refusal() {
                return Err(invalid(&format!("source {}: {why}", i + 1)));
            }
        }
        let mut source_lists = Vec::with_capacity(raw.source_lists.len());
        for (i, item) in raw.source_lists.into_iter().enumerate() {
            let location = match item {
                ListItem::Text(t) => Location::from_text(&t),
                ListItem::Object(ListObject {
                    url: Some(u),
                    path: None,
                }) => Location::Url(u),
                ListItem::Object(ListObject {
                    url: None,
                    path: Some(p),
                }) if is_url(&p) => {
                    return Err(invalid(&format!(
                        "source list {}: `path` {} is a URL: write it as {{\"url\": \"…\"}}",
                        i + 1,
                        read::excerpt(&p)
                    )));
                }
                ListItem::Object(ListObject {
                    url: None,
                    path: Some(p),
                }) => Location::Path(p),
                ListItem::Object(_) => {
                    return Err(invalid("a source_lists entry needs `path` or `url`"));
                }
            };
            if let Some(why) = location.refusal() {
                return Err(invalid(&format!("source list {}: {why}", i + 1)));
            }
            source_lists.push(location);
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
                notes.push(format!("COS key `{key}` ({}) ignored", tidy(&v)));
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
            let name = list.to_string();
            stream_list(reader, &name, &mut |spec| {
                n += 1;
                if let Some(why) = spec.location.refusal() {
                    return Err(E::from(ManifestError::List {
                        list: name.clone(),
                        message: format!("source {n}: {why}"),
                    }));
                }
                f(n, &spec)
            })?;
        }
        Ok(n)
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
}
