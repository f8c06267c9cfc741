//! Found by an adversarial review.

use super::*;

/// With overwrite on, a folder at the output's path cannot be replaced: the
/// job is refused up front as `output_not_allowed`, not `internal` at the rename after the copy.
#[test]
fn a_folder_at_the_output_path_is_refused_before_the_copy_even_with_overwrite() {
    let env = Env::new("    overwrite: true\n");
    env.data("a", &vec![5u8; 1 << 20]);
    std::fs::create_dir_all(env.path("out/dir/inner")).unwrap();
    let r = env.fails(
        "m.json",
        r#"{"output":"dir","sources":["a"]}"#,
        "output_not_allowed",
        "dir",
    );
    assert!(env.path("out/dir/inner").is_dir());
    let message = r["error"]["message"].as_str().unwrap();
    assert!(message.contains("folder"), "{message}");
}
