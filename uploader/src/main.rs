use std::io::{Read, Write};
use std::path::Path;

use anyhow::Context;
use clap::Parser;
use spillway_uploader::seal::Sealer;
use spillway_uploader::{Args, Command, Flags, OmiDecrypt};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            spillway_ops::termination_signal().await;
            shutdown.cancel();
        }
    });
    match args.command {
        Some(Command::Drain(flags)) => drain(flags, shutdown).await,
        Some(Command::OmiDecrypt(args)) => omi_decrypt(&args),
        Some(Command::Status(args)) => spillway_uploader::status::run(&args).await,
        None => serve(args.flags, shutdown).await,
    }
}

async fn serve(flags: Flags, shutdown: CancellationToken) -> anyhow::Result<()> {
    spillway_ops::init_tracing(flags.log_format);
    let (listen, http_listen) = (flags.listen, flags.http_listen);
    let config = flags.into_config()?;
    let grpc = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding gRPC on {listen}"))?;
    let http = tokio::net::TcpListener::bind(http_listen)
        .await
        .with_context(|| format!("binding HTTP on {http_listen}"))?;
    spillway_uploader::run(
        config,
        spillway_uploader::Listeners { grpc, http },
        shutdown,
    )
    .await
}

/// `uploader drain`: exits 0 once the spool is empty, 2 when chunks are left.
async fn drain(flags: Flags, interrupt: CancellationToken) -> anyhow::Result<()> {
    spillway_ops::init_tracing(flags.log_format);
    let config = flags.into_drain_config()?;
    let dir = config.spool_dir.clone();
    let report =
        spillway_uploader::drain_spool(config, std::time::Duration::from_secs(5), interrupt)
            .await?;
    if report.left > 0 {
        eprintln!(
            "uploader drain: {} chunks ({} bytes) are still spooled in {}; run it again",
            report.left,
            report.left_bytes,
            dir.display()
        );
        std::process::exit(2);
    }
    Ok(())
}

/// `uploader omi-decrypt`: the whole object is opened before anything is written, so a wrong
/// secret or uid, or a damaged object, leaves no output at all.
fn omi_decrypt(args: &OmiDecrypt) -> anyhow::Result<()> {
    let sealer = Sealer::from_file(&args.secret_file)?;
    let stored = if args.input == Path::new("-") {
        let mut stored = Vec::new();
        std::io::stdin()
            .read_to_end(&mut stored)
            .context("reading standard input")?;
        stored
    } else {
        std::fs::read(&args.input).with_context(|| format!("reading {}", args.input.display()))?
    };
    let pcm = sealer
        .open(&args.uid, &stored)
        .with_context(|| format!("decrypting {} for uid {:?}", args.input.display(), args.uid))?;
    let audio = if args.wav {
        anyhow::ensure!(
            pcm.len() % 2 == 0,
            "{} decrypts to {} bytes, not whole 16-bit samples: not PCM16 (use raw output)",
            args.input.display(),
            pcm.len()
        );
        spillway_uploader::object::wav(&pcm, args.sample_rate).context("making the WAV")?
    } else {
        pcm
    };
    if args.output == Path::new("-") {
        let mut out = std::io::stdout().lock();
        out.write_all(&audio)
            .and_then(|()| out.flush())
            .context("writing standard output")
    } else {
        write_whole(&args.output, &audio)
    }
}

/// Writes `bytes` to a file beside `path` and renames it there: `path` is the whole output or
/// absent (or as it was), never part of it.
fn write_whole(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let mut partial = name.to_owned();
    partial.push(format!(".partial-{}", std::process::id()));
    let partial = path.with_file_name(partial);
    let written = std::fs::write(&partial, bytes)
        .and_then(|()| std::fs::rename(&partial, path))
        .with_context(|| format!("writing {}", path.display()));
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}
