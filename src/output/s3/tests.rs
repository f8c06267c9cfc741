use super::*;

fn root(prefix: &str) -> S3Root {
    S3Root {
        bucket: "b".into(),
        prefix: prefix.into(),
    }
}

#[test]
fn keys_are_plain_and_short() {
    assert_eq!(key_for(&root("p/"), "a/b.bin").unwrap(), "p/a/b.bin");
    assert_eq!(key_for(&root(""), "x").unwrap(), "x");
    for bad in ["", "/abs", "a//b", "a/../b", "..", "./a", "a/", "a\nb"] {
        let e = key_for(&root("p/"), bad).unwrap_err();
        assert!(matches!(e, OutputError::NotAllowed { .. }), "{bad}: {e}");
    }
    let long = "k".repeat(MAX_KEY - 2 - 3);
    assert!(key_for(&root("p/"), &long).is_ok());
    assert!(key_for(&root("p/"), &format!("{long}k")).is_err());
}

#[test]
fn multipart_etag_is_md5_of_md5s() {
    // Two parts "a" and "b": MD5("a") = 0cc175b9…, MD5("b") = 92eb5ffe….
    let parts = [
        DonePart {
            number: 1,
            etag: "\"0cc175b9c0f1b6a831c399e269772661\"".into(),
            crc64nvme: None,
        },
        DonePart {
            number: 2,
            etag: "\"92eb5ffee6ae2fec3ad71c777531578f\"".into(),
            crc64nvme: None,
        },
    ];
    let got = multipart_etag(&parts).unwrap();
    let mut raw = Vec::new();
    for p in &parts {
        let h = p.etag.trim_matches('"');
        raw.extend((0..16).map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap()));
    }
    use md5::Digest;
    let want: String = md5::Md5::digest(&raw)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(got, format!("\"{want}-2\""));
    // The same, computed apart (Python: md5(bytes.fromhex(a) + bytes.fromhex(b)).hexdigest()).
    assert_eq!(got, "\"96e024ba2074fe77e8e965ba43a704be-2\"");
    let odd = [DonePart {
        number: 1,
        etag: "\"xyz\"".into(),
        crc64nvme: None,
    }];
    assert!(multipart_etag(&odd).is_none());
}
