//! Simulated Omi `listen` sessions for `cargo xtask up --omi` and the chaos rows of the Omi
//! path, and the audit of what they left in the store.
//!
//! A session plays a deterministic capture in 1 s frames with `audio_timeline=2`, a heartbeat
//! every 20 s, as listen does; when its connection fails it reconnects with backoff and sends the
//! frame that failed, and on from there (listen keeps its unsent audio). Omi's
//! protocol has no acknowledgements, so the audit measures, per session, how much of the capture
//! the store holds, how much is missing, and whether any of it is there twice or altered.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::omi::Listen;

/// One simulated listen session.
#[derive(Debug, Clone)]
pub struct OmiSpec {
    pub uid: String,
    pub conversation: String,
    pub sample_rate: u32,
    /// Seconds of capture.
    pub seconds: u32,
    /// 1.0 plays in real time; 0 as fast as the socket takes it.
    pub speed: f64,
    /// Unix time of the capture's first sample.
    pub t0: f64,
    pub seed: u64,
}

impl OmiSpec {
    /// Second `i` of the capture, PCM s16le.
    pub fn second(&self, i: u32) -> Vec<u8> {
        let n = self.sample_rate as usize * 2;
        let mut x = self
            .seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(u64::from(i).wrapping_mul(0xbf58_476d_1ce4_e5b9))
            | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn query(&self) -> String {
        format!(
            "uid={}&sample_rate={}&client_kind=sim&audio_timeline=2",
            self.uid, self.sample_rate
        )
    }
}

/// What a session did.
#[derive(Debug, Clone, Default)]
pub struct OmiPlay {
    /// Frames sent, resends included.
    pub frames: u64,
    pub reconnects: u32,
}

/// Plays `spec` against the Omi WebSocket at `addr` until the capture is sent or `limit`
/// passes; reconnects (backoff 100 ms doubling to 2 s) whenever the connection fails.
pub async fn play(addr: SocketAddr, spec: &OmiSpec, limit: Duration) -> anyhow::Result<OmiPlay> {
    let started = Instant::now();
    let mut report = OmiPlay::default();
    let mut next = 0u32;
    let mut backoff = Duration::from_millis(100);
    while next < spec.seconds {
        anyhow::ensure!(
            started.elapsed() < limit,
            "{}: capture not sent within {limit:?} ({next} of {} s)",
            spec.uid,
            spec.seconds
        );
        let mut l = match connect(addr, spec).await {
            Ok(l) => l,
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        loop {
            if next >= spec.seconds {
                let _ = l.close().await;
                return Ok(report);
            }
            if spec.speed > 0.0 {
                let due = started + Duration::from_secs_f64(f64::from(next) / spec.speed);
                tokio::time::sleep_until(due.into()).await;
            }
            let ts = spec.t0 + f64::from(next);
            let sent = async {
                l.audio(ts, &spec.second(next)).await?;
                if next % 20 == 19 {
                    l.op(100, b"").await?;
                }
                anyhow::Ok(())
            }
            .await;
            report.frames += 1;
            match sent {
                Ok(()) => next += 1,
                Err(_) => {
                    // listen keeps what it could not send and sends it on the next connection;
                    // what the dead connection took is gone (the protocol has no acks).
                    report.reconnects += 1;
                    break;
                }
            }
        }
    }
    Ok(report)
}

async fn connect(addr: SocketAddr, spec: &OmiSpec) -> anyhow::Result<Listen> {
    let mut l = tokio::time::timeout(
        Duration::from_secs(5),
        Listen::connect(addr, &spec.query(), None),
    )
    .await??;
    l.next().await?; // the 202 timeline acknowledgement
    l.conversation(&spec.conversation).await?;
    Ok(l)
}

/// What the store holds of one session's capture.
#[derive(Debug, Clone, Default)]
pub struct OmiAudit {
    pub objects: usize,
    /// Seconds of the capture stored (each sample once).
    pub stored: f64,
    /// Seconds of the capture not in the store.
    pub missing: f64,
    /// The longest run of missing audio, in seconds.
    pub longest_gap: f64,
    /// Seconds stored more than once.
    pub duplicated: f64,
    /// Objects whose audio is not the capture's at their start time, or outside it.
    pub altered: usize,
}

/// Reads every object of `spec`'s conversation back and lays it on the capture.
pub async fn audit(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    spec: &OmiSpec,
) -> anyhow::Result<OmiAudit> {
    let rate = u64::from(spec.sample_rate);
    let total = u64::from(spec.seconds) * rate;
    let capture: Vec<u8> = (0..spec.seconds).flat_map(|i| spec.second(i)).collect();
    let mut cover = vec![0u8; usize::try_from(total)?];
    let prefix = format!("chunks/{}/{}/", spec.uid, spec.conversation);
    let keys = crate::sim::keys_under(s3, bucket, &prefix).await?;
    let mut report = OmiAudit {
        objects: keys.len(),
        ..OmiAudit::default()
    };
    for key in &keys {
        let Some(start) = key
            .strip_prefix(&prefix)
            .and_then(|k| k.strip_suffix(".batch.bin"))
            .and_then(|t| t.parse::<f64>().ok())
        else {
            report.altered += 1;
            continue;
        };
        let body = s3
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await?
            .body
            .collect()
            .await?
            .into_bytes();
        let at = ((start - spec.t0) * rate as f64).round();
        let from = at as usize;
        let ours = capture.get(from * 2..from * 2 + body.len());
        if at < 0.0 || ours != Some(&body[..]) {
            report.altered += 1;
            continue;
        }
        for c in cover.iter_mut().skip(from).take(body.len() / 2) {
            *c = c.saturating_add(1);
        }
    }
    let secs = |n: usize| n as f64 / rate as f64;
    report.stored = secs(cover.iter().filter(|&&c| c > 0).count());
    report.missing = secs(cover.iter().filter(|&&c| c == 0).count());
    report.duplicated = secs(cover.iter().filter(|&&c| c > 1).count());
    report.longest_gap = secs(cover.split(|&c| c > 0).map(<[u8]>::len).max().unwrap_or(0));
    Ok(report)
}
