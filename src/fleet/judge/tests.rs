use std::sync::Arc;

use super::*;
use crate::domain::FleetOrigin;
use crate::fleet::approval::FleetApproval;
use crate::fleet::settings::{still_selected, Fleet};
use crate::remote::signers;

macro_rules! fixture {
    ($name:literal) => {
        include_str!(concat!("../../../tests/fixtures/fleet/", $name))
    };
}
const REQUEST: &str = fixture!("request");
const ID: &str = "5f2b0c9e5f2b0c9e5f2b0c9e5f2b0c9e";

fn fleet(name: &str, groups: &[&str]) -> Fleet {
    Fleet {
        endpoints: vec!["http://127.0.0.1:2379".into()],
        tls: None,
        name: name.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        prefix: "/jitd/".into(),
        id: "/jitd/".into(),
        allowed_signers: "/dev/null".into(),
        signers: Arc::new(signers::parse(fixture!("allowed_signers")).unwrap()),
        signers_digest: [0; 32],
    }
}

fn at(t: &str) -> DateTime<Utc> {
    t.parse().unwrap()
}

fn now() -> DateTime<Utc> {
    at("2026-11-26T13:05:10Z")
}

fn stored(sig: &str) -> Vec<u8> {
    FleetRequest::stored(REQUEST, sig).into_bytes()
}

fn judged(value: &[u8], host: &Fleet, now: DateTime<Utc>) -> Result<Option<(FleetRequest, SignedBy)>, Refused> {
    match screen(ID, value, host, now)? {
        None => Ok(None),
        Some(s) => verify(s, now).map(Some),
    }
}

#[test]
fn alices_request_passes_on_a_selected_host_by_name_or_group() {
    for host in [fleet("web1", &[]), fleet("web7", &["web"])] {
        let (request, by) = judged(&stored(fixture!("alice.sig")), &host, now()).unwrap().unwrap();
        assert_eq!(by.principals, ["alice"]);
        assert_eq!(request.id(), ID);
        assert_eq!(request.ports, [22]);
    }
}

#[test]
fn a_host_outside_the_selection_does_nothing_even_for_garbage_signatures() {
    let db = fleet("db1", &["db", "prod"]);
    assert!(judged(&stored(fixture!("alice.sig")), &db, now()).unwrap().is_none());
    assert!(judged(&stored(fixture!("mallory.sig")), &db, now()).unwrap().is_none());
    assert!(judged(REQUEST.as_bytes(), &db, now()).unwrap().is_none());
}

#[test]
fn every_bad_request_is_refused_with_its_code() {
    let web1 = fleet("web1", &[]);
    let tampered = FleetRequest::stored(&REQUEST.replace("198.51.100.7", "198.51.100.8"), fixture!("alice.sig"));
    let cases: Vec<(Vec<u8>, DateTime<Utc>, &str)> = vec![
        (REQUEST.as_bytes().to_vec(), now(), "unsigned"),
        (stored(fixture!("mallory.sig")), now(), "unknown_key"),
        // bob's line allows knock@jitd only
        (stored(fixture!("bob.sig")), now(), "unknown_key"),
        // a knock's signature of the very same text
        (stored(fixture!("alice-knock.sig")), now(), "bad_signature"),
        (tampered.into_bytes(), now(), "bad_signature"),
        (stored(fixture!("alice.sig")), at("2026-11-26T14:05:00Z"), "expired"),
        (stored(fixture!("alice.sig")), at("2026-11-26T13:04:00Z"), "future"),
        (b"hosts web1\n".to_vec(), now(), "malformed"),
    ];
    for (value, when, code) in cases {
        let e = judged(&value, &web1, when).unwrap_err();
        assert_eq!(e.code, code, "{e:?}");
    }
}

#[test]
fn a_request_copied_under_another_id_is_refused() {
    let e = screen(
        &"00".repeat(16),
        &stored(fixture!("alice.sig")),
        &fleet("web1", &[]),
        now(),
    )
    .unwrap_err();
    assert_eq!(e.code, "id_mismatch");
}

#[test]
fn a_request_or_approval_signed_for_another_fleet_is_refused_before_its_signature() {
    let mut other = fleet("web1", &[]);
    other.id = "/staging/".into();
    let e = judged(&stored(fixture!("alice.sig")), &other, now()).unwrap_err();
    assert_eq!(e.code, "other_fleet", "{e:?}");
    assert!(e.reason.contains("/jitd/") && e.reason.contains("/staging/"), "{e:?}");
    // a host the request does not name still does nothing
    other.name = "db1".into();
    assert!(judged(&stored(fixture!("alice.sig")), &other, now()).unwrap().is_none());
    let signed = FleetRequest::stored(APPROVAL, fixture!("alice-approval.sig"));
    let later = at("2026-11-26T13:06:10Z");
    let e = screen_approval((ID, APPROVAL_ID), signed.as_bytes(), &other, later).unwrap_err();
    assert_eq!(e.code, "other_fleet", "{e:?}");
}

#[test]
fn the_grant_ends_with_the_lease_or_the_signed_end_whichever_is_sooner() {
    let request = FleetRequest::parse(REQUEST).unwrap();
    let secs = |s| Some(Duration::from_secs(s));
    assert_eq!(
        open_until(&request, secs(600), now()).unwrap(),
        now() + TimeDelta::seconds(600)
    );
    // a lease longer than the signed duration does not stretch it
    assert_eq!(
        open_until(&request, secs(86_400), now()).unwrap(),
        at("2026-11-26T14:05:00Z")
    );
    assert_eq!(open_until(&request, None, now()).unwrap_err().code, "no_lease");
    assert_eq!(open_until(&request, secs(0), now()).unwrap_err().code, "expired");
}

#[test]
fn a_grant_stays_while_this_host_is_still_named_and_ends_when_it_left_the_group() {
    let origin = FleetOrigin {
        request: ID.into(),
        hosts: vec!["group:web".into(), "db9".into()],
        revision: 12,
        digest: String::new(),
    };
    assert_eq!(still_selected(Some(&fleet("web7", &["prod", "web"])), &origin), Ok(()));
    assert_eq!(still_selected(Some(&fleet("DB9", &[])), &origin), Ok(()));
    let left = still_selected(Some(&fleet("web7", &["prod"])), &origin).unwrap_err();
    assert!(
        left.contains("web7, groups [prod]") && left.contains("group:web,db9"),
        "{left}"
    );
    let off = still_selected(None, &origin).unwrap_err();
    assert!(off.contains("[fleet] is off") && off.contains(ID), "{off}");
}

const APPROVAL: &str = fixture!("approval");
const APPROVAL_ID: &str = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";

fn approval_judged(value: &str, keys: (&str, &str)) -> Result<(FleetApproval, SignedBy), Refused> {
    let host = fleet("web1", &[]);
    let later = at("2026-11-26T13:06:10Z");
    screen_approval(keys, value.as_bytes(), &host, later).and_then(|s| verify_approval(s, later))
}

#[test]
fn alices_approval_passes_and_covers_only_what_it_names() {
    let signed = FleetRequest::stored(APPROVAL, fixture!("alice-approval.sig"));
    let (approval, by) = approval_judged(&signed, (ID, APPROVAL_ID)).unwrap();
    assert_eq!(
        (approval.request.as_str(), by.principals.as_slice()),
        (ID, ["alice".to_string()].as_slice())
    );
    let source = crate::domain::parse_prefix("198.51.100.7").unwrap();
    // the request's signer, as the host recorded it when it judged the request
    let request = stored(fixture!("alice.sig"));
    let blob = crate::fleet::request::split(&request).unwrap().1.unwrap();
    let alice = crate::remote::sshsig::signer_fingerprint(&blob).unwrap();
    assert_eq!(approval.requester, alice);
    // the digest of the request's text, as the host recorded it (sha256sum in make.sh)
    let digest = FleetRequest::parse(REQUEST).unwrap().digest();
    assert_eq!(approval.digest, digest);
    assert_eq!(approval_covers(&approval, &alice, &digest, &[22], &source), Ok(()));
    let other = crate::domain::parse_prefix("198.51.100.8").unwrap();
    let mismatch = |r: Result<(), Refused>| r.unwrap_err().code;
    assert_eq!(
        mismatch(approval_covers(&approval, &alice, &digest, &[22], &other)),
        "approval_mismatch"
    );
    assert_eq!(
        mismatch(approval_covers(&approval, &alice, &digest, &[22, 3389], &source)),
        "approval_mismatch"
    );
    // the same id, ports and source, but another signer's request
    let bob = "SHA256:ILpTOb8KCaVWW5/hHsIGXfh4F9DA5zSvGDFAxmiuj8+";
    assert_eq!(
        mismatch(approval_covers(&approval, bob, &digest, &[22], &source)),
        "approval_mismatch"
    );
    // another text under the same id (other hosts, a longer duration): not covered
    let other_text = FleetRequest {
        hosts: vec!["h2".into()],
        ..FleetRequest::parse(REQUEST).unwrap()
    };
    let covered = approval_covers(&approval, &alice, &other_text.digest(), &[22], &source);
    assert_eq!(mismatch(covered), "approval_mismatch");
}

#[test]
fn an_approval_under_another_key_or_namespace_or_unsigned_is_refused() {
    let signed = FleetRequest::stored(APPROVAL, fixture!("alice-approval.sig"));
    let other = "00".repeat(16);
    for keys in [(other.as_str(), APPROVAL_ID), (ID, other.as_str())] {
        assert_eq!(approval_judged(&signed, keys).unwrap_err().code, "id_mismatch");
    }
    let as_request = FleetRequest::stored(APPROVAL, fixture!("alice-approval-as-request.sig"));
    let e = approval_judged(&as_request, (ID, APPROVAL_ID)).unwrap_err();
    assert!(e.reason.contains("namespace"), "{e:?}");
    assert_eq!(
        approval_judged(APPROVAL, (ID, APPROVAL_ID)).unwrap_err().code,
        "unsigned"
    );
    let early = screen_approval((ID, APPROVAL_ID), signed.as_bytes(), &fleet("web1", &[]), now());
    assert_eq!(early.unwrap_err().code, "future");
    // a request is not an approval, even signed
    let request = stored(fixture!("alice.sig"));
    let e = approval_judged(std::str::from_utf8(&request).unwrap(), (ID, APPROVAL_ID)).unwrap_err();
    assert_eq!(e.code, "malformed");
}
