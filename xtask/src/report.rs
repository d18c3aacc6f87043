//! Tables written into Markdown files between two marker comments, so the prose around them is
//! kept: `cargo xtask chaos --record` and `cargo xtask bench --record` use it.

use anyhow::Context;

/// Replaces what lies between `begin` and `end` in the file at `path` with `text` (appending
/// both markers and the text when the file lacks them).
pub fn write_between_markers(
    path: &std::path::Path,
    begin: &str,
    end: &str,
    text: &str,
) -> anyhow::Result<()> {
    let text = format!("{}\n", text.trim_end());
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let new = match (old.find(begin), old.find(end)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{begin}\n{text}{}", &old[..b], &old[e..])
        }
        _ => format!("{old}{begin}\n{text}{end}\n"),
    };
    std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}
