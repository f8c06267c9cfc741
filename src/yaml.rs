//! One YAML reader for the rules file and manifests, so both get the same strictness.

use serde::de::DeserializeOwned;

/// Parse YAML strictly: duplicate keys are an error (a repeated `output:` must never silently
/// pick one), and only `true`/`false` are booleans (`no`, `on`, `y` stay strings and so fail to
/// deserialize into a `bool` with a clear message).
pub fn from_str<T: DeserializeOwned>(input: &str) -> Result<T, serde_saphyr::Error> {
    let options = serde_saphyr::options! {
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
        strict_booleans: true,
    };
    serde_saphyr::from_str_with_options(input, options)
}

/// [`from_str`] for text whose errors are shown to others (manifests): the error carries no
/// snippet of the surrounding lines, only the parser's message.
pub fn from_str_quiet<T: DeserializeOwned>(input: &str) -> Result<T, serde_saphyr::Error> {
    let options = serde_saphyr::options! {
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
        strict_booleans: true,
        with_snippet: false,
    };
    serde_saphyr::from_str_with_options(input, options)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    #[test]
    fn duplicate_keys_are_an_error() {
        let r: Result<BTreeMap<String, String>, _> = super::from_str("a: 1\na: 2\n");
        assert!(r.is_err());
    }

    #[test]
    fn yes_is_not_a_boolean() {
        let r: Result<BTreeMap<String, bool>, _> = super::from_str("a: yes\n");
        assert!(r.is_err());
        let r: BTreeMap<String, bool> = super::from_str("a: true\n").unwrap();
        assert!(r["a"]);
    }
}
