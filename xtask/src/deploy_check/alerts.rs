//! The alert rules: their structure, and every `spillway_*` metric they name against the
//! daemons' registries.

#[allow(clippy::wildcard_imports)]
use super::*;

/// Every series name the daemons export, from their own registries.
///
/// The text encoding leaves out a label family until it has a child, so each family known here
/// gets one first; a family added later without being listed here is reported (its type, and so
/// its series names, cannot be told otherwise).
pub(super) fn exposed_metrics() -> Result<BTreeSet<String>> {
    use prometheus_client::registry::Registry;
    use spillway_ingest::metrics as ingest;
    use spillway_uploader::metrics as uploader;

    let mut names = BTreeSet::new();
    let mut ingest_registry = Registry::default();
    let m = ingest::Metrics::register(&mut ingest_registry);
    m.sessions_ended
        .get_or_create(&ingest::EndLabel { reason: "any" })
        .inc();
    m.refusals
        .get_or_create(&ingest::CodeLabel { code: "ANY".into() })
        .inc();
    m.connections_refused
        .get_or_create(&ingest::EndLabel { reason: "any" })
        .inc();
    let mut uploader_registry = Registry::default();
    let m = uploader::Metrics::register(&mut uploader_registry);
    m.puts
        .get_or_create(&uploader::ResultLabel { result: "any" })
        .inc();
    m.uploads
        .get_or_create(&uploader::ResultLabel { result: "any" })
        .inc();
    m.put_rejections
        .get_or_create(&uploader::ReasonLabel { reason: "any" })
        .inc();

    for (daemon, registry) in [
        ("ingest", &ingest_registry),
        ("uploader", &uploader_registry),
    ] {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry)
            .map_err(|e| anyhow!("encoding the {daemon} metrics: {e}"))?;
        let mut families = BTreeSet::new();
        for (name, kind) in spillway_kit::metrics::families(&text) {
            families.insert(name.to_owned());
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" | "gaugehistogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            for s in suffixes {
                names.insert(format!("{name}{s}"));
            }
        }
        // Every registered name, encoded or not, from the registry's Debug form.
        let debug = format!("{registry:?}");
        for piece in debug.split("Descriptor { name: \"").skip(1) {
            let Some(name) = piece.split('"').next() else {
                continue;
            };
            let encoded = families
                .iter()
                .any(|f| f.ends_with(&format!("_{name}")) || f.contains(&format!("_{name}_")));
            if !encoded {
                bail!(
                    "the {daemon} metric {name} is an empty label family deploy-check does not know: \
                     give it a child in exposed_metrics() (xtask/src/deploy_check.rs)"
                );
            }
        }
    }
    Ok(names)
}

/// What the rule file holds.
#[derive(Debug)]
pub(super) struct AlertsSummary {
    pub(super) groups: usize,
    pub(super) rules: usize,
    pub(super) names: usize,
    pub(super) exported: usize,
}

pub(super) fn check_alerts(
    path: &Path,
    at_f: &str,
    metrics: &BTreeSet<String>,
    report: &mut Report,
) -> Result<AlertsSummary> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let doc = parse_single_yaml(path)?;
    let mut summary = AlertsSummary {
        groups: 0,
        rules: 0,
        names: 0,
        exported: metrics.len(),
    };
    let Some(groups) = at(&doc, &["groups"]).and_then(Value::as_array) else {
        report.fail(format!("{at_f}: no `groups` list"));
        return Ok(summary);
    };
    let mut group_names = BTreeSet::new();
    let mut alert_names = BTreeSet::new();
    for (gi, g) in groups.iter().enumerate() {
        summary.groups += 1;
        let gname = str_at(g, &["name"]).unwrap_or("");
        let at_g = format!("{at_f}: group {gi} ({gname})");
        report.expect(!gname.is_empty() && group_names.insert(gname), || {
            format!("{at_g}: needs a unique name")
        });
        if let Some(m) = g.as_object() {
            for k in m.keys() {
                report.expect(
                    ["name", "interval", "rules", "limit", "query_offset"].contains(&k.as_str()),
                    || format!("{at_g}: unknown key {k}"),
                );
            }
        }
        let rules = arr_at(g, &["rules"]);
        report.expect(!rules.is_empty(), || format!("{at_g}: no rules"));
        for (ri, r) in rules.iter().enumerate() {
            summary.rules += 1;
            let name = str_at(r, &["alert"]).or_else(|| str_at(r, &["record"]));
            let at_r = format!("{at_g} rule {ri} ({})", name.unwrap_or("?"));
            if let Some(m) = r.as_object() {
                for k in m.keys() {
                    report.expect(
                        [
                            "alert",
                            "record",
                            "expr",
                            "for",
                            "keep_firing_for",
                            "labels",
                            "annotations",
                        ]
                        .contains(&k.as_str()),
                        || format!("{at_r}: unknown key {k}"),
                    );
                }
            }
            let expr = str_at(r, &["expr"]).unwrap_or("");
            report.expect(!expr.trim().is_empty() && balanced(expr), || {
                format!("{at_r}: expr is empty or its brackets and quotes do not balance")
            });
            if let Some(f) = at(r, &["for"]) {
                report.expect(f.as_str().is_some_and(prometheus_duration), || {
                    format!("{at_r}: `for: {f}` is not a Prometheus duration")
                });
            }
            if let Some(alert) = str_at(r, &["alert"]) {
                report.expect(alert_names.insert(alert.to_owned()), || {
                    format!("{at_r}: alert name used twice")
                });
                report.expect(
                    matches!(
                        str_at(r, &["labels", "severity"]),
                        Some("critical" | "warning" | "info")
                    ),
                    || format!("{at_r}: labels.severity must be critical, warning or info"),
                );
                for a in ["summary", "description"] {
                    report.expect(
                        str_at(r, &["annotations", a]).is_some_and(|s| !s.trim().is_empty()),
                        || format!("{at_r}: annotations.{a} is missing"),
                    );
                }
            } else {
                report.expect(str_at(r, &["record"]).is_some(), || {
                    format!("{at_r}: neither `alert` nor `record`")
                });
            }
        }
    }
    let mut seen = BTreeSet::new();
    for (line_no, line) in text.lines().enumerate() {
        for name in spillway_identifiers(line) {
            let new = seen.insert(name.clone());
            if !metrics.contains(&name) {
                report.fail(format!(
                    "{at_f}:{}: {name} is not a metric the daemons export",
                    line_no + 1
                ));
            } else if new {
                report.checks += 1;
            }
        }
    }
    summary.names = seen.len();
    Ok(summary)
}

/// Every identifier starting with `spillway_` in `line`.
pub(super) fn spillway_identifiers(line: &str) -> Vec<String> {
    let bytes = line.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(pos) = line[i..].find("spillway_") {
        let start = i + pos;
        let boundary = start == 0 || {
            let b = bytes[start - 1];
            !(b.is_ascii_alphanumeric() || b == b'_')
        };
        let end = line[start..]
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .map_or(line.len(), |e| start + e);
        if boundary {
            out.push(line[start..end].to_owned());
        }
        i = end.max(start + 1);
    }
    out
}

/// Brackets balance and quotes close, outside quoted strings.
pub(super) fn balanced(expr: &str) -> bool {
    let mut stack = Vec::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '(' | '[' | '{' => stack.push(c),
            ')' | ']' | '}' => {
                let open = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                if stack.pop() != Some(open) {
                    return false;
                }
            }
            _ => {}
        }
    }
    stack.is_empty() && quote.is_none()
}

/// A Prometheus duration: one or more `<number><unit>`, units ms s m h d w y.
pub(super) fn prometheus_duration(s: &str) -> bool {
    let mut rest = s;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let unit = ["ms", "s", "m", "h", "d", "w", "y"]
            .iter()
            .find(|u| rest.starts_with(**u));
        match unit {
            Some(u) => rest = &rest[u.len()..],
            None => return false,
        }
    }
    true
}
