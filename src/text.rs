//! Untrusted text made safe to store and show (placeholder until the full module lands).

/// The first control or Unicode format character in `s`.
pub fn has_format_chars(s: &str) -> Option<char> {
    s.chars().find(|c| {
        c.is_control()
            || matches!(*c as u32, 0xAD | 0x600..=0x605 | 0x61C | 0x6DD | 0x70F | 0x180E | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x2064 | 0x2066..=0x206F | 0xFEFF | 0xFFF9..=0xFFFB)
    })
}

/// `s` with every control and format character escaped, cut to `max_chars`.
pub fn escape_capped(s: &str, max_chars: usize) -> String {
    let escaped: String = s
        .chars()
        .flat_map(|c| {
            if c == '\\' || has_format_chars(c.encode_utf8(&mut [0; 4])).is_some() {
                format!("\\u{{{:x}}}", c as u32).chars().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    let total = s.chars().count();
    if escaped.chars().count() <= max_chars {
        return escaped;
    }
    let cut: String = escaped.chars().take(max_chars).collect();
    format!("{cut}… (cut, {total} characters in all)")
}
