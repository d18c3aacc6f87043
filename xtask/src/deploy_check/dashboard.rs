//! The Grafana dashboard (`deploy/grafana/spillway.json`): its structure (what Grafana 10+
//! needs to import it as is), every panel query's PromQL against the daemons' registries
//! (`promql.rs`, as for the alerts), and the ConfigMap each overlay renders from it.

#[allow(clippy::wildcard_imports)]
use super::*;

/// The oldest dashboard schema accepted: 38 is what Grafana 10.0 writes.
const MIN_SCHEMA_VERSION: u64 = 38;
/// The largest ConfigMap `kubectl apply` (client-side) can keep: it copies the object into an
/// annotation, and all of an object's annotations together may hold 262,144 bytes.
const MAX_APPLIED_BYTES: usize = 256 * 1024;
/// The label Grafana's dashboard sidecar selects ConfigMaps by, and its value.
pub(super) const SIDECAR_LABEL: (&str, &str) = ("grafana_dashboard", "1");

/// What the dashboard holds.
#[derive(Debug, Default)]
pub(super) struct DashboardSummary {
    pub(super) rows: usize,
    pub(super) panels: usize,
    pub(super) queries: usize,
    pub(super) names: usize,
}

/// Checks the dashboard's JSON text; `at_f` names it in messages.
pub(super) fn check_dashboard(
    text: &str,
    at_f: &str,
    metrics: &BTreeSet<String>,
    report: &mut Report,
) -> DashboardSummary {
    let mut summary = DashboardSummary::default();
    let doc: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            report.fail(format!("{at_f}: not JSON: {e}"));
            return summary;
        }
    };
    for key in ["uid", "title"] {
        report.expect(
            str_at(&doc, &[key]).is_some_and(|s| !s.trim().is_empty()),
            || format!("{at_f}: `{key}` is missing"),
        );
    }
    let schema = at(&doc, &["schemaVersion"]).and_then(Value::as_u64);
    report.expect(schema.is_some_and(|v| v >= MIN_SCHEMA_VERSION), || {
        format!("{at_f}: schemaVersion {schema:?} is older than Grafana 10's {MIN_SCHEMA_VERSION}")
    });

    // Variables: the dashboard's own (templating), and the data source inputs of an export.
    let mut variables = BTreeMap::new();
    for v in arr_at(&doc, &["templating", "list"]) {
        let name = str_at(v, &["name"]).unwrap_or("");
        report.expect(!name.is_empty(), || {
            format!("{at_f}: a templating variable has no name")
        });
        variables.insert(
            name.to_owned(),
            str_at(v, &["type"]).unwrap_or("").to_owned(),
        );
    }
    let mut data_sources: BTreeSet<String> = variables
        .iter()
        .filter(|(_, kind)| *kind == "datasource")
        .map(|(name, _)| format!("${{{name}}}"))
        .collect();
    for input in arr_at(&doc, &["__inputs"]) {
        if str_at(input, &["type"]) == Some("datasource")
            && let Some(name) = str_at(input, &["name"])
        {
            data_sources.insert(format!("${{{name}}}"));
        }
    }
    report.expect(!data_sources.is_empty(), || {
        format!(
            "{at_f}: no Prometheus data source to choose: add a templating variable of type \
             datasource (query prometheus) or a datasource entry in __inputs"
        )
    });

    let mut ids = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let mut panels: Vec<&Value> = Vec::new();
    for p in arr_at(&doc, &["panels"]) {
        panels.push(p);
        // A collapsed row carries its panels inside it.
        panels.extend(arr_at(p, &["panels"]));
    }
    report.expect(!panels.is_empty(), || format!("{at_f}: no panels"));
    for p in panels {
        let id = at(p, &["id"]).and_then(Value::as_u64);
        let title = str_at(p, &["title"]).unwrap_or("");
        let kind = str_at(p, &["type"]).unwrap_or("");
        let at_p = format!(
            "{at_f}: panel {} {title:?}",
            id.map_or_else(|| "?".to_owned(), |i| i.to_string())
        );
        report.expect(id.is_some_and(|i| ids.insert(i)), || {
            format!("{at_p}: needs an id of its own")
        });
        report.expect(!title.trim().is_empty(), || format!("{at_p}: no title"));
        let grid = |k: &str| at(p, &["gridPos", k]).and_then(Value::as_u64);
        report.expect(
            matches!((grid("x"), grid("w"), grid("h"), grid("y")),
                (Some(x), Some(w), Some(h), Some(_)) if w > 0 && h > 0 && x + w <= 24),
            || format!("{at_p}: gridPos must place it within Grafana's 24 columns"),
        );
        if kind == "row" {
            summary.rows += 1;
            continue;
        }
        summary.panels += 1;
        report.expect(
            str_at(p, &["fieldConfig", "defaults", "unit"]).is_some_and(|u| !u.is_empty()),
            || format!("{at_p}: fieldConfig.defaults.unit is missing"),
        );
        check_data_source(&at_p, p, &data_sources, report);
        let targets = arr_at(p, &["targets"]);
        report.expect(!targets.is_empty(), || format!("{at_p}: no targets"));
        let mut refs = BTreeSet::new();
        for (ti, t) in targets.iter().enumerate() {
            let ref_id = str_at(t, &["refId"]).unwrap_or("");
            let at_t = format!(
                "{at_p} target {}",
                if ref_id.is_empty() { "?" } else { ref_id }
            );
            report.expect(!ref_id.is_empty() && refs.insert(ref_id), || {
                format!("{at_p}: target {ti} needs a refId of its own")
            });
            if at(t, &["datasource"]).is_some() {
                check_data_source(&at_t, t, &data_sources, report);
            }
            let Some(expr) = str_at(t, &["expr"]).filter(|e| !e.trim().is_empty()) else {
                report.fail(format!("{at_t}: no expr"));
                continue;
            };
            summary.queries += 1;
            match expand_variables(expr, &variables) {
                Ok(expr) => {
                    check_promql(&at_t, &expr, metrics, &mut seen, report);
                }
                Err(e) => report.fail(format!("{at_t}: {e}")),
            }
        }
    }
    summary.names = seen.len();
    summary
}

/// A panel's or target's data source must be one the dashboard lets its user choose.
fn check_data_source(at_p: &str, v: &Value, data_sources: &BTreeSet<String>, report: &mut Report) {
    let uid = str_at(v, &["datasource", "uid"]).unwrap_or("");
    report.expect(data_sources.contains(uid), || {
        format!(
            "{at_p}: datasource uid {uid:?} is not the dashboard's data source variable ({})",
            data_sources.iter().cloned().collect::<Vec<_>>().join(", ")
        )
    });
}

/// Grafana's own variables, and what each becomes for parsing: a duration where Grafana puts
/// one in a range, a number of milliseconds or seconds where it puts those.
const BUILTINS: [(&str, &str); 7] = [
    ("__rate_interval", "5m"),
    ("__interval", "1m"),
    ("__range", "1h"),
    ("__rate_interval_ms", "300000"),
    ("__interval_ms", "60000"),
    ("__range_ms", "3600000"),
    ("__range_s", "3600"),
];

/// `expr` with every variable reference (`$name`, `${name}`, `${name:format}`, `[[name]]`)
/// replaced: Grafana's own by a value of their kind, the dashboard's by `interval` variables'
/// `5m` and any other's own name (they select label values). Naming a variable the dashboard
/// does not define is an error.
pub(super) fn expand_variables(
    expr: &str,
    variables: &BTreeMap<String, String>,
) -> Result<String, String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let value = |name: &str| -> Result<String, String> {
        if let Some((_, v)) = BUILTINS.iter().find(|(n, _)| *n == name) {
            return Ok((*v).to_owned());
        }
        match variables.get(name).map(String::as_str) {
            Some("interval") => Ok("5m".to_owned()),
            Some(_) => Ok(name.to_owned()),
            None => Err(format!(
                "uses ${name}, which is neither a variable of the dashboard nor one of Grafana's"
            )),
        }
    };
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(i) = rest.find(['$', '[']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(inner) = tail.strip_prefix("${") {
            let end = inner
                .find('}')
                .ok_or_else(|| format!("`{tail}`: a ${{ without its }}"))?;
            let name = inner[..end].split(':').next().unwrap_or("");
            out.push_str(&value(name)?);
            rest = &inner[end + 1..];
        } else if let Some(inner) = tail.strip_prefix("[[") {
            let end = inner
                .find("]]")
                .ok_or_else(|| format!("`{tail}`: a [[ without its ]]"))?;
            let name = inner[..end].split(':').next().unwrap_or("");
            out.push_str(&value(name)?);
            rest = &inner[end + 2..];
        } else if let Some(inner) = tail.strip_prefix('$')
            && inner.starts_with(is_name)
        {
            let end = inner.find(|c: char| !is_name(c)).unwrap_or(inner.len());
            out.push_str(&value(&inner[..end])?);
            rest = &inner[end..];
        } else {
            // A `$` that names nothing (a regex anchor) or a range's `[`.
            out.push_str(&tail[..1]);
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Every overlay renders the dashboard as exactly one ConfigMap the Grafana sidecar finds,
/// holding `source` (the dashboard file) byte for byte.
pub(super) fn check_dashboard_configmap(
    scope: &str,
    objects: &[Value],
    file_name: &str,
    source: &str,
    report: &mut Report,
) {
    let (key, value) = SIDECAR_LABEL;
    let maps: Vec<&Value> = objects
        .iter()
        .filter(|o| {
            kind_of(o) == "ConfigMap" && str_at(o, &["metadata", "labels", key]) == Some(value)
        })
        .collect();
    report.expect(maps.len() == 1, || {
        format!(
            "{scope}: {} ConfigMaps labelled {key}: \"{value}\", expected the dashboard's one \
             (deploy/grafana/kustomization.yaml, included by the base)",
            maps.len()
        )
    });
    for m in maps {
        let at_m = format!("{scope}: {}", id_of(m));
        report.expect(str_at(m, &["data", file_name]) == Some(source), || {
            format!("{at_m}: data.{file_name} is not deploy/grafana/{file_name} byte for byte")
        });
        report.expect(
            serde_json::to_string(m).map_or(usize::MAX, |s| s.len()) <= MAX_APPLIED_BYTES,
            || {
                format!(
                    "{at_m}: over {MAX_APPLIED_BYTES} bytes, more than `kubectl apply` can keep in \
                     its last-applied annotation"
                )
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> BTreeMap<String, String> {
        [("namespace", "query"), ("step", "interval")]
            .into_iter()
            .map(|(n, k)| (n.to_owned(), k.to_owned()))
            .collect()
    }

    #[test]
    fn variables_are_replaced_by_values_promql_parses() {
        let e = |s: &str| expand_variables(s, &vars());
        assert_eq!(
            e(r#"rate(x{namespace=~"$namespace"}[$__rate_interval])"#).unwrap(),
            r#"rate(x{namespace=~"namespace"}[5m])"#
        );
        assert_eq!(
            e(r#"x{a="${namespace:regex}",b="[[namespace]]"}[${step}]"#).unwrap(),
            r#"x{a="namespace",b="namespace"}[5m]"#
        );
        assert_eq!(e(r#"x{a=~"^b$"}[5m]"#).unwrap(), r#"x{a=~"^b$"}[5m]"#);
        assert_eq!(e("x / $__range_s").unwrap(), "x / 3600");
        let err = e(r#"x{pod="$pod"}"#).unwrap_err();
        assert!(err.contains("$pod"), "{err}");
        assert!(e("x{a=\"${namespace\"}").is_err());
    }

    fn repository_dashboard() -> String {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        std::fs::read_to_string(root.join("deploy/grafana/spillway.json")).unwrap()
    }

    #[test]
    fn the_repository_dashboard_passes() {
        let metrics = exposed_metrics().unwrap();
        let mut report = Report::default();
        let s = check_dashboard(
            &repository_dashboard(),
            "spillway.json",
            &metrics,
            &mut report,
        );
        assert!(report.failures.is_empty(), "{:#?}", report.failures);
        assert!(
            s.panels >= 30 && s.queries >= s.panels && s.names >= 30,
            "{s:?}"
        );
    }

    /// A misspelt metric in one panel's query is refused, naming the panel, the query and the
    /// name; so are a variable the dashboard does not define and a foreign data source.
    #[test]
    fn a_broken_copy_is_refused_precisely() {
        let metrics = exposed_metrics().unwrap();
        let text = repository_dashboard();
        let mut doc: Value = serde_json::from_str(&text).unwrap();
        let panel = doc["panels"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|p| p["title"] == "Spool fill")
            .unwrap();
        let id = panel["id"].as_u64().unwrap();
        let expr = panel["targets"][0]["expr"].as_str().unwrap().to_owned();
        assert!(
            expr.contains("spillway_uploader_spool_fill_ratio"),
            "{expr}"
        );
        panel["targets"][0]["expr"] = Value::String(expr.replace(
            "spillway_uploader_spool_fill_ratio",
            "spillway_uploader_spool_fill_ration",
        ));
        panel["targets"][0]["datasource"]["uid"] = Value::String("prod-prometheus".into());
        let mut broken = serde_json::to_string_pretty(&doc).unwrap();
        broken = broken.replacen("$__rate_interval", "$rate_window", 1);
        let mut report = Report::default();
        check_dashboard(&broken, "copy.json", &metrics, &mut report);
        assert!(
            report.failures.contains(&format!(
                "copy.json: panel {id} \"Spool fill\" target A: spillway_uploader_spool_fill_ration \
                 is not a metric the daemons export"
            )),
            "{:#?}",
            report.failures
        );
        assert!(
            report
                .failures
                .iter()
                .any(|f| f.contains("target A: datasource uid \"prod-prometheus\"")),
            "{:#?}",
            report.failures
        );
        assert!(
            report
                .failures
                .iter()
                .any(|f| f.contains("uses $rate_window, which is neither")),
            "{:#?}",
            report.failures
        );
        assert_eq!(report.failures.len(), 3, "{:#?}", report.failures);

        let mut report = Report::default();
        check_dashboard("{\"panels\": [", "cut.json", &metrics, &mut report);
        assert!(
            report.failures[0].starts_with("cut.json: not JSON"),
            "{:?}",
            report.failures
        );
    }

    #[test]
    fn the_configmap_must_hold_the_file_byte_for_byte() {
        let map = |data: &str| {
            serde_json::json!({"kind": "ConfigMap", "metadata": {"name": "d", "namespace": "n",
                "labels": {"grafana_dashboard": "1"}}, "data": {"spillway.json": data}})
        };
        let mut report = Report::default();
        check_dashboard_configmap("o", &[map("{}\n")], "spillway.json", "{}\n", &mut report);
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        check_dashboard_configmap("o", &[map("{}")], "spillway.json", "{}\n", &mut report);
        check_dashboard_configmap("o", &[], "spillway.json", "{}\n", &mut report);
        assert_eq!(
            report.failures,
            [
                "o: ConfigMap/d in n: data.spillway.json is not deploy/grafana/spillway.json byte for byte",
                "o: 0 ConfigMaps labelled grafana_dashboard: \"1\", expected the dashboard's one \
                 (deploy/grafana/kustomization.yaml, included by the base)",
            ]
        );
    }
}
