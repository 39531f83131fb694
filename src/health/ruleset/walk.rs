//! Walking chains for a probe (pure): the typical packet's path, and whether any path
//! accepts (or forwards) it. Both are bounded: jumps nest at most as deep as the kernel
//! allows, and one judgement evaluates at most [`BUDGET`] rules.

use super::matches::{judge_rule, Verdict};
use super::model::{Base, Chain, ChainId, Ruleset};
use super::{text, ChainVerdict, Place, Probe, Tri};

/// How deep jumps nest (the kernel's limit is 16).
const MAX_DEPTH: usize = 16;
/// The most rule evaluations one chain's judgement may take.
pub const BUDGET: usize = 100_000;

/// Where the typical packet's walk through a chain ends.
enum End {
    Accept,
    Drop(Place),
    Forward(Place),
    Return,
}

/// What some path through a chain can do.
#[derive(Default)]
struct Reach {
    accept: Option<Place>,
    forward: Option<Place>,
    returns: bool,
}

/// The budget ran out, or jumps nest too deep (or loop).
struct TooBig;

struct Walker<'a> {
    ruleset: &'a Ruleset,
    probe: &'a Probe,
    steps: usize,
}

/// A filter base chain on the prerouting, input or ingress hook: `None` when the
/// typical packet passes it.
pub fn filter_chain(
    ruleset: &Ruleset,
    id: &ChainId,
    chain: &Chain,
    base: &Base,
    probe: &Probe,
) -> Option<ChainVerdict> {
    let mut w = Walker {
        ruleset,
        probe,
        steps: 0,
    };
    let policy = policy_place(id, base);
    let typical = match w.typical(id, chain, 0) {
        Ok(End::Return) if base.policy_drop => End::Drop(policy.clone()),
        Ok(end) => end,
        Err(TooBig) => return Some(unknown(id)),
    };
    let End::Drop(at) = typical else {
        return None;
    };
    let reach = match w.possible(id, chain, 0) {
        Ok(reach) => reach,
        Err(TooBig) => return Some(unknown(id)),
    };
    let unless = reach.accept.or((reach.returns && !base.policy_drop).then_some(policy));
    Some(match unless {
        Some(unless) => ChainVerdict::Restricted { at, unless },
        None => ChainVerdict::Blocked { at },
    })
}

/// A nat base chain on prerouting: does it DNAT the probe elsewhere?
pub fn nat_chain(ruleset: &Ruleset, id: &ChainId, chain: &Chain, probe: &Probe) -> Option<ChainVerdict> {
    let mut w = Walker {
        ruleset,
        probe,
        steps: 0,
    };
    match w.typical(id, chain, 0) {
        Ok(End::Forward(at)) => return Some(ChainVerdict::Forwarded { at, always: true }),
        Ok(_) => {}
        Err(TooBig) => return Some(unknown(id)),
    }
    match w.possible(id, chain, 0) {
        Ok(Reach { forward: Some(at), .. }) => Some(ChainVerdict::Forwarded { at, always: false }),
        Ok(_) => None,
        Err(TooBig) => Some(unknown(id)),
    }
}

fn unknown(id: &ChainId) -> ChainVerdict {
    ChainVerdict::Unknown { chain: id.to_string() }
}

fn policy_place(id: &ChainId, base: &Base) -> Place {
    Place {
        family: id.family.clone(),
        table: id.table.clone(),
        chain: id.chain.clone(),
        handle: None,
        rule: format!("policy {}", if base.policy_drop { "drop" } else { "accept" }),
    }
}

impl<'a> Walker<'a> {
    fn chain(&self, from: &ChainId, name: &str) -> Option<(ChainId, &'a Chain)> {
        let id = ChainId {
            chain: name.to_string(),
            ..from.clone()
        };
        self.ruleset.chains.get(&id).map(|c| (id, c))
    }

    fn place(&self, id: &ChainId, rule: &super::model::Rule) -> Place {
        Place {
            family: id.family.clone(),
            table: id.table.clone(),
            chain: id.chain.clone(),
            handle: Some(rule.handle),
            rule: text::rule(&rule.expr),
        }
    }

    fn tick(&mut self, depth: usize) -> Result<(), TooBig> {
        self.steps += 1;
        if self.steps > BUDGET || depth > MAX_DEPTH {
            return Err(TooBig);
        }
        Ok(())
    }

    /// The typical packet's path: every match that depends on the unknown fails.
    fn typical(&mut self, id: &ChainId, chain: &Chain, depth: usize) -> Result<End, TooBig> {
        for rule in &chain.rules {
            self.tick(depth)?;
            let (holds, verdict) = judge_rule(self.ruleset, id, rule, self.probe);
            if holds != Tri::Yes {
                continue;
            }
            let verdict = match verdict {
                Verdict::Map(entries) => match entries.into_iter().find(|(t, _)| *t == Tri::Yes) {
                    Some((_, v)) => v,
                    None => continue,
                },
                v => v,
            };
            let end = match verdict {
                Verdict::Continue | Verdict::Map(_) => continue,
                Verdict::Accept => End::Accept,
                Verdict::Drop => End::Drop(self.place(id, rule)),
                Verdict::Forward => End::Forward(self.place(id, rule)),
                Verdict::Return => End::Return,
                Verdict::Jump(ref to) | Verdict::Goto(ref to) => {
                    let Some((sub_id, sub)) = self.chain(id, to) else {
                        continue;
                    };
                    match self.typical(&sub_id, sub, depth + 1)? {
                        End::Return if matches!(verdict, Verdict::Jump(_)) => continue,
                        other => other,
                    }
                }
            };
            return Ok(end);
        }
        Ok(End::Return)
    }

    /// What any path can do: accept, forward, or return.
    fn possible(&mut self, id: &ChainId, chain: &Chain, depth: usize) -> Result<Reach, TooBig> {
        let mut reach = Reach::default();
        for rule in &chain.rules {
            self.tick(depth)?;
            let (holds, verdict) = judge_rule(self.ruleset, id, rule, self.probe);
            if holds == Tri::No {
                continue;
            }
            let entries = match verdict {
                Verdict::Map(entries) => entries,
                v => vec![(Tri::Yes, v)],
            };
            let mut ends = false;
            for (when, verdict) in entries {
                let certain = holds.and(when) == Tri::Yes;
                ends |= self.step(id, rule, verdict, certain, depth, &mut reach)?;
            }
            if ends {
                return Ok(reach);
            }
        }
        reach.returns = true;
        Ok(reach)
    }

    /// Adds what one verdict can do to `reach`; whether the chain surely ends here.
    fn step(
        &mut self,
        id: &ChainId,
        rule: &super::model::Rule,
        verdict: Verdict,
        certain: bool,
        depth: usize,
        reach: &mut Reach,
    ) -> Result<bool, TooBig> {
        match verdict {
            Verdict::Continue | Verdict::Map(_) => Ok(false),
            Verdict::Accept => {
                reach.accept.get_or_insert_with(|| self.place(id, rule));
                Ok(certain)
            }
            Verdict::Forward => {
                reach.forward.get_or_insert_with(|| self.place(id, rule));
                Ok(certain)
            }
            Verdict::Drop => Ok(certain),
            Verdict::Return => {
                reach.returns = true;
                Ok(certain)
            }
            Verdict::Jump(ref to) | Verdict::Goto(ref to) => {
                let Some((sub_id, sub)) = self.chain(id, to) else {
                    return Ok(false);
                };
                let inner = self.possible(&sub_id, sub, depth + 1)?;
                if reach.accept.is_none() {
                    reach.accept = inner.accept;
                }
                if reach.forward.is_none() {
                    reach.forward = inner.forward;
                }
                let goto = matches!(verdict, Verdict::Goto(_));
                reach.returns |= goto && inner.returns;
                Ok(certain && (goto || !inner.returns))
            }
        }
    }
}
