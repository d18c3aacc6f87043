//! PromQL against the daemons' registries: every `spillway_*` metric an expression selects
//! (read from the expression's syntax tree by `promql-parser`, as Prometheus parses it) must be
//! one the daemons export. Shared by the alert rules and the Grafana dashboard.

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

/// Parses `expr` as PromQL and checks every `spillway_*` metric it selects against `metrics`,
/// failures located by `at`. `seen` collects the names found across calls (each counted as one
/// check the first time). Returns whether the expression parsed.
pub(super) fn check_promql(
    at: &str,
    expr: &str,
    metrics: &BTreeSet<String>,
    seen: &mut BTreeSet<String>,
    report: &mut Report,
) -> bool {
    match promql_parser::parser::parse(expr) {
        Ok(ast) => {
            report.checks += 1;
            for name in metric_names(&ast) {
                if !metrics.contains(&name) {
                    report.fail(format!("{at}: {name} is not a metric the daemons export"));
                } else if seen.insert(name) {
                    report.checks += 1;
                }
            }
            true
        }
        Err(e) => {
            report.fail(format!("{at}: expr is not PromQL: {e}"));
            false
        }
    }
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
