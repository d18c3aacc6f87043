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
    /// Cores ingest and the uploader used together while every device was streaming (CPU
    /// seconds per second, from `/proc`), and that window's length.
    pub(super) daemon_cores: Option<(f64, Duration)>,
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
    uploader: (SocketAddr, u32),
    chunk_seconds: u32,
    devices: usize,
    chunks: u64,
    pin_to: Option<&str>,
) -> anyhow::Result<Step> {
    let (uploader, uploader_pid) = uploader;
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
    if let Some(cpus) = pin_to {
        pin(pid, cpus)?;
    }
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
    // The steady window: from the last device's start to the first device's end.
    let cpu = {
        let (from, to) = (
            t0 + spread,
            t0 + Duration::from_secs(u64::from(chunk_seconds) * chunks),
        );
        tokio::spawn(async move {
            if to <= from {
                return anyhow::Ok(None);
            }
            let both = || -> anyhow::Result<f64> {
                Ok(crate::bench::cpu_seconds(pid)? + crate::bench::cpu_seconds(uploader_pid)?)
            };
            tokio::time::sleep_until(from.into()).await;
            let (before, begun) = (both()?, Instant::now());
            tokio::time::sleep_until(to.into()).await;
            let window = begun.elapsed();
            Ok(Some(((both()? - before) / window.as_secs_f64(), window)))
        })
    };
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
    step.daemon_cores = cpu.await??;
    step.latencies.sort();
    step.max_held = max_held.load(Ordering::Relaxed);
    step.ingest_peak = rss(pid)?.0;
    proc.stop().await?;
    Ok(step)
}

/// Which CPUs the load generator and the daemons run on, for row 4b-pinned.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pinning {
    /// The bench process (the simulated devices) and the store.
    pub(super) load: &'static str,
    /// ingest and the uploader.
    pub(super) daemons: &'static str,
}

pub(super) const PINNING: Pinning = Pinning {
    load: "0",
    daemons: "1",
};

/// Every thread of process `pid` onto `cpus` (`taskset -a -c`).
fn pin(pid: u32, cpus: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("taskset")
        .args(["-a", "-cp", cpus, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .context("running taskset (util-linux)")?;
    anyhow::ensure!(status.success(), "taskset -a -cp {cpus} {pid} failed");
    Ok(())
}

/// Row 4b's steps: a store, an uploader, then per step a fresh ingest and that many real-time
/// devices, until a step is not sustained. With `pinning`, this process and the store run on
/// its `load` CPUs and the daemons on its `daemons` CPUs (restored afterwards).
pub(super) async fn real_time_steps(
    env: &Env,
    tls: &Tls,
    chunk_seconds: u32,
    steps: &[usize],
    pinning: Option<Pinning>,
) -> anyhow::Result<Vec<Step>> {
    let store = StoreProc::start(env, "realtime", Duration::ZERO).await?;
    let spool = env.dir.join("spool-realtime");
    let up =
        crate::bench::uploader(env, "uploader-realtime", &spool, store.uploader_args()).await?;
    let (uploader, grpc, up_http) = (up.proc, up.grpc, up.http);
    let uploader_pid = uploader.id().context("uploader pid")?;
    let all = format!(
        "0-{}",
        std::thread::available_parallelism().map_or(1, |n| n.get()) - 1
    );
    if let Some(p) = pinning {
        pin(std::process::id(), p.load)?;
        pin(store.pid().context("store pid")?, p.load)?;
        pin(uploader_pid, p.daemons)?;
    }
    let mut done: Vec<Step> = Vec::new();
    let ran = async {
        for &n in steps {
            let before = commit_buckets(&http_get(up_http, "/metrics").await?.1);
            let mut step =
                realtime(env, tls, (grpc, uploader_pid), chunk_seconds, n, 2, pinning.map(|p| p.daemons)).await?;
            let after = commit_buckets(&http_get(up_http, "/metrics").await?.1);
            step.commits_within = slowest_commit_within(&before, &after);
            eprintln!(
                "   {n} devices: {} of {} acks, p50 {:?}, p99 {:?}, max {:?}, worst send lag {:?}, {} errors, ingest peak RSS {:.0} MiB, every commit within {}, daemons {}",
                step.latencies.len(),
                step.expected_acks,
                percentile(&step.latencies, 50.0),
                percentile(&step.latencies, 99.0),
                step.latencies.last().copied().unwrap_or_default(),
                step.worst_lag,
                step.errors,
                step.ingest_peak as f64 / MIB,
                within(step.commits_within),
                step.daemon_cores
                    .map_or("-".into(), |(c, w)| format!("{c:.2} cores over {w:.0?}"))
            );
            let ok = step.sustained();
            done.push(step);
            if !ok {
                break;
            }
            store.clear()?;
        }
        anyhow::Ok(())
    }
    .await;
    if pinning.is_some() {
        pin(std::process::id(), &all)?;
    }
    ran?;
    uploader.stop().await?;
    drop(store);
    std::fs::remove_dir_all(&spool).ok();
    Ok(done)
}

/// The most devices a step sustained (0 when none did).
pub(super) fn most_sustained(done: &[Step]) -> usize {
    done.iter()
        .filter(|s| s.sustained())
        .map(|s| s.devices)
        .max()
        .unwrap_or(0)
}

/// Row 4b (or 4b-pinned) from its steps.
pub(super) fn row_4b(
    id: &str,
    done: &[Step],
    steps: &[usize],
    ceiling: Option<f64>,
    chunk_seconds: u32,
    pinning: Option<Pinning>,
) -> Row {
    let max = most_sustained(done);
    let tried = done
        .iter()
        .map(|s| s.devices.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let top = steps.iter().max().copied().unwrap_or(0);
    let what = match pinning {
        None => "real-time 16 kHz devices sustained (every ack within 1 s)",
        Some(_) => "the same, devices and store on one core, ingest and uploader on the other",
    };
    let row = match ceiling {
        Some(c) => Row::ratio_at_least(
            id,
            &format!("{what} vs the disk-bound ceiling"),
            "devices",
            max as f64,
            c,
            GOAL_4B,
        ),
        None => Row::figure(
            id,
            what,
            "devices",
            max as f64,
            "run the spool group for the ceiling",
            true,
        ),
    };
    let limited = if max == top {
        format!("; {top} is the most tried: not the limit")
    } else {
        String::new()
    };
    // The disk's share of the acks' latency at the last step tried.
    let commits = done
        .last()
        .map(|s| {
            format!(
                "; at {} devices every commit durable within {}",
                s.devices,
                within(s.commits_within)
            )
        })
        .unwrap_or_default();
    let placed = match pinning {
        None => format!(
            "devices run in the bench process on the same cores, {SIM_SOCKETS} UDP sockets among them"
        ),
        Some(p) => format!(
            "taskset: bench process (devices) and store on CPU {}, ingest and uploader on CPU {}",
            p.load, p.daemons
        ),
    };
    row.note(format!(
        "steps {tried}; {chunk_seconds} s chunks; ceiling = row 3's append+fdatasync MB/s ÷ 32 KB/s{limited}{commits}; {placed}"
    ))
}

/// Row 4c: ingest's and the uploader's CPU per 1,000 real-time 16 kHz devices, at the largest
/// step row 4b sustained, against the floor for the same bytes (each part measured alone in
/// this run: `floor_per_mb` CPU seconds per MB).
pub(super) fn row_4c(done: &[Step], floor: FloorCpu, machine: &str) -> Option<Row> {
    let floor_per_mb = floor.per_mb();
    let step = done
        .iter()
        .filter(|s| s.sustained())
        .max_by_key(|s| s.devices)?;
    let (cores, window) = step.daemon_cores?;
    let per_1000 = cores * 1000.0 / step.devices as f64;
    let what = "ingest + uploader CPU per 1,000 real-time 16 kHz devices";
    let (mb_s, unit) = (BYTES_PER_SECOND as f64 / MB * 1000.0, "cores");
    let each = done
        .iter()
        .filter_map(|s| {
            let (c, _) = s.daemon_cores?;
            Some(format!(
                "{}: {:.3}",
                s.devices,
                c * 1000.0 / s.devices as f64
            ))
        })
        .collect::<Vec<_>>()
        .join(", ");
    let ms = |p: Option<f64>| p.map_or("-".to_owned(), |s| format!("{:.2}", s * 1e3));
    let note = format!(
        "{} devices, {window:.0?} with every device streaming; per 1,000 at each step: {each}; per 10,000: {:.1} cores; the floor's CPU ms per MB: quinn receive {}, append+fdatasync {}, PutObject {}; {machine}",
        step.devices,
        per_1000 * 10.0,
        ms(floor.quic),
        ms(floor.disk),
        ms(floor.put),
    );
    Some(match floor_per_mb {
        Some(f) => Row::ratio_at_most("4c", &format!("{what} vs the floor (raw quinn receive + append and fdatasync + raw PutObject, the same bytes)"), unit, per_1000, f * mb_s, 1.5).note(note),
        None => Row::figure("4c", what, unit, per_1000, "run every group for the floor", true).note(note),
    })
}
