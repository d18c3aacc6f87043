//! The model test's steps, their generators, and what the model says a put must answer.

use proptest::prelude::*;

use super::super::fault_fs::{Fault, Op};
use super::super::*;
use super::Case;
use crate::disk::{RESERVE_BYTES, Room};

/// What a step does to the spool.
#[derive(Debug, Clone, Copy)]
pub(super) enum Action {
    /// A put of chunk `seq`: `samples` samples of audio pattern `variant`. Two puts of one
    /// pattern are pieces of each other; of two patterns, other audio.
    Put { seq: u8, variant: u8, samples: u8 },
    /// The drain uploads the `nth` spooled chunk (modulo how many) and removes it.
    Remove { nth: u8 },
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Step {
    Act(Action),
    /// `op` fails with `fault` during the action (if the action reaches it).
    Faulty(Action, Op, Fault),
    /// Drop the spool and open it again.
    Restart,
    /// The process dies after `after` more filesystem operations of the action; then a
    /// restart. With `lose_tail`, sled loses what it had not flushed, too.
    Crash {
        action: Action,
        after: u8,
        lose_tail: bool,
    },
    /// Flip byte `at` (modulo its length) of the `nth` chunk's audio in its file, restart.
    Damage {
        nth: u8,
        at: u16,
    },
    /// The disk has 60 bytes left above the reserve (or its real room again).
    NearlyFull(bool),
}

pub(super) fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (0u8..6, prop_oneof![3 => Just(0u8), 1 => Just(1u8)], 1u8..=60)
            .prop_map(|(seq, variant, samples)| Action::Put { seq, variant, samples }),
        1 => any::<u8>().prop_map(|nth| Action::Remove { nth }),
    ]
}

pub(super) fn fault() -> impl Strategy<Value = (Op, Fault)> {
    let op = prop::sample::select(vec![
        Op::Room,
        Op::Create,
        Op::Write,
        Op::SyncData,
        Op::Read,
        Op::HardLink,
        Op::RemoveFile,
        Op::SyncDir,
    ]);
    let fault = prop_oneof![
        Just(Fault::Eio),
        Just(Fault::Enospc),
        (1usize..8).prop_map(Fault::Short),
        Just(Fault::Zero),
        Just(Fault::Interrupted),
    ];
    (op, fault)
}

pub(super) fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        10 => action().prop_map(Step::Act),
        3 => (action(), fault()).prop_map(|(a, (op, f))| Step::Faulty(a, op, f)),
        1 => Just(Step::Restart),
        2 => (action(), 0u8..12, any::<bool>())
            .prop_map(|(action, after, lose_tail)| Step::Crash { action, after, lose_tail }),
        1 => (any::<u8>(), any::<u16>()).prop_map(|(nth, at)| Step::Damage { nth, at }),
        1 => prop_oneof![1 => Just(true), 2 => Just(false)].prop_map(Step::NearlyFull),
    ]
}

/// The spool's bounds: bytes, records, and drop-oldest or not.
pub(super) fn limits() -> impl Strategy<Value = (u64, u64, bool)> {
    (200u64..2000, 2u64..8, any::<bool>())
}

/// The audio of a put.
pub(super) fn pcm(seq: u8, variant: u8, samples: u8) -> Vec<u8> {
    (0..usize::from(samples) * 2)
        .map(|i| (usize::from(seq) * 7 + usize::from(variant) * 101 + i * 31) as u8)
        .collect()
}

pub(super) fn size(seq: u64, pcm: &[u8]) -> u64 {
    record(seq, pcm).encode_to_vec().len() as u64
}

/// What a put must answer, by the model.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Expect {
    Ok(Committed, Vec<u64>),
    Full,
    TooMany,
    DiskFull,
    Conflict,
}

/// The refusal `e` is, or `None` for a failure (I/O, sled, task).
pub(super) fn kind(e: &SpoolError) -> Option<Expect> {
    match e {
        SpoolError::Full { .. } => Some(Expect::Full),
        SpoolError::TooManyChunks { .. } => Some(Expect::TooMany),
        SpoolError::DiskFull { .. } => Some(Expect::DiskFull),
        SpoolError::Conflict { .. } => Some(Expect::Conflict),
        _ => None,
    }
}

impl Case {
    /// What a put must answer: the spool's own decision procedure, over the model's contents.
    pub(super) fn predict(&self, seq: u64, pcm: &[u8], need: u64) -> Expect {
        let crc = crc32c::crc32c;
        let old = self.m.spooled.iter().find(|(_, s, _)| *s == seq);
        if old.is_some_and(|(_, _, o)| crc(o) == crc(pcm)) {
            return Expect::Ok(Committed::Duplicate, Vec::new());
        }
        if self.m.nearly_full && !self.nearly_full_room().fits(need) {
            return Expect::DiskFull;
        }
        let mut order: Vec<(u64, u64)> = self
            .m
            .spooled
            .iter()
            .map(|(_, s, p)| (*s, size(*s, p)))
            .collect();
        let (max, max_chunks) = (self.limits.max_bytes, self.limits.max_chunks);
        let reject = self.limits.when_full == WhenFull::Reject;
        let used = |order: &[(u64, u64)]| order.iter().map(|(_, n)| n).sum::<u64>();
        if reject && old.is_none() {
            if used(&order) + need > max {
                return Expect::Full;
            }
            if order.len() as u64 >= max_chunks {
                return Expect::TooMany;
            }
        }
        let supersedes = match old {
            None => false,
            Some((_, _, o)) if pcm.starts_with(o) => true,
            Some((_, _, o)) if o.starts_with(pcm) => {
                return Expect::Ok(Committed::Duplicate, Vec::new());
            }
            Some(_) => return Expect::Conflict,
        };
        let mut evicted = Vec::new();
        loop {
            let credit = match order.iter().find(|(s, _)| supersedes && *s == seq) {
                Some((_, n)) => *n,
                None => 0,
            };
            let replaces = u64::from(credit > 0);
            let room_for_one = (order.len() as u64).saturating_sub(replaces) < max_chunks;
            if used(&order) - credit + need <= max && room_for_one {
                break;
            }
            if reject || need > max || order.is_empty() {
                return if room_for_one {
                    Expect::Full
                } else {
                    Expect::TooMany
                };
            }
            evicted.push(order.remove(0).0);
        }
        let outcome = if supersedes {
            Committed::Extended
        } else {
            Committed::Stored
        };
        Expect::Ok(outcome, evicted)
    }

    pub(super) fn nearly_full_room(&self) -> Room {
        Room {
            free_bytes: RESERVE_BYTES + 60,
            free_inodes: None,
        }
    }
}
