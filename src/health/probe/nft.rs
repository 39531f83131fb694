//! Reads the host's nftables ruleset for the doctor: every table but jitd's own, one
//! `nft -j -f -` run per table (the command given as JSON on stdin, so no table name
//! can be read as a command), each bounded in time and size; and the options of
//! iptables-nft matches over netlink ([`read_xt`]), which nft's JSON leaves out.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::firewall::netlink::{self, parse_attrs, Reader};
use crate::health::ruleset::model::ChainId;
use crate::health::ruleset::xt::XtMatch;
use crate::health::ruleset::Ruleset;

/// How long one `nft` run may take.
const NFT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most output one `nft` run may print.
const MAX_LISTING: u64 = 64 * 1024 * 1024;
/// The most tables read.
const MAX_TABLES: usize = 256;

/// One table as read: its listing (nft's JSON) and its iptables-nft matches.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Listing {
    /// `nft -j list table FAMILY NAME`.
    pub json: Value,
    /// The xtables matches of its rules (see [`read_xt`]).
    pub xt: Vec<XtRule>,
}

/// The xtables matches of one rule.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct XtRule {
    /// The rule's chain.
    pub chain: ChainId,
    /// Its handle.
    pub handle: u64,
    /// Its matches, in order.
    pub matches: Vec<XtMatch>,
}

/// The ruleset without jitd's table, or why it could not be read.
pub async fn read_ruleset(program: &str) -> Result<Ruleset, String> {
    let mut ruleset = Ruleset::default();
    for listing in read_listings(program).await? {
        add(&mut ruleset, listing)?;
    }
    Ok(ruleset)
}

/// Adds one table's listing to `ruleset`.
pub fn add(ruleset: &mut Ruleset, listing: Listing) -> Result<(), String> {
    let bytes = serde_json::to_vec(&listing.json).expect("a value serializes");
    ruleset.add_listing(&bytes)?;
    for rule in listing.xt {
        ruleset.xt.insert((rule.chain, rule.handle), rule.matches);
    }
    Ok(())
}

/// Every table but jitd's, as read.
pub async fn read_listings(program: &str) -> Result<Vec<Listing>, String> {
    let tables = run(program, json!({"list": {"tables": null}})).await?;
    let tables = table_names(&tables)?;
    if tables.len() > MAX_TABLES {
        return Err(format!(
            "the ruleset has {} tables, more than the {MAX_TABLES} jitd reads",
            tables.len()
        ));
    }
    let mut listings = Vec::new();
    for (family, name) in tables {
        if (family.as_str(), name.as_str()) == ("inet", crate::firewall::rules::TABLE) {
            continue;
        }
        let bytes = match run(program, json!({"list": {"table": {"family": family, "name": name}}})).await {
            Ok(bytes) => bytes,
            // deleted between the two listings
            Err(e) if e.contains("No such file or directory") => continue,
            Err(e) => return Err(e),
        };
        let json: Value = serde_json::from_slice(&bytes)
            .map_err(|e| format!("table {family} {name}: nft printed invalid JSON: {e}"))?;
        let mut xt = Vec::new();
        if bytes.windows(5).any(|w| w == b"\"xt\":") {
            let found = tokio::task::spawn_blocking(move || read_xt(&family, &name))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("reading the iptables-nft matches over netlink: {e}"))?;
            xt = found
                .into_iter()
                .map(|((chain, handle), matches)| XtRule { chain, handle, matches })
                .collect();
            xt.sort_by(|a: &XtRule, b: &XtRule| (&a.chain, a.handle).cmp(&(&b.chain, b.handle)));
        }
        listings.push(Listing { json, xt });
    }
    Ok(listings)
}

fn table_names(listing: &[u8]) -> Result<Vec<(String, String)>, String> {
    let doc: Value = serde_json::from_slice(listing).map_err(|e| format!("nft printed invalid JSON: {e}"))?;
    Ok(doc["nftables"]
        .as_array()
        .ok_or("nft's JSON has no \"nftables\" array")?
        .iter()
        .filter_map(|o| {
            let t = o.get("table")?;
            Some((t["family"].as_str()?.to_string(), t["name"].as_str()?.to_string()))
        })
        .collect())
}

/// Runs `nft -j -f -` with one command; its output, or its error message.
async fn run(program: &str, command: Value) -> Result<Vec<u8>, String> {
    let mut child = Command::new(program)
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e} (is the nftables package installed?)"))?;
    let input = serde_json::to_vec(&json!({"nftables": [command]})).expect("a command serializes");
    let mut stdin = child.stdin.take().expect("piped");
    let mut stdout = child.stdout.take().expect("piped").take(MAX_LISTING + 1);
    let mut stderr = child.stderr.take().expect("piped").take(64 * 1024);
    let work = async {
        let _ = stdin.write_all(&input).await;
        drop(stdin);
        let mut out = Vec::new();
        let mut err = Vec::new();
        let (read, _) = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
        read.map_err(|e| e.to_string())?;
        if out.len() as u64 > MAX_LISTING {
            return Err(format!("nft printed more than {MAX_LISTING} bytes; not analysed"));
        }
        let status = child.wait().await.map_err(|e| e.to_string())?;
        if status.success() {
            Ok(out)
        } else {
            Err(String::from_utf8_lossy(&err)
                .lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("; "))
        }
    };
    tokio::time::timeout(NFT_TIMEOUT, work)
        .await
        .map_err(|_| format!("nft did not answer within {}s", NFT_TIMEOUT.as_secs()))?
}

/// nfnetlink's numbers for what [`read_xt`] asks.
const NFT_MSG_GETRULE: u16 = 7;
const RULE_TABLE: u16 = 1;
const RULE_CHAIN: u16 = 2;
const RULE_HANDLE: u16 = 3;
const RULE_EXPRESSIONS: u16 = 4;
const LIST_ELEM: u16 = 1;
const EXPR_NAME: u16 = 1;
const EXPR_DATA: u16 = 2;
const MATCH_NAME: u16 = 1;
const MATCH_REV: u16 = 2;
const MATCH_INFO: u16 = 3;

fn nfproto(family: &str) -> Option<u8> {
    Some(match family {
        "inet" => 1,
        "ip" => 2,
        "arp" => 3,
        "netdev" => 5,
        "bridge" => 7,
        "ip6" => 10,
        _ => return None,
    })
}

/// The xtables matches of every rule of table `family name`, in rule order.
pub fn read_xt(family: &str, table: &str) -> std::io::Result<HashMap<(ChainId, u64), Vec<XtMatch>>> {
    let mut found = HashMap::new();
    let Some(proto) = nfproto(family) else {
        return Ok(found);
    };
    let mut reader = Reader::open()?;
    let mut name = table.as_bytes().to_vec();
    name.push(0);
    let rules = reader
        .request_to(
            netlink::NFNL_SUBSYS_NFTABLES,
            NFT_MSG_GETRULE,
            proto,
            true,
            &[(RULE_TABLE, name)],
        )?
        .unwrap_or_default();
    for rule in rules {
        if rule.string(RULE_TABLE).as_deref() != Some(table) {
            continue;
        }
        let (Some(chain), Some(handle)) = (rule.string(RULE_CHAIN), rule.get(RULE_HANDLE)) else {
            continue;
        };
        let Ok(handle) = <[u8; 8]>::try_from(handle).map(u64::from_be_bytes) else {
            continue;
        };
        let matches = xt_matches(rule.get(RULE_EXPRESSIONS).unwrap_or_default());
        if !matches.is_empty() {
            let id = ChainId {
                family: family.to_string(),
                table: table.to_string(),
                chain,
            };
            found.insert((id, handle), matches);
        }
    }
    Ok(found)
}

/// The `match` expressions of a rule's expression list.
pub fn xt_matches(expressions: &[u8]) -> Vec<XtMatch> {
    let mut found = Vec::new();
    for elem in parse_attrs(expressions).into_iter().filter(|a| a.kind == LIST_ELEM) {
        let attrs = parse_attrs(&elem.value);
        let get = |kind| attrs.iter().find(|a| a.kind == kind).map(|a| a.value.as_slice());
        if get(EXPR_NAME).map(|n| n.strip_suffix(b"\0").unwrap_or(n)) != Some(b"match") {
            continue;
        }
        let data = parse_attrs(get(EXPR_DATA).unwrap_or_default());
        let field = |kind| data.iter().find(|a| a.kind == kind).map(|a| a.value.as_slice());
        let name = field(MATCH_NAME).map(|n| String::from_utf8_lossy(n).trim_end_matches('\0').to_string());
        let rev = field(MATCH_REV)
            .and_then(|r| <[u8; 4]>::try_from(r).ok())
            .map(u32::from_be_bytes);
        found.push(XtMatch {
            name: name.unwrap_or_default(),
            rev: rev.unwrap_or(u32::MAX),
            info: hex::encode(field(MATCH_INFO).unwrap_or_default()),
        });
    }
    found
}
