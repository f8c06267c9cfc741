//! What a new user hit: a URL written as `path`, the COS body as Tencent documents it.

use crate::Env;

#[test]
fn a_url_given_as_path_is_refused_pointing_at_url() {
    let env = Env::new("");
    env.data("a", b"A");
    let r = env.fails(
        "p.json",
        r#"{"output":"p.bin","sources":["a",{"path":"http://objects.example.com/x.bin"}]}"#,
        "invalid_manifest",
        "p.bin",
    );
    let m = r["error"]["message"].as_str().unwrap();
    assert!(m.contains("is a URL") && m.contains("\"url\""), "{m}");
    assert!(m.contains("sources[1]"), "names the field: {m}");
    // In source_lists the same.
    let r = env.fails(
        "l.json",
        r#"{"output":"l.bin","source_lists":[{"path":"s3://bucket/list.txt"}]}"#,
        "invalid_manifest",
        "l.bin",
    );
    let m = r["error"]["message"].as_str().unwrap();
    assert!(m.contains("is a URL") && m.contains("source list 1"), "{m}");
}

#[test]
fn a_cos_key_with_a_leading_slash_is_relative_to_output_root() {
    let env = Env::new("");
    env.data("a", b"COS");
    let r = env.succeeds(
        r#"{"key":"/2026/12/cos.bin","bucket":"examplebucket-1250000000","region":"ap-guangzhou","sources":["a"]}"#,
        "2026/12/cos.bin",
        b"COS",
    );
    assert!(
        r["output"]
            .as_str()
            .unwrap()
            .ends_with("out/2026/12/cos.bin"),
        "{r}"
    );
    // `output` keeps refusing absolute paths.
    env.fails(
        "abs.json",
        r#"{"output":"/2026/abs.bin","sources":["a"]}"#,
        "output_not_allowed",
        "2026/abs.bin",
    );
    // Both names at once is ambiguous.
    env.fails(
        "both.json",
        r#"{"output":"x.bin","key":"y.bin","sources":["a"]}"#,
        "invalid_manifest",
        "x.bin",
    );
}

#[test]
fn errors_about_the_cos_body_name_the_cos_field() {
    let env = Env::new("");
    let r = env.fails(
        "cos.json",
        r#"{"key":"c.bin","sourceList":[{"url":"https://h/a"},{"url":"https://h/b"},{"uri":"https://h/c"}]}"#,
        "invalid_manifest",
        "c.bin",
    );
    let m = r["error"]["message"].as_str().unwrap();
    assert!(m.contains("sourceList[2]"), "{m}");
    let r = env.fails(
        "cos2.json",
        r#"{"key":"c.bin","sourceConfigList":[{"url":7}]}"#,
        "invalid_manifest",
        "c.bin",
    );
    let m = r["error"]["message"].as_str().unwrap();
    assert!(m.contains("sourceConfigList[0]"), "{m}");
}
