//! Markdown tables ([`table`]), written into Markdown files between two marker comments so the
//! prose around them is kept: `cargo xtask chaos`, `attack` and `bench` (with `--record`) use it.

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

/// How a column's cells line up: the separator row's `---` or `---:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A Markdown table: the header, the separator, then one line per row, each `| a | b |`.
pub fn table(columns: &[(&str, Align)], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::from("|");
        for cell in cells {
            l.push(' ');
            l.push_str(cell);
            l.push_str(" |");
        }
        l.push('\n');
        l
    };
    let mut t = line(&mut columns.iter().map(|(name, _)| *name));
    t.push_str(&line(&mut columns.iter().map(|(_, align)| match align {
        Align::Left => "---",
        Align::Right => "---:",
    })));
    for row in rows {
        t.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::{Align, table};

    #[test]
    fn a_table_is_header_separator_and_rows() {
        let t = table(
            &[
                ("name", Align::Left),
                ("n", Align::Right),
                ("", Align::Left),
            ],
            [
                vec!["a".to_owned(), "1".to_owned(), String::new()],
                vec!["b c".to_owned(), "22".to_owned(), "x".to_owned()],
            ],
        );
        assert_eq!(
            t,
            "| name | n |  |\n| --- | ---: | --- |\n| a | 1 |  |\n| b c | 22 | x |\n"
        );
        assert_eq!(table(&[("x", Align::Right)], []), "| x |\n| ---: |\n");
    }
}
