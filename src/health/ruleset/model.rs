//! The nftables ruleset as `nft -j list table ...` prints it, read into chains, rules,
//! and set elements (pure). Objects jitd does not need are skipped; malformed ones are
//! counted, never trusted.

use std::collections::HashMap;

use serde_json::Value;

/// The most objects one ruleset may hold before jitd stops reading it (a bound on the
/// memory and time one doctor run can take).
pub const MAX_OBJECTS: usize = 200_000;

/// A chain's address: family, table and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct ChainId {
    /// `ip`, `ip6`, `inet`, `netdev`, `bridge` or `arp`.
    pub family: String,
    /// The table's name.
    pub table: String,
    /// The chain's name.
    pub chain: String,
}

impl std::fmt::Display for ChainId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "table {} {} chain {}", self.family, self.table, self.chain)
    }
}

/// What makes a chain a base chain: the hook it sees packets on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    /// `filter`, `nat` or `route`.
    pub kind: String,
    /// `prerouting`, `input`, `ingress`, ...
    pub hook: String,
    /// Its priority (lower runs first).
    pub prio: i64,
    /// Whether a packet that falls off the end is dropped (`policy drop`).
    pub policy_drop: bool,
}

/// One rule: its handle and its expressions as nftables' JSON has them.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The rule's handle (`nft -a list chain ...` shows it).
    pub handle: u64,
    /// Its expressions in order: matches, then statements, then at most one verdict.
    pub expr: Vec<Value>,
}

/// A chain and its rules in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Chain {
    /// Set when it is a base chain.
    pub base: Option<Base>,
    /// Its rules.
    pub rules: Vec<Rule>,
}

/// A named set or map's elements: keys, or `[key, data]` pairs for maps.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedSet {
    /// The elements, as listed; `None` when the listing left them out.
    pub elements: Option<Vec<Value>>,
}

/// The ruleset read from one or more `nft -j` listings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ruleset {
    /// Every chain.
    pub chains: HashMap<ChainId, Chain>,
    /// Named sets and maps, by family, table and name (`ChainId::chain` holds the set's name).
    pub sets: HashMap<ChainId, NamedSet>,
    /// Tables that are dormant (their chains see no packets).
    pub dormant: Vec<(String, String)>,
    /// Objects that could not be read (missing fields), skipped.
    pub skipped: usize,
    /// The iptables-nft matches (`xt`) of rules that have them, read over netlink
    /// (nft's JSON names them only), by chain and rule handle.
    pub xt: HashMap<(ChainId, u64), Vec<super::xt::XtMatch>>,
}

impl Ruleset {
    /// Reads one listing (`{"nftables": [...]}`) into the ruleset; an error names what
    /// is wrong with the document as a whole.
    pub fn add_listing(&mut self, json: &[u8]) -> Result<(), String> {
        let doc: Value = serde_json::from_slice(json).map_err(|e| format!("nft printed invalid JSON: {e}"))?;
        let objects = doc
            .get("nftables")
            .and_then(Value::as_array)
            .ok_or("nft's JSON has no \"nftables\" array")?;
        if self.objects() + objects.len() > MAX_OBJECTS {
            return Err(format!("the ruleset has more than {MAX_OBJECTS} objects; not analysed"));
        }
        let mut rules = Vec::new();
        for object in objects {
            if !self.add_object(object, &mut rules) {
                self.skipped += 1;
            }
        }
        // rules come after their chains in a listing, but do not rely on it
        for (id, rule) in rules {
            match self.chains.get_mut(&id) {
                Some(chain) => chain.rules.push(rule),
                None => self.skipped += 1,
            }
        }
        Ok(())
    }

    fn objects(&self) -> usize {
        self.chains.values().map(|c| c.rules.len() + 1).sum::<usize>() + self.sets.len()
    }

    /// Adds one object; `false` when it is malformed. Rules are collected in `rules`.
    fn add_object(&mut self, object: &Value, rules: &mut Vec<(ChainId, Rule)>) -> bool {
        let Some((kind, body)) = object.as_object().and_then(|o| o.iter().next()) else {
            return false;
        };
        match kind.as_str() {
            "table" => {
                let dormant = body["flags"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|x| x == "dormant"));
                if dormant {
                    let (Some(family), Some(name)) = (body["family"].as_str(), body["name"].as_str()) else {
                        return false;
                    };
                    self.dormant.push((family.into(), name.into()));
                }
                true
            }
            "chain" => add_chain(&mut self.chains, body),
            "rule" => match read_rule(body) {
                Some(found) => {
                    rules.push(found);
                    true
                }
                None => false,
            },
            "set" | "map" => {
                let Some(id) = id_of(body, "name") else {
                    return false;
                };
                // nft leaves "elem" out of an empty set's listing
                let elements = match body.get("elem") {
                    None => Some(Vec::new()),
                    Some(list) => list.as_array().cloned(),
                };
                self.sets.insert(id, NamedSet { elements });
                true
            }
            _ => true, // metainfo, counters, quotas, flowtables, ... are not needed
        }
    }

    /// Whether table `family name` is dormant.
    pub fn is_dormant(&self, family: &str, table: &str) -> bool {
        self.dormant.iter().any(|(f, t)| f == family && t == table)
    }

    /// What wrote table `family name`, judged by its chains' names: `ufw`, `firewalld`,
    /// `docker`, or `nft` (anything else: a hand-written ruleset, nftables.conf).
    pub fn written_by(&self, family: &str, table: &str) -> &'static str {
        let chains = || {
            self.chains
                .keys()
                .filter(move |id| id.family == family && id.table == table)
                .map(|id| id.chain.as_str())
        };
        if table == "firewalld" {
            "firewalld"
        } else if chains().any(|c| c.starts_with("ufw-") || c.starts_with("ufw6-")) {
            "ufw"
        } else if chains().any(|c| c.starts_with("DOCKER")) {
            "docker"
        } else {
            "nft"
        }
    }

    /// The base chains, in a stable order (family, table, chain).
    pub fn base_chains(&self) -> Vec<(&ChainId, &Chain, &Base)> {
        let mut found: Vec<_> = self
            .chains
            .iter()
            .filter_map(|(id, c)| c.base.as_ref().map(|b| (id, c, b)))
            .filter(|(id, _, _)| !self.is_dormant(&id.family, &id.table))
            .collect();
        found.sort_by(|a, b| a.0.cmp(b.0));
        found
    }
}

/// A chain's or set's address from its `family`, `table` and the field `name_key`.
fn id_of(body: &Value, name_key: &str) -> Option<ChainId> {
    Some(ChainId {
        family: body["family"].as_str()?.to_string(),
        table: body["table"].as_str()?.to_string(),
        chain: body[name_key].as_str()?.to_string(),
    })
}

fn add_chain(chains: &mut HashMap<ChainId, Chain>, body: &Value) -> bool {
    let Some(id) = id_of(body, "name") else {
        return false;
    };
    let base = match (body["type"].as_str(), body["hook"].as_str()) {
        (Some(kind), Some(hook)) => Some(Base {
            kind: kind.to_string(),
            hook: hook.to_string(),
            prio: body["prio"].as_i64().unwrap_or(0),
            policy_drop: body["policy"].as_str() == Some("drop"),
        }),
        _ => None,
    };
    chains
        .entry(id)
        .or_insert(Chain {
            base: None,
            rules: Vec::new(),
        })
        .base = base;
    true
}

fn read_rule(body: &Value) -> Option<(ChainId, Rule)> {
    let id = id_of(body, "chain")?;
    let rule = Rule {
        handle: body["handle"].as_u64()?,
        expr: body["expr"].as_array()?.clone(),
    };
    Some((id, rule))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_becomes_chains_rules_and_sets() {
        let json = br#"{"nftables":[{"metainfo":{}},
            {"table":{"family":"inet","name":"filter","handle":1}},
            {"table":{"family":"ip","name":"off","handle":2,"flags":["dormant"]}},
            {"set":{"family":"inet","name":"ports","table":"filter","type":"inet_service","handle":3,"elem":[80,443]}},
            {"chain":{"family":"inet","table":"filter","name":"input","handle":1,"type":"filter","hook":"input","prio":0,"policy":"drop"}},
            {"rule":{"family":"inet","table":"filter","chain":"input","handle":5,"expr":[{"accept":null}]}},
            {"rule":{"family":"inet","table":"filter","chain":"gone","handle":6,"expr":[]}},
            {"rule":{"family":"inet","table":"filter","chain":"input","expr":[]}}
        ]}"#;
        let mut r = Ruleset::default();
        r.add_listing(json).unwrap();
        let id = ChainId {
            family: "inet".into(),
            table: "filter".into(),
            chain: "input".into(),
        };
        let chain = &r.chains[&id];
        assert!(chain.base.as_ref().unwrap().policy_drop);
        assert_eq!(chain.rules.len(), 1);
        assert_eq!(r.skipped, 2, "a rule of a missing chain and one without a handle");
        assert!(r.is_dormant("ip", "off"));
        let ports = ChainId {
            chain: "ports".into(),
            ..id
        };
        assert_eq!(r.sets[&ports].elements.as_ref().unwrap().len(), 2);
    }

    #[test]
    fn bad_documents_are_errors() {
        let mut r = Ruleset::default();
        assert!(r.add_listing(b"not json").unwrap_err().contains("invalid JSON"));
        assert!(r.add_listing(br#"{"x":1}"#).unwrap_err().contains("no \"nftables\""));
    }
}
