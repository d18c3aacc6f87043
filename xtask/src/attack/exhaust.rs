//! The attacks that try to exhaust a resource over time rather than break a check: sessions that
//! trickle to hold memory and slots, Omi connections that never become WebSockets, and a spool
//! disk filled by someone else.

use std::path::Path;
use std::time::{Duration, Instant};

use spillway_ingest::auth::Scope;
use spillway_proto::device::{ErrorCode, server_message::Kind};

use super::{ATTACKER, attacker_device, hello, metric_of};
use spillway_kit::cluster::{Cluster, Daemon};

/// Ingest's `--chunk-fill-timeout` in the attack cluster (its default: twice the 2 s chunk).
pub(super) const FILL_TIMEOUT: Duration = Duration::from_secs(4);

/// `sessions` sessions under one gateway token (every uid `trickle-*`), each sending one sample
/// every 500 ms, 0.6 % of real time: (attempts, sessions still open past the fill timeout, what).
pub(super) async fn trickle(c: &Cluster, sessions: usize) -> anyhow::Result<(u64, u64, String)> {
    let token = c.token_for(&Scope::Prefix("trickle-".into()))?;
    let mut devices = Vec::new();
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for i in 0..sessions {
        // Sixteen streams per connection, well within a connection's stream limit.
        if i % 16 == 0 {
            devices.push(attacker_device(c).await?);
        }
        let Some(device) = devices.last() else {
            anyhow::bail!("no connection");
        };
        let (mut tx, mut rx) = device.open().await?;
        tx.hello(hello(&format!("trickle-{i}"), "drip", token.clone()))
            .await?;
        match rx.next().await?.and_then(|m| m.kind) {
            Some(Kind::Accepted(_)) => {
                writers.push(tx);
                readers.push(rx);
            }
            other => anyhow::bail!("trickling session {i} not accepted: {other:?}"),
        }
    }
    let started = Instant::now();
    let drip = tokio::spawn(async move {
        while started.elapsed() < FILL_TIMEOUT + Duration::from_secs(4) {
            for tx in &mut writers {
                let _ = tx.audio(bytes::Bytes::from_static(&[1, 0])).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    // While they trickle, what they hold of ingest's budget (the honest devices' chunks too).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = metric_of(c.ingests[0].http, "spillway_ingest_buffered_bytes").await;
    let mut outlived = 0;
    for rx in readers {
        let ended = tokio::time::timeout(FILL_TIMEOUT + Duration::from_secs(2), async {
            let mut rx = rx;
            loop {
                match rx.next().await {
                    Ok(Some(m)) => {
                        if let Some(Kind::Error(e)) = m.kind {
                            break e.code == ErrorCode::TooSlow as i32;
                        }
                    }
                    _ => break false,
                }
            }
        })
        .await;
        outlived += u64::from(!matches!(ended, Ok(true)));
    }
    let _ = drip.await;
    drop(devices);
    Ok((
        sessions as u64,
        outlived,
        format!(
            "sessions open past the {}-s fill timeout; all of ingest's budget in use 1 s in: {} KiB, {} KiB per trickler at most",
            FILL_TIMEOUT.as_secs(),
            held as u64 >> 10,
            (held as u64 >> 10) / sessions.max(1) as u64
        ),
    ))
}

/// Size of the filesystem the full-disk row gives the spool.
pub(super) const DISK_BYTES: u64 = 160 << 20;

/// Mounts a tmpfs of [`DISK_BYTES`] where uploader 0's spool will be, so the row can fill a disk
/// without touching the machine's. Needs root (CAP_SYS_ADMIN).
pub(super) fn mount_spool_disk(spool: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(spool)?;
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={DISK_BYTES}"), "tmpfs"])
        .arg(spool)
        .status()?;
    anyhow::ensure!(status.success(), "mount -t tmpfs failed ({status})");
    Ok(())
}

pub(super) fn unmount(spool: &Path) {
    let _ = std::process::Command::new("umount")
        .arg(spool)
        .stderr(std::process::Stdio::null())
        .status();
}

/// Fills the spool's disk to the last byte (another tenant's file, or a runaway log) while the
/// honest devices stream, holds it full for `hold`, then frees it: (attempts, daemons down or
/// readiness that lied, what).
pub(super) async fn full_disk(c: &Cluster, hold: Duration) -> anyhow::Result<(u64, u64, String)> {
    let filler = c.spool_dir(0).join("filler.bin");
    let filled = tokio::task::spawn_blocking({
        let filler = filler.clone();
        move || fill(&filler)
    })
    .await??;
    let http = c.uploaders[0].http;
    let until = Instant::now() + hold;
    // The uploader looks at its disk every 200 ms; give /readyz one look before asking it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ready_while_full = 0u64;
    while Instant::now() < until {
        if let Ok((200, _)) = spillway_kit::pipeline::http_get(http, "/readyz").await {
            ready_while_full += 1;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let refused = metric_of(
        http,
        "spillway_uploader_put_rejections_total{reason=\"disk_full\"}",
    )
    .await;
    std::fs::remove_file(&filler)?;
    let down = [Daemon::Uploader(0), Daemon::Ingest(0)]
        .into_iter()
        .filter(|d| {
            c.pid(*d)
                .is_none_or(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        })
        .count() as u64;
    Ok((
        1,
        down + u64::from(ready_while_full > 0),
        format!(
            "daemons down, or /readyz 200 from 0.3 s after the disk filled; it filled with {} MiB for {} s: {refused} puts refused as disk_full, then drained",
            filled >> 20,
            hold.as_secs()
        ),
    ))
}

/// Writes `path` until the disk refuses a byte more; returns the bytes written.
fn fill(path: &Path) -> anyhow::Result<u64> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let block = vec![0x7e_u8; 1 << 20];
    let mut written = 0u64;
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
            Err(e) => return Err(e.into()),
        }
    }
    // The last partial block may fit byte by byte.
    let page = [0x7e_u8; 4096];
    while let Ok(n @ 1..) = f.write(&page) {
        written += n as u64;
    }
    Ok(written)
}

/// Ingest's `--hello-timeout` in the attack cluster.
pub(super) const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// `n` TCP connections to the Omi WebSocket listener from the attacker's address, every second
/// one trickling a request's headers a byte every 250 ms, none ever upgraded: (attempts,
/// connections still open a second past the hello timeout, what).
pub(super) async fn omi_no_upgrade(c: &Cluster, n: u64) -> anyhow::Result<(u64, u64, String)> {
    let addr = c.ingests[0].omi;
    let mut held = tokio::task::JoinSet::new();
    for i in 0..n {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(std::net::SocketAddr::from((ATTACKER, 0)))?;
        let conn = socket.connect(addr).await?;
        held.spawn(open_after(
            conn,
            i % 2 == 1,
            HELLO_TIMEOUT + Duration::from_secs(1),
        ));
    }
    let mut open = 0;
    while let Some(still) = held.join_next().await {
        open += u64::from(still?);
    }
    let closed = metric_of(
        c.ingests[0].http,
        "spillway_ingest_omi_closes_total{code=\"upgrade_timeout\"}",
    )
    .await;
    Ok((
        n,
        open,
        format!("connections open past the 2-s hello timeout; {closed} closed as upgrade_timeout"),
    ))
}

/// Holds `conn` (trickling a request's headers when `trickle`) until `after`: whether the
/// server had not closed it by then.
async fn open_after(mut conn: tokio::net::TcpStream, trickle: bool, after: Duration) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let started = Instant::now();
    let mut request = b"GET /v1/trigger/listen?uid=honest-0&sample_rate=8000 HTTP/1.1\r\nX-Slow: "
        .iter()
        .copied()
        .chain(std::iter::repeat(b'a'));
    let mut buf = [0u8; 256];
    while started.elapsed() < after {
        if trickle {
            let byte = [request.next().unwrap_or(b'a')];
            if conn.write_all(&byte).await.is_err() {
                return false;
            }
        }
        // A read that returns nothing or fails: the server closed it. None within 250 ms: open.
        let read = tokio::time::timeout(Duration::from_millis(250), conn.read(&mut buf)).await;
        if let Ok(Ok(0) | Err(_)) = read {
            return false;
        }
    }
    true
}
