//! `ingest status` and `uploader status`, the part they share: two scrapes of a running
//! daemon's `/metrics` an interval apart plus its `/readyz`, and a summary of named fields
//! rendered as short text for people or as JSON for scripts. Which fields is each daemon's
//! business (`ingest/src/cli/status.rs`, `uploader/src/status.rs`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use crate::exposition::{self, Scrape};
use crate::fetch::{self, FetchError, Url};

/// The largest `/metrics` body read (the daemons serve a few tens of KiB).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// The flags both `status` subcommands take (each daemon names its own environment variable
/// and default URL).
#[derive(Debug, Clone)]
pub struct Options {
    pub metrics_url: String,
    /// Between the two scrapes rates are computed from.
    pub interval: Duration,
    /// For each request.
    pub timeout: Duration,
}

/// The flags every `status` command takes beside its daemon's `--metrics-url` (whose env and
/// default are the daemon's own).
#[derive(Debug, Clone, clap::Args)]
pub struct StatusFlags {
    /// Time between the two scrapes rates are computed from (at most 60s).
    #[arg(long, default_value = "1s", value_parser = parse_wait)]
    pub interval: Duration,
    /// Longest each request may take (at most 60s).
    #[arg(long, default_value = "5s", value_parser = parse_wait)]
    pub timeout: Duration,
    /// Print JSON (one object) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Scrapes `metrics_url` as `flags` say and summarizes the two scrapes with `summarize`.
pub async fn collect(
    metrics_url: &str,
    flags: &StatusFlags,
    summarize: fn(&Samples) -> Summary,
) -> Result<Summary, StatusError> {
    let samples = sample(&Options {
        metrics_url: metrics_url.to_owned(),
        interval: flags.interval,
        timeout: flags.timeout,
    })
    .await?;
    Ok(summarize(&samples))
}

/// Prints `summary` on standard output, as JSON (one object) with `--json`, else as text.
pub fn print(summary: &Summary, flags: &StatusFlags) {
    if flags.json {
        println!("{}", summary.to_json());
    } else {
        print!("{}", summary.to_text());
    }
}

/// The longest `--interval` and `--timeout`: a status is a glance, not a watch.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// Parses `--interval` / `--timeout`: a duration (`1s`, `500ms`) above 0 and at most
/// [`MAX_WAIT`].
pub fn parse_wait(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| e.to_string())?;
    if d.is_zero() || d > MAX_WAIT {
        return Err(format!(
            "expected a duration above 0 and at most {}s",
            MAX_WAIT.as_secs()
        ));
    }
    Ok(d)
}

/// The state of a circuit breaker gauge (0 closed, 1 half-open, 2 open).
pub fn breaker(state: Option<f64>) -> String {
    match state {
        None => "-".to_owned(),
        Some(0.0) => "closed".to_owned(),
        Some(1.0) => "half-open".to_owned(),
        Some(2.0) => "open".to_owned(),
        Some(s) => format!("unknown ({s})"),
    }
}

/// Why there is no status.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("{url}: {source}")]
    Parse {
        url: String,
        source: exposition::ParseError,
    },
}

/// Two scrapes of one daemon and its readiness.
#[derive(Debug, Clone)]
pub struct Samples {
    pub url: String,
    pub first: Scrape,
    pub last: Scrape,
    /// Seconds between the two scrapes.
    pub elapsed: f64,
    /// `/readyz`: 200 ready, anything else not; `None` when it did not answer.
    pub ready: Option<bool>,
}

/// Scrapes `/metrics`, waits `interval`, scrapes again, and asks `/readyz`.
pub async fn sample(options: &Options) -> Result<Samples, StatusError> {
    let url = Url::parse(&options.metrics_url)?;
    let scrape = || async {
        let body = fetch::get_text(&url, options.timeout, MAX_BODY_BYTES).await?;
        exposition::parse(&body).map_err(|source| StatusError::Parse {
            url: url.text.clone(),
            source,
        })
    };
    let first = scrape().await?;
    let started = Instant::now();
    tokio::time::sleep(options.interval).await;
    let last = scrape().await?;
    let elapsed = started.elapsed().as_secs_f64();
    let ready = fetch::get(&url.with_path("/readyz"), options.timeout, 4096)
        .await
        .ok()
        .map(|a| a.status == 200);
    Ok(Samples {
        url: url.text,
        first,
        last,
        elapsed,
        ready,
    })
}

impl Samples {
    /// A gauge's value now (summed over its series).
    pub fn now(&self, name: &str) -> Option<f64> {
        self.last.sum(name)
    }

    /// A counter's per-second rate between the scrapes (a restart in between counts from 0).
    pub fn rate(&self, name: &str) -> Option<f64> {
        let last = self.last.sum(name)?;
        let first = self.first.sum(name).unwrap_or(0.0);
        let delta = if last >= first { last - first } else { last };
        (self.elapsed > 0.0).then(|| delta / self.elapsed)
    }

    /// The per-second rate of the series of counter `name` whose `label` is `value`.
    pub fn rate_where(&self, name: &str, label: &str, value: &str) -> Option<f64> {
        let pick = |s: &Scrape| -> Option<f64> {
            s.samples
                .iter()
                .filter(|x| x.name == name && x.label(label) == Some(value))
                .map(|x| x.value)
                .reduce(|a, b| a + b)
        };
        let last = pick(&self.last)?;
        let first = pick(&self.first).unwrap_or(0.0);
        let delta = if last >= first { last - first } else { last };
        (self.elapsed > 0.0).then(|| delta / self.elapsed)
    }

    /// A labelled counter's totals by `label`, and what each grew by between the scrapes.
    pub fn counts_by(&self, name: &str, label: &str) -> Counts {
        let first = self.first.by_label(name, label);
        let total = self.last.by_label(name, label);
        let recent = total
            .iter()
            .map(|(k, v)| {
                let before = first.get(k).copied().unwrap_or(0.0);
                (k.clone(), if *v >= before { v - before } else { *v })
            })
            .collect();
        Counts { total, recent }
    }

    /// Quantile `q` of histogram `name` over the observations made between the scrapes, as
    /// Prometheus's `histogram_quantile` estimates it; `None` without any.
    pub fn quantile(&self, name: &str, q: f64) -> Option<f64> {
        let first = self.first.buckets(name);
        let delta: Vec<(f64, f64)> = self
            .last
            .buckets(name)
            .into_iter()
            .map(|(le, n)| {
                let before = first
                    .iter()
                    .find(|(b, _)| *b == le)
                    .map_or(0.0, |(_, c)| *c);
                (le, (n - before).max(0.0))
            })
            .collect();
        quantile(&delta, q)
    }
}

/// Quantile `q` of cumulative buckets (upper bound, count) sorted by bound, interpolating
/// linearly within the bucket it falls in; the highest finite bound when it falls in `+Inf`.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last().map(|(_, n)| *n).filter(|n| *n > 0.0)?;
    let rank = q.clamp(0.0, 1.0) * total;
    let mut lower = (0.0, 0.0);
    for &(le, n) in buckets {
        if n >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let within = n - lower.1;
            let part = if within > 0.0 {
                (rank - lower.1) / within
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * part);
        }
        lower = (le, n);
    }
    Some(lower.0)
}

/// Totals of a labelled counter and their growth during the interval.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    pub total: BTreeMap<String, f64>,
    pub recent: BTreeMap<String, f64>,
}

/// How a field's value reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Count,
    Bytes,
    Seconds,
    /// A fraction, shown as a percentage.
    Ratio,
    /// Per second.
    Rate,
    BytesPerSecond,
}

/// One line of a summary: a key for JSON, a label for people, and its value.
#[derive(Debug, Clone)]
pub struct Field {
    pub key: &'static str,
    pub label: &'static str,
    pub value: FieldValue,
}

#[derive(Debug, Clone)]
pub enum FieldValue {
    /// `None`: the daemon does not report it (or not yet).
    Number(Option<f64>, Unit),
    Text(String),
    Counts(Counts),
}

impl Field {
    pub fn number(key: &'static str, label: &'static str, v: Option<f64>, unit: Unit) -> Self {
        Self {
            key,
            label,
            value: FieldValue::Number(v, unit),
        }
    }

    pub fn text(key: &'static str, label: &'static str, v: impl Into<String>) -> Self {
        Self {
            key,
            label,
            value: FieldValue::Text(v.into()),
        }
    }

    pub fn counts(key: &'static str, label: &'static str, c: Counts) -> Self {
        Self {
            key,
            label,
            value: FieldValue::Counts(c),
        }
    }
}

/// A daemon's summary: sections of fields.
#[derive(Debug, Clone)]
pub struct Summary {
    pub daemon: &'static str,
    pub url: String,
    pub ready: Option<bool>,
    pub interval: f64,
    pub sections: Vec<(&'static str, Vec<Field>)>,
}

impl Summary {
    pub fn new(daemon: &'static str, samples: &Samples) -> Self {
        Self {
            daemon,
            url: samples.url.clone(),
            ready: samples.ready,
            interval: samples.elapsed,
            sections: Vec::new(),
        }
    }

    pub fn section(&mut self, name: &'static str, fields: Vec<Field>) {
        self.sections.push((name, fields));
    }

    /// The field `key` of section `section`, if there is one.
    pub fn field(&self, section: &str, key: &str) -> Option<&Field> {
        self.sections
            .iter()
            .find(|(s, _)| *s == section)
            .and_then(|(_, fields)| fields.iter().find(|f| f.key == key))
    }

    /// `{"daemon", "metrics_url", "ready", "interval_seconds", <section>: {<key>: value}}`:
    /// numbers in their base units (bytes, seconds, per second, fractions), `null` when the
    /// daemon does not report them, counts as `{"total": {label: n}, "recent": {label: n}}`.
    pub fn to_json(&self) -> Value {
        let mut out = Map::new();
        out.insert("daemon".into(), json!(self.daemon));
        out.insert("metrics_url".into(), json!(self.url));
        out.insert("ready".into(), json!(self.ready));
        out.insert("interval_seconds".into(), json!(self.interval));
        for (name, fields) in &self.sections {
            let mut section = Map::new();
            for f in fields {
                let v = match &f.value {
                    FieldValue::Number(v, _) => json!(v.filter(|v| v.is_finite())),
                    FieldValue::Text(t) => json!(t),
                    FieldValue::Counts(c) => json!({"total": c.total, "recent": c.recent}),
                };
                section.insert(f.key.into(), v);
            }
            out.insert((*name).into(), Value::Object(section));
        }
        Value::Object(out)
    }

    /// A few aligned lines for a person.
    pub fn to_text(&self) -> String {
        let ready = match self.ready {
            Some(true) => "ready",
            Some(false) => "NOT READY",
            None => "readiness unknown (/readyz did not answer)",
        };
        let mut out = format!(
            "{} at {}: {ready} (rates over {:.1} s)\n",
            self.daemon, self.url, self.interval
        );
        let width = self
            .sections
            .iter()
            .flat_map(|(_, f)| f.iter().map(|f| f.label.len()))
            .max()
            .unwrap_or(0);
        for (name, fields) in &self.sections {
            out.push_str(name);
            out.push('\n');
            for f in fields {
                out.push_str(&format!("  {:width$}  {}\n", f.label, render(&f.value)));
            }
        }
        out
    }
}

fn render(v: &FieldValue) -> String {
    match v {
        FieldValue::Number(None, _) => "-".to_owned(),
        FieldValue::Number(Some(v), unit) => number(*v, *unit),
        FieldValue::Text(t) => t.clone(),
        FieldValue::Counts(c) if c.total.values().all(|n| *n == 0.0) => "none".to_owned(),
        FieldValue::Counts(c) => c
            .total
            .iter()
            .filter(|(_, n)| **n > 0.0)
            .map(|(k, n)| {
                let recent = c.recent.get(k).copied().unwrap_or(0.0);
                let k = if k.is_empty() { "-" } else { k };
                if recent > 0.0 {
                    format!("{k} {n} (+{recent})")
                } else {
                    format!("{k} {n}")
                }
            })
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// A value in its unit, for people.
pub fn number(v: f64, unit: Unit) -> String {
    match unit {
        Unit::Count => format!("{v}"),
        Unit::Bytes => bytes(v),
        Unit::Seconds => seconds(v),
        Unit::Ratio => format!("{:.1} %", v * 100.0),
        Unit::Rate => format!("{v:.2}/s"),
        Unit::BytesPerSecond => format!("{}/s", bytes(v)),
    }
}

fn bytes(v: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = v;
    let mut unit = 0;
    while v.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn seconds(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v} s");
    }
    if v < 1.0 {
        return format!("{:.1} ms", v * 1000.0);
    }
    if v < 120.0 {
        return format!("{v:.1} s");
    }
    let whole = v as u64;
    match whole {
        0..7200 => format!("{}m {:02}s", whole / 60, whole % 60),
        _ => format!("{}h {:02}m", whole / 3600, whole % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_interpolated_as_prometheus_does() {
        let b = [(0.1, 10.0), (0.2, 20.0), (f64::INFINITY, 20.0)];
        assert_eq!(quantile(&b, 0.5), Some(0.1));
        assert!((quantile(&b, 0.75).unwrap() - 0.15).abs() < 1e-9);
        assert_eq!(quantile(&[(0.1, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
        assert_eq!(
            quantile(&[(0.1, 1.0), (f64::INFINITY, 5.0)], 0.99),
            Some(0.1)
        );
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn values_read_in_their_units() {
        assert_eq!(number(1536.0, Unit::Bytes), "1.5 KiB");
        assert_eq!(number(12.0, Unit::Bytes), "12 B");
        assert_eq!(number(0.0123, Unit::Seconds), "12.3 ms");
        assert_eq!(number(754.0, Unit::Seconds), "12m 34s");
        assert_eq!(number(7300.0, Unit::Seconds), "2h 01m");
        assert_eq!(number(0.25, Unit::Ratio), "25.0 %");
        assert_eq!(number(2.0, Unit::Rate), "2.00/s");
    }

    fn samples() -> Samples {
        let first = exposition::parse(
            "x_total{reason=\"a\"} 1\nx_total{reason=\"b\"} 5\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 1\ng 3\n",
        )
        .unwrap();
        let last = exposition::parse(
            "x_total{reason=\"a\"} 3\nx_total{reason=\"b\"} 5\nx_total{reason=\"c\"} 1\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 3\ng 4\n",
        )
        .unwrap();
        Samples {
            url: "http://127.0.0.1:1/metrics".into(),
            first,
            last,
            elapsed: 2.0,
            ready: Some(true),
        }
    }

    #[test]
    fn rates_and_recent_counts_come_from_the_two_scrapes() {
        let s = samples();
        assert_eq!(s.rate("x_total"), Some(1.5));
        assert_eq!(s.now("g"), Some(4.0));
        assert_eq!(s.rate("missing_total"), None);
        let c = s.counts_by("x_total", "reason");
        assert_eq!(
            c.recent,
            [("a".into(), 2.0), ("b".into(), 0.0), ("c".into(), 1.0)].into()
        );
        // Both observations between the scrapes were above 1: the highest finite bound.
        assert_eq!(s.quantile("h", 0.5), Some(1.0));
    }

    #[test]
    fn a_summary_renders_as_text_and_json() {
        let s = samples();
        let mut summary = Summary::new("test", &s);
        summary.section(
            "things",
            vec![
                Field::number("gauge", "a gauge", s.now("g"), Unit::Count),
                Field::number("absent", "not reported", None, Unit::Bytes),
                Field::text("state", "state", "closed"),
                Field::counts("by_reason", "by reason", s.counts_by("x_total", "reason")),
            ],
        );
        let text = summary.to_text();
        assert_eq!(
            text,
            "test at http://127.0.0.1:1/metrics: ready (rates over 2.0 s)\nthings\n  \
             a gauge       4\n  not reported  -\n  state         closed\n  \
             by reason     a 3 (+2), b 5, c 1 (+1)\n"
        );
        let j = summary.to_json();
        assert_eq!(j["ready"], json!(true));
        assert_eq!(j["things"]["gauge"], json!(4.0));
        assert_eq!(j["things"]["absent"], Value::Null);
        assert_eq!(j["things"]["by_reason"]["recent"]["a"], json!(2.0));
        assert!(summary.field("things", "state").is_some());
    }
}
