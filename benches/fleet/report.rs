//! The fleet section's ratios, its table, and the figures its JSON must hold.

use serde_json::{json, Value};

/// Figures every size's row must hold (checked by the smoke run).
const ROW_SHAPE: &[&str] = &[
    "/hosts",
    "/requests",
    "/join_s",
    "/open/samples",
    "/open/p50_ms",
    "/open/p99_ms",
    "/all_open/p50_ms",
    "/all_open/p99_ms",
    "/answered/p50_ms",
    "/closed/p50_ms",
    "/closed/p99_ms",
    "/all_closed/p99_ms",
    "/revoked/p50_ms",
    "/memory/etcd_empty_mb",
    "/memory/idle/jitd_mb_mean",
    "/memory/idle/jitd_mb_max",
    "/memory/idle/etcd_mb",
    "/memory/idle/etcd_db_bytes",
    "/memory/after_rounds/jitd_mb_mean",
    "/memory/live/jitd_mb_mean",
    "/memory/live/etcd_mb",
    "/memory/live/etcd_db_bytes",
    "/memory/live/etcd_keys",
    "/memory/etcd_mb_per_host_joined",
];

/// Panics unless the section holds every figure for every size, and every host was
/// timed in every round.
pub fn check(v: &Value) {
    assert!(
        v["jitd_mb_without_fleet"].is_number(),
        "fleet: results lack jitd_mb_without_fleet"
    );
    let rows = v["sizes"].as_array().expect("fleet: a row per size");
    assert!(!rows.is_empty(), "fleet: no sizes");
    for row in rows {
        for path in ROW_SHAPE {
            assert!(
                row.pointer(path).is_some_and(Value::is_number),
                "fleet row {}: results lack the number {path}",
                row["hosts"]
            );
        }
        let (hosts, requests) = (row["hosts"].as_u64().unwrap(), row["requests"].as_u64().unwrap());
        for what in ["open", "closed"] {
            assert_eq!(
                row[what]["samples"].as_u64(),
                Some(hosts * requests),
                "fleet row {hosts}: a {what} time per host and request"
            );
        }
    }
}

/// The largest size against the smallest, in the same run (none with one size).
pub fn ratios(v: &Value) -> Value {
    let rows = v["sizes"].as_array().map_or(&[][..], Vec::as_slice);
    let (Some(small), Some(big)) = (rows.first(), rows.last()) else {
        return json!({});
    };
    if rows.len() < 2 {
        return json!({});
    }
    let (a, b) = (small["hosts"].as_u64().unwrap_or(0), big["hosts"].as_u64().unwrap_or(0));
    let mut r = json!({});
    for what in ["open", "all_open", "answered", "closed", "all_closed"] {
        for p in ["p50", "p99"] {
            let key = format!("{p}_ms");
            if let (Some(x), Some(y)) = (small[what][&key].as_f64(), big[what][&key].as_f64()) {
                r[format!("{what}_{p}_{b}_over_{a}")] = json!(y / x);
            }
        }
    }
    let mb = |row: &Value, k: &str| row["memory"]["idle"][k].as_f64();
    if let (Some(x), Some(y)) = (mb(small, "etcd_mb"), mb(big, "etcd_mb")) {
        r[format!("etcd_mb_per_host_idle_{a}_to_{b}")] = json!((y - x) / (b - a) as f64);
    }
    r
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn trio(s: &Value) -> String {
    format!(
        "{:6.1} {:6.1} {:6.1}",
        f(&s["p50_ms"]),
        f(&s["p99_ms"]),
        f(&s["max_ms"])
    )
}

/// Prints the section.
pub fn print(v: &Value) {
    println!(
        "\n8. Fleet: one request in etcd opens every host ({}, TLS client certificates; a jitd per namespace; probes every {} ms)",
        v["etcd_version"].as_str().unwrap_or("etcd"),
        v["probe_every_ms"]
    );
    println!(
        "   (load average {:.1} at the start, {:.1} at the end, on {} cores; {:.0} s)",
        f(&v["loadavg_start"]),
        f(&v["loadavg_end"]),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        f(&v["secs"])
    );
    println!(
        "   {:>5} {:>6} {:>5}  {:>20}  {:>20}  {:>13}  {:>20}  {:>20}",
        "hosts",
        "join s",
        "reqs",
        "open p50 p99 max",
        "all open p50 p99 max",
        "jitctl p50/99",
        "closed p50 p99 max",
        "all closed"
    );
    let rows = v["sizes"].as_array().map_or(&[][..], Vec::as_slice);
    for r in rows {
        println!(
            "   {:>5} {:>6.1} {:>5}  {:>20}  {:>20}  {:>6.0}/{:<6.0}  {:>20}  {:>20}",
            r["hosts"].as_u64().unwrap_or(0),
            f(&r["join_s"]),
            r["requests"].as_u64().unwrap_or(0),
            trio(&r["open"]),
            trio(&r["all_open"]),
            f(&r["answered"]["p50_ms"]),
            f(&r["answered"]["p99_ms"]),
            trio(&r["closed"]),
            trio(&r["all_closed"])
        );
    }
    println!("   (open, closed: per host, every host of every request; all: the last host of each request; jitctl: fleet request's wall time, every answer read)");
    for r in rows {
        let hosts = r["hosts"].as_f64().unwrap_or(f64::NAN);
        let c = &r["cpu"];
        println!(
            "   {:>3} hosts: first host open p50 {:.1} ms; jitctl revoke p50 {:.1} ms; CPU per request + revoke: jitd {:.1} ms per host ({:.0} ms all hosts), etcd {:.0} ms;\n              idle: each jitd {:.2} %, etcd {:.2} % of a core; jitd RSS after the rounds {:.1} MB (mean); jitd warnings {}",
            hosts,
            f(&r["first_open"]["p50_ms"]),
            f(&r["revoked"]["p50_ms"]),
            f(&c["jitd_ms_total_per_round"]) / hosts,
            f(&c["jitd_ms_total_per_round"]),
            f(&c["etcd_ms_per_round"]),
            f(&c["idle"]["jitd_pct_per_host"]),
            f(&c["idle"]["etcd_pct"]),
            f(&r["memory"]["after_rounds"]["jitd_mb_mean"]),
            r["warnings"]["count"]
        );
        for kind in r["warnings"]["kinds"].as_array().into_iter().flatten() {
            println!("       {}", kind.as_str().unwrap_or(""));
        }
    }
    let b = &v["rounds_cpu"];
    println!(
        "   the bench during the rounds: probes {:.0} % of a core, jitctl and its helpers {:.0} %",
        f(&b["probes_pct"]),
        f(&b["jitctl_and_helpers_pct"])
    );
    println!(
        "\n   {:>5}  {:>16}  {:>16}  {:>10}  {:>10}  {:>10}  {:>12}  {:>10}  {:>9}",
        "hosts",
        "jitd MB idle m/x",
        "jitd MB live m/x",
        "etcd empty",
        "etcd idle",
        "etcd live",
        "MB/host idle",
        "db idle",
        "db live"
    );
    for r in rows {
        let m = &r["memory"];
        let (i, l) = (&m["idle"], &m["live"]);
        println!(
            "   {:>5}  {:>7.1}/{:<8.1}  {:>7.1}/{:<8.1}  {:>10.1}  {:>10.1}  {:>10.1}  {:>12.2}  {:>7.0}KiB  {:>6.0}KiB",
            r["hosts"].as_u64().unwrap_or(0),
            f(&i["jitd_mb_mean"]),
            f(&i["jitd_mb_max"]),
            f(&l["jitd_mb_mean"]),
            f(&l["jitd_mb_max"]),
            f(&m["etcd_empty_mb"]),
            f(&i["etcd_mb"]),
            f(&l["etcd_mb"]),
            f(&m["etcd_mb_per_host_joined"]),
            f(&i["etcd_db_bytes"]) / 1024.0,
            f(&l["etcd_db_bytes"]) / 1024.0
        );
    }
    if let Some(r) = rows.first() {
        println!(
            "   (live: {} requests open on every host; etcd RSS in MB; db: etcd's db file; a jitd without [fleet]: {:.1} MB)",
            r["memory"]["live"]["requests"],
            f(&v["jitd_mb_without_fleet"])
        );
    }
    if let Some(big) = rows.last() {
        let p99 = f(&big["open"]["p99_ms"]);
        println!(
            "   target request to open p99 <= 250 ms with {} hosts: {:.1} ms, {}",
            big["hosts"],
            p99,
            if p99 <= 250.0 { "met" } else { "missed" }
        );
    }
    let ratios = v["ratios"].as_object();
    if ratios.is_some_and(|r| !r.is_empty()) {
        println!("\n   ratios (same run):");
        for (name, value) in ratios.into_iter().flatten() {
            println!("     {name:<44} {:.2}", f(value));
        }
    }
}
