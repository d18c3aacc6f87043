//! The transport-independent core of ingest: what a front end (QUIC today; the Omi WebSocket
//! next) drives, with no sockets, no async runtime and no clock of its own. Every function takes
//! bytes, messages and the time, and returns outputs or refusals, so each rule is tested
//! deterministically.
//!
//! - [`session`]: one audio session's rules: the hello (identity, sample rate, resume point),
//!   then audio into the chunker, with precise refusals.
//! - [`chunker`]: exact, session-aligned chunks from any split of the byte stream.
//! - [`reserve`]: how a session's chunk memory is reserved in steps.
//! - [`fill`]: the chunk fill deadline (a minimum data rate).
//! - [`auth`]: device credentials (signed tokens, client certificate names).
//! - [`outbox`]: the device side's resume logic and receipt checks.
//! - [`balance`]: which uploader each session prefers, and cool-downs.
//! - [`omi`]: the WebSocket protocol of Omi's pusher (query, frames, timeline and cutting), for a
//!   front end Omi's `listen` service can point at unchanged.
//!
//! The boundary is the compiler's: this crate does not depend on tokio, quinn or any network
//! crate, so none of them can be named here.

pub mod auth;
pub mod balance;
pub mod chunker;
pub mod fill;
pub mod omi;
pub mod outbox;
pub mod reserve;
pub mod session;
