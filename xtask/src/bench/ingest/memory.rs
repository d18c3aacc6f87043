//! Row 5: ingest's memory with every session holding a chunk in progress.

#[allow(clippy::wildcard_imports)]
use super::*;

/// What row 5 measured.
pub(super) struct Memory {
    pub(super) devices: usize,
    pub(super) idle: u64,
    pub(super) peak: u64,
    /// Audio ingest held when the peak was read: every session's chunk in progress.
    pub(super) held: u64,
}

/// Row 5: `devices` sessions at once, each holding one chunk in progress (the chunk but its
/// last 200 ms frame), at the product's chunk length. Devices fill their chunks 32 at a time,
/// so what QUIC buffers in flight stays near what real-time devices leave; once every chunk is
/// held, ingest's peak RSS is read, then every device completes its chunk and must get its ack.
pub(super) async fn memory(
    env: &Env,
    tls: &Tls,
    uploader: SocketAddr,
    chunk_seconds: u32,
    devices: usize,
) -> anyhow::Result<Memory> {
    let (proc, quic, _) = ingest(
        env,
        tls,
        uploader,
        chunk_seconds,
        "ingest-memory",
        UNBOUNDED,
    )
    .await?;
    let pid = proc.id().context("ingest pid")?;
    let (_, idle) = rss(pid)?;
    let chunk_bytes = u64::from(chunk_seconds) * BYTES_PER_SECOND;
    let last = 6_400u64;
    let hold = chunk_bytes - last;
    let frame = Bytes::from(crate::bench::store::base_pcm().slice(..64 * 1024).to_vec());
    let filling = Arc::new(tokio::sync::Semaphore::new(32));
    let held = Arc::new(tokio::sync::Barrier::new(devices + 1));
    let release = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    for d in 0..devices {
        let (cert, frame, filling, held, release) = (
            tls.der.clone(),
            frame.clone(),
            Arc::clone(&filling),
            Arc::clone(&held),
            release.clone(),
        );
        tasks.spawn(async move {
            let permit = filling.acquire_owned().await?;
            let filled = async {
                let device = Device::connect(quic, "localhost", &cert).await?;
                let (mut tx, rx) = device.open().await?;
                tx.hello(hello(&format!("mem-{d:05}"))?).await?;
                send(&mut tx, &frame, hold).await?;
                anyhow::Ok((device, tx, rx))
            }
            .await;
            drop(permit);
            // Every task reaches the barrier, failed or not, so the count always completes.
            held.wait().await;
            let (device, mut tx, rx) = filled?;
            release.cancelled().await;
            tx.audio(frame.slice(..last as usize)).await?;
            tx.finish()?;
            let acks = rx
                .collect()
                .await?
                .into_iter()
                .filter(|m| matches!(m.kind, Some(Kind::Ack(_))))
                .count();
            device.close().await;
            anyhow::ensure!(acks == 1, "device {d}: {acks} acks for its one chunk");
            anyhow::Ok(())
        });
    }
    held.wait().await;
    // Let ingest take in what QUIC still held, then read its high-water mark.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (peak, _) = rss(pid)?;
    release.cancel();
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    proc.stop().await?;
    Ok(Memory {
        devices,
        idle,
        peak,
        held: devices as u64 * hold,
    })
}
