//! A rule's expressions written back roughly as `nft list` prints them, so that a
//! finding can quote the rule (pure). What this does not know is written `…`; the
//! handle always names the rule exactly. The text is not escaped: whoever shows it to
//! a terminal does (names in a ruleset are root's, but still only text).

use serde_json::Value;

/// The longest rule text shown.
const MAX_TEXT: usize = 200;

/// The rule as text: matches, statements and verdict, space-separated.
pub fn rule(exprs: &[Value]) -> String {
    let words: Vec<String> = exprs.iter().filter_map(expr).collect();
    let text = words.join(" ");
    if text.chars().count() <= MAX_TEXT {
        return text;
    }
    let mut cut: String = text.chars().take(MAX_TEXT).collect();
    cut.push('…');
    cut
}

fn expr(e: &Value) -> Option<String> {
    let (key, body) = e.as_object()?.iter().next()?;
    Some(match key.as_str() {
        "match" => {
            let op = match body["op"].as_str().unwrap_or("==") {
                "==" | "in" => String::new(),
                other => format!("{other} "),
            };
            format!("{} {op}{}", value(&body["left"]), value(&body["right"]))
        }
        "counter" => return None,
        "accept" | "drop" | "return" | "continue" => key.clone(),
        "reject" => "reject".into(),
        "jump" | "goto" => format!("{key} {}", body["target"].as_str().unwrap_or("…")),
        "xt" => format!(
            "xt {} \"{}\"",
            body["type"].as_str().unwrap_or("…"),
            body["name"].as_str().unwrap_or("…")
        ),
        "vmap" => format!("{} vmap {}", value(&body["key"]), value(&body["data"])),
        "log" => "log".into(),
        "limit" => "limit …".into(),
        "dnat" => format!("dnat to {}", value(&body["addr"])),
        other => other.to_string(),
    })
}

fn value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Array(list) => list.iter().map(value).collect::<Vec<_>>().join(","),
        Value::Object(o) => match o.iter().next() {
            Some((k, body)) => object(k, body),
            None => "…".into(),
        },
        Value::Null => "…".into(),
    }
}

fn object(key: &str, body: &Value) -> String {
    match key {
        "payload" => match (body["protocol"].as_str(), body["field"].as_str()) {
            (Some(p), Some(f)) => format!("{p} {f}"),
            _ => "@payload".into(),
        },
        "meta" => match body["key"].as_str() {
            Some(k @ ("iif" | "iifname" | "oif" | "oifname")) => k.to_string(),
            Some(k) => format!("meta {k}"),
            None => "meta …".into(),
        },
        "ct" => format!("ct {}", body["key"].as_str().unwrap_or("…")),
        "fib" => format!(
            "fib {} {}",
            value(&body["flags"]).replace(',', " . "),
            body["result"].as_str().unwrap_or("…")
        ),
        "set" => format!(
            "{{ {} }}",
            body.as_array()
                .into_iter()
                .flatten()
                .map(value)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        "range" => format!("{}-{}", value(&body[0]), value(&body[1])),
        "prefix" => format!("{}/{}", value(&body["addr"]), value(&body["len"])),
        "concat" => body
            .as_array()
            .into_iter()
            .flatten()
            .map(value)
            .collect::<Vec<_>>()
            .join(" . "),
        "&" => format!("{} & {}", value(&body[0]), value(&body[1])),
        "elem" => value(&body["val"]),
        "accept" | "drop" | "return" | "continue" => key.to_string(),
        "jump" | "goto" => format!("{key} {}", body["target"].as_str().unwrap_or("…")),
        _ => "…".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_read_like_nft_prints_them() {
        let e: Vec<Value> = serde_json::from_str(
            r#"[{"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"saddr"}},"right":{"prefix":{"addr":"10.0.0.0","len":8}}}},
                {"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":{"set":[22,{"range":[5900,5999]}]}}},
                {"match":{"op":"in","left":{"ct":{"key":"state"}},"right":["new","untracked"]}},
                {"counter":{"packets":0,"bytes":0}},{"accept":null}]"#,
        )
        .unwrap();
        assert_eq!(
            rule(&e),
            "ip saddr 10.0.0.0/8 tcp dport { 22, 5900-5999 } ct state new,untracked accept"
        );
        let e: Vec<Value> = serde_json::from_str(
            r#"[{"match":{"op":"!=","left":{"meta":{"key":"iifname"}},"right":"lo\u001b[31m"}},{"xt":{"type":"match","name":"conntrack"}},{"drop":null}]"#,
        )
        .unwrap();
        let text = rule(&e);
        assert!(text.starts_with("iifname != lo"), "{text}");
        assert!(text.ends_with("xt match \"conntrack\" drop"), "{text}");
        let long: Vec<Value> = vec![serde_json::json!({"jump": {"target": "x".repeat(500)}})];
        assert_eq!(rule(&long).chars().count(), MAX_TEXT + 1);
    }
}
