//! `uploader status`: a running uploader's state at a glance, from two scrapes of its
//! `/metrics` (rates between them) and its `/readyz`: the spool, uploads and the store's
//! breaker, commits and refusals. The fetching, parsing and rendering are `spillway_ops::status`.

pub use spillway_ops::status::StatusFlags;
use spillway_ops::status::{self, Field, Samples, StatusError, Summary, Unit};

/// Arguments of `uploader status`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// The uploader's /metrics URL (on its --http-listen).
    #[arg(
        long,
        env = "SPILLWAY_UPLOADER_METRICS_URL",
        default_value = "http://127.0.0.1:9465/metrics"
    )]
    pub metrics_url: String,
    #[command(flatten)]
    pub flags: StatusFlags,
}

const P: &str = "spillway_uploader_";

/// Scrapes the uploader and summarizes it.
pub async fn collect(args: &StatusArgs) -> Result<Summary, StatusError> {
    status::collect(&args.metrics_url, &args.flags, summarize).await
}

/// What `uploader status` shows of two scrapes.
pub fn summarize(s: &Samples) -> Summary {
    let m = |name: &str| format!("{P}{name}");
    let mut out = Summary::new("uploader", s);
    out.section(
        "spool",
        vec![
            Field::number("chunks", "chunks", s.now(&m("spool_chunks")), Unit::Count),
            Field::number("bytes", "bytes", s.now(&m("spool_bytes")), Unit::Bytes),
            Field::number(
                "max_bytes",
                "bound",
                s.now(&m("spool_max_bytes")),
                Unit::Bytes,
            ),
            Field::number(
                "fill_ratio",
                "fill",
                s.now(&m("spool_fill_ratio")),
                Unit::Ratio,
            ),
            Field::number(
                "oldest_chunk_age_seconds",
                "oldest chunk",
                s.now(&m("spool_oldest_chunk_age_seconds")),
                Unit::Seconds,
            ),
            Field::number(
                "disk_free_bytes",
                "disk free",
                s.now(&m("spool_disk_free_bytes")),
                Unit::Bytes,
            ),
            // During a rollout: a spool above the release before's format is one it cannot open.
            Field::number("format", "format", s.now(&m("spool_format")), Unit::Count),
        ],
    );
    let uploads = m("uploads_total");
    let results = s.counts_by(&uploads, "result");
    // No `error` series yet, but uploads: none failed.
    let errors_per_second = s
        .rate_where(&uploads, "result", "error")
        .or_else(|| s.rate(&uploads).map(|_| 0.0));
    let per_second = s
        .rate(&uploads)
        .map(|all| all - errors_per_second.unwrap_or(0.0));
    out.section(
        "uploads",
        vec![
            Field::text(
                "breaker",
                "store breaker",
                status::breaker(s.now(&m("breaker_state"))),
            ),
            Field::number("per_second", "uploaded", per_second, Unit::Rate),
            Field::number(
                "bytes_per_second",
                "throughput",
                s.rate(&m("upload_bytes_total")),
                Unit::BytesPerSecond,
            ),
            Field::number(
                "errors_per_second",
                "failing",
                errors_per_second,
                Unit::Rate,
            ),
            Field::number(
                "in_flight",
                "in flight",
                s.now(&m("uploads_in_flight")),
                Unit::Count,
            ),
            Field::number(
                "concurrency_limit",
                "concurrency limit",
                s.now(&m("upload_concurrency_limit")),
                Unit::Count,
            ),
            Field::counts("results", "results", results),
        ],
    );
    out.section(
        "puts",
        vec![
            Field::number(
                "per_second",
                "committed",
                s.rate(&m("puts_total")),
                Unit::Rate,
            ),
            Field::number(
                "commit_p99_seconds",
                "commit p99",
                s.quantile(&m("commit_seconds"), 0.99),
                Unit::Seconds,
            ),
            Field::counts(
                "results",
                "results",
                s.counts_by(&m("puts_total"), "result"),
            ),
            Field::counts(
                "rejections",
                "refused",
                s.counts_by(&m("put_rejections_total"), "reason"),
            ),
        ],
    );
    out.section(
        "losses",
        vec![
            Field::number(
                "dropped_chunks",
                "evicted (drop-oldest)",
                s.now(&m("spool_dropped_chunks_total")),
                Unit::Count,
            ),
            Field::number(
                "lost_chunks",
                "lost at start",
                s.now(&m("spool_lost_chunks_total")),
                Unit::Count,
            ),
            Field::number(
                "quarantined_chunks",
                "quarantined",
                s.now(&m("spool_quarantined_total")),
                Unit::Count,
            ),
            Field::number(
                "conflicts",
                "store conflicts",
                s.now(&m("upload_conflicts_total")),
                Unit::Count,
            ),
        ],
    );
    out
}

/// `uploader status`: prints the summary.
pub async fn run(args: &StatusArgs) -> anyhow::Result<()> {
    status::print(&collect(args).await?, &args.flags);
    Ok(())
}
