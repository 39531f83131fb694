//! Aligned text tables for `jitctl`'s human output. Every cell is escaped with
//! [`crate::text::show_stored`] here (once: what jitd stored escaped already is not
//! escaped again), in the one place tables are drawn, so no
//! caller-supplied text (a source, a justification, a reason) reaches a terminal raw.

use crate::text::show_stored;

/// `headers` and `rows` as left-aligned columns two spaces apart, one line per row
/// (each ending in `\n`, trailing spaces trimmed); cells are escaped for the terminal
/// and columns are as wide as their widest escaped cell, in characters.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let escaped: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|c| show_stored(c).into_owned()).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &escaped {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    };
    line(headers);
    for row in &escaped {
        line(&row.iter().map(String::as_str).collect::<Vec<_>>());
    }
    out
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
    fn no_cell_can_break_a_line_or_send_an_escape() {
        let rows = vec![vec!["a\nb\rc\u{2028}d\u{9b}2J\u{7}".to_string()]];
        let out = render(&["X"], &rows);
        assert_eq!(out.lines().count(), 2, "{out}");
        assert_eq!(crate::text::has_format_chars(&out.replace('\n', "")), None, "{out}");
    }
}
