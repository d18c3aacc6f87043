//! Simulated devices: each streams deterministic audio over its own session, and afterwards
//! every object the pipeline wrote is checked byte for byte against what was sent.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use indicatif::ProgressBar;
use rand::{Rng, SeedableRng};
use spillway_ingest::client::Device;
use spillway_proto::device::{Ack, Encoding, Hello, server_message::Kind};

/// Where a device's samples come from. Sample `i` is a pure function of `i`, so expected bytes
/// can be regenerated at verification time instead of being kept in memory.
#[derive(Debug, Clone)]
pub enum Source {
    /// A tone plus pseudo-random noise, seeded per device.
    Synthetic { seed: u64, sample_rate: u32 },
    /// Samples of a mono 16-bit WAV file, looped.
    Wav(Arc<Vec<i16>>),
}

impl Source {
    /// Loads a mono 16-bit PCM WAV file; returns its samples and rate.
    pub fn wav_file(path: &std::path::Path) -> anyhow::Result<(Self, u32)> {
        let reader =
            hound::WavReader::open(path).with_context(|| format!("opening {}", path.display()))?;
        let spec = reader.spec();
        ensure!(
            spec.channels == 1
                && spec.bits_per_sample == 16
                && spec.sample_format == hound::SampleFormat::Int,
            "{} must be mono 16-bit PCM (it is {} channel(s), {} bits, {:?})",
            path.display(),
            spec.channels,
            spec.bits_per_sample,
            spec.sample_format
        );
        let samples: Vec<i16> = reader
            .into_samples::<i16>()
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading {}", path.display()))?;
        ensure!(!samples.is_empty(), "{} holds no samples", path.display());
        Ok((Source::Wav(Arc::new(samples)), spec.sample_rate))
    }

    pub fn sample(&self, i: u64) -> i16 {
        match self {
            Source::Synthetic { seed, sample_rate } => {
                let t = i as f64 / f64::from(*sample_rate);
                let freq = 220.0 + (*seed % 16) as f64 * 55.0;
                let tone = (t * freq * std::f64::consts::TAU).sin() * 8000.0;
                let mut h = (i ^ seed.rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                h ^= h >> 29;
                let noise = (h % 2001) as f64 - 1000.0;
                (tone + noise) as i16
            }
            Source::Wav(samples) => samples[(i % samples.len() as u64) as usize],
        }
    }

    /// The PCM bytes `[offset, offset + len)` of the stream.
    pub fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let first = offset / 2;
        let last = (offset + len as u64).div_ceil(2);
        let mut out = Vec::with_capacity(((last - first) * 2) as usize);
        for i in first..last {
            out.extend_from_slice(&self.sample(i).to_le_bytes());
        }
        let skip = (offset % 2) as usize;
        out[skip..skip + len].to_vec()
    }
}

/// One simulated device's session.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    pub uid: String,
    pub session: String,
    pub sample_rate: u32,
    pub samples: u64,
    /// Playback speed: 1.0 is real time, 0 sends as fast as possible.
    pub speed: f64,
    /// Frames are uniformly 1..=2×this many bytes, split anywhere (even inside a sample).
    pub mean_frame_bytes: usize,
    pub source: Source,
    pub seed: u64,
    /// The device's credential (`Hello.token`); empty against `--auth none`.
    pub token: String,
}

impl DeviceSpec {
    /// The hello that opens this session from its start.
    pub fn hello(&self) -> Hello {
        Hello {
            uid: self.uid.clone(),
            session: self.session.clone(),
            sample_rate: self.sample_rate,
            encoding: Encoding::PcmS16le as i32,
            channels: 1,
            token: self.token.clone(),
            resume_from: 0,
        }
    }

    /// A synthetic session sent as fast as possible in frames of ~3 KB split anywhere.
    pub fn synthetic(uid: &str, session: &str, sample_rate: u32, seconds: f64, seed: u64) -> Self {
        Self {
            uid: uid.into(),
            session: session.into(),
            sample_rate,
            samples: (seconds * f64::from(sample_rate)).round() as u64,
            speed: 0.0,
            mean_frame_bytes: 3_001,
            source: Source::Synthetic { seed, sample_rate },
            seed,
            token: String::new(),
        }
    }
}

/// What a device saw.
#[derive(Debug, Clone)]
pub struct DeviceReport {
    pub spec: DeviceSpec,
    pub chunk_samples: u64,
    pub acks: Vec<Ack>,
    pub errors: Vec<spillway_proto::device::Error>,
    pub sent_bytes: u64,
}

/// Shared progress of all simulated devices: bytes sent on the bar, acks in its message.
#[derive(Debug)]
pub struct Progress {
    pub bar: ProgressBar,
    pub acked: AtomicU64,
}

impl Progress {
    pub fn new(bar: ProgressBar) -> Arc<Self> {
        Arc::new(Self {
            bar,
            acked: AtomicU64::new(0),
        })
    }

    /// Progress that is not drawn (tests).
    pub fn hidden() -> Arc<Self> {
        Self::new(ProgressBar::hidden())
    }

    fn ack(&self) {
        let n = self.acked.fetch_add(1, Ordering::Relaxed) + 1;
        self.bar.set_message(format!("{n} chunks acked"));
    }
}

/// The audio frames a simulated device sends: sizes uniform in 1..=2×`mean_frame_bytes`, split
/// anywhere (even inside a sample), paced to the spec's speed.
struct Frames {
    source: Source,
    rng: rand::rngs::StdRng,
    max_len: usize,
    total: u64,
    /// Bytes per second of wall time to pace to; 0 for as fast as possible.
    pace: f64,
    started: Instant,
    sent: u64,
}

impl Frames {
    fn new(spec: &DeviceSpec) -> Self {
        Self {
            source: spec.source.clone(),
            rng: rand::rngs::StdRng::seed_from_u64(spec.seed),
            max_len: spec.mean_frame_bytes.max(1) * 2,
            total: spec.samples * 2,
            pace: 2.0 * f64::from(spec.sample_rate) * spec.speed,
            started: Instant::now(),
            sent: 0,
        }
    }

    async fn next(&mut self) -> Option<Bytes> {
        if self.sent >= self.total {
            return None;
        }
        let len = self
            .rng
            .random_range(1..=self.max_len)
            .min((self.total - self.sent) as usize);
        if self.pace > 0.0 {
            let due = Duration::from_secs_f64(self.sent as f64 / self.pace);
            tokio::time::sleep_until((self.started + due).into()).await;
        }
        let frame = Bytes::from(self.source.bytes(self.sent, len));
        self.sent += len as u64;
        Some(frame)
    }
}

/// Streams one session and collects every reply until ingest finishes its side.
pub async fn run_device(
    device: &Device,
    spec: DeviceSpec,
    progress: &Arc<Progress>,
) -> anyhow::Result<DeviceReport> {
    let (mut tx, mut rx) = device.open().await?;
    tx.hello(spec.hello()).await?;
    let reader = {
        let progress = Arc::clone(progress);
        tokio::spawn(async move {
            let mut messages = Vec::new();
            while let Some(m) = rx.next().await? {
                if matches!(m.kind, Some(Kind::Ack(_))) {
                    progress.ack();
                }
                messages.push(m);
            }
            anyhow::Ok(messages)
        })
    };
    let mut frames = Frames::new(&spec);
    while let Some(frame) = frames.next().await {
        let len = frame.len() as u64;
        tx.audio(frame).await?;
        progress.bar.inc(len);
    }
    let sent = frames.sent;
    tx.finish()?;
    let messages = reader.await.context("reader task")??;
    let mut report = DeviceReport {
        spec,
        chunk_samples: 0,
        acks: Vec::new(),
        errors: Vec::new(),
        sent_bytes: sent,
    };
    for m in messages {
        match m.kind {
            Some(Kind::Accepted(a)) => report.chunk_samples = a.chunk_samples,
            Some(Kind::Ack(a)) => report.acks.push(a),
            Some(Kind::Error(e)) => report.errors.push(e),
            None => {}
        }
    }
    Ok(report)
}

/// Checks one device's acks and objects: every chunk acked once, contiguous, and each object a
/// valid WAV whose PCM is exactly the audio sent. Waits up to `wait` for the drain to upload.
/// Returns the number of objects verified.
pub async fn verify_device(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    report: &DeviceReport,
    wait: Duration,
) -> anyhow::Result<usize> {
    let spec = &report.spec;
    ensure!(
        report.errors.is_empty(),
        "{}/{}: ingest sent errors {:?}",
        spec.uid,
        spec.session,
        report.errors
    );
    ensure!(
        report.chunk_samples > 0,
        "{}/{}: never accepted",
        spec.uid,
        spec.session
    );
    let expected = spec.samples.div_ceil(report.chunk_samples) as usize;
    ensure!(
        report.acks.len() == expected,
        "{}/{}: {} acks for {} chunks",
        spec.uid,
        spec.session,
        report.acks.len(),
        expected
    );
    let deadline = Instant::now() + wait;
    for (k, ack) in report.acks.iter().enumerate() {
        let first = k as u64 * report.chunk_samples;
        let end = (first + report.chunk_samples).min(spec.samples);
        ensure!(
            (ack.seq, ack.first_sample, ack.end_sample) == (k as u64, first, end),
            "ack {k} covers {:?}, expected {:?}",
            (ack.seq, ack.first_sample, ack.end_sample),
            (k, first, end)
        );
        let want = spec.source.bytes(first * 2, ((end - first) * 2) as usize);
        // The receipt names exactly the bytes sent.
        let sent = spillway_proto::checksum::crc32c(&want);
        ensure!(
            ack.crc32c == Some(sent),
            "ack {k}: receipt {:?}, but the audio sent has crc32c {sent:08x}",
            ack.crc32c
        );
        let body = get_when_present(s3, bucket, &ack.key, deadline).await?;
        let pcm = wav_pcm(&body, spec.sample_rate).with_context(|| ack.key.clone())?;
        if pcm != want {
            bail!(
                "{}: PCM differs from what was sent ({} vs {} bytes)",
                ack.key,
                pcm.len(),
                want.len()
            );
        }
    }
    let prefix = report
        .acks
        .first()
        .and_then(|a| a.key.rsplit_once('/'))
        .map(|(p, _)| format!("{p}/"))
        .unwrap_or_default();
    let count = keys_under(s3, bucket, &prefix).await?.len();
    ensure!(
        count == expected,
        "{prefix}: {count} objects, expected {expected}"
    );
    Ok(count)
}

async fn get_when_present(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    deadline: Instant,
) -> anyhow::Result<Vec<u8>> {
    loop {
        match s3.get_object().bucket(bucket).key(key).send().await {
            Ok(out) => return Ok(out.body.collect().await?.into_bytes().to_vec()),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(key, error = %aws_sdk_s3::error::DisplayErrorContext(&e), "object not there yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => bail!(
                "object {key} never appeared: {}",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            ),
        }
    }
}

/// What a resuming device saw.
#[derive(Debug, Clone)]
pub struct ResumedReport {
    pub spec: DeviceSpec,
    pub report: spillway_ingest::client::ResumeReport,
    pub sent_bytes: u64,
}

/// Streams one session through the resuming client ([`spillway_ingest::client::stream_resuming`]):
/// audio is produced at the spec's pace into a small channel, and the client keeps it until
/// acknowledged, reconnecting and resuming across ingest restarts.
pub async fn run_resuming_device(
    config: spillway_ingest::client::ResumeConfig,
    spec: DeviceSpec,
    progress: &Arc<Progress>,
) -> anyhow::Result<ResumedReport> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let hello = spec.hello();
    let producer = {
        let (spec, progress) = (spec.clone(), Arc::clone(progress));
        tokio::spawn(async move {
            let mut frames = Frames::new(&spec);
            while let Some(frame) = frames.next().await {
                let len = frame.len() as u64;
                if tx.send(frame).await.is_err() {
                    break;
                }
                progress.bar.inc(len);
            }
            frames.sent
        })
    };
    let report = spillway_ingest::client::stream_resuming(config, hello, rx).await?;
    let sent_bytes = producer.await.context("producer task")?;
    for _ in &report.acks {
        progress.ack();
    }
    Ok(ResumedReport {
        spec,
        report,
        sent_bytes,
    })
}

/// What reached the store for one resumed session, against what was acknowledged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Audit {
    /// Distinct objects the acks name.
    pub acked: usize,
    /// Objects stored for the session.
    pub objects: usize,
    /// Acked objects missing from the store or not holding exactly the audio of their range.
    pub lost: usize,
    /// Objects stored for the session that no ack names (a second copy of some audio).
    pub duplicated: usize,
    /// Copies set aside beside an original (`{key}.conflict-{crc32c}`: other audio put under an
    /// acknowledged chunk's id, which never replaces it). Not duplicates of acknowledged audio.
    pub set_aside: usize,
    /// Problems with the acks themselves (gaps, overlaps, audio never acknowledged).
    pub ack_problems: Vec<String>,
}

/// Audits a resumed session without stopping at the first problem: every acked object is read
/// back and compared with the audio of its range, and every stored object must be acked.
pub async fn audit_resumed(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    r: &ResumedReport,
    wait: Duration,
) -> anyhow::Result<Audit> {
    let spec = &r.spec;
    let mut audit = Audit::default();
    let mut next = 0u64;
    let deadline = Instant::now() + wait;
    let mut keys = std::collections::BTreeSet::new();
    for ack in &r.report.acks {
        if ack.first_sample != next || ack.end_sample <= ack.first_sample {
            audit.ack_problems.push(format!(
                "ack [{}, {}) does not continue from {next}",
                ack.first_sample, ack.end_sample
            ));
        }
        next = ack.end_sample;
        if !keys.insert(ack.key.clone()) {
            audit.ack_problems.push(format!("{} acked twice", ack.key));
            continue;
        }
        let want = spec.source.bytes(
            ack.first_sample * 2,
            ((ack.end_sample.saturating_sub(ack.first_sample)) * 2) as usize,
        );
        let intact = match get_when_present(s3, bucket, &ack.key, deadline).await {
            Ok(body) => wav_pcm(&body, spec.sample_rate).is_ok_and(|pcm| pcm == want),
            Err(_) => false,
        };
        if !intact {
            audit.lost += 1;
        }
    }
    if next != spec.samples {
        audit.ack_problems.push(format!(
            "acks end at sample {next}, the audio at {}",
            spec.samples
        ));
    }
    let prefix = format!("{}/{}/", spec.uid, spec.session);
    let (aside, stored): (std::collections::BTreeSet<String>, _) = keys_under(s3, bucket, &prefix)
        .await?
        .into_iter()
        .partition(|k| k.contains(".conflict-"));
    audit.acked = keys.len();
    audit.objects = stored.len();
    audit.duplicated = stored.difference(&keys).count();
    audit.set_aside = aside.len();
    Ok(audit)
}

/// [`audit_resumed`] for every session, added up; each ack problem names its uid.
pub async fn audit_all(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    reports: &[ResumedReport],
    wait: Duration,
) -> anyhow::Result<Audit> {
    let mut all = Audit::default();
    for r in reports {
        let a = audit_resumed(s3, bucket, r, wait).await?;
        all.acked += a.acked;
        all.objects += a.objects;
        all.lost += a.lost;
        all.duplicated += a.duplicated;
        all.set_aside += a.set_aside;
        all.ack_problems.extend(
            a.ack_problems
                .into_iter()
                .map(|p| format!("{}: {p}", r.spec.uid)),
        );
    }
    Ok(all)
}

/// The object keys under `prefix`, in order.
pub async fn keys_under(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
) -> anyhow::Result<std::collections::BTreeSet<String>> {
    let listed = s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(prefix)
        .send()
        .await?;
    Ok(listed
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_owned))
        .collect())
}

/// The PCM of a WAV object, which must be mono 16-bit at `sample_rate`.
fn wav_pcm(body: &[u8], sample_rate: u32) -> anyhow::Result<Vec<u8>> {
    let wav = hound::WavReader::new(std::io::Cursor::new(body)).context("not a WAV file")?;
    let ws = wav.spec();
    ensure!(
        (ws.channels, ws.sample_rate, ws.bits_per_sample) == (1, sample_rate, 16),
        "WAV header says {ws:?}"
    );
    Ok(wav
        .into_samples::<i16>()
        .map(|s| s.map(i16::to_le_bytes))
        .collect::<Result<Vec<_>, _>>()?
        .concat())
}

/// Checks a resumed session: its acks cover the audio contiguously from the first sample to the
/// last, each acked object is a WAV holding exactly the audio of its range, and the store holds
/// no object for the session beyond those (no duplicates). Returns the number of objects.
pub async fn verify_resumed(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    r: &ResumedReport,
    wait: Duration,
) -> anyhow::Result<usize> {
    let audit = audit_resumed(s3, bucket, r, wait).await?;
    ensure!(
        audit.ack_problems.is_empty() && audit.lost == 0 && audit.duplicated == 0,
        "{}/{}: {audit:?}",
        r.spec.uid,
        r.spec.session
    );
    Ok(audit.objects)
}
