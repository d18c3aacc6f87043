//! Rows 4b and 6: real-time 16 kHz devices through the whole pipeline, step by step, and the
//! commit latency each step saw.

#[allow(clippy::wildcard_imports)]
use super::*;

/// Row 4b's goal: real-time devices sustained, as a fraction of the disk-bound ceiling.
pub(super) const GOAL_4B: f64 = 0.7;

/// The device counts row 4b tries: `fixed`, plus the goal's own point ([`GOAL_4B`] × the
/// disk-bound ceiling, rounded up to 25) when it falls among them, so that passing it is the
/// goal met rather than something between two coarse steps.
pub(super) fn with_goal_step(fixed: &[usize], ceiling: Option<f64>) -> Vec<usize> {
    let mut steps = fixed.to_vec();
    let top = fixed.iter().max().copied().unwrap_or(0);
    if let Some(c) = ceiling {
        let goal = ((GOAL_4B * c / 25.0).ceil() as usize) * 25;
        if goal > 0 && goal < top && !steps.contains(&goal) {
            steps.push(goal);
            steps.sort_unstable();
        }
    }
    steps
}

/// The uploader's commit-latency histogram (`spillway_uploader_commit_seconds`) as (upper bound
/// in seconds, cumulative count) pairs, `+Inf` last.
pub(super) fn commit_buckets(metrics: &str) -> Vec<(f64, f64)> {
    spillway_kit::metrics::buckets(metrics, "spillway_uploader_commit_seconds")
}

/// The smallest bucket bound every commit between two scrapes fell under: `None` when no
/// commit happened or the histogram is missing.
pub(super) fn slowest_commit_within(before: &[(f64, f64)], after: &[(f64, f64)]) -> Option<f64> {
    let delta = |le: f64| {
        let at = |h: &[(f64, f64)]| h.iter().find(|(l, _)| *l == le).map_or(0.0, |(_, c)| *c);
        at(after) - at(before)
    };
    let all = delta(f64::INFINITY);
    if all <= 0.0 {
        return None;
    }
    after.iter().map(|(le, _)| *le).find(|le| delta(*le) >= all)
}

/// A commit-latency bound for the table.
pub(super) fn within(bound: Option<f64>) -> String {
    match bound {
        None => "? (no commits seen)".into(),
        Some(b) if b.is_infinite() => "over 8 s (beyond the histogram)".into(),
        Some(b) => format!("{:.0} ms", b * 1000.0),
    }
}

/// What one step of real-time devices saw.
#[derive(Debug, Default)]
pub(super) struct Step {
    pub(super) devices: usize,
    /// Ack latencies: from the last byte of a chunk written to its ack read.
    pub(super) latencies: Vec<Duration>,
    pub(super) expected_acks: usize,
    pub(super) worst_lag: Duration,
    pub(super) errors: usize,
    pub(super) ingest_peak: u64,
    pub(super) ingest_idle: u64,
    pub(super) max_held: u64,
    /// Every commit of the step was durable within this many seconds (a histogram bound).
    pub(super) commits_within: Option<f64>,
}

impl Step {
    pub(super) fn sustained(&self) -> bool {
        self.errors == 0
            && self.latencies.len() == self.expected_acks
            && self.worst_lag <= Duration::from_secs(1)
            && self
                .latencies
                .last()
                .is_none_or(|l| *l <= Duration::from_secs(1))
    }
}

/// `devices` real-time 16 kHz devices through the whole pipeline, starts spread over one chunk,
/// each streaming `chunks` chunks in 200 ms frames.
pub(super) async fn realtime(
    env: &Env,
    tls: &Tls,
    uploader: SocketAddr,
    chunk_seconds: u32,
    devices: usize,
    chunks: u64,
) -> anyhow::Result<Step> {
    let (proc, quic, _http) = ingest(
        env,
        tls,
        uploader,
        chunk_seconds,
        &format!("ingest-rt-{devices}"),
        UNBOUNDED,
    )
    .await?;
    let pid = proc.id().context("ingest pid")?;
    let (_, idle) = rss(pid)?;
    let chunk_bytes = u64::from(chunk_seconds) * BYTES_PER_SECOND;
    let frame = Bytes::from(crate::bench::store::base_pcm().slice(..6_400).to_vec());
    let frame_every = Duration::from_millis(200);
    // Bytes sent and acknowledged by all devices: what ingest must hold is the difference.
    let sent = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let max_held = Arc::new(AtomicU64::new(0));
    let monitor = {
        let (sent, acked, max_held) =
            (Arc::clone(&sent), Arc::clone(&acked), Arc::clone(&max_held));
        tokio::spawn(async move {
            loop {
                let held = sent
                    .load(Ordering::Relaxed)
                    .saturating_sub(acked.load(Ordering::Relaxed));
                max_held.fetch_max(held, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // The simulated devices share a few UDP sockets, as devices behind a gateway do: a socket
    // and its driver task per device made the load generator itself the first thing to run
    // out of CPU on these two cores.
    let sockets = (0..SIM_SOCKETS)
        .map(|_| quinn::Endpoint::client(([127, 0, 0, 1], 0).into()))
        .collect::<Result<Vec<_>, _>>()
        .context("binding the simulated devices' sockets")?;
    let t0 = Instant::now() + Duration::from_secs(1);
    let spread = Duration::from_secs(u64::from(chunk_seconds));
    let mut tasks = tokio::task::JoinSet::new();
    for d in 0..devices {
        let (cert, frame, sent, acked) = (
            tls.der.clone(),
            frame.clone(),
            Arc::clone(&sent),
            Arc::clone(&acked),
        );
        let socket = sockets[d % sockets.len()].clone();
        let start = t0 + spread.mul_f64(d as f64 / devices as f64);
        tasks.spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let device = Device::connect_on(&socket, quic, "localhost", &cert).await?;
            let (mut tx, mut rx) = device.open().await?;
            tx.hello(hello(&format!("rt-{d:05}"))?).await?;
            let total = chunk_bytes * chunks;
            let ends: Arc<parking_lot::Mutex<Vec<Instant>>> = Arc::default();
            let reader = {
                let (ends, acked) = (Arc::clone(&ends), Arc::clone(&acked));
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut errors = 0;
                    while let Some(m) = rx.next().await? {
                        match m.kind {
                            Some(Kind::Ack(a)) => {
                                let now = Instant::now();
                                acked.fetch_add(
                                    (a.end_sample - a.first_sample) * 2,
                                    Ordering::Relaxed,
                                );
                                let end = ends.lock().get(a.seq as usize).copied();
                                if let Some(end) = end {
                                    latencies.push(now.saturating_duration_since(end));
                                }
                            }
                            Some(Kind::Error(_)) => errors += 1,
                            _ => {}
                        }
                    }
                    anyhow::Ok((latencies, errors))
                })
            };
            let begun = Instant::now();
            let mut written = 0u64;
            let mut worst_lag = Duration::ZERO;
            let mut n = 0u32;
            while written < total {
                let due = begun + frame_every * n;
                let now = Instant::now();
                if now < due {
                    tokio::time::sleep_until(due.into()).await;
                } else {
                    worst_lag = worst_lag.max(now - due);
                }
                written += frame.len() as u64;
                if written.is_multiple_of(chunk_bytes) {
                    // Stamped as the chunk's last byte leaves (before the ack can come back).
                    ends.lock().push(Instant::now());
                }
                tx.audio(frame.clone()).await?;
                sent.fetch_add(frame.len() as u64, Ordering::Relaxed);
                n += 1;
            }
            tx.finish()?;
            let (latencies, errors) = reader.await??;
            device.close().await;
            anyhow::Ok((latencies, errors, worst_lag))
        });
    }
    let mut step = Step {
        devices,
        expected_acks: devices * chunks as usize,
        ingest_idle: idle,
        ..Step::default()
    };
    while let Some(r) = tasks.join_next().await {
        match r? {
            Ok((latencies, errors, lag)) => {
                step.latencies.extend(latencies);
                step.errors += errors;
                step.worst_lag = step.worst_lag.max(lag);
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "a real-time device failed");
                step.errors += 1;
            }
        }
    }
    monitor.abort();
    step.latencies.sort();
    step.max_held = max_held.load(Ordering::Relaxed);
    step.ingest_peak = rss(pid)?.0;
    proc.stop().await?;
    Ok(step)
}
