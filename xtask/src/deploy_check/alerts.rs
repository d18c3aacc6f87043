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
    m.omi_closes
        .get_or_create(&ingest::CodeLabel { code: "ANY".into() })
        .inc();
    m.omi_upstream_connects
        .get_or_create(&ingest::ResultLabel { result: "any" })
        .inc();
    for family in [
        &m.omi_ignored_bytes,
        &m.omi_chunks_cut,
        &m.omi_upstream_dropped_frames,
        &m.omi_upstream_replies,
    ] {
        family
            .get_or_create(&ingest::EndLabel { reason: "any" })
            .inc();
    }
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
                     give it a child in exposed_metrics() (xtask/src/deploy_check/alerts.rs)"
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
            match promql_parser::parser::parse(expr) {
                Ok(ast) => {
                    report.checks += 1;
                    for name in metric_names(&ast) {
                        if !metrics.contains(&name) {
                            report
                                .fail(format!("{at_r}: {name} is not a metric the daemons export"));
                        } else if seen.insert(name) {
                            report.checks += 1;
                        }
                    }
                }
                Err(e) => report.fail(format!("{at_r}: expr is not PromQL: {e}")),
            }
            if let Some(f) = at(r, &["for"]) {
                report.expect(
                    f.as_str()
                        .is_some_and(|d| promql_parser::util::parse_duration(d).is_ok()),
                    || format!("{at_r}: `for: {f}` is not a Prometheus duration"),
                );
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
    summary.names = seen.len();
    Ok(summary)
}

/// The `spillway_*` metric names an expression selects, read from its syntax tree.
pub(super) fn metric_names(expr: &promql_parser::parser::Expr) -> BTreeSet<String> {
    use promql_parser::parser::{Expr, VectorSelector};
    struct Names(BTreeSet<String>);
    impl promql_parser::util::ExprVisitor for Names {
        type Error = std::convert::Infallible;
        fn pre_visit(&mut self, e: &Expr) -> Result<bool, Self::Error> {
            let selector: Option<&VectorSelector> = match e {
                Expr::VectorSelector(vs) => Some(vs),
                Expr::MatrixSelector(ms) => Some(&ms.vs),
                _ => None,
            };
            if let Some(name) = selector.and_then(|vs| vs.name.as_deref())
                && name.starts_with("spillway_")
            {
                self.0.insert(name.to_owned());
            }
            Ok(true)
        }
    }
    let mut names = Names(BTreeSet::new());
    let Ok(_) = promql_parser::util::walk_expr(&mut names, expr);
    names.0
}
