//! Reading the Prometheus text format the daemons serve on `/metrics` (what prometheus-client
//! encodes): one sample per line, `series value`, the series being the metric name and its
//! `{labels}` exactly as written; `#` lines carry `HELP`, `TYPE` and `UNIT`.

/// The samples of a body as (series, value text), in order; comment lines are skipped.
fn samples(body: &str) -> impl Iterator<Item = (&str, &str)> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            // Label values may hold spaces: with labels, the series ends at the `}` before a space.
            let end = match (l.find('{'), l.find(' ')) {
                (Some(open), Some(space)) if open < space => l[open..].find("} ")? + open + 1,
                (_, space) => space?,
            };
            Some((&l[..end], &l[end + 1..]))
        })
}

/// The value of a series (exact name and labels) in a body, 0 if absent or not a number.
pub fn metric(body: &str, series: &str) -> f64 {
    samples(body)
        .find(|(s, _)| *s == series)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The buckets of histogram `name` (labelled by `le` only) as (upper bound, cumulative count)
/// pairs in the body's order, `+Inf` as infinity.
pub fn buckets(body: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    samples(body)
        .filter_map(|(series, value)| {
            let le = series.strip_prefix(&prefix)?.strip_suffix("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, value.trim().parse().ok()?))
        })
        .collect()
}

/// The metric families a body declares, as (name, type) from its `# TYPE` lines.
pub fn families(body: &str) -> impl Iterator<Item = (&str, &str)> {
    body.lines().filter_map(|line| {
        let mut words = line.split_whitespace();
        if (words.next(), words.next()) != (Some("#"), Some("TYPE")) {
            return None;
        }
        Some((words.next()?, words.next()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = "# HELP spillway_uploader_spool_chunks Chunks in the spool.\n\
        # TYPE spillway_uploader_spool_chunks gauge\n\
        spillway_uploader_spool_chunks 12\n\
        spillway_uploader_spool_chunks_max 40\n\
        # TYPE spillway_uploader_puts counter\n\
        spillway_uploader_puts_total{result=\"ok\"} 7\n\
        spillway_uploader_puts_total{result=\"a b\"} 2\n\
        # TYPE spillway_uploader_commit_seconds histogram\n\
        spillway_uploader_commit_seconds_sum 0.5\n\
        spillway_uploader_commit_seconds_count 15\n\
        spillway_uploader_commit_seconds_bucket{le=\"0.008\"} 13\n\
        spillway_uploader_commit_seconds_bucket{le=\"0.032\"} 14\n\
        spillway_uploader_commit_seconds_bucket{le=\"+Inf\"} 15\n\
        # EOF\n";

    #[test]
    fn a_series_is_matched_whole_with_its_labels() {
        assert_eq!(metric(BODY, "spillway_uploader_spool_chunks"), 12.0);
        assert_eq!(metric(BODY, "spillway_uploader_spool_chunks_max"), 40.0);
        assert_eq!(
            metric(BODY, "spillway_uploader_puts_total{result=\"ok\"}"),
            7.0
        );
        assert_eq!(
            metric(BODY, "spillway_uploader_puts_total{result=\"a b\"}"),
            2.0
        );
        // A prefix of a name, a name without its labels, a missing series: 0.
        assert_eq!(metric(BODY, "spillway_uploader_spool"), 0.0);
        assert_eq!(metric(BODY, "spillway_uploader_puts_total"), 0.0);
        assert_eq!(metric(BODY, "spillway_ingest_sessions"), 0.0);
        assert_eq!(metric("", "x"), 0.0);
        assert_eq!(metric("x nan?\n", "x"), 0.0);
    }

    #[test]
    fn a_histogram_reads_as_bounds_and_cumulative_counts() {
        assert_eq!(
            buckets(BODY, "spillway_uploader_commit_seconds"),
            [(0.008, 13.0), (0.032, 14.0), (f64::INFINITY, 15.0)]
        );
        assert_eq!(buckets(BODY, "spillway_uploader_spool_chunks"), []);
    }

    #[test]
    fn families_come_from_the_type_lines() {
        assert_eq!(
            families(BODY).collect::<Vec<_>>(),
            [
                ("spillway_uploader_spool_chunks", "gauge"),
                ("spillway_uploader_puts", "counter"),
                ("spillway_uploader_commit_seconds", "histogram"),
            ]
        );
    }
}
