//! Aligned text tables for `jitctl`'s human output. Every cell is escaped with
//! [`crate::text::show_stored`] here (once: what jitd stored escaped already is not
//! escaped again), in the one place tables are drawn, so no
//! caller-supplied text (a source, a justification, a reason) reaches a terminal raw.

use crate::text::{escape_capped, show_stored};

/// `headers` and `rows` as left-aligned columns two spaces apart, one line per row
/// (each ending in `\n`, trailing spaces trimmed); cells are escaped for the terminal
/// and columns are as wide as their widest escaped cell, in characters.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let columns = Columns::fit(headers, rows);
    let mut out = columns.header(headers);
    out.push_str(&columns.rows(rows));
    out
}

/// Like [`render`], for text nobody checked (values from etcd, which anyone with write
/// access there wrote): every cell escaped with [`escape_capped`] and cut to at most
/// `max_chars` characters, never taken for text jitd stored escaped.
pub fn render_capped(headers: &[&str], rows: &[Vec<String>], max_chars: usize) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|c| escape_capped(c, max_chars)).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let columns = Columns { widths };
    let mut out = columns.header(headers);
    for row in cells {
        out.push_str(&columns.line(row.into_iter()));
    }
    out
}

/// Column widths for a table printed as its rows arrive (`jitctl status` page by
/// page): fitted to the headers and the first rows; a later, wider cell makes only its
/// own row wider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    widths: Vec<usize>,
}

impl Columns {
    /// Widths that fit `headers` and `rows` (escaped).
    pub fn fit(headers: &[&str], rows: &[Vec<String>]) -> Columns {
        let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
        for row in rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(show_stored(cell).chars().count());
            }
        }
        Columns { widths }
    }

    /// The header line.
    pub fn header(&self, headers: &[&str]) -> String {
        self.line(headers.iter().map(|h| h.to_string()))
    }

    /// The lines of `rows`, their cells escaped.
    pub fn rows(&self, rows: &[Vec<String>]) -> String {
        rows.iter()
            .map(|row| self.line(row.iter().map(|c| show_stored(c).into_owned())))
            .collect()
    }

    fn line(&self, cells: impl Iterator<Item = String>) -> String {
        let padded: Vec<String> = cells.zip(&self.widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let mut line = padded.join("  ").trim_end().to_string();
        line.push('\n');
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_on_escaped_cells() {
        let rows = vec![
            vec!["1".to_string(), "203.0.113.7".to_string(), "ok".to_string()],
            vec!["22".to_string(), "\x1b[2J".to_string(), "x\u{202e}y".to_string()],
        ];
        assert_eq!(
            render(&["ID", "SOURCE", "WHY"], &rows),
            "ID  SOURCE       WHY\n\
             1   203.0.113.7  ok\n\
             22  \\u{1b}[2J    x\\u{202e}y\n"
        );
    }

    #[test]
    fn unchecked_text_is_escaped_once_and_cut() {
        let long = "a".repeat(30);
        let rows = vec![
            vec!["web1".to_string(), "\\stored\u{1b}".to_string()],
            vec!["\x1b[2J".to_string(), long],
        ];
        let drawn = render_capped(&["HOST", "REASON"], &rows, 10);
        let lines: Vec<&str> = drawn.lines().collect();
        assert_eq!(lines[0], "HOST       REASON");
        // a backslash from etcd is never taken for one of jitd's own escapes
        assert_eq!(lines[1], "web1       \\\\stored\\[cut: the original had 8 characters]");
        assert_eq!(
            lines[2],
            "\\u{1b}[2J  aaaaaaaaaa\\[cut: the original had 30 characters]"
        );
    }

    #[test]
    fn later_rows_keep_the_first_rows_widths() {
        let first = vec![vec!["1".to_string(), "10.0.0.1".to_string()]];
        let columns = Columns::fit(&["ID", "SOURCE"], &first);
        assert_eq!(columns.header(&["ID", "SOURCE"]), "ID  SOURCE\n");
        assert_eq!(columns.rows(&first), "1   10.0.0.1\n");
        let later = vec![
            vec!["2".to_string(), "10.0.0.2".to_string()],
            vec!["1000".to_string(), "\x1b".to_string()],
        ];
        assert_eq!(columns.rows(&later), "2   10.0.0.2\n1000  \\u{1b}\n");
    }

    #[test]
    fn no_cell_can_break_a_line_or_send_an_escape() {
        let rows = vec![vec!["a\nb\rc\u{2028}d\u{9b}2J\u{7}".to_string()]];
        let out = render(&["X"], &rows);
        assert_eq!(out.lines().count(), 2, "{out}");
        assert_eq!(crate::text::has_format_chars(&out.replace('\n', "")), None, "{out}");
    }
}
