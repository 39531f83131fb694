//! The knock section's ratios, its table, and the figures its JSON must hold.

use serde_json::{json, Value};

/// Figures the results must hold (checked by the smoke run), under `/knock`.
pub const SHAPE: &[&str] = &[
    "/quiet/jitctl/p50_ms",
    "/quiet/jitctl/p99_ms",
    "/quiet/jitctl/sign_p50_ms",
    "/quiet/jitctl_waiting/p99_ms",
    "/quiet/presigned/p50_ms",
    "/quiet/presigned/p99_ms",
    "/flood/quiet/presigned/p99_ms",
    "/flood/single/presigned/p99_ms",
    "/flood/many/presigned/p99_ms",
    "/flood/many/jitctl/p99_ms",
    "/flood/many/requests/p99_ms",
    "/flood/many/garbage_pps",
    "/flood/many/jitd_received_per_s",
    "/flood/many/kernel_dropped_per_s",
    "/flood/many/jitd_cpu_pct",
    "/capacity/0/granted",
    "/ratios/presigned_p99_many_over_quiet",
    "/ratios/requests_p99_many_over_quiet",
];

/// `a / b` of the numbers at two JSON pointers (null when either is missing).
fn ratio(v: &Value, a: &str, b: &str) -> Value {
    match (
        v.pointer(a).and_then(Value::as_f64),
        v.pointer(b).and_then(Value::as_f64),
    ) {
        (Some(a), Some(b)) if b > 0.0 => json!(a / b),
        _ => Value::Null,
    }
}

/// Ratios within the run: under a flood against quiet, jitd against fwknop.
pub fn ratios(v: &Value) -> Value {
    let mut r = json!({});
    for flood in ["single", "many"] {
        for (what, p) in [
            ("presigned", "p50"),
            ("presigned", "p99"),
            ("jitctl", "p99"),
            ("requests", "p99"),
        ] {
            r[format!("{what}_{p}_{flood}_over_quiet")] = ratio(
                v,
                &format!("/flood/{flood}/{what}/{p}_ms"),
                &format!("/flood/quiet/{what}/{p}_ms"),
            );
        }
    }
    // jitd's own share of a flood: the single-source flood costs the machine the same
    // sending and dropping but reaches jitd's socket at a few packets a second
    for (what, p) in [("presigned", "p99"), ("requests", "p99")] {
        r[format!("{what}_{p}_many_over_single")] = ratio(
            v,
            &format!("/flood/many/{what}/{p}_ms"),
            &format!("/flood/single/{what}/{p}_ms"),
        );
    }
    for p in ["p50", "p99"] {
        r[format!("jitctl_over_fwknop_client_{p}")] = ratio(
            v,
            &format!("/quiet/jitctl/{p}_ms"),
            &format!("/fwknop/quiet/client/{p}_ms"),
        );
        r[format!("presigned_over_fwknop_premade_{p}")] = ratio(
            v,
            &format!("/quiet/presigned/{p}_ms"),
            &format!("/fwknop/quiet/premade/{p}_ms"),
        );
        r[format!("fwknop_premade_{p}_flood_over_quiet")] = ratio(
            v,
            &format!("/fwknop/flood/premade/{p}_ms"),
            &format!("/fwknop/quiet/premade/{p}_ms"),
        );
    }
    r
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn latency_row(name: &str, s: &Value) {
    println!(
        "   {:<44} {:>6}  {:>7.2}  {:>7.2}  {:>7.2}  {:>6}",
        name,
        s["knocks"].as_u64().unwrap_or(0),
        f(&s["p50_ms"]),
        f(&s["p99_ms"]),
        f(&s["max_ms"]),
        s["failed"].as_u64().unwrap_or(0)
    );
}

/// Prints the section.
pub fn print(k: &Value) {
    println!(
        "\n7. Remote knocks ({} client addresses, {} flood addresses)\n   {:<44} {:>6}  {:>7}  {:>7}  {:>7}  {:>6}",
        k["client_sources"],
        k["flood_sources"],
        "quiet, to the first accepted connection",
        "knocks",
        "p50 ms",
        "p99 ms",
        "max ms",
        "failed"
    );
    println!(
        "   (load average {:.1} at the start, {:.1} at the end, on {} cores)",
        f(&k["loadavg_start"]),
        f(&k["loadavg_end"]),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let q = &k["quiet"];
    latency_row("jitctl knock, signing via ssh-agent", &q["jitctl"]);
    println!(
        "     of which signing (ssh-keygen + agent): p50 {:.1} ms, p99 {:.1} ms",
        f(&q["jitctl"]["sign_p50_ms"]),
        f(&q["jitctl"]["sign_p99_ms"])
    );
    latency_row("jitctl knock waiting itself (wall time)", &q["jitctl_waiting"]);
    latency_row("signed beforehand (send to open)", &q["presigned"]);
    println!(
        "     (their signatures, ssh-keygen -Y sign via the agent: p50 {:.1} ms, p99 {:.1} ms)",
        f(&q["presigned"]["sign_p50_ms"]),
        f(&q["presigned"]["sign_p99_ms"])
    );
    let fw = &k["fwknop"];
    if fw["skipped"].is_string() {
        println!("   fwknop: skipped: {}", fw["skipped"].as_str().unwrap_or(""));
    } else {
        latency_row("fwknop client (spawn to open)", &fw["quiet"]["client"]);
        latency_row("fwknop SPA made beforehand (send to open)", &fw["quiet"]["premade"]);
    }
    print_floods(k);
    print_capacity(k);
    println!("\n   ratios (same run):");
    for (name, value) in k["ratios"].as_object().into_iter().flatten() {
        println!("     {name:<44} {:.2}", f(value));
    }
}

fn print_floods(k: &Value) {
    println!(
        "\n   {:<12} {:>9} {:>9} {:>10} {:>9} {:>6} {:>6}  {:>22}  {:>13}  {:>13}",
        "flood",
        "garbage/s",
        "strngr/s",
        "k.drop/s",
        "got/s",
        "cpu%",
        "gen%",
        "knock p50/p99/max (lost)",
        "jitctl p50/99",
        "request p50/99"
    );
    for name in ["quiet", "single", "many"] {
        let r = &k["flood"][name];
        flood_row(
            &format!("jitd {name}"),
            r,
            &r["presigned"],
            &r["jitctl"],
            &r["requests"],
            r["jitd_received_per_s"].clone(),
            r["jitd_cpu_pct"].clone(),
        );
    }
    let fw = &k["fwknop"]["flood"];
    if fw.is_object() {
        let c = &fw["counters"];
        let secs = f(&c["secs"]);
        let row = json!({"garbage_pps": fw["sent"]["garbage_pps"], "stranger_pps": fw["sent"]["stranger_pps"],
            "kernel_dropped_per_s": 0, "bench_cpu_pct": c["bench_cpu_pct"]});
        let got = json!(f(&c["udp_delivered"]) / secs);
        flood_row(
            "fwknop many",
            &row,
            &fw["premade"],
            &Value::Null,
            &Value::Null,
            got,
            c["daemon_cpu_pct"].clone(),
        );
    }
}

fn flood_row(name: &str, r: &Value, knock: &Value, ctl: &Value, req: &Value, got: Value, cpu: Value) {
    // p50/p99 of a summary, or nothing when the row has none (fwknop: no jitctl, no socket)
    let pair = |s: &Value, prec: usize| match (s["p50_ms"].as_f64(), s["p99_ms"].as_f64()) {
        (Some(a), Some(b)) => format!("{a:>6.prec$}/{b:>6.prec$}"),
        _ => String::new(),
    };
    let line = format!(
        "   {:<12} {:>9.0} {:>9.0} {:>10.0} {:>9.0} {:>6.0} {:>6.0}  {:>6.1}/{:>6.1}/{:>6.1} ({:>2})  {:>13}  {:>13}",
        name,
        f(&r["garbage_pps"]),
        f(&r["stranger_pps"]),
        f(&r["kernel_dropped_per_s"]),
        f(&got),
        f(&cpu),
        f(&r["bench_cpu_pct"]),
        f(&knock["p50_ms"]),
        f(&knock["p99_ms"]),
        f(&knock["max_ms"]),
        knock["failed"].as_u64().unwrap_or(0),
        pair(ctl, 1),
        pair(req, 2)
    );
    println!("{}", line.trim_end());
}

/// Seconds with two decimals, or `-` when there is no figure (not all opened).
fn secs(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |s| format!("{s:.2}"))
}

fn print_capacity(k: &Value) {
    println!("\n   valid knocks at a rate           rate/s    sent   opened  all open, s after the last sent");
    for r in k["capacity"].as_array().into_iter().flatten() {
        println!(
            "   jitd                        {:>8} {:>7} {:>8} {:>20}   (busy {}, rate-limited {})",
            r["rate"].as_u64().unwrap_or(0),
            r["sent"].as_u64().unwrap_or(0),
            r["granted"].as_u64().unwrap_or(0),
            secs(&r["all_granted_after_last_sent_s"]),
            r["busy"],
            r["rate_limited"]
        );
    }
    for r in k["fwknop"]["capacity"].as_array().into_iter().flatten() {
        println!(
            "   fwknop                      {:>8} {:>7} {:>8} {:>20}   (within 2 s; {} after {:.1} s)",
            r["rate"].as_u64().unwrap_or(0),
            r["sent"].as_u64().unwrap_or(0),
            r["opened_in_time"].as_u64().unwrap_or(0),
            secs(&r["all_opened_after_last_sent_s"]),
            r["opened_eventually"],
            f(&r["eventually_after_s"])
        );
    }
}
