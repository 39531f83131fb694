//! OpenSSH's `allowed_signers` file (the format `ssh-keygen -Y verify` and git read):
//! one signer a line, `PRINCIPALS [OPTIONS] KEYTYPE BASE64 [COMMENT]`, with the options
//! `cert-authority`, `namespaces="..."`, `valid-after="..."` and `valid-before="..."`.

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use ssh_key::PublicKey;

/// One line of `allowed_signers`.
#[derive(Debug, Clone)]
pub struct Signer {
    /// Who signs with this key (comma-separated in the file).
    pub principals: Vec<String>,
    /// The key signs certificates rather than requests.
    pub cert_authority: bool,
    /// The namespaces the key may sign for; `None`: any.
    pub namespaces: Option<Vec<String>>,
    /// Not valid before this time.
    pub valid_after: Option<DateTime<Utc>>,
    /// Not valid after this time.
    pub valid_before: Option<DateTime<Utc>>,
    /// The key.
    pub key: PublicKey,
}

impl Signer {
    /// Whether this line lets its key sign in `namespace` at `now`.
    pub fn allows(&self, namespace: &str, now: DateTime<Utc>) -> bool {
        self.namespaces
            .as_ref()
            .is_none_or(|n| n.iter().any(|x| x == namespace))
            && self.valid_after.is_none_or(|t| now >= t)
            && self.valid_before.is_none_or(|t| now <= t)
    }
}

/// Reads an `allowed_signers` file's text; a bad line is refused naming its number
/// and why (a file with one bad line is not half-trusted).
pub fn parse(text: &str) -> Result<Vec<Signer>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|(i, l)| line(l.trim()).map_err(|e| format!("allowed_signers line {}: {e}", i + 1)))
        .collect()
}

fn line(text: &str) -> Result<Signer, String> {
    let (principals, rest) = text.split_once([' ', '\t']).ok_or("no key")?;
    let principals: Vec<String> = principals.split(',').map(str::to_string).collect();
    if principals.iter().any(|p| p.is_empty()) {
        return Err("an empty principal".into());
    }
    let rest = rest.trim_start();
    let (options, key_text) = if starts_with_key_type(rest) {
        ("", rest)
    } else {
        split_options(rest)?
    };
    let key = PublicKey::from_openssh(key_text).map_err(|e| format!("not a public key ({e})"))?;
    let mut signer = Signer {
        principals,
        cert_authority: false,
        namespaces: None,
        valid_after: None,
        valid_before: None,
        key,
    };
    for option in options_list(options)? {
        match option.split_once('=') {
            None if option.eq_ignore_ascii_case("cert-authority") => signer.cert_authority = true,
            Some((name, value)) => {
                let value = value
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .ok_or_else(|| format!("option {name}: the value must be quoted"))?;
                match name.to_ascii_lowercase().as_str() {
                    "namespaces" => signer.namespaces = Some(value.split(',').map(str::to_string).collect()),
                    "valid-after" => signer.valid_after = Some(timestamp(value)?),
                    "valid-before" => signer.valid_before = Some(timestamp(value)?),
                    _ => return Err(format!("unknown option {name:?}")),
                }
            }
            None => return Err(format!("unknown option {option:?}")),
        }
    }
    Ok(signer)
}

fn starts_with_key_type(text: &str) -> bool {
    ["ssh-", "ecdsa-", "sk-"].iter().any(|p| text.starts_with(p))
}

/// Splits `OPTIONS KEY...` where OPTIONS may hold quoted spaces.
fn split_options(text: &str) -> Result<(&str, &str), String> {
    let mut quoted = false;
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ' ' | '\t' if !quoted => return Ok((&text[..i], text[i..].trim_start())),
            _ => {}
        }
    }
    Err("no key after the options".into())
}

/// The comma-separated options, commas inside quotes kept.
fn options_list(text: &str) -> Result<Vec<&str>, String> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let (mut out, mut start, mut quoted) = (Vec::new(), 0, false);
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted {
        return Err("an unterminated quote in the options".into());
    }
    out.push(&text[start..]);
    Ok(out)
}

/// `YYYYMMDD[HHMM[SS]]`, UTC with a trailing `Z`, else UTC too (jitd runs in UTC terms).
fn timestamp(value: &str) -> Result<DateTime<Utc>, String> {
    let digits = value.strip_suffix('Z').unwrap_or(value);
    let bad = || format!("{value:?} is not YYYYMMDD[HHMM[SS]]");
    let naive = match digits.len() {
        8 => NaiveDate::parse_from_str(digits, "%Y%m%d")
            .map_err(|_| bad())?
            .and_hms_opt(0, 0, 0),
        12 => NaiveDateTime::parse_from_str(digits, "%Y%m%d%H%M").ok(),
        14 => NaiveDateTime::parse_from_str(digits, "%Y%m%d%H%M%S").ok(),
        _ => None,
    };
    naive.map(|n| n.and_utc()).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../../tests/fixtures/knock/allowed_signers");

    #[test]
    fn the_fixture_reads_with_its_options() {
        let signers = parse(FIXTURE).unwrap();
        assert_eq!(signers.len(), 2);
        assert_eq!(signers[0].principals, ["alice"]);
        assert!(signers[0].namespaces.is_none());
        assert_eq!(signers[1].principals, ["bob"]);
        assert_eq!(signers[1].namespaces.as_deref(), Some(&["knock@jitd".to_string()][..]));
        let jan = "2026-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(signers[1].valid_after, Some(jan));
        assert!(signers[1].allows("knock@jitd", jan));
        assert!(!signers[1].allows("git", jan), "another namespace");
        assert!(!signers[1].allows("knock@jitd", jan - chrono::TimeDelta::seconds(1)));
    }

    #[test]
    fn a_ca_line_with_quoted_commas_and_a_comment_reads() {
        let key = FIXTURE.lines().next().unwrap().split_once(' ').unwrap().1;
        let text =
            format!("# the team CA\n*@example.org,root cert-authority,namespaces=\"knock@jitd,git\" {key} team ca\n");
        let s = &parse(&text).unwrap()[0];
        assert!(s.cert_authority);
        assert_eq!(s.principals, ["*@example.org", "root"]);
        assert_eq!(s.namespaces.as_ref().unwrap().len(), 2);
    }

    #[test]
    fn a_bad_line_is_refused_naming_it() {
        let key = FIXTURE.lines().next().unwrap().split_once(' ').unwrap().1;
        for (text, why) in [
            ("alice\n".to_string(), "line 1: no key"),
            (
                "alice ssh-ed25519 AAAAnotbase64\n".to_string(),
                "line 1: not a public key",
            ),
            (format!("\nalice frobnicate {key}\n"), "line 2: unknown option"),
            (format!("alice namespaces=knock@jitd {key}\n"), "must be quoted"),
            (format!("alice valid-after=\"2026\" {key}\n"), "YYYYMMDD"),
            (
                format!("alice namespaces=\"knock@jitd {key}\n"),
                "no key after the options",
            ),
            (format!(",alice {key}\n"), "empty principal"),
        ] {
            let e = parse(&text).unwrap_err();
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }
}
