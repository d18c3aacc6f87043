//! Who gets in before anything is spent on them: connection slots (overall and per source
//! address) and session slots per uid. Each slot is a guard that gives itself back when dropped,
//! so a connection or session that ends any way at all frees its slot.
//!
//! Plain counting, no I/O and no clock: the front ends ask, and refuse what does not fit.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;

/// Counts held per key, each at most `per_key`, and all together at most `total`. Clones share
/// the counts.
#[derive(Debug, Clone)]
pub struct Slots<K: Hash + Eq + Clone> {
    inner: Arc<Mutex<Counts<K>>>,
    total: usize,
    per_key: usize,
}

#[derive(Debug)]
struct Counts<K> {
    by_key: HashMap<K, usize>,
    total: usize,
}

/// Why a slot was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// Every slot is taken.
    Total,
    /// This key holds its share.
    PerKey,
}

impl Full {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Full::Total => "total",
            Full::PerKey => "per_key",
        }
    }
}

/// A slot held; given back on drop.
#[derive(Debug)]
pub struct Slot<K: Hash + Eq + Clone> {
    inner: Arc<Mutex<Counts<K>>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Slots<K> {
    pub fn new(total: usize, per_key: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Counts {
                by_key: HashMap::new(),
                total: 0,
            })),
            total,
            per_key,
        }
    }

    /// Takes a slot for `key` if one is free.
    pub fn try_take(&self, key: &K) -> Result<Slot<K>, Full> {
        let mut c = self.inner.lock();
        if c.total >= self.total {
            return Err(Full::Total);
        }
        let n = c.by_key.entry(key.clone()).or_insert(0);
        if *n >= self.per_key {
            return Err(Full::PerKey);
        }
        *n += 1;
        c.total += 1;
        Ok(Slot {
            inner: Arc::clone(&self.inner),
            key: key.clone(),
        })
    }

    /// The most slots held at once.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Slots held now.
    pub fn held(&self) -> usize {
        self.inner.lock().total
    }

    /// Keys holding at least one slot (bounded by `total`).
    pub fn keys(&self) -> usize {
        self.inner.lock().by_key.len()
    }
}

impl<K: Hash + Eq + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut c = self.inner.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_key.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                c.by_key.remove(&self.key);
            }
        }
    }
}

/// Connection slots by source address.
pub type Connections = Slots<IpAddr>;
/// Session slots by uid.
pub type Uids = Slots<String>;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_per_key_and_in_total_and_come_back_on_drop() {
        let slots: Slots<&str> = Slots::new(3, 2);
        let a1 = slots.try_take(&"a").unwrap();
        let a2 = slots.try_take(&"a").unwrap();
        assert_eq!(slots.try_take(&"a").unwrap_err(), Full::PerKey);
        let b1 = slots.try_take(&"b").unwrap();
        assert_eq!(slots.try_take(&"c").unwrap_err(), Full::Total);
        assert_eq!((slots.held(), slots.keys()), (3, 2));
        drop(a1);
        let c1 = slots.try_take(&"c").unwrap();
        drop((a2, b1, c1));
        assert_eq!((slots.held(), slots.keys()), (0, 0), "nothing left behind");
    }
}
