//! OpenSSH's `allowed_signers` file (the format `ssh-keygen -Y verify` and git read):
//! one signer a line, `PRINCIPALS [OPTIONS] KEYTYPE BASE64 [COMMENT]`, with the options
//! `cert-authority`, `namespaces="..."`, `valid-after="..."` and `valid-before="..."`.
//! Principals and namespaces are pattern lists matched as OpenSSH matches them
//! ([`matches_list`]).

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use ssh_key::{Algorithm, EcdsaCurve, PublicKey};

/// One line of `allowed_signers`, as [`parse`] builds it.
#[derive(Debug, Clone)]
pub struct Signer {
    /// Who signs with this key (comma-separated in the file); for a `cert-authority`
    /// line, patterns a certificate's principals are matched against.
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
    /// The key's wire form, which a packet's key is compared with byte for byte (so an
    /// unknown key is never decoded).
    wire: Vec<u8>,
}

impl Signer {
    /// Whether this line lets its key sign in `namespace` at `now`.
    pub fn allows(&self, namespace: &str, now: DateTime<Utc>) -> bool {
        self.namespaces.as_ref().is_none_or(|n| matches_list(namespace, n))
            && self.valid_after.is_none_or(|t| now >= t)
            && self.valid_before.is_none_or(|t| now <= t)
    }

    /// Whether a certificate principal is one this line's principal patterns allow.
    pub fn allows_principal(&self, principal: &str) -> bool {
        matches_list(principal, &self.principals)
    }

    /// The key's wire form.
    pub fn wire(&self) -> &[u8] {
        &self.wire
    }

    /// A line from its parts (as the knock worker receives them), checked as [`parse`]
    /// checks a line's key.
    pub fn from_parts(
        principals: Vec<String>,
        cert_authority: bool,
        namespaces: Option<Vec<String>>,
        valid: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
        key: PublicKey,
    ) -> Result<Signer, String> {
        usable(&key)?;
        let wire = key.to_bytes().map_err(|e| format!("not a public key ({e})"))?;
        Ok(Signer {
            principals,
            cert_authority,
            namespaces,
            valid_after: valid.0,
            valid_before: valid.1,
            key,
            wire,
        })
    }
}

/// OpenSSH's `match_pattern`: `*` matches any run of bytes, `?` any one byte, every
/// other byte itself; case matters.
pub fn matches(text: &str, pattern: &str) -> bool {
    let (t, p) = (text.as_bytes(), pattern.as_bytes());
    let (mut ti, mut pi) = (0, 0);
    let mut star: Option<(usize, usize)> = None; // after the last `*`: (pattern, text)
    while ti < t.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi + 1, ti));
                pi += 1;
            }
            Some(&c) if c == b'?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                // let the last `*` take one more byte, and try again from there
                Some((sp, st)) => {
                    star = Some((sp, st + 1));
                    pi = sp;
                    ti = st + 1;
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// OpenSSH's `match_pattern_list`: true when one of the patterns matches and no
/// negated one (`!pattern`) does. So `*,!root` is everyone but root.
pub fn matches_list(text: &str, patterns: &[String]) -> bool {
    let mut positive = false;
    for pattern in patterns {
        match pattern.strip_prefix('!') {
            Some(p) if matches(text, p) => return false,
            Some(_) => {}
            None => positive |= matches(text, pattern),
        }
    }
    positive
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
    usable(&key)?;
    let wire = key.to_bytes().map_err(|e| format!("not a public key ({e})"))?;
    let mut signer = Signer {
        principals,
        cert_authority: false,
        namespaces: None,
        valid_after: None,
        valid_before: None,
        key,
        wire,
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

/// Refuses, when the file is read, a key that could never verify a knock: a type jitd
/// is built without, or an RSA key outside 2048-4096 bits (ssh-key's limits).
fn usable(key: &PublicKey) -> Result<(), String> {
    match key.algorithm() {
        Algorithm::Ed25519 | Algorithm::SkEd25519 | Algorithm::SkEcdsaSha2NistP256 => Ok(()),
        Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP256 | EcdsaCurve::NistP384,
        } => Ok(()),
        Algorithm::Rsa { .. } => {
            let n = key
                .key_data()
                .rsa()
                .and_then(|k| k.n.as_positive_bytes())
                .unwrap_or_default();
            let bits = n.len() * 8 - n.first().map_or(0, |b| b.leading_zeros() as usize);
            if (2048..=4096).contains(&bits) {
                Ok(())
            } else {
                Err(format!("an RSA key of {bits} bits: 2048 to 4096 are accepted"))
            }
        }
        other => Err(format!(
            "{} keys are not accepted (ed25519, ECDSA P-256 or P-384, RSA, or their FIDO kinds are)",
            other.as_str()
        )),
    }
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

/// `YYYYMMDD[HHMM[SS]]` as ssh-keygen reads it (OpenSSH's `parse_absolute_time`): UTC
/// with a trailing `Z` or `UTC` (either case), else the host's local time, as
/// `mktime(3)` with `tm_isdst = 0` makes of it (the `TZ` of the process, else
/// /etc/localtime). Dates that do not exist are refused rather than rolled over.
fn timestamp(value: &str) -> Result<DateTime<Utc>, String> {
    let lower = value.to_ascii_lowercase();
    let (digits, utc) = if let Some(d) = lower.strip_suffix('z') {
        (d, true)
    } else if let Some(d) = lower.strip_suffix("utc") {
        (d, true)
    } else {
        (lower.as_str(), false)
    };
    let bad = || format!("{value:?} is not YYYYMMDD[HHMM[SS]]");
    let naive = match digits.len() {
        8 => NaiveDate::parse_from_str(digits, "%Y%m%d")
            .map_err(|_| bad())?
            .and_hms_opt(0, 0, 0),
        12 => NaiveDateTime::parse_from_str(digits, "%Y%m%d%H%M").ok(),
        14 => NaiveDateTime::parse_from_str(digits, "%Y%m%d%H%M%S").ok(),
        _ => None,
    }
    .ok_or_else(bad)?;
    match utc {
        true => Ok(naive.and_utc()),
        false => local_time(&naive).ok_or_else(|| format!("{value:?} is not a time in the local time zone")),
    }
}

/// `naive` read as local time by `mktime(3)`, exactly as ssh-keygen does (`tm_isdst`
/// 0: during summer time the hour is read as standard time).
fn local_time(naive: &NaiveDateTime) -> Option<DateTime<Utc>> {
    use chrono::{Datelike, Timelike};
    // SAFETY: an all-zero `tm` is a valid value; mktime reads and normalises it and
    // touches nothing else but the C library's time zone state.
    let mut tm: nix::libc::tm = unsafe { std::mem::zeroed() };
    tm.tm_year = naive.year() - 1900;
    tm.tm_mon = naive.month0() as i32;
    tm.tm_mday = naive.day() as i32;
    tm.tm_hour = naive.hour() as i32;
    tm.tm_min = naive.minute() as i32;
    tm.tm_sec = naive.second() as i32;
    tm.tm_isdst = 0;
    // SAFETY: `tm` is a valid, exclusively borrowed `struct tm`.
    let t = unsafe { nix::libc::mktime(&mut tm) };
    (t >= 0).then(|| DateTime::from_timestamp(t, 0)).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../../tests/fixtures/knock/allowed_signers");

    #[test]
    fn a_z_or_utc_suffix_means_utc() {
        let utc: DateTime<Utc> = "2026-03-01T12:30:00Z".parse().unwrap();
        for text in ["202603011230Z", "202603011230z", "202603011230UTC", "20260301123000utc"] {
            assert_eq!(timestamp(text), Ok(utc), "{text}");
        }
        assert!(timestamp("20260230").is_err(), "no 30 February");
    }

    #[test]
    fn the_fixture_reads_with_its_options() {
        let signers = parse(FIXTURE).unwrap();
        assert_eq!(signers.len(), 6);
        assert_eq!(signers[0].principals, ["alice"]);
        assert!(signers[..5].iter().all(|s| !s.cert_authority));
        assert!(signers[5].cert_authority);
        assert_eq!(signers[5].principals, ["alice", "ops-*"]);
        assert!(signers[5].allows_principal("ops-db") && !signers[5].allows_principal("bob"));
        assert!(signers[0].namespaces.is_none());
        assert_eq!(signers[1].principals, ["bob"]);
        assert_eq!(signers[1].namespaces.as_deref(), Some(&["knock@jitd".to_string()][..]));
        // no Z: local time, as ssh-keygen reads it
        let midnight = NaiveDate::from_ymd_opt(2026, 1, 1)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap();
        let jan = local_time(&midnight).unwrap();
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

    const RSA_1024: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDcSFRV/G5exhMIN/n6jRRQJ+a82e0EE5CuqI7q3RK2J277G3yvZZMCx93cnLl1o+cBhNOGNiD2zgl0eI0ZD/VVSIUJWuVkzk87Hlqd+2lQo6JEEhwgTglO4GXqQUDA/ZSBnHa5imWg3oVoXTdQpDKx4fNilEYkqFLoCNC87BZf/Q==";
    const P521: &str = "ecdsa-sha2-nistp521 AAAAE2VjZHNhLXNoYTItbmlzdHA1MjEAAAAIbmlzdHA1MjEAAACFBAHW2llGLbpuYGCszZ+9MRrFFkYP9cLm3adXiazyGOHgzcWBdD1ouLdZF4O2z8xK+w1kXSkmUBTZXdjv4vy0cQG4VADOM9AyYpML6qNZ4We7856MGFFiPHlijW92WTPc5Qk/m+J2QUALpwoIciI9ytn3H7bQP/WKrnIrAG1/NkMSVKCTJw==";

    #[test]
    fn patterns_match_as_openssh_matches_them() {
        for (text, pattern, expected) in [
            ("alice", "alice", true),
            ("alice", "Alice", false),
            ("alice", "a*", true),
            ("alice", "*", true),
            ("", "*", true),
            ("alice", "?lice", true),
            ("alice", "?alice", false),
            ("ops-db", "ops-*", true),
            ("ops-", "ops-*", true),
            ("ops", "ops-*", false),
            ("a@example.org", "*@example.org", true),
            ("a@example.org.evil", "*@example.org", false),
            ("abcbcd", "a*bcd", true),
            ("aXbXc", "a*b*c", true),
            ("ab", "a*b*c", false),
            ("alice", "", false),
        ] {
            assert_eq!(matches(text, pattern), expected, "{text:?} {pattern:?}");
        }
        let list = |l: &str| l.split(',').map(str::to_string).collect::<Vec<_>>();
        assert!(matches_list("bob", &list("*,!root")));
        assert!(!matches_list("root", &list("*,!root")));
        assert!(
            !matches_list("root", &list("!root,*")),
            "a negation wins wherever it is"
        );
        assert!(!matches_list("bob", &list("!root")), "negations alone allow nobody");
        assert!(matches_list("knock@jitd", &list("git,knock@*")));
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
            (format!("alice {RSA_1024}\n"), "an RSA key of 1024 bits: 2048 to 4096"),
            (format!("alice {P521}\n"), "ecdsa-sha2-nistp521 keys are not accepted"),
        ] {
            let e = parse(&text).unwrap_err();
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }
}
