//! The HTML status page at `GET /` of the admin listener: the `/status` data as a table
//! per listener, breaker states coloured, refreshing itself every two seconds. No
//! external assets, so it works on an air-gapped node.

use std::fmt::Write as _;

use serde_json::Value;

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn num(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => esc(s),
        other => esc(&other.to_string()),
    }
}

/// Renders the page from a `/status` document.
pub fn render(status: &Value) -> String {
    let mut html = String::with_capacity(8192);
    let version = status["version"].as_str().unwrap_or("");
    let uptime = status["uptime_seconds"].as_u64().unwrap_or(0);
    let _ = write!(
        html,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="2">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>breakwater status</title>
<style>
body{{font:14px/1.4 system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em;color:#222;background:#fafafa}}
h1{{font-size:1.4em;margin:0 0 .2em}} h2{{font-size:1.1em;margin:1.4em 0 .4em}}
.meta{{color:#666;margin-bottom:1em}}
table{{border-collapse:collapse;background:#fff;min-width:60em}}
th,td{{border:1px solid #ddd;padding:.35em .7em;text-align:right}}
th{{background:#eef1f5;text-align:center}} td.l{{text-align:left}}
.state{{font-weight:600;border-radius:3px;padding:.1em .5em;color:#fff}}
.closed{{background:#2e7d32}} .open{{background:#c62828}} .half_open{{background:#ef8f00}}
.forced_open{{background:#6a1b9a}} .forced_closed{{background:#1565c0}} .none{{background:#9e9e9e}}
.err{{color:#c62828;font-weight:600}}
</style></head><body>
<h1>breakwater</h1>
<div class="meta">version {} &middot; up {}s &middot; refreshes every 2s &middot; <a href="/status">/status</a> &middot; <a href="/metrics">/metrics</a> &middot; <a href="/config">/config</a></div>
"#,
        esc(version),
        uptime
    );
    let routes = status["routes"].as_array().cloned().unwrap_or_default();
    let mut listeners: Vec<String> = Vec::new();
    for r in &routes {
        let l = r["listener"].as_str().unwrap_or("").to_string();
        if !listeners.contains(&l) {
            listeners.push(l);
        }
    }
    for l in &listeners {
        let _ = write!(
            html,
            "<h2>listener {}</h2>\n<table><thead><tr><th>route</th><th>upstream</th><th>circuit</th>\
<th>failures / calls in window</th><th>tokens / burst</th><th>in flight</th><th>requests</th><th>errors</th></tr></thead><tbody>\n",
            esc(l)
        );
        for r in routes.iter().filter(|r| r["listener"].as_str() == Some(l)) {
            let (state, window) = match r["circuit"].as_object() {
                Some(c) => {
                    let s = c.get("state").and_then(Value::as_str).unwrap_or("closed");
                    (
                        format!(r#"<span class="state {s}">{s}</span>"#, s = esc(s)),
                        format!(
                            "{} / {}",
                            num(&c["failures_in_window"]),
                            num(&c["requests_in_window"])
                        ),
                    )
                }
                None => (
                    r#"<span class="state none">none</span>"#.to_string(),
                    "-".into(),
                ),
            };
            let bucket = match r["rate_limit"].as_object() {
                Some(rl) => format!("{} / {}", num(&rl["tokens"]), num(&rl["burst"])),
                None => "-".into(),
            };
            let errors = r["errors"].as_u64().unwrap_or(0);
            let err_cell = if errors > 0 {
                format!(r#"<td class="err">{errors}</td>"#)
            } else {
                "<td>0</td>".into()
            };
            let _ = writeln!(
                html,
                r#"<tr data-route="{name}"><td class="l">{name}</td><td class="l">{up}</td><td>{state}</td><td>{window}</td><td>{bucket}</td><td>{inflight}</td><td>{requests}</td>{err_cell}</tr>"#,
                name = esc(r["name"].as_str().unwrap_or("")),
                up = esc(r["upstream"].as_str().unwrap_or("")),
                inflight = num(&r["inflight"]),
                requests = num(&r["requests"]),
            );
        }
        html.push_str("</tbody></table>\n");
    }
    html.push_str("</body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_routes_with_states_and_escapes() {
        let s = json!({"version": "0.1.0", "uptime_seconds": 5, "routes": [
            {"listener": "in", "name": "api", "upstream": "a<b", "inflight": 1, "requests": 10, "errors": 2,
             "circuit": {"state": "open", "failures_in_window": 6, "requests_in_window": 10},
             "rate_limit": {"tokens": 3, "burst": 5}},
            {"listener": "in", "name": "raw", "upstream": "a", "inflight": 0, "requests": 0, "errors": 0,
             "circuit": null, "rate_limit": null}
        ]});
        let html = render(&s);
        assert!(html.contains(r#"<span class="state open">open</span>"#));
        assert!(html.contains("6 / 10"));
        assert!(html.contains("3 / 5"));
        assert!(html.contains("a&lt;b"));
        assert!(html.contains(r#"data-route="raw""#));
    }
}
