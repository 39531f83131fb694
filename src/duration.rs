//! Parsing and printing of durations as people write them: humantime
//! (`90s`, `1h30m`) or ISO 8601 (`PT3H`, Azure's format).

use std::time::Duration;

/// Parses `90s`, `1h30m`, `2h` (humantime) or `PT3H`, `P1DT2H` (ISO 8601).
///
/// The error says what was expected; callers add the field name.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    if text.starts_with('P') || text.starts_with('p') {
        return parse_iso8601(text);
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("not a duration ({e}); write e.g. \"90s\", \"1h30m\" or ISO 8601 \"PT3H\""))
}

fn parse_iso8601(text: &str) -> Result<Duration, String> {
    let upper = text.to_ascii_uppercase();
    match iso8601::parsers::parse_duration(upper.as_bytes()) {
        Ok((b"", parsed)) => {
            if matches!(parsed, iso8601::Duration::YMDHMS { year, month, .. } if year > 0 || month > 0) {
                return Err("years and months have no fixed length; use days (P1D) or hours".into());
            }
            Ok(parsed.into())
        }
        _ => Err("not an ISO 8601 duration; write e.g. \"PT3H\" or \"PT1H30M\"".into()),
    }
}

/// Formats a duration the way config files write it (`3h`, `1h 30m`), whole seconds only.
pub fn format(duration: Duration) -> String {
    humantime::format_duration(Duration::from_secs(duration.as_secs())).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humantime_and_iso8601_agree() {
        assert_eq!(parse("3h").unwrap(), Duration::from_secs(3 * 3600));
        assert_eq!(parse("PT3H").unwrap(), Duration::from_secs(3 * 3600));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("PT1H30M").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("P1D").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse("90s").unwrap(), Duration::from_secs(90));
    }

    #[test]
    fn rejects_garbage_and_trailing_text() {
        assert!(parse("").is_err());
        assert!(parse("soon").is_err());
        assert!(parse("PT3Hxyz").is_err());
        assert!(parse("P1M").unwrap_err().contains("months"));
    }

    #[test]
    fn formats_whole_seconds() {
        assert_eq!(format(Duration::from_millis(5_400_900)), "1h 30m");
    }
}
