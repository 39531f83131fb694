//! The two-person rule, its pure part: requests waiting for an approver (the pending
//! book, with their deadlines and a bounded memory of how recent ones ended), who may
//! decide one, and whether two callers are the same person. No I/O; time comes in as
//! arguments, as in [`crate::grants`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::config::{Access, PortPolicy};
use crate::domain::{format_prefix, Caller, ErrorCode, GrantId};
use crate::policy::Denial;

/// The most requests one requester may have waiting for approval at once.
pub const MAX_PENDING_PER_REQUESTER: usize = 5;
/// The most requests waiting for approval at once, whoever asked.
pub const MAX_PENDING: usize = 1000;
/// How many ended requests jitd remembers the outcome of (for `pending` queries).
pub const CLOSED_MEMORY: usize = 1024;

/// How long a request for `entries` waits for its approval: the shortest
/// `approval_timeout` of the entries with `approvals = 1`; `None` when none needs one.
/// A request that names one such port waits whole, for every port it names.
pub fn approval_timeout(entries: &[&PortPolicy]) -> Option<Duration> {
    entries
        .iter()
        .filter(|e| e.approvals > 0)
        .map(|e| e.approval_timeout)
        .min()
}

/// A request that passed every check and waits for an approver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRequest {
    /// Its id (from the same counter as grant ids, so the two never clash).
    pub id: GrantId,
    /// Who asked, as it was when it asked.
    pub requester: Caller,
    /// The login uid of the process that asked (see [`crate::identity::login_uid`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requester_login: Option<u32>,
    /// The ports it asked for (an empty request resolved to the protected ports).
    pub ports: Vec<u16>,
    /// The source to open for.
    pub source: IpNet,
    /// How long to open, counted from the approval.
    pub duration_secs: u64,
    /// A request asked until a time (as a fleet request is, by its lease and signed
    /// end): the grant ends then at the latest, however late it is approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
    /// Why, as the requester said.
    pub justification: Option<String>,
    /// When it was asked (by the wall clock).
    pub asked_at: DateTime<Utc>,
    /// When it times out unless someone decides first (by the wall clock at the time
    /// of asking; jitd times it by the monotonic clock while it runs).
    pub times_out_at: DateTime<Utc>,
}

impl PendingRequest {
    /// How long it opens the ports for once approved.
    pub fn duration(&self) -> Duration {
        Duration::from_secs(self.duration_secs)
    }

    /// How long it opens the ports for when approved at `wall`: its duration, cut at its
    /// `until` (whole seconds, rounded up); `None` once `until` has passed.
    pub fn duration_at(&self, wall: DateTime<Utc>) -> Option<Duration> {
        let Some(until) = self.until else {
            return Some(self.duration());
        };
        let left = (until - wall).to_std().ok().filter(|d| !d.is_zero())?;
        let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        Some(self.duration().min(Duration::from_secs(secs)))
    }

    /// The ports as text, `22,3389`.
    pub fn ports_text(&self) -> String {
        self.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
    }

    /// One line naming it for messages: `request 7 (bob: port 22 for 203.0.113.7)`.
    pub fn describe(&self) -> String {
        format!(
            "request {} ({}: {} {} for {})",
            self.id,
            self.requester.name,
            if self.ports.len() == 1 { "port" } else { "ports" },
            self.ports_text(),
            format_prefix(&self.source)
        )
    }
}

/// Where a request that waited for approval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PendingState {
    /// Still waiting.
    Pending,
    /// Approved: its grants were opened.
    Approved,
    /// Turned down by an approver (or withdrawn by its requester).
    Denied,
    /// Nobody decided within the approval timeout.
    Expired,
    /// Closed without a decision: the policy no longer allowed it when it was
    /// approved, or jitd could not time it across a restart.
    Closed,
}

/// How a request ended, remembered for the requester's `pending` query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// The request as it waited.
    pub request: PendingRequest,
    /// How it ended.
    pub state: PendingState,
    /// Who decided (`jitd` when nobody did).
    pub by: String,
    /// Why, when there is a reason.
    pub reason: Option<String>,
    /// The grants an approval opened.
    pub grants: Vec<GrantId>,
    /// When it ended.
    pub at: DateTime<Utc>,
}

/// Who counts as one requester for [`MAX_PENDING_PER_REQUESTER`]: a local user by uid,
/// a signed caller by its name (`principal:` and its first principal).
fn requester_key(caller: &Caller) -> (u32, &str) {
    (caller.uid, caller.name.as_str())
}

/// The requests waiting for approval, by id and by deadline, and how recent ones ended.
#[derive(Debug, Default)]
pub struct PendingBook {
    entries: BTreeMap<GrantId, (PendingRequest, Instant)>,
    deadlines: BTreeSet<(Instant, GrantId)>,
    ended: BTreeMap<GrantId, Ended>,
}

impl PendingBook {
    /// Whether `requester` may add one more request: refused when it has
    /// [`MAX_PENDING_PER_REQUESTER`] waiting, or when [`MAX_PENDING`] wait in all.
    pub fn room_for(&self, requester: &Caller) -> Result<(), Denial> {
        let key = requester_key(requester);
        let theirs = self
            .entries
            .values()
            .filter(|(r, _)| requester_key(&r.requester) == key)
            .count();
        if theirs >= MAX_PENDING_PER_REQUESTER {
            return Err(Denial::new(
                ErrorCode::TooManyPending,
                format!(
                    "{} already has {theirs} requests waiting for approval, the most jitd keeps per requester; wait for a decision (jitctl status lists them)",
                    requester.name
                ),
            ));
        }
        if self.entries.len() >= MAX_PENDING {
            return Err(Denial::new(
                ErrorCode::TooManyPending,
                format!("{MAX_PENDING} requests are waiting for approval, the most jitd keeps; try again later"),
            ));
        }
        Ok(())
    }

    /// Adds `request`, timing out at `deadline`.
    pub fn insert(&mut self, request: PendingRequest, deadline: Instant) {
        let id = request.id;
        if let Some((_, old)) = self.entries.insert(id, (request, deadline)) {
            self.deadlines.remove(&(old, id));
        }
        self.deadlines.insert((deadline, id));
    }

    /// Takes request `id` out, with its deadline.
    pub fn remove(&mut self, id: GrantId) -> Option<(PendingRequest, Instant)> {
        let (request, deadline) = self.entries.remove(&id)?;
        self.deadlines.remove(&(deadline, id));
        Some((request, deadline))
    }

    /// Request `id` with its deadline, if it waits.
    pub fn get(&self, id: GrantId) -> Option<(&PendingRequest, Instant)> {
        self.entries.get(&id).map(|(r, d)| (r, *d))
    }

    /// The waiting requests in id order, with their deadlines.
    pub fn iter(&self) -> impl Iterator<Item = (&PendingRequest, Instant)> {
        self.entries.values().map(|(r, d)| (r, *d))
    }

    /// How many wait.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The earliest deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(d, _)| *d)
    }

    /// Takes out every request whose deadline is at or before `now`.
    pub fn pop_timed_out(&mut self, now: Instant) -> Vec<PendingRequest> {
        crate::grants::due(&self.deadlines, now)
            .into_iter()
            .filter_map(|id| self.remove(id))
            .map(|(r, _)| r)
            .collect()
    }

    /// Remembers how a request ended (the oldest memory goes beyond [`CLOSED_MEMORY`]).
    pub fn note_ended(&mut self, ended: Ended) {
        self.ended.insert(ended.request.id, ended);
        while self.ended.len() > CLOSED_MEMORY {
            self.ended.pop_first();
        }
    }

    /// How request `id` ended, if jitd remembers.
    pub fn ended(&self, id: GrantId) -> Option<&Ended> {
        self.ended.get(&id)
    }
}

/// Whether `caller` may approve requests: root (a local uid 0) always, anyone else when
/// `[access] approvers` names them. Admins are not approvers by their role alone.
pub fn may_approve(access: &Access, caller: &Caller) -> bool {
    (caller.uid == 0 && caller.signer.is_none()) || crate::policy::named(&access.approvers, caller)
}

/// Why `decider` is the same person as `requester`, if it is: the same local uid (or
/// user name); a signed caller whose principal is the other's local user name (the same
/// person's SSH identity); two signed callers with the same key or a shared principal.
pub fn same_person(requester: &Caller, decider: &Caller) -> Option<String> {
    match (&requester.signer, &decider.signer) {
        (None, None) if requester.uid == decider.uid => Some(format!("the same uid ({})", decider.uid)),
        (None, None) if requester.name == decider.name => Some(format!("the same user name ({})", decider.name)),
        (None, None) => None,
        (Some(s), None) => s
            .principals
            .iter()
            .find(|p| **p == decider.name)
            .map(|p| format!("the requester's principal {p} is the local user {}", decider.name)),
        (None, Some(s)) => s.principals.iter().find(|p| **p == requester.name).map(|p| {
            format!(
                "the approver's principal {p} is the requester's local user {}",
                requester.name
            )
        }),
        (Some(a), Some(b)) if !a.fingerprint.is_empty() && a.fingerprint == b.fingerprint => {
            Some(format!("the same key ({})", a.fingerprint))
        }
        (Some(a), Some(b)) => a
            .principals
            .iter()
            .find(|p| b.principals.contains(p))
            .map(|p| format!("the same principal ({p})")),
    }
}

/// Why a local decider whose process has login uid `login` is the requester of
/// `request` under another uid, if it is: the decider logged in as the requester (and
/// became root, or another user, through sudo or su), the requester logged in as the
/// decider, or both come from the same login.
pub fn same_login(request: &PendingRequest, decider: &Caller, login: Option<u32>) -> Option<String> {
    let asked = &request.requester;
    if asked.signer.is_some() || decider.signer.is_some() {
        return None;
    }
    match (request.requester_login, login) {
        (_, Some(l)) if l == asked.uid => Some(format!(
            "the approver's login uid is the requester's uid {l} (sudo or su)"
        )),
        (Some(l), _) if l == decider.uid => Some(format!(
            "the requester's login uid is the approver's uid {l} (sudo or su)"
        )),
        (Some(a), Some(b)) if a == b => Some(format!("both come from the login of uid {a}")),
        _ => None,
    }
}

/// Why `decider` (login uid `login`) is the requester of `request` itself, if it is
/// ([`same_person`] or [`same_login`]).
pub fn requester_itself(request: &PendingRequest, decider: &Caller, login: Option<u32>) -> Option<String> {
    same_person(&request.requester, decider).or_else(|| same_login(request, decider, login))
}

/// Whether `decider` is `requester` by the requester's own identity: the same local
/// uid, or the same signing key. Never by a name from another namespace (an SSH
/// principal is not a login name): withdrawing a request needs this, while refusing
/// one's own approval also takes the looser [`requester_itself`].
pub fn own_identity(requester: &Caller, decider: &Caller) -> bool {
    match (&requester.signer, &decider.signer) {
        (None, None) => requester.uid == decider.uid,
        (Some(a), Some(b)) => !a.fingerprint.is_empty() && a.fingerprint == b.fingerprint,
        _ => false,
    }
}

/// What a decider wants to do with a pending request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// Open it.
    Approve,
    /// Turn it down.
    Deny,
}

/// Checks that `decider` (whose process has login uid `login`) may `verb` request `id`
/// (`request`, when it waits), in order: who (the approver role; for a denial, or the
/// requester withdrawing its own, by [`own_identity`]), then what (the request waits),
/// then never one's own approval ([`same_person`], [`same_login`]). Returns the
/// request.
pub fn check_decider<'r>(
    access: &Access,
    decider: &Caller,
    login: Option<u32>,
    id: GrantId,
    request: Option<&'r PendingRequest>,
    verb: Verb,
) -> Result<&'r PendingRequest, Denial> {
    let own = request.and_then(|r| requester_itself(r, decider, login));
    let withdrawing = verb == Verb::Deny && request.is_some_and(|r| own_identity(&r.requester, decider));
    if !withdrawing && !may_approve(access, decider) {
        let what = match verb {
            Verb::Approve => "approve",
            Verb::Deny => "deny",
        };
        return Err(Denial::new(
            ErrorCode::NotAuthorized,
            format!(
                "{} (uid {}) may not {what} requests: that needs the approver role ([access] approvers)",
                decider.name, decider.uid
            ),
        ));
    }
    let request = request.ok_or_else(|| {
        Denial::new(
            ErrorCode::NotFound,
            format!("no request {id} waits for approval (it may have been decided or timed out: see jitctl audit)"),
        )
    })?;
    if let (Verb::Approve, Some(why)) = (verb, own) {
        return Err(Denial::new(
            ErrorCode::NotAuthorized,
            format!(
                "{} is the requester's own ({why}); a requester can never approve their own request",
                request.describe()
            ),
        ));
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Principal, SignedBy};

    fn local(uid: u32, name: &str) -> Caller {
        Caller {
            uid,
            name: name.into(),
            groups: vec!["users".into()],
            signer: None,
        }
    }

    fn signed(principals: &[&str], key: &str) -> Caller {
        Caller::signed(SignedBy {
            principals: principals.iter().map(|p| p.to_string()).collect(),
            fingerprint: key.into(),
            peer: None,
            nonce: None,
            certificate: None,
            fleet: None,
        })
    }

    fn request(id: GrantId, requester: Caller) -> PendingRequest {
        let at = DateTime::parse_from_rfc3339("2026-11-25T10:00:00Z").unwrap().to_utc();
        PendingRequest {
            id,
            requester,
            requester_login: None,
            ports: vec![22],
            source: "203.0.113.7/32".parse().unwrap(),
            duration_secs: 3600,
            until: None,
            justification: None,
            asked_at: at,
            times_out_at: at + chrono::Duration::minutes(15),
        }
    }

    fn access() -> Access {
        Access {
            admins: vec![Principal::User("alice".into())],
            approvers: vec![
                Principal::User("carol".into()),
                Principal::User("bob".into()),
                Principal::Ssh("dave".into()),
            ],
            ..Access::default()
        }
    }

    #[test]
    fn only_approvers_and_root_approve_and_never_their_own_request() {
        let a = access();
        let bobs = request(7, local(1001, "bob"));
        let verdict = |who: &Caller, verb| check_decider(&a, who, None, 7, Some(&bobs), verb).map(|r| r.id);
        assert_eq!(verdict(&local(1003, "carol"), Verb::Approve), Ok(7));
        assert_eq!(verdict(&local(0, "root"), Verb::Approve), Ok(7), "root always may");
        // an admin is not an approver by its role alone
        let refused = verdict(&local(1000, "alice"), Verb::Approve).unwrap_err();
        assert_eq!(refused.code, ErrorCode::NotAuthorized);
        assert!(
            refused.message.contains("needs the approver role"),
            "{}",
            refused.message
        );
        // bob is an approver, but this is his own request
        let own = verdict(&local(1001, "bob"), Verb::Approve).unwrap_err();
        assert_eq!(own.code, ErrorCode::NotAuthorized);
        assert_eq!(
            own.message,
            "request 7 (bob: port 22 for 203.0.113.7) is the requester's own (the same uid (1001)); a requester can never approve their own request"
        );
        // root's own request: root cannot approve it either
        let roots = request(8, local(0, "root"));
        let e = check_decider(&a, &local(0, "root"), None, 8, Some(&roots), Verb::Approve).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotAuthorized);
    }

    #[test]
    fn a_requester_may_withdraw_its_own_request_and_others_need_the_role() {
        let a = access();
        let eves = request(9, local(1005, "eve"));
        assert!(check_decider(&a, &local(1005, "eve"), None, 9, Some(&eves), Verb::Deny).is_ok());
        assert!(check_decider(&a, &local(1003, "carol"), None, 9, Some(&eves), Verb::Deny).is_ok());
        let e = check_decider(&a, &local(1006, "mallory"), None, 9, Some(&eves), Verb::Deny).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotAuthorized);
        // a knock by principal mallory: the local user mallory (no role) is not its
        // requester, nor is anyone by name; the same key is
        let knock = request(11, signed(&["mallory"], "SHA256:k9"));
        let e = check_decider(&a, &local(1006, "mallory"), None, 11, Some(&knock), Verb::Deny).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotAuthorized);
        let same_key = signed(&["other"], "SHA256:k9");
        assert!(check_decider(&a, &same_key, None, 11, Some(&knock), Verb::Deny).is_ok());
        // a local requester is not withdrawn by a same-named user under another uid
        let e = check_decider(&a, &local(1007, "eve"), None, 9, Some(&eves), Verb::Deny).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotAuthorized);
        // who before what: an unknown id tells a stranger nothing
        let e = check_decider(&a, &local(1006, "mallory"), None, 10, None, Verb::Approve).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotAuthorized);
        let e = check_decider(&a, &local(1003, "carol"), None, 10, None, Verb::Approve).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
    }

    #[test]
    fn one_person_behind_a_local_uid_and_an_ssh_principal_is_the_same_person() {
        assert!(same_person(&local(1001, "bob"), &local(1001, "bob")).is_some());
        assert!(same_person(&local(1001, "bob"), &local(1002, "bob")).is_some());
        assert_eq!(same_person(&local(1001, "bob"), &local(1003, "carol")), None);
        // bob knocked with his SSH key (principal bob); local user bob approves
        let knock = signed(&["bob", "ops"], "SHA256:k1");
        assert!(same_person(&knock, &local(1001, "bob")).is_some());
        assert_eq!(same_person(&knock, &local(1003, "carol")), None);
        assert!(same_person(&local(1001, "bob"), &signed(&["bob"], "SHA256:k2")).is_some());
        assert!(
            same_person(&knock, &signed(&["robert"], "SHA256:k1")).is_some(),
            "same key"
        );
        assert!(
            same_person(&knock, &signed(&["ops"], "SHA256:k3")).is_some(),
            "shared principal"
        );
        assert_eq!(same_person(&knock, &signed(&["dave"], "SHA256:k4")), None);
        // a signed approver is named by principal: dave may approve bob's knock
        let a = access();
        let knocked = request(11, knock);
        assert!(check_decider(
            &a,
            &signed(&["dave"], "SHA256:k4"),
            None,
            11,
            Some(&knocked),
            Verb::Approve
        )
        .is_ok());
        let e = check_decider(&a, &local(1001, "bob"), None, 11, Some(&knocked), Verb::Approve).unwrap_err();
        assert!(
            e.message.contains("principal bob is the local user bob"),
            "{}",
            e.message
        );
    }

    #[test]
    fn sudo_does_not_make_a_second_person() {
        let a = access();
        let mut bobs = request(7, local(1001, "bob"));
        // bob asked, then ran `sudo jitctl approve 7`: root, but logged in as bob
        let e = check_decider(&a, &local(0, "root"), Some(1001), 7, Some(&bobs), Verb::Approve).unwrap_err();
        assert!(
            e.message.contains("login uid is the requester's uid 1001"),
            "{}",
            e.message
        );
        // root logged in as carol approves bob's request: fine
        assert!(check_decider(&a, &local(0, "root"), Some(1003), 7, Some(&bobs), Verb::Approve).is_ok());
        // carol asked as root through sudo, and approves as herself
        bobs.requester = local(0, "root");
        bobs.requester_login = Some(1003);
        let e = check_decider(&a, &local(1003, "carol"), Some(1003), 7, Some(&bobs), Verb::Approve).unwrap_err();
        assert!(
            e.message
                .contains("the requester's login uid is the approver's uid 1003"),
            "{}",
            e.message
        );
        // both through sudo from the same login
        bobs.requester = local(1004, "ops-robot");
        let e = check_decider(&a, &local(1001, "bob"), Some(1003), 7, Some(&bobs), Verb::Approve).unwrap_err();
        assert!(
            e.message.contains("both come from the login of uid 1003"),
            "{}",
            e.message
        );
    }

    #[test]
    fn each_requester_may_have_a_few_requests_waiting() {
        let mut book = PendingBook::default();
        let now = Instant::now();
        for id in 1..=MAX_PENDING_PER_REQUESTER as u64 {
            assert!(book.room_for(&local(1001, "bob")).is_ok());
            book.insert(request(id, local(1001, "bob")), now + Duration::from_secs(id));
        }
        let e = book.room_for(&local(1001, "bob")).unwrap_err();
        assert_eq!(e.code, ErrorCode::TooManyPending);
        assert!(book.room_for(&local(1003, "carol")).is_ok(), "others are not held up");
        assert!(book.room_for(&signed(&["bob"], "k")).is_ok(), "counted per requester");
    }

    #[test]
    fn requests_time_out_in_deadline_order_and_their_end_is_remembered() {
        let mut book = PendingBook::default();
        let now = Instant::now();
        book.insert(request(2, local(1001, "bob")), now + Duration::from_secs(20));
        book.insert(request(1, local(1001, "bob")), now + Duration::from_secs(10));
        assert_eq!(book.next_deadline(), Some(now + Duration::from_secs(10)));
        assert!(book.pop_timed_out(now + Duration::from_secs(9)).is_empty());
        let due = book.pop_timed_out(now + Duration::from_secs(10));
        assert_eq!(due.iter().map(|r| r.id).collect::<Vec<_>>(), vec![1]);
        assert_eq!(book.next_deadline(), Some(now + Duration::from_secs(20)));
        let (r, _) = book.remove(2).unwrap();
        assert!(book.is_empty() && book.next_deadline().is_none());
        for id in 0..CLOSED_MEMORY as u64 + 2 {
            book.note_ended(Ended {
                request: PendingRequest { id, ..r.clone() },
                state: PendingState::Expired,
                by: "jitd".into(),
                reason: None,
                grants: vec![],
                at: r.asked_at,
            });
        }
        assert!(
            book.ended(0).is_none() && book.ended(1).is_none(),
            "the oldest are forgotten"
        );
        assert_eq!(book.ended(2).unwrap().state, PendingState::Expired);
    }

    #[test]
    fn a_mixed_request_waits_as_long_as_its_shortest_approval_timeout() {
        let text = "[[ports]]\nport = 22\napprovals = 1\napproval_timeout = \"10m\"\n[[ports]]\nport = 23\napprovals = 1\napproval_timeout = \"5m\"\n[[ports]]\nport = 24\n";
        let c = crate::config::Config::parse(std::path::Path::new("/t.toml"), text, &|_| None).unwrap();
        let entries: Vec<&PortPolicy> = c.ports.iter().collect();
        assert_eq!(approval_timeout(&entries), Some(Duration::from_secs(300)));
        assert_eq!(approval_timeout(&entries[..1]), Some(Duration::from_secs(600)));
        assert_eq!(approval_timeout(&entries[2..]), None);
        assert_eq!(
            approval_timeout(&[entries[0], entries[2]]),
            Some(Duration::from_secs(600))
        );
    }
}
