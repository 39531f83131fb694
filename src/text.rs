//! Text that came from callers, made safe to show and to export.
//!
//! Anything a local user sends (a source, a justification) can end up in the audit log
//! and from there on an admin's terminal or in a spreadsheet. This module owns the pure
//! functions that make such text harmless where it is shown:
//!
//! - [`escape_for_terminal`]: control characters (C0, DEL, C1), Unicode format
//!   characters (category Cf: bidi overrides, isolates and marks, zero-width
//!   characters, the BOM, ...) and the line and paragraph separators U+2028/U+2029
//!   become visible escapes, so no escape sequence reaches a terminal and no hidden
//!   character reorders or hides what is shown.
//! - [`escape_capped`]: the same, cut to a length, marked as cut; [`unchecked`]: a
//!   caller's input that failed its checks, escaped, capped and marked for storing.
//! - [`show_stored`]: stored text shown escaped once: what jitd stored escaped already
//!   (after [`UNCHECKED_MARK`]) is not escaped a second time.
//! - [`has_format_chars`]: the first such character, for refusing input at the door.
//! - [`csv_cell`]: a cell a spreadsheet will not run as a formula.
//! - [`escape_json_output`]: serialized JSON with the same characters as `\uXXXX`.
//!
//! # The escapes
//! | character | shown as |
//! |---|---|
//! | `\` | `\\` |
//! | line feed, carriage return, tab | `\n`, `\r`, `\t` |
//! | any other hidden character (see above) | `\u{…}`: its code point in lowercase hex, as Rust writes it (`\u{1b}`, `\u{202e}`) |
//!
//! Every other character is kept as it is. Because a backslash is always doubled, the
//! escaped text reads back unambiguously: a single `\` always starts an escape (or the
//! cut marker of [`escape_capped`]), never stands for itself.

use std::borrow::Cow;
use std::fmt::Write as _;

use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

/// Whether `c` must not be shown raw: control characters (Cc: C0, DEL, C1), format
/// characters (Cf) and the line/paragraph separators (Zl, Zp), which start new lines
/// in some terminals and editors.
fn is_hidden(c: char) -> bool {
    matches!(
        c.general_category(),
        GeneralCategory::Control
            | GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
    )
}

/// Appends `c` to `out`, escaped as the module documentation describes.
fn push_escaped(out: &mut String, c: char) {
    match c {
        '\\' => out.push_str(r"\\"),
        '\n' => out.push_str(r"\n"),
        '\r' => out.push_str(r"\r"),
        '\t' => out.push_str(r"\t"),
        c if is_hidden(c) => {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        }
        c => out.push(c),
    }
}

/// `s` with backslashes, control characters (C0, DEL, C1), Unicode format characters
/// (category Cf: bidi overrides and isolates, LRM/RLM/ALM, zero-width characters, BOM,
/// ...) and U+2028/U+2029 replaced by visible escapes (`\\`, `\n`, `\r`, `\t`,
/// `\u{1b}`); borrowed when there is nothing to escape.
pub fn escape_for_terminal(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c == '\\' || is_hidden(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        push_escaped(&mut out, c);
    }
    Cow::Owned(out)
}

/// [`escape_for_terminal`] of `s`, cut to at most `max_chars` characters of escaped
/// text if it is longer, followed then by the marker `\[cut: the original had N
/// characters]` (N counts the characters of `s` itself). The cut never splits an
/// escape, and since escaped text never holds a lone backslash the marker cannot be
/// forged by the input. With the marker the result is at most `max_chars` + 56
/// characters long.
pub fn escape_capped(s: &str, max_chars: usize) -> String {
    let escaped = escape_for_terminal(s);
    if escaped.chars().count() <= max_chars {
        return escaped.into_owned();
    }
    let mut out = String::new();
    let mut kept = 0;
    let mut piece = String::new();
    for c in s.chars() {
        piece.clear();
        push_escaped(&mut piece, c);
        let len = piece.chars().count();
        if kept + len > max_chars {
            break;
        }
        out.push_str(&piece);
        kept += len;
    }
    let _ = write!(out, "\\[cut: the original had {} characters]", s.chars().count());
    out
}

/// The label that marks a copy of a caller's input that did not pass its checks, as
/// jitd stores it: escaped already ([`escape_capped`]), so the log holds no raw byte.
pub const UNCHECKED_MARK: &str = "(unchecked input, escaped) ";

/// The longest copy of a caller's unchecked input that goes into the audit log, in
/// escaped characters.
pub const UNCHECKED_CHARS: usize = 80;

/// A caller's input that did not pass the checks, as it may be stored: escaped, cut
/// short and marked with [`UNCHECKED_MARK`]. [`show_stored`] shows it as it is.
pub fn unchecked(text: &str) -> String {
    format!("{UNCHECKED_MARK}{}", escape_capped(text, UNCHECKED_CHARS))
}

/// Stored text (an audit field, a message from jitd) made safe to show, escaped once:
/// like [`escape_for_terminal`], except that the part after an [`UNCHECKED_MARK`], which
/// jitd stored escaped already, is shown as it is when it is well-formed escaped text
/// (no hidden character, every backslash starting an escape of the module's table or
/// the cut marker). Anything else, a hand-made record say, is escaped as usual: nothing
/// hidden is ever shown raw.
pub fn show_stored(s: &str) -> Cow<'_, str> {
    let Some(at) = s.find(UNCHECKED_MARK) else {
        return escape_for_terminal(s);
    };
    let (head, rest) = s.split_at(at + UNCHECKED_MARK.len());
    if !is_escaped_text(rest) {
        return escape_for_terminal(s);
    }
    match escape_for_terminal(head) {
        Cow::Borrowed(_) => Cow::Borrowed(s),
        Cow::Owned(head) => Cow::Owned(head + rest),
    }
}

/// Whether `s` reads as the output of [`escape_capped`]: no hidden character, and each
/// backslash starts `\\`, `\n`, `\r`, `\t`, `\u{HEX}` or, at the very end, the cut marker.
fn is_escaped_text(s: &str) -> bool {
    if has_format_chars(s).is_some() {
        return false;
    }
    let mut rest = s;
    while let Some(at) = rest.find('\\') {
        let after = &rest[at + 1..];
        let len = match after.chars().next() {
            Some('\\' | 'n' | 'r' | 't') => 1,
            Some('u') => match after.find('}') {
                Some(end) if after.starts_with("u{") && (3..=8).contains(&end) => {
                    if !after[2..end].chars().all(|c| c.is_ascii_hexdigit()) {
                        return false;
                    }
                    end + 1
                }
                _ => return false,
            },
            Some('[') => return is_cut_marker(after),
            _ => return false,
        };
        rest = &after[len..];
    }
    true
}

/// Whether `s` is exactly `[cut: the original had N characters]`.
fn is_cut_marker(s: &str) -> bool {
    s.strip_prefix("[cut: the original had ")
        .and_then(|r| r.strip_suffix(" characters]"))
        .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}

/// Whether `s` is exactly `len` lower-case hex digits (ids, nonces, digests).
pub fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The first character of `s` that [`escape_for_terminal`] would hide behind an escape
/// (a control character, a Unicode format character (Cf) or U+2028/U+2029), if any;
/// the backslash, which is merely doubled, does not count.
pub fn has_format_chars(s: &str) -> Option<char> {
    s.chars().find(|&c| is_hidden(c))
}

/// Characters that make a spreadsheet read a cell as a formula when it starts with
/// them (OWASP, "CSV Injection"), with their full-width forms, which some spreadsheet
/// programs fold to the ASCII ones.
const FORMULA_STARTS: [char; 10] = ['=', '+', '-', '@', '\t', '\r', '＝', '＋', '－', '＠'];

/// A CSV cell for `s`: [`show_stored`] of it (escaped once), and if `s` starts (after any
/// spaces) with `=`, `+`, `-`, `@`, a tab or a carriage return (or the full-width
/// `＝＋－＠`), prefixed with a single quote `'` so that spreadsheets take it as text
/// (OWASP's advice against CSV injection). Quoting of commas and quotes is left to the
/// CSV writer.
pub fn csv_cell(s: &str) -> Cow<'_, str> {
    let escaped = show_stored(s);
    let first = s.trim_start_matches([' ', '\u{a0}', '\u{3000}']).chars().next();
    match first {
        Some(c) if FORMULA_STARTS.contains(&c) => Cow::Owned(format!("'{escaped}")),
        _ => escaped,
    }
}

/// `json`, text serialized by serde_json, with every hidden character that serde_json
/// leaves raw (DEL, C1 controls, format characters such as U+202E, U+2028/U+2029)
/// written as a JSON `\uXXXX` escape (a surrogate pair above U+FFFF). The JSON means
/// exactly the same to a parser; only a terminal showing it sees the difference.
///
/// `json` must be valid JSON: outside strings it may hold only ASCII structure and
/// whitespace, which is kept.
pub fn escape_json_output(json: &str) -> Cow<'_, str> {
    let escape = |c: char| is_hidden(c) && !matches!(c, '\n' | '\r' | '\t');
    if !json.chars().any(escape) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if escape(c) {
            for unit in c.encode_utf16(&mut [0; 2]) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        for s in ["", "ticket 4711", "203.0.113.7/32", "Ünïcødé ok, 日本語, emoji 🦀"] {
            assert!(matches!(escape_for_terminal(s), Cow::Borrowed(t) if t == s), "{s}");
            assert_eq!(has_format_chars(s), None, "{s}");
        }
    }

    #[test]
    fn terminal_sequences_become_visible() {
        assert_eq!(escape_for_terminal("\x1b[2Jgone"), r"\u{1b}[2Jgone");
        assert_eq!(
            escape_for_terminal("\x1b]0;pwned\x07title"),
            r"\u{1b}]0;pwned\u{7}title",
            "OSC 0 with BEL"
        );
        assert_eq!(
            escape_for_terminal("\x1b]0;pwned\x1b\\"),
            r"\u{1b}]0;pwned\u{1b}\\",
            "OSC 0 with ST"
        );
        assert_eq!(escape_for_terminal("a\u{9b}31mred"), r"a\u{9b}31mred", "C1 CSI");
        assert_eq!(escape_for_terminal("del\u{7f}"), r"del\u{7f}");
        assert_eq!(escape_for_terminal("a\nb\r\tc\0"), r"a\nb\r\tc\u{0}");
    }

    #[test]
    fn bidi_and_invisible_characters_become_visible() {
        assert_eq!(escape_for_terminal("abc\u{202e}fed"), r"abc\u{202e}fed", "RLO");
        assert_eq!(escape_for_terminal("x\u{200b}y"), r"x\u{200b}y", "ZWSP");
        assert_eq!(escape_for_terminal("\u{2066}iso\u{2069}"), r"\u{2066}iso\u{2069}");
        let listed = [
            '\u{202a}',
            '\u{202b}',
            '\u{202c}',
            '\u{202d}',
            '\u{202e}',
            '\u{2066}',
            '\u{2067}',
            '\u{2068}',
            '\u{2069}',
            '\u{200e}',
            '\u{200f}',
            '\u{61c}',
            '\u{200b}',
            '\u{200c}',
            '\u{200d}',
            '\u{2060}',
            '\u{feff}',
            '\u{ad}',
            '\u{e0041}',
            '\u{2028}',
            '\u{2029}',
        ];
        for c in listed {
            let s = c.to_string();
            assert_eq!(escape_for_terminal(&s), format!("\\u{{{:x}}}", u32::from(c)));
            assert_eq!(has_format_chars(&format!("ok {c}")), Some(c));
        }
    }

    #[test]
    fn backslashes_are_doubled_so_escapes_cannot_be_faked() {
        assert_eq!(escape_for_terminal(r"C:\temp"), r"C:\\temp");
        assert_eq!(escape_for_terminal(r"\u{1b}"), r"\\u{1b}");
        assert_ne!(escape_for_terminal(r"\u{1b}"), escape_for_terminal("\x1b"));
        assert_eq!(has_format_chars(r"a\b"), None, "a backslash is shown, not refused");
    }

    #[test]
    fn has_format_chars_finds_the_first() {
        assert_eq!(has_format_chars("a\u{200b}b\x1b"), Some('\u{200b}'));
        assert_eq!(has_format_chars("tab\there"), Some('\t'));
        assert_eq!(has_format_chars("\u{9b}"), Some('\u{9b}'));
    }

    #[test]
    fn capping_keeps_short_text_and_marks_cut_text() {
        assert_eq!(escape_capped("short", 5), "short");
        assert_eq!(escape_capped("a\x1b", 7), r"a\u{1b}");
        assert_eq!(escape_capped("abcdef", 3), r"abc\[cut: the original had 6 characters]");
        // characters, not bytes: five 3-byte characters keep 3 whole characters
        assert_eq!(
            escape_capped("日本語日本", 3),
            r"日本語\[cut: the original had 5 characters]"
        );
        assert_eq!(escape_capped("é🦀é🦀", 2), r"é🦀\[cut: the original had 4 characters]");
    }

    #[test]
    fn capping_never_splits_an_escape() {
        // "a" + "\u{1b}" is 7 characters; at 5 the escape does not fit and is left out
        assert_eq!(escape_capped("a\x1bbc", 5), r"a\[cut: the original had 4 characters]");
        assert_eq!(
            escape_capped(r"\\\", 3),
            r"\\\[cut: the original had 3 characters]",
            "one doubled backslash, then the marker's own"
        );
        let long = "\u{202e}".repeat(1000);
        let capped = escape_capped(&long, 100);
        assert!(capped.starts_with(r"\u{202e}\u{202e}"));
        assert!(capped.ends_with(r"\[cut: the original had 1000 characters]"));
        assert!(capped.chars().count() <= 100 + 56);
        assert_eq!(has_format_chars(&capped), None);
    }

    #[test]
    fn stored_unchecked_input_is_shown_escaped_once() {
        let stored = unchecked("10.0.0.1\x1b[2J\\x\u{202e}");
        assert_eq!(stored, r"(unchecked input, escaped) 10.0.0.1\u{1b}[2J\\x\u{202e}");
        assert_eq!(show_stored(&stored), stored, "not escaped a second time");
        let reason = format!("invalid_argument: source: not an address, got {stored}");
        assert_eq!(show_stored(&reason), reason);
        let long = unchecked(&"\x1b".repeat(100));
        assert!(long.ends_with(r"\[cut: the original had 100 characters]"), "{long}");
        assert_eq!(show_stored(&long), long);
        assert_eq!(csv_cell(&stored), stored);
    }

    #[test]
    fn stored_text_that_is_not_well_formed_is_escaped_as_usual() {
        // raw text, and text after the mark that jitd cannot have written
        assert_eq!(show_stored("a\x1b\\b"), r"a\u{1b}\\b");
        let raw_after = format!("{UNCHECKED_MARK}\x1b[2J");
        assert_eq!(show_stored(&raw_after), format!("{UNCHECKED_MARK}\\u{{1b}}[2J"));
        for bad in [
            r"\q",
            r"\u{zz}",
            r"\u{}",
            r"\u{1234567}",
            r"\",
            r"\[cut: x]",
            r"\[cut: the original had 3 characters]x",
        ] {
            let s = format!("{UNCHECKED_MARK}{bad}");
            assert_eq!(show_stored(&s), escape_for_terminal(&s), "{bad}");
        }
        // the head before the mark is escaped all the same
        let s = format!("\x1b {UNCHECKED_MARK}ok");
        assert_eq!(show_stored(&s), format!(r"\u{{1b}} {UNCHECKED_MARK}ok"));
        assert_eq!(
            has_format_chars(&show_stored(&format!("{UNCHECKED_MARK}{}", '\u{202e}'))),
            None
        );
    }

    #[test]
    fn csv_cells_starting_like_formulas_are_quoted() {
        for (raw, cell) in [
            ("=cmd|' /C calc'!A0", "'=cmd|' /C calc'!A0"),
            ("@SUM(1)", "'@SUM(1)"),
            ("+1", "'+1"),
            ("-1", "'-1"),
            ("-", "'-"),
            ("\tx", r"'\tx"),
            ("\r=1", r"'\r=1"),
            ("  =1+1", "'  =1+1"),
            ("＝1+1", "'＝1+1"),
        ] {
            assert_eq!(csv_cell(raw), cell, "{raw:?}");
        }
    }

    #[test]
    fn csv_cells_are_terminal_escaped_and_otherwise_unchanged() {
        assert_eq!(csv_cell("ticket 4711"), "ticket 4711");
        assert_eq!(csv_cell("203.0.113.7"), "203.0.113.7");
        assert_eq!(csv_cell("a=b"), "a=b", "only a leading trigger counts");
        assert_eq!(csv_cell("x\x1b[2J"), r"x\u{1b}[2J");
        assert_eq!(csv_cell("=\u{202e}"), r"'=\u{202e}");
        assert_eq!(csv_cell(""), "");
    }

    #[test]
    fn json_output_keeps_its_meaning_and_hides_nothing() {
        let value = serde_json::json!({
            "j": "a\u{202e}b\u{200b}c\u{9b}d\u{7f}e\u{2028}f\u{e0041}\x1b[2J\\ \"q\"",
            "n": [1, 2],
        });
        let raw = serde_json::to_string_pretty(&value).unwrap();
        assert!(raw.contains('\u{202e}'), "serde_json leaves it raw");
        let safe = escape_json_output(&raw);
        assert_eq!(has_format_chars(&safe.replace(['\n'], "")), None, "{safe}");
        assert!(safe.contains(r"\u202e") && safe.contains(r"\udb40\udc41"), "{safe}");
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, value);
        assert!(matches!(escape_json_output("{\n  \"a\": 1\n}"), Cow::Borrowed(_)));
    }
}
