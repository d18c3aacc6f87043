//! `ingest status`: a running ingest's state at a glance, from two scrapes of its `/metrics`
//! (rates between them) and its `/readyz`: sessions, the memory budget, acks and their latency,
//! the uploaders it sees, refusals by code. The fetching, parsing and rendering are
//! `spillway_ops::status`.

pub use spillway_ops::status::StatusFlags;
use spillway_ops::status::{self, Field, Samples, StatusError, Summary, Unit};

/// Arguments of `ingest status`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// The ingest's /metrics URL (on its --http-listen).
    #[arg(
        long,
        env = "SPILLWAY_INGEST_METRICS_URL",
        default_value = "http://127.0.0.1:9464/metrics"
    )]
    pub metrics_url: String,
    #[command(flatten)]
    pub flags: StatusFlags,
}

const P: &str = "spillway_ingest_";

/// Scrapes the ingest and summarizes it.
pub async fn collect(args: &StatusArgs) -> Result<Summary, StatusError> {
    status::collect(&args.metrics_url, &args.flags, summarize).await
}

/// What `ingest status` shows of two scrapes.
pub fn summarize(s: &Samples) -> Summary {
    let m = |name: &str| format!("{P}{name}");
    let mut out = Summary::new("ingest", s);
    out.section(
        "sessions",
        vec![
            Field::number("active", "open", s.now(&m("sessions_active")), Unit::Count),
            Field::counts(
                "ended",
                "ended",
                s.counts_by(&m("sessions_ended_total"), "reason"),
            ),
            Field::counts(
                "refusals",
                "refused",
                s.counts_by(&m("refusals_total"), "code"),
            ),
        ],
    );
    let (buffered, budget) = (s.now(&m("buffered_bytes")), s.now(&m("budget_bytes")));
    out.section(
        "budget",
        vec![
            Field::number("buffered_bytes", "reserved", buffered, Unit::Bytes),
            Field::number("budget_bytes", "budget", budget, Unit::Bytes),
            Field::number(
                "in_use_ratio",
                "in use",
                buffered
                    .zip(budget.filter(|b| *b > 0.0))
                    .map(|(a, b)| a / b),
                Unit::Ratio,
            ),
            Field::number(
                "waits",
                "waits",
                s.now(&m("budget_waits_total")),
                Unit::Count,
            ),
        ],
    );
    out.section(
        "acks",
        vec![
            Field::number(
                "chunks",
                "chunks acked",
                s.now(&m("chunks_acked_total")),
                Unit::Count,
            ),
            Field::number(
                "per_second",
                "acks",
                s.rate(&m("chunks_acked_total")),
                Unit::Rate,
            ),
            Field::number(
                "bytes_per_second",
                "audio acked",
                s.rate(&m("acked_bytes_total")),
                Unit::BytesPerSecond,
            ),
            Field::number(
                "ack_p99_seconds",
                "ack latency p99",
                s.quantile(&m("ack_seconds"), 0.99),
                Unit::Seconds,
            ),
        ],
    );
    out.section(
        "uploaders",
        vec![
            Field::number(
                "endpoints",
                "known",
                s.now(&m("uploader_endpoints")),
                Unit::Count,
            ),
            Field::number(
                "healthy",
                "healthy",
                s.now(&m("uploader_endpoints_healthy")),
                Unit::Count,
            ),
            Field::number(
                "failovers",
                "failovers",
                s.now(&m("forward_failovers_total")),
                Unit::Count,
            ),
            Field::number(
                "retries",
                "retries",
                s.now(&m("forward_retries_total")),
                Unit::Count,
            ),
        ],
    );
    out.section(
        "connections",
        vec![
            Field::number(
                "accepted",
                "accepted",
                s.now(&m("connections_total")),
                Unit::Count,
            ),
            Field::number(
                "handshake_failures",
                "handshakes failed",
                s.now(&m("handshake_failures_total")),
                Unit::Count,
            ),
            Field::counts(
                "refused",
                "refused",
                s.counts_by(&m("connections_refused_total"), "reason"),
            ),
        ],
    );
    if s.now(&m("omi_connections_total")).is_some_and(|n| n > 0.0) {
        out.section(
            "omi",
            vec![
                Field::number(
                    "connections",
                    "connections",
                    s.now(&m("omi_connections_total")),
                    Unit::Count,
                ),
                Field::counts(
                    "closes",
                    "closed",
                    s.counts_by(&m("omi_closes_total"), "code"),
                ),
                Field::text(
                    "upstream_breaker",
                    "upstream breaker",
                    status::breaker(s.now(&m("omi_upstream_breaker_state"))),
                ),
                Field::counts(
                    "upstream_dropped_frames",
                    "relay drops",
                    s.counts_by(&m("omi_upstream_dropped_frames_total"), "reason"),
                ),
            ],
        );
    }
    out
}

/// `ingest status`: prints the summary.
pub async fn run(args: &StatusArgs) -> anyhow::Result<()> {
    status::print(&collect(args).await?, &args.flags);
    Ok(())
}
