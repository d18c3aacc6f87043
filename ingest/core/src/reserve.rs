//! How a session reserves memory for the chunk it fills: a small first step before the chunk's
//! first byte, then the rest of the chunk once the device has sent that much. Pure arithmetic;
//! ingest's budget (a semaphore) does the reserving.

/// The first reservation of every chunk, in bytes: 0.5 s of 16 kHz audio. Small, so a session
/// that never sends more holds little; one step, so growing to a whole chunk copies little.
pub const FIRST_STEP: usize = 16 * 1024;

/// How many more bytes a session must reserve before it feeds more audio into a chunk of `room`
/// bytes of which `pending` are filled and `held` reserved: `None` while the reservation still has
/// space. Pure, so the step plan is tested without a budget.
pub fn next_reservation(room: usize, held: usize, pending: usize) -> Option<usize> {
    match held {
        _ if pending < held => None,
        0 => Some(FIRST_STEP.min(room)),
        _ if held < room => Some(room - held),
        _ => None,
    }
}

/// The least `--max-buffered-bytes` that can never deadlock: every session holding a first step
/// while one largest chunk (`chunk_seconds` at the highest sample rate) still fits.
pub fn min_budget(max_sessions: usize, chunk_seconds: u32) -> usize {
    max_sessions
        .saturating_mul(FIRST_STEP)
        .saturating_add(spillway_proto::validate::max_chunk_bytes(chunk_seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_is_reserved_in_a_first_step_and_then_the_rest() {
        let chunk = 1_920_000;
        assert_eq!(next_reservation(chunk, 0, 0), Some(FIRST_STEP));
        assert_eq!(next_reservation(chunk, FIRST_STEP, 10), None, "room left");
        assert_eq!(
            next_reservation(chunk, FIRST_STEP, FIRST_STEP),
            Some(chunk - FIRST_STEP),
            "the first step is full: the rest of the chunk"
        );
        assert_eq!(next_reservation(chunk, chunk, chunk - 2), None);
        assert_eq!(
            next_reservation(1_000, 0, 0),
            Some(1_000),
            "a chunk (or resumed piece) smaller than a step is reserved whole"
        );
        assert_eq!(min_budget(256, 60), 256 * FIRST_STEP + 5_760_000);
    }
}
