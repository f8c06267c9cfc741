//! Output names that can be published: checked before any byte is written.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use super::OutputError;

/// The longest path the kernel takes, its terminating NUL included (`PATH_MAX` of Linux).
pub const PATH_MAX: usize = 4096;

/// The longest file name (`NAME_MAX` of Linux filesystems), in bytes.
pub const NAME_MAX: usize = 255;

/// The folders and the file name of `output`, checked: relative, no `..`, not in our temp-name
/// space, no NUL byte, every name within `NAME_MAX` (the file's with room for `.b3`), and the whole
/// path beneath `root` within `PATH_MAX` (room for the sidecar and our temporary names kept), so
/// that nothing the publish does can fail for the name after the copy.
pub(super) fn check<'a>(
    root: &Path,
    output: &'a str,
) -> Result<(Vec<&'a OsStr>, &'a OsStr), OutputError> {
    let refuse = |reason: String| OutputError::NotAllowed {
        output: output.escape_debug().to_string(),
        reason,
    };
    if output.is_empty() || output.ends_with('/') {
        return Err(refuse("it must name a file".into()));
    }
    if output.contains('\0') {
        return Err(refuse("it may not contain a NUL byte".into()));
    }
    let mut parts = Vec::new();
    for c in Path::new(output).components() {
        match c {
            Component::Normal(p) => parts.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err(refuse("`..` may not appear in it".into())),
            Component::RootDir | Component::Prefix(_) => {
                return Err(refuse(
                    "it must be relative to the rule's output_root".into(),
                ));
            }
        }
    }
    let name = parts
        .pop()
        .ok_or_else(|| refuse("it must name a file".into()))?;
    if name.as_bytes().starts_with(b".concatd-") {
        return Err(refuse("names starting with .concatd- are reserved".into()));
    }
    for part in &parts {
        if part.len() > NAME_MAX {
            return Err(refuse(format!(
                "a folder name of {} bytes is longer than {NAME_MAX}",
                part.len()
            )));
        }
    }
    if name.len() + SIDECAR_EXT.len() > NAME_MAX {
        return Err(refuse(format!(
            "its file name of {} bytes leaves no room for the {SIDECAR_EXT} sidecar ({NAME_MAX} at most)",
            name.len()
        )));
    }
    let folder: usize = root.as_os_str().len() + parts.iter().map(|p| p.len() + 1).sum::<usize>();
    let longest = (name.len() + SIDECAR_EXT.len()).max(TEMP_NAME_LEN);
    if folder + 1 + longest >= PATH_MAX {
        return Err(refuse(format!(
            "the whole path would be longer than PATH_MAX ({PATH_MAX} bytes)"
        )));
    }
    Ok((parts, name))
}

/// What the `.b3` sidecar's name adds to the output's.
pub(super) const SIDECAR_EXT: &str = ".b3";

/// The longest temporary name of ours beside an output (a job id is 32 hex digits).
const TEMP_NAME_LEN: usize = ".concatd-".len() + 32 + ".b3.tmp".len();
