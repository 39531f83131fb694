//! `jitctl fleet`: ask many hosts at once through etcd (docs/fleet.md). `request` signs
//! a fleet request with the user's SSH key (`ssh-keygen -Y sign -n fleet@jitd`, as
//! `jitctl knock` signs), writes it under `requests/<id>` on a lease whose TTL is the
//! duration, and waits for each selected host's answer; `status` shows hosts, live
//! requests and answers; `approve` signs an approval (`fleet-approve@jitd`) of a request
//! that waits for an approver on some hosts and writes it beside the request; `revoke`
//! revokes a request's lease. etcd's address and
//! credentials: flags, else `ETCDCTL_*` (as etcdctl reads them), else
//! `~/.config/jitctl/fleet.toml`; the fleet's id (signed into every request and
//! approval): `--fleet-id`, else `id` in that file, else the prefix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use etcd_client::{Client, PutOptions};
use serde::{Deserialize, Serialize};

use crate::cli::jitctl::{FleetArgs, FleetCommand};
use crate::cli::knock::sign;
use crate::cli::table;
use crate::fleet::approval::FleetApproval;
use crate::fleet::connect;
use crate::fleet::records::{HostRecord, Keys, Outcome, StatusRecord};
use crate::fleet::request::FleetRequest;
use crate::fleet::settings::{valid_fleet_id, valid_name, Tls, DEFAULT_PREFIX};

/// `~/.config/jitctl/fleet.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetFile {
    #[serde(default)]
    endpoints: Vec<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    prefix: Option<String>,
    id: Option<String>,
}

/// Where etcd is and how to reach it, resolved, and the fleet's id.
#[derive(Debug)]
struct Etcd {
    endpoints: Vec<String>,
    tls: Option<Tls>,
    keys: Keys,
    fleet: String,
}

/// What `jitctl fleet` prints: one answer per host, or the fleet's state.
#[derive(Debug, Serialize)]
pub struct Answers {
    /// The request's id.
    pub id: String,
    /// Each selected host's answer (`outcome: "no_answer"` when it gave none in time).
    pub hosts: Vec<Answer>,
}

/// One host's answer.
#[derive(Debug, Serialize)]
pub struct Answer {
    /// The host.
    pub host: String,
    /// approved, denied, pending (waiting for an approver on that host), revoked,
    /// no_answer.
    pub outcome: String,
    /// When it closes, if approved; when the approval times out, if pending.
    pub until: Option<DateTime<Utc>>,
    /// Why, if denied.
    pub reason: Option<String>,
}

impl Answers {
    /// Whether every host approved.
    pub fn all_approved(&self) -> bool {
        !self.hosts.is_empty() && self.hosts.iter().all(|h| h.outcome == "approved")
    }

    /// The table: HOST OUTCOME OPEN UNTIL / REASON.
    pub fn table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .hosts
            .iter()
            .map(|h| {
                // an approval shows when it closes; anything else why (a pending answer
                // says how to approve and when it times out)
                let detail = match (h.outcome.as_str(), &h.until, &h.reason) {
                    ("approved", Some(t), _) => t.to_rfc3339_opts(SecondsFormat::Secs, true),
                    (_, _, Some(r)) => r.clone(),
                    (_, Some(t), None) => t.to_rfc3339_opts(SecondsFormat::Secs, true),
                    (_, None, None) => "-".into(),
                };
                vec![h.host.clone(), h.outcome.clone(), detail]
            })
            .collect();
        let mut out = format!("request {}\n", crate::text::escape_capped(&self.id, 200));
        out.push_str(&table::render_capped(
            &["HOST", "OUTCOME", "OPEN UNTIL / REASON"],
            &rows,
            200,
        ));
        if self.hosts.is_empty() {
            out.push_str("(no registered host is selected)\n");
        }
        out
    }
}

/// Runs `jitctl fleet`; `Ok(text or JSON, success)`; `Err`: a usage or connection error.
pub async fn run(args: &FleetArgs, json: bool) -> Result<(String, bool), String> {
    let etcd = resolve(args)?;
    let mut client = connect::connect(&etcd.endpoints, etcd.tls.as_ref()).await?;
    match &args.command {
        FleetCommand::Request {
            hosts,
            ports,
            source,
            duration,
            justification,
            key,
            wait,
        } => {
            let asked = Ask {
                fleet: etcd.fleet.clone(),
                hosts: hosts.iter().flat_map(|h| h.split(',')).map(str::to_string).collect(),
                ports: ports.clone(),
                source: source.clone(),
                duration: *duration,
                justification: justification.clone(),
            };
            let answers = request(&etcd, &mut client, &asked, key.as_deref(), *wait).await?;
            let ok = answers.all_approved();
            Ok((render(json, &answers, Answers::table)?, ok))
        }
        FleetCommand::Status => {
            let state = status(&etcd, &mut client).await?;
            Ok((render(json, &state, FleetState::table)?, true))
        }
        FleetCommand::Approve { id, key, wait } => {
            let answers = approve(&etcd, &mut client, id, key.as_deref(), *wait).await?;
            let ok = answers.all_approved();
            Ok((render(json, &answers, Answers::table)?, ok))
        }
        FleetCommand::Revoke { id } => {
            revoke(&etcd, &mut client, id).await?;
            let done = serde_json::json!({"revoked": id});
            Ok((render(json, &done, |_| format!("revoked {id}\n"))?, true))
        }
    }
}

fn render<T: Serialize>(json: bool, value: &T, human: impl Fn(&T) -> String) -> Result<String, String> {
    match json {
        true => serde_json::to_string_pretty(value)
            .map(|s| s + "\n")
            .map_err(|e| e.to_string()),
        false => Ok(human(value)),
    }
}

/// Flags, else `ETCDCTL_*`, else the file.
fn resolve(args: &FleetArgs) -> Result<Etcd, String> {
    let file = read_file()?;
    let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let endpoints: Vec<String> = match (&args.endpoints, env("ETCDCTL_ENDPOINTS")) {
        (Some(e), _) => e.split(',').map(str::to_string).collect(),
        (None, Some(e)) => e.to_string_lossy().split(',').map(str::to_string).collect(),
        (None, None) => file.endpoints.clone(),
    };
    if endpoints.is_empty() {
        return Err(
            "no etcd endpoints: give --endpoints, ETCDCTL_ENDPOINTS or `endpoints` in ~/.config/jitctl/fleet.toml"
                .into(),
        );
    }
    let pick = |flag: &Option<PathBuf>, var: &str, from_file: &Option<PathBuf>| {
        flag.clone()
            .or_else(|| env(var).map(PathBuf::from))
            .or_else(|| from_file.clone())
    };
    let ca = pick(&args.cacert, "ETCDCTL_CACERT", &file.ca);
    let cert = pick(&args.cert, "ETCDCTL_CERT", &file.cert);
    let key = pick(&args.etcd_key, "ETCDCTL_KEY", &file.key);
    let plain = endpoints.iter().all(|e| e.starts_with("http://"));
    let tls = match (ca, cert, key) {
        (Some(ca), Some(cert), Some(key)) => Some(Tls { ca, cert, key }),
        _ if plain => None,
        _ => return Err(
            "https:// endpoints need --cacert, --cert and --etcd-key (or ETCDCTL_CACERT, ETCDCTL_CERT, ETCDCTL_KEY)"
                .into(),
        ),
    };
    let prefix = args
        .prefix
        .clone()
        .or(file.prefix)
        .unwrap_or_else(|| DEFAULT_PREFIX.into());
    let fleet = args.fleet_id.clone().or(file.id).unwrap_or_else(|| prefix.clone());
    if !valid_fleet_id(&fleet) {
        return Err(format!(
            "--fleet-id: must be 1-128 letters, digits, '.', '-', '_', '/' (the hosts' [fleet] id), got {fleet:?}"
        ));
    }
    Ok(Etcd {
        endpoints,
        tls,
        keys: Keys::new(&prefix),
        fleet,
    })
}

fn read_file() -> Result<FleetFile, String> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".config")));
    let Some(path) = base.map(|b| b.join("jitctl/fleet.toml")) else {
        return Ok(FleetFile::default());
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FleetFile::default()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// What the user asked for, in which fleet.
struct Ask {
    fleet: String,
    hosts: Vec<String>,
    ports: Vec<u16>,
    source: String,
    duration: Duration,
    justification: Option<String>,
}

/// The canonical request for `ask`, signed at `now` with `nonce`.
fn build(ask: &Ask, now: DateTime<Utc>, nonce: [u8; 16]) -> Result<FleetRequest, String> {
    if let Some(bad) = ask
        .hosts
        .iter()
        .find(|h| !valid_name(h.strip_prefix("group:").unwrap_or(h)))
    {
        return Err(format!("--hosts: {bad:?} is not a host name or group:NAME"));
    }
    let mut ports = ask.ports.clone();
    ports.sort_unstable();
    ports.dedup();
    let request = FleetRequest {
        fleet: ask.fleet.clone(),
        hosts: ask.hosts.clone(),
        ports,
        duration: ask.duration.as_secs(),
        source: crate::domain::parse_prefix(&ask.source).map_err(|e| format!("--source: {e}"))?,
        justification: ask.justification.clone(),
        time: DateTime::from_timestamp(now.timestamp(), 0).unwrap_or(now),
        nonce,
    };
    // the parser jitd uses is the judge of what may be sent
    FleetRequest::parse(&request.encode())?;
    Ok(request)
}

async fn request(
    etcd: &Etcd,
    client: &mut Client,
    ask: &Ask,
    key: Option<&Path>,
    wait: Duration,
) -> Result<Answers, String> {
    let request = build(ask, Utc::now(), sign::random16()?)?;
    let text = request.encode();
    let armoured = sign_text(&text, key, crate::fleet::NAMESPACE)?;
    let selected = selected_hosts(etcd, client, &request.hosts).await?;
    let ttl = i64::try_from(request.duration).map_err(|_| "--duration: too long")?;
    let lease = client
        .lease_grant(ttl, None)
        .await
        .map_err(|e| format!("granting a lease: {e}"))?
        .id();
    let id = request.id();
    let mut answering = Answering::watch(etcd, client, &id).await?;
    client
        .put(
            etcd.keys.request(&id),
            FleetRequest::stored(&text, &armoured),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .map_err(|e| format!("writing the request: {e}"))?;
    let all_answered = |a: &BTreeMap<String, StatusRecord>| selected.iter().all(|h| a.contains_key(h));
    let answers = answering.until(etcd, client, &id, wait, all_answered).await?;
    Ok(collect(id, &selected, answers))
}

/// The answers to one request as they arrive: a watch on `status/<id>/` opened before
/// the request (or an approval) is written, so that no answer is missed.
struct Answering {
    stream: etcd_client::WatchStream,
    prefix: String,
}

impl Answering {
    async fn watch(etcd: &Etcd, client: &mut Client, id: &str) -> Result<Answering, String> {
        let prefix = etcd.keys.status_of(id);
        let stream = connect::watch(client, &prefix, 0).await?;
        Ok(Answering { stream, prefix })
    }

    /// The answers once `done` holds for them, or when `wait` is over.
    async fn until(
        &mut self,
        etcd: &Etcd,
        client: &mut Client,
        id: &str,
        wait: Duration,
        done: impl Fn(&BTreeMap<String, StatusRecord>) -> bool,
    ) -> Result<BTreeMap<String, StatusRecord>, String> {
        let deadline = Instant::now() + wait;
        // what was there when read; the watch's older events are already in it
        let (read_at, found) = connect::read_all(client, &etcd.keys.status_of(id)).await?;
        let mut answers = records(&self.prefix, &found);
        while !done(&answers) {
            let left = deadline.saturating_duration_since(Instant::now());
            let response = match tokio::time::timeout(left, self.stream.message()).await {
                Err(_) | Ok(Ok(None)) => break,
                Ok(Err(e)) => return Err(format!("watching the answers: {e}")),
                Ok(Ok(Some(response))) => response,
            };
            for event in response.events() {
                let Some(kv) = event.kv().filter(|kv| kv.mod_revision() > read_at) else {
                    continue;
                };
                let Some(host) = kv.key_str().ok().and_then(|k| k.strip_prefix(self.prefix.as_str())) else {
                    continue;
                };
                match (event.event_type(), serde_json::from_slice::<StatusRecord>(kv.value())) {
                    (etcd_client::EventType::Put, Ok(record)) => answers.insert(host.to_string(), record),
                    _ => answers.remove(host),
                };
            }
        }
        Ok(answers)
    }
}

/// Signs `text` in `namespace` with `key` (or the agent's or ~/.ssh's key, as `jitctl
/// knock` chooses); the armoured signature.
fn sign_text(text: &str, key: Option<&Path>, namespace: &str) -> Result<String, String> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let agent_keys = match key {
        Some(_) => Vec::new(),
        None => sign::agent_keys(std::env::var_os("SSH_AUTH_SOCK").as_deref()),
    };
    let listing = sign::listing(&agent_keys);
    let given = key.map(|k| (k.to_path_buf(), "--key".to_string()));
    let key = sign::choose(given, listing.as_deref(), home.as_deref(), Path::exists)?;
    let dir = sign::PrivateDir::new(sign::random16()?)?;
    sign::sign_with(text, &key, &agent_keys, &dir, namespace)
}

/// Approves request `id` where it waits for an approver: signs an approval naming its
/// ports and source, writes it beside the request on the request's lease, and waits
/// for the hosts that answered `pending` to answer again.
async fn approve(
    etcd: &Etcd,
    client: &mut Client,
    id: &str,
    key: Option<&Path>,
    wait: Duration,
) -> Result<Answers, String> {
    let (request, lease, requester) = live_request(etcd, client, id).await?;
    if request.fleet != etcd.fleet {
        return Err(format!(
            "request {id} is signed for fleet {}, not this one ({}): no host here obeys it",
            request.fleet, etcd.fleet
        ));
    }
    let waiting: Vec<String> = answers(etcd, client, id)
        .await?
        .into_iter()
        .filter(|(_, s)| s.outcome == Outcome::Pending)
        .map(|(host, _)| host)
        .collect();
    if waiting.is_empty() {
        return Err(format!(
            "no host waits for an approval of request {id} (`jitctl fleet status` shows its answers)"
        ));
    }
    let approval = FleetApproval {
        fleet: etcd.fleet.clone(),
        request: id.to_string(),
        requester,
        digest: request.digest(),
        ports: request.ports.clone(),
        source: request.source,
        time: DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap_or_else(Utc::now),
        nonce: sign::random16()?,
    };
    // the approver sees what they approve before the key signs it
    eprintln!(
        "approving request {id}, signed by {}: {}",
        approval.requester,
        crate::text::escape_capped(&request.encode().replace('\n', "; "), 600)
    );
    let text = approval.encode();
    let armoured = sign_text(&text, key, crate::fleet::approval::NAMESPACE)?;
    let options = (lease != 0).then(|| PutOptions::new().with_lease(lease));
    let mut answering = Answering::watch(etcd, client, id).await?;
    client
        .put(
            etcd.keys.approval(id, &approval.id()),
            FleetRequest::stored(&text, &armoured),
            options,
        )
        .await
        .map_err(|e| format!("writing the approval: {e}"))?;
    let decided = |a: &BTreeMap<String, StatusRecord>| {
        waiting
            .iter()
            .all(|h| a.get(h).is_some_and(|s| s.outcome != Outcome::Pending))
    };
    let mut answers = answering.until(etcd, client, id, wait, decided).await?;
    answers.retain(|host, _| waiting.contains(host));
    Ok(collect(id.to_string(), &waiting, answers))
}

/// The live request `id`, its lease and the fingerprint of the key that signed it.
async fn live_request(etcd: &Etcd, client: &mut Client, id: &str) -> Result<(FleetRequest, i64, String), String> {
    let key = request_key(etcd, id)?;
    let got = client
        .get(key.as_str(), None)
        .await
        .map_err(|e| format!("reading {key}: {e}"))?;
    let kv = got.kvs().first().ok_or_else(|| format!("no live request {id}"))?;
    let (text, blob) = crate::fleet::request::split(kv.value()).map_err(|e| format!("request {id}: {e}"))?;
    let request = FleetRequest::parse(text).map_err(|e| format!("request {id}: {e}"))?;
    let blob = blob.ok_or_else(|| format!("request {id} is not signed: no host opens it"))?;
    let requester = crate::remote::sshsig::signer_fingerprint(&blob).map_err(|e| format!("request {id}: {e}"))?;
    Ok((request, kv.lease(), requester))
}

/// The key of request `id`, refusing anything but an id.
fn request_key(etcd: &Etcd, id: &str) -> Result<String, String> {
    let key = etcd.keys.request(id);
    match etcd.keys.request_id(&key) {
        Some(_) => Ok(key),
        None => Err(format!(
            "{id:?} is not a request id (32 hex digits, as `jitctl fleet status` shows)"
        )),
    }
}

/// The registered hosts `targets` select.
async fn selected_hosts(etcd: &Etcd, client: &mut Client, targets: &[String]) -> Result<Vec<String>, String> {
    let hosts = hosts(etcd, client).await?;
    Ok(hosts
        .into_iter()
        .filter(|(name, record)| {
            targets.iter().any(|t| match t.strip_prefix("group:") {
                Some(g) => record.groups.iter().any(|x| x == g),
                None => t.eq_ignore_ascii_case(name),
            })
        })
        .map(|(name, _)| name)
        .collect())
}

async fn hosts(etcd: &Etcd, client: &mut Client) -> Result<BTreeMap<String, HostRecord>, String> {
    under(client, &etcd.keys.hosts()).await
}

async fn answers(etcd: &Etcd, client: &mut Client, id: &str) -> Result<BTreeMap<String, StatusRecord>, String> {
    under(client, &etcd.keys.status_of(id)).await
}

/// The JSON values under `prefix`, by the rest of their key (values that do not read
/// as `T` are left out).
async fn under<T: serde::de::DeserializeOwned>(
    client: &mut Client,
    prefix: &str,
) -> Result<BTreeMap<String, T>, String> {
    Ok(records(prefix, &connect::read_all(client, prefix).await?.1))
}

/// The JSON values of `kvs` under `prefix`, by the rest of their key.
fn records<T: serde::de::DeserializeOwned>(prefix: &str, kvs: &[etcd_client::KeyValue]) -> BTreeMap<String, T> {
    kvs.iter()
        .filter_map(|kv| {
            let name = kv.key_str().ok()?.strip_prefix(prefix)?.to_string();
            Some((name, serde_json::from_slice(kv.value()).ok()?))
        })
        .collect()
}

fn collect(id: String, selected: &[String], mut answers: BTreeMap<String, StatusRecord>) -> Answers {
    let mut hosts: Vec<Answer> = selected
        .iter()
        .map(|h| match answers.remove(h) {
            Some(s) => answer(h, s),
            None => Answer {
                host: h.clone(),
                outcome: "no_answer".into(),
                until: None,
                reason: Some(
                    "no answer in time: its jitd is not connected to etcd, or does not know the signing key (its audit log says which)"
                        .into(),
                ),
            },
        })
        .collect();
    // hosts that answered without being registered (their registration lapsed)
    hosts.extend(answers.into_iter().map(|(h, s)| answer(&h, s)));
    Answers { id, hosts }
}

fn answer(host: &str, s: StatusRecord) -> Answer {
    Answer {
        host: host.to_string(),
        outcome: s.outcome.as_str().into(),
        until: s.until,
        reason: s.reason,
    }
}

/// The fleet as etcd holds it.
#[derive(Debug, Serialize)]
pub struct FleetState {
    /// Registered (alive) hosts.
    pub hosts: BTreeMap<String, LiveHost>,
    /// Live requests, by id: their text and the hosts' answers.
    pub requests: BTreeMap<String, LiveRequest>,
}

/// A registered host.
#[derive(Debug, Serialize)]
pub struct LiveHost {
    /// What it registered.
    #[serde(flatten)]
    pub record: HostRecord,
    /// Seconds left on its registration lease (it renews it every few seconds; a host
    /// that stopped renewing drops out when this reaches 0).
    pub lease_left_secs: Option<i64>,
}

/// A live request.
#[derive(Debug, Serialize)]
pub struct LiveRequest {
    /// Whom it selects.
    pub hosts: Vec<String>,
    /// Ports.
    pub ports: Vec<u16>,
    /// Source.
    pub source: String,
    /// Seconds left on its lease: when etcd deletes it and every host closes it (no
    /// lease: it was written without one, and no host opens it).
    pub lease_left_secs: Option<i64>,
    /// Where it is open (approved answers) and what others said.
    pub answers: BTreeMap<String, StatusRecord>,
}

impl FleetState {
    /// Two tables: hosts, then requests with where they are open.
    pub fn table(&self) -> String {
        let left = |s: Option<i64>| {
            s.map_or_else(
                || "-".to_string(),
                |s| crate::duration::format(Duration::from_secs(s.max(0) as u64)),
            )
        };
        let mut hosts = Vec::new();
        for (name, h) in &self.hosts {
            let r = &h.record;
            hosts.push(vec![
                name.clone(),
                r.version.clone(),
                r.health.clone(),
                r.groups.join(","),
                r.ports.join(","),
                left(h.lease_left_secs),
            ]);
        }
        let mut requests = Vec::new();
        for (id, r) in &self.requests {
            let on = |want: bool| -> String {
                let hosts: Vec<String> = r
                    .answers
                    .iter()
                    .filter(|(_, s)| (s.outcome == Outcome::Approved) == want)
                    .map(|(h, s)| {
                        if want {
                            h.clone()
                        } else {
                            format!("{h}:{}", s.outcome.as_str())
                        }
                    })
                    .collect();
                if hosts.is_empty() {
                    "-".into()
                } else {
                    hosts.join(",")
                }
            };
            let ports: Vec<String> = r.ports.iter().map(u16::to_string).collect();
            requests.push(vec![
                id.clone(),
                r.hosts.join(","),
                ports.join(","),
                r.source.clone(),
                left(r.lease_left_secs),
                on(true),
                on(false),
            ]);
        }
        format!(
            "{}\n{}",
            table::render_capped(&["HOST", "VERSION", "HEALTH", "GROUPS", "PORTS", "LEASE"], &hosts, 200),
            table::render_capped(
                &["REQUEST", "HOSTS", "PORTS", "SOURCE", "CLOSES IN", "OPEN ON", "OTHERS"],
                &requests,
                200
            )
        )
    }
}

/// Seconds left on `lease` (`None`: no lease, or gone).
async fn secs_left(client: &mut Client, lease: i64) -> Result<Option<i64>, String> {
    Ok(connect::lease_left(client, lease).await?.map(|d| d.as_secs() as i64))
}

async fn status(etcd: &Etcd, client: &mut Client) -> Result<FleetState, String> {
    let mut hosts = BTreeMap::new();
    for kv in &connect::read_all(client, &etcd.keys.hosts()).await?.1 {
        let (Some(name), Ok(record)) = (
            kv.key_str()
                .ok()
                .and_then(|k| k.strip_prefix(etcd.keys.hosts().as_str())),
            serde_json::from_slice::<HostRecord>(kv.value()),
        ) else {
            continue;
        };
        let lease_left_secs = secs_left(client, kv.lease()).await?;
        hosts.insert(
            name.to_string(),
            LiveHost {
                record,
                lease_left_secs,
            },
        );
    }
    let mut requests = BTreeMap::new();
    for kv in &connect::read_all(client, &etcd.keys.requests()).await?.1 {
        let Some(id) = kv.key_str().ok().and_then(|k| etcd.keys.request_id(k)) else {
            continue;
        };
        let Ok((text, _)) = crate::fleet::request::split(kv.value()) else {
            continue;
        };
        let Ok(r) = FleetRequest::parse(text) else { continue };
        let live = LiveRequest {
            hosts: r.hosts,
            ports: r.ports,
            source: crate::domain::format_prefix(&r.source),
            lease_left_secs: secs_left(client, kv.lease()).await?,
            answers: answers(etcd, client, id).await?,
        };
        requests.insert(id.to_string(), live);
    }
    Ok(FleetState { hosts, requests })
}

async fn revoke(etcd: &Etcd, client: &mut Client, id: &str) -> Result<(), String> {
    let key = request_key(etcd, id)?;
    let got = client
        .get(key.as_str(), None)
        .await
        .map_err(|e| format!("reading {key}: {e}"))?;
    let Some(kv) = got.kvs().first() else {
        return Err(format!("no live request {id}"));
    };
    // revoking the lease deletes the request and the answers bound to it, at once; but
    // only a lease that carries nothing else (anyone who can write to etcd may have put
    // the request on a host's lease, or on another request's)
    let lease = kv.lease();
    let only_ours = lease != 0 && lease_holds_only(etcd, client, lease, id).await?;
    match only_ours {
        true => client.lease_revoke(lease).await.map(|_| ()),
        false => client.delete(key.as_str(), None).await.map(|_| ()),
    }
    .map_err(|e| format!("revoking {id}: {e}"))
}

/// Whether `lease` carries only request `id`, its answers and its approvals.
async fn lease_holds_only(etcd: &Etcd, client: &mut Client, lease: i64, id: &str) -> Result<bool, String> {
    let options = etcd_client::LeaseTimeToLiveOptions::new().with_keys();
    let ttl = client
        .lease_time_to_live(lease, Some(options))
        .await
        .map_err(|e| format!("reading the lease of {id}: {e}"))?;
    let (request, statuses, approvals) = (
        etcd.keys.request(id),
        etcd.keys.status_of(id),
        etcd.keys.approvals_of(id),
    );
    Ok(ttl.keys().iter().all(|k| {
        let k = String::from_utf8_lossy(k);
        k == request || k.starts_with(&statuses) || k.starts_with(&approvals)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask() -> Ask {
        Ask {
            fleet: "/jitd/".into(),
            hosts: vec!["group:web".into(), "db1".into()],
            ports: vec![3389, 22, 22],
            source: "198.51.100.7".into(),
            duration: Duration::from_secs(3600),
            justification: Some("INC-1234".into()),
        }
    }

    #[test]
    fn the_request_is_canonical_and_bad_input_is_named() {
        let r = build(&ask(), "2026-11-26T13:05:00.7Z".parse().unwrap(), [1; 16]).unwrap();
        assert_eq!(r.ports, [22, 3389]);
        assert_eq!(FleetRequest::parse(&r.encode()).unwrap(), r);
        let mut bad = ask();
        bad.hosts = vec!["group:we b".into()];
        assert!(build(&bad, Utc::now(), [1; 16]).unwrap_err().contains("--hosts"));
        let mut bad = ask();
        bad.source = "nowhere".into();
        assert!(build(&bad, Utc::now(), [1; 16]).unwrap_err().contains("--source"));
        assert_eq!(r.fleet, "/jitd/", "signed for the fleet asked in");
    }

    #[test]
    fn hosts_without_an_answer_are_listed_and_fail_the_request() {
        let mut got = BTreeMap::new();
        let t = "2026-11-26T14:05:00Z".parse().unwrap();
        got.insert(
            "web1".to_string(),
            StatusRecord {
                host: "web1".into(),
                outcome: Outcome::Approved,
                until: Some(t),
                reason: None,
                time: t,
            },
        );
        let answers = collect("ab".repeat(16), &["web1".into(), "web2".into()], got);
        assert!(!answers.all_approved());
        let table = answers.table();
        assert!(table.contains("web1  approved   2026-11-26T14:05:00Z"), "{table}");
        assert!(table.contains("web2  no_answer  no answer in time"), "{table}");
    }
}
