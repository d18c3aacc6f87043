//! Validation rules shared by ingest and uploader. Identifiers become object-key path segments,
//! so the rules are strict: nothing that could climb a directory, hide a separator or confuse a
//! log line gets through.

/// Longest uid or session, in characters.
pub const MAX_ID_LEN: usize = 128;
/// Lowest accepted sample rate, in Hz.
pub const MIN_SAMPLE_RATE: u32 = 8_000;
/// Highest accepted sample rate, in Hz.
pub const MAX_SAMPLE_RATE: u32 = 48_000;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("is empty")]
    Empty,
    #[error("is {0} bytes long; at most {MAX_ID_LEN} are allowed")]
    TooLong(usize),
    #[error("contains {0:?}; only [A-Za-z0-9._-] are allowed")]
    BadChar(char),
    #[error("is {0:?}, which is reserved")]
    Reserved(&'static str),
}

/// Checks a uid or session identifier: 1–128 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn id(value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty);
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(IdError::BadChar(c));
    }
    if value.len() > MAX_ID_LEN {
        return Err(IdError::TooLong(value.len()));
    }
    match value {
        "." => Err(IdError::Reserved(".")),
        ".." => Err(IdError::Reserved("..")),
        _ => Ok(()),
    }
}

/// Checks a sample rate against [`MIN_SAMPLE_RATE`]..=[`MAX_SAMPLE_RATE`].
pub fn sample_rate(rate: u32) -> Result<(), SampleRateError> {
    if (MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&rate) {
        Ok(())
    } else {
        Err(SampleRateError(rate))
    }
}

/// A sample rate outside the supported range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sample rate {0} Hz is outside {MIN_SAMPLE_RATE}..={MAX_SAMPLE_RATE} Hz")]
pub struct SampleRateError(pub u32);

/// Latest first-sample time an Omi-layout chunk may carry: 2^32 Unix seconds (year 2106).
pub const MAX_START_TIME: f64 = 4_294_967_296.0;

/// An Omi-layout chunk's first-sample time, in the whole milliseconds its key prints: the time
/// formatted with three decimals, as Omi's pusher names its objects (`{t:.3f}`, rounded to
/// nearest, ties to even, on the exact binary value), read back as an integer. `None` for a
/// time that is not finite or outside `0..MAX_START_TIME`.
pub fn key_millis(start_time: f64) -> Option<u64> {
    if !(0.0..MAX_START_TIME).contains(&start_time) {
        return None;
    }
    let printed = format!("{start_time:.3}");
    let (secs, millis) = printed.split_once('.')?;
    let secs: u64 = secs.parse().ok()?;
    let millis: u64 = millis.parse().ok()?;
    secs.checked_mul(1000)?.checked_add(millis)
}

/// Checks an Omi-layout chunk's id against its first-sample time: `seq` must be
/// [`key_millis`] of it, so the chunk's id and its key name the same instant.
pub fn omi_start(seq: u64, start_time: f64) -> Result<(), StartTimeError> {
    match key_millis(start_time) {
        Some(ms) if ms == seq => Ok(()),
        Some(ms) => Err(StartTimeError::NotSeq { ms, seq }),
        None => Err(StartTimeError::Range(start_time)),
    }
}

/// An Omi-layout chunk's first-sample time that does not fit its id.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StartTimeError {
    #[error("start_time {0} is not a Unix time in 0..2^32 seconds")]
    Range(f64),
    #[error("start_time is {ms} ms but the chunk's seq is {seq}; they must be equal")]
    NotSeq { ms: u64, seq: u64 },
}

/// Largest chunk in bytes for a chunk length, at the highest sample rate; message-size limits
/// are derived from this rather than hard-coded.
pub fn max_chunk_bytes(chunk_seconds: u32) -> usize {
    chunk_seconds as usize * MAX_SAMPLE_RATE as usize * crate::BYTES_PER_SAMPLE
}

/// True when `samples` samples starting at session sample `first_sample` lie inside chunk
/// `seq` of `chunk_samples` samples, `[seq·N, (seq+1)·N)`, without overflow.
pub fn inside_chunk(seq: u64, chunk_samples: u64, first_sample: u64, samples: u64) -> bool {
    let start = seq.checked_mul(chunk_samples);
    let end = start.and_then(|s| s.checked_add(chunk_samples));
    match (start, end) {
        (Some(start), Some(end)) => {
            first_sample >= start && first_sample.checked_add(samples).is_some_and(|e| e <= end)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_millis_are_the_three_decimals_omi_prints() {
        assert_eq!(key_millis(1_786_961_845.727), Some(1_786_961_845_727));
        assert_eq!(key_millis(1_786_961_845.727_4), Some(1_786_961_845_727));
        assert_eq!(key_millis(1_786_961_845.727_6), Some(1_786_961_845_728));
        assert_eq!(key_millis(0.0), Some(0));
        assert_eq!(key_millis(-0.001), None);
        assert_eq!(key_millis(f64::NAN), None);
        assert_eq!(key_millis(f64::INFINITY), None);
        assert_eq!(key_millis(MAX_START_TIME), None);
        assert_eq!(omi_start(1_786_961_845_727, 1_786_961_845.727), Ok(()));
        assert!(omi_start(1_786_961_845_728, 1_786_961_845.727).is_err());
    }

    #[test]
    fn accepts_ordinary_ids() {
        for ok in ["a", "user-1", "A.b_c-9", "...", ".hidden", &"x".repeat(128)] {
            assert_eq!(id(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_ids_that_could_escape_a_key_segment() {
        assert_eq!(id(""), Err(IdError::Empty));
        assert_eq!(id("."), Err(IdError::Reserved(".")));
        assert_eq!(id(".."), Err(IdError::Reserved("..")));
        assert_eq!(id("../x"), Err(IdError::BadChar('/')));
        assert_eq!(id("a/b"), Err(IdError::BadChar('/')));
        assert_eq!(id("a\\b"), Err(IdError::BadChar('\\')));
        assert_eq!(id("a\nb"), Err(IdError::BadChar('\n')));
        assert_eq!(id("a\u{0}b"), Err(IdError::BadChar('\u{0}')));
        assert_eq!(id("é"), Err(IdError::BadChar('é')));
        assert_eq!(id(&"x".repeat(129)), Err(IdError::TooLong(129)));
    }

    #[test]
    fn sample_rate_bounds_are_inclusive() {
        assert!(sample_rate(8_000).is_ok());
        assert!(sample_rate(48_000).is_ok());
        assert_eq!(sample_rate(7_999), Err(SampleRateError(7_999)));
        assert_eq!(sample_rate(48_001), Err(SampleRateError(48_001)));
    }

    #[test]
    fn largest_chunk_is_derived_from_chunk_length() {
        assert_eq!(max_chunk_bytes(60), 5_760_000);
        assert_eq!(max_chunk_bytes(1), 96_000);
    }
}
