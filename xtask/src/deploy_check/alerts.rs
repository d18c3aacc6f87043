//! The alert rules: their structure, and every `spillway_*` metric they name against the
//! daemons' registries (`promql.rs`).

#[allow(clippy::wildcard_imports)]
use super::*;

/// What the rule file holds.
#[derive(Debug)]
pub(super) struct AlertsSummary {
    pub(super) groups: usize,
    pub(super) rules: usize,
    pub(super) names: usize,
    pub(super) exported: usize,
    /// Every alert rule, in file order (the runbook is checked against them).
    pub(super) alerts: Vec<AlertRule>,
}

/// One alert rule, as the runbook check needs it.
#[derive(Debug)]
pub(super) struct AlertRule {
    pub(super) name: String,
    /// Where it is, for messages.
    pub(super) at: String,
    pub(super) runbook_url: Option<String>,
}

pub(super) fn check_alerts(
    path: &Path,
    at_f: &str,
    metrics: &BTreeSet<String>,
    report: &mut Report,
) -> Result<AlertsSummary> {
    let doc = parse_single_yaml(path)?;
    let mut summary = AlertsSummary {
        groups: 0,
        rules: 0,
        names: 0,
        exported: metrics.len(),
        alerts: Vec::new(),
    };
    let Some(groups) = at(&doc, &["groups"]).and_then(Value::as_array) else {
        report.fail(format!("{at_f}: no `groups` list"));
        return Ok(summary);
    };
    let mut seen = BTreeSet::new();
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
            check_promql(&at_r, expr, metrics, &mut seen, report);
            if let Some(f) = at(r, &["for"]) {
                report.expect(
                    f.as_str()
                        .is_some_and(|d| promql_parser::util::parse_duration(d).is_ok()),
                    || format!("{at_r}: `for: {f}` is not a Prometheus duration"),
                );
            }
            if let Some(alert) = str_at(r, &["alert"]) {
                summary.alerts.push(AlertRule {
                    name: alert.to_owned(),
                    at: at_r.clone(),
                    runbook_url: str_at(r, &["annotations", "runbook_url"]).map(str::to_owned),
                });
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
    summary.names = seen.len();
    Ok(summary)
}
