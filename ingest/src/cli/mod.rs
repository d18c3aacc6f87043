//! The `ingest` binary's tools besides the daemon: `ingest token ...` and `ingest status` for
//! operators, `ingest stream` for device-gateway engineers.

pub mod status;
pub mod stream;
pub mod token;

/// Subcommands of the `ingest` binary.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Device tokens and their keys.
    #[command(subcommand)]
    Token(token::Token),
    /// Stream a WAV file (or raw PCM from stdin) to an ingest as a device does: resuming
    /// across reconnects, keeping audio until its receipt matches, with a device token.
    Stream(stream::StreamArgs),
    /// A running ingest's state at a glance, read from its /metrics (two scrapes --interval
    /// apart, for rates) and /readyz: readiness, sessions, the memory budget, acks and their
    /// latency, the uploaders it sees, refusals by code. --json for scripts.
    Status(status::StatusArgs),
}

impl Command {
    /// Runs the tool; its output goes to stdout, progress to stderr.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Token(t) => t.run(),
            Command::Stream(s) => stream::run(s).await,
            Command::Status(s) => status::run(&s).await,
        }
    }
}
