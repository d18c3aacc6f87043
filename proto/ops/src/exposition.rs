//! Parsing what a `/metrics` endpoint serves: the Prometheus text format 0.0.4 and the
//! OpenMetrics text format that prometheus-client writes (one sample per line, `# TYPE`,
//! `# HELP`, `# UNIT` and `# EOF` comments, exemplars after ` # `, which are skipped).
//!
//! The bytes come from the network, so nothing here panics or trusts them: every line either
//! parses whole (name, labels with their escapes, value, optional timestamp) or the body is
//! refused with the line's number and what was wrong. Nothing is guessed: no crate on the
//! registry parsed label values with their escapes (`prometheus-parse` 0.2 splits label sets on
//! every comma and `=`), so this is a small parser of its own, property-tested.

use std::collections::BTreeMap;

/// Why a body is not the text format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {what}")]
pub struct ParseError {
    /// 1-based.
    pub line: usize,
    pub what: String,
}

/// One sample: a series (name and labels, in the order written) and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, if the series has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A parsed body.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    /// Family name → type, from the `# TYPE` lines.
    pub types: BTreeMap<String, String>,
}

impl Scrape {
    /// The value of the series `name` without labels.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels.is_empty())
            .map(|s| s.value)
    }

    /// The sum over every series named `name`, `None` when there is none.
    pub fn sum(&self, name: &str) -> Option<f64> {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .reduce(|a, b| a + b)
    }

    /// The series named `name`, summed by the value of `label` (a series without it counts
    /// under "").
    pub fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for s in self.samples.iter().filter(|s| s.name == name) {
            *out.entry(s.label(label).unwrap_or("").to_owned())
                .or_insert(0.0) += s.value;
        }
        out
    }

    /// The cumulative buckets of histogram `name` (its `_bucket` series, summed over their
    /// other labels) as (upper bound, count), by increasing bound.
    pub fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let series = format!("{name}_bucket");
        let mut out: Vec<(f64, f64)> = Vec::new();
        for s in self.samples.iter().filter(|s| s.name == series) {
            let Some(le) = s.label("le").and_then(parse_value) else {
                continue;
            };
            match out.iter_mut().find(|(b, _)| *b == le) {
                Some((_, n)) => *n += s.value,
                None => out.push((le, s.value)),
            }
        }
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }
}

/// Parses a whole body.
pub fn parse(body: &str) -> Result<Scrape, ParseError> {
    let mut scrape = Scrape::default();
    for (i, raw) in body.split('\n').enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let err = |what: String| ParseError { line: i + 1, what };
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.split_whitespace();
            if words.next() == Some("TYPE") {
                match (words.next(), words.next(), words.next()) {
                    (Some(name), Some(kind), None) if is_metric_name(name) => {
                        scrape.types.insert(name.to_owned(), kind.to_owned());
                    }
                    _ => return Err(err(format!("malformed TYPE line {line:?}"))),
                }
            }
            continue;
        }
        scrape.samples.push(sample(line).map_err(err)?);
    }
    Ok(scrape)
}

/// `name[{labels}] value [timestamp] [# exemplar]`.
fn sample(line: &str) -> Result<Sample, String> {
    let end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
    let name = &line[..end];
    if !is_metric_name(name) {
        return Err(format!("{name:?} is not a metric name"));
    }
    let mut rest = &line[end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = label_set(after, &mut labels)?;
    }
    // OpenMetrics exemplar: ` # {labels} value [timestamp]`, not part of the sample.
    let rest = rest.split(" # ").next().unwrap_or(rest);
    let mut words = rest.split_ascii_whitespace();
    let value = words.next().ok_or_else(|| format!("{name} has no value"))?;
    let value = parse_value(value).ok_or_else(|| format!("{name}: {value:?} is not a number"))?;
    if let Some(ts) = words.next()
        && parse_value(ts).is_none()
    {
        return Err(format!("{name}: timestamp {ts:?} is not a number"));
    }
    if let Some(extra) = words.next() {
        return Err(format!("{name}: unexpected {extra:?} after the value"));
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Reads `name="value",...}` (after the `{`), returning what follows the `}`.
fn label_set<'a>(mut s: &'a str, labels: &mut Vec<(String, String)>) -> Result<&'a str, String> {
    loop {
        s = s.trim_start_matches([' ', '\t']);
        if let Some(after) = s.strip_prefix('}') {
            return Ok(after);
        }
        let end = s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .ok_or("a label set without its closing }")?;
        let key = &s[..end];
        if !is_label_name(key) {
            return Err(format!("{key:?} is not a label name"));
        }
        s = s[end..].trim_start_matches([' ', '\t']);
        s = s
            .strip_prefix("=\"")
            .ok_or_else(|| format!("label {key} is not followed by =\""))?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let close = loop {
            match chars.next() {
                None => return Err(format!("label {key}'s value has no closing quote")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => {
                        return Err(format!(
                            "label {key}'s value has an unknown escape \\{}",
                            other.map_or(String::new(), |(_, c)| c.to_string())
                        ));
                    }
                },
                Some((_, c)) => value.push(c),
            }
        };
        if labels.iter().any(|(k, _)| k == key) {
            return Err(format!("label {key} appears twice"));
        }
        labels.push((key.to_owned(), value));
        s = s[close + 1..].trim_start_matches([' ', '\t']);
        if let Some(after) = s.strip_prefix(',') {
            s = after;
        } else if !s.starts_with('}') {
            return Err(format!("label {key} is followed by neither , nor }}"));
        }
    }
}

/// A sample value or bound: a float, `NaN`, `+Inf`, `-Inf` (Go's spellings, as Prometheus
/// writes them).
pub fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" | "+inf" | "inf" => Some(f64::INFINITY),
        "-Inf" | "-inf" => Some(f64::NEG_INFINITY),
        "NaN" | "nan" => Some(f64::NAN),
        _ if s
            .bytes()
            .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b)) =>
        {
            s.parse().ok()
        }
        _ => None,
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn what_prometheus_client_writes_parses() {
        use prometheus_client::encoding::EncodeLabelSet;
        use prometheus_client::metrics::{
            counter::Counter, family::Family, gauge::Gauge, histogram::Histogram,
        };
        #[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct Reason {
            reason: String,
        }
        let mut registry = prometheus_client::registry::Registry::default();
        let r = registry.sub_registry_with_prefix("spillway_test");
        let family = Family::<Reason, Counter>::default();
        let gauge = Gauge::<i64>::default();
        let hist = Histogram::new([0.5, 1.0]);
        r.register("rejections", "by reason", family.clone());
        r.register("chunks", "now", gauge.clone());
        r.register("commit_seconds", "latency", hist.clone());
        // prometheus-client 0.24 writes label values without escaping them; what a naive parser
        // splits on (commas, `=`, `}` and spaces) must stay inside the value.
        family
            .get_or_create(&Reason {
                reason: "a b, c=d} e".into(),
            })
            .inc_by(3);
        gauge.set(-7);
        hist.observe(0.25);
        hist.observe(0.75);
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &registry).unwrap();
        let s = parse(&body).unwrap();
        assert_eq!(
            s.by_label("spillway_test_rejections_total", "reason"),
            [("a b, c=d} e".to_owned(), 3.0)].into()
        );
        assert_eq!(s.get("spillway_test_chunks"), Some(-7.0));
        assert_eq!(
            s.buckets("spillway_test_commit_seconds"),
            [(0.5, 1.0), (1.0, 2.0), (f64::INFINITY, 2.0)]
        );
        assert_eq!(s.get("spillway_test_commit_seconds_count"), Some(2.0));
        assert_eq!(
            s.types.get("spillway_test_rejections").map(String::as_str),
            Some("counter")
        );
    }

    #[test]
    fn malformed_lines_are_refused_with_their_number() {
        let bad = [
            ("x 1\ny{a=\"b} 2\n", 2, "closing quote"),
            ("x{a=\"b\"", 1, "neither"),
            ("x{a=\"b\",a=\"c\"} 1", 1, "twice"),
            ("x{a=\"\\t\"} 1", 1, "escape"),
            ("x{1a=\"b\"} 1", 1, "label name"),
            ("x", 1, "no value"),
            ("x one", 1, "not a number"),
            ("x 1 2 3", 1, "unexpected"),
            ("9x 1", 1, "metric name"),
            ("# TYPE x", 1, "TYPE"),
        ];
        for (body, line, what) in bad {
            let e = parse(body).unwrap_err();
            assert_eq!(e.line, line, "{body:?}: {e}");
            assert!(e.what.contains(what), "{body:?}: {e}");
        }
        let ok = parse(
            "# HELP x a b c\n# EOF\r\nx{} 1 1700000000\nx_total{a=\"b\",} +Inf # {t=\"1\"} 1\n",
        )
        .unwrap();
        assert_eq!(ok.get("x"), Some(1.0));
        assert_eq!(ok.sum("x_total"), Some(f64::INFINITY));
    }

    fn escape(v: &str) -> String {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    }

    fn render(samples: &[Sample]) -> String {
        let mut out = String::from("# HELP whatever\n");
        for s in samples {
            out.push_str(&s.name);
            if !s.labels.is_empty() {
                let labels: Vec<String> = s
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                    .collect();
                out.push_str(&format!("{{{}}}", labels.join(",")));
            }
            out.push_str(&format!(" {}\n", s.value));
        }
        out.push_str("# EOF\n");
        out
    }

    fn sample_strategy() -> impl Strategy<Value = Sample> {
        (
            "[a-zA-Z_:][a-zA-Z0-9_:]{0,20}",
            proptest::collection::btree_map("[a-zA-Z_][a-zA-Z0-9_]{0,8}", any::<String>(), 0..4),
            any::<f64>().prop_filter("NaN is not equal to itself", |v| !v.is_nan()),
        )
            .prop_map(|(name, labels, value)| Sample {
                name,
                labels: labels.into_iter().collect(),
                value,
            })
    }

    proptest! {
        /// Whatever names, label values (quotes, backslashes, newlines, braces, commas, any
        /// Unicode) and values a body carries, it reads back exactly as written.
        #[test]
        fn a_written_body_reads_back_exactly(samples in proptest::collection::vec(sample_strategy(), 0..20)) {
            let parsed = parse(&render(&samples)).unwrap();
            prop_assert_eq!(parsed.samples, samples);
        }

        /// Any text at all: an answer, never a panic.
        #[test]
        fn any_text_is_parsed_or_refused(body in any::<String>()) {
            let _ = parse(&body);
        }

        /// Lines cut anywhere are refused or read, never a panic.
        #[test]
        fn a_cut_body_is_parsed_or_refused(samples in proptest::collection::vec(sample_strategy(), 1..5), cut in any::<prop::sample::Index>()) {
            let body = render(&samples);
            let at = cut.index(body.len() + 1);
            if let Some(prefix) = body.get(..at) {
                let _ = parse(prefix);
            }
        }
    }
}
