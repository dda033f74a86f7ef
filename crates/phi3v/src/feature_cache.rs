//! Projected image features kept across requests, so that an image sent again (the same pixels
//! and `num_crops`, see [`ProcessedImage::key`](crate::processor::ProcessedImage)) skips CLIP
//! and the projector. Bounded in bytes; the least recently used entry goes first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

type Key = [u8; 32];

struct Entry {
    feats: Arc<Vec<f32>>,
    last_use: u64,
}

struct Inner {
    map: HashMap<Key, Entry>,
    bytes: usize,
    clock: u64,
    hits: u64,
    misses: u64,
}

/// A byte-bounded LRU of `[num_img_tokens, hidden]` f32 features. Shared by reference; the
/// lock is held only for lookups and inserts, never while the model runs.
pub struct FeatureCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

/// Counters for `/health` and the tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FeatureCacheStats {
    pub entries: usize,
    pub bytes: usize,
    pub capacity_bytes: usize,
    pub hits: u64,
    pub misses: u64,
}

impl FeatureCache {
    /// A cache holding at most `capacity` bytes of features (0 disables it).
    pub fn new(capacity: usize) -> Self {
        FeatureCache {
            capacity,
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                bytes: 0,
                clock: 0,
                hits: 0,
                misses: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves the map consistent (every update is
        // a single insert or remove), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, key: &Key) -> Option<Arc<Vec<f32>>> {
        let mut g = self.lock();
        g.clock += 1;
        let now = g.clock;
        match g.map.get_mut(key) {
            Some(e) => {
                e.last_use = now;
                let f = e.feats.clone();
                g.hits += 1;
                Some(f)
            }
            None => {
                g.misses += 1;
                None
            }
        }
    }

    /// Stores `feats` under `key`, evicting the least recently used entries to stay within
    /// the byte bound. An entry larger than the whole bound is not stored.
    pub fn insert(&self, key: Key, feats: Arc<Vec<f32>>) {
        let size = feats.len() * std::mem::size_of::<f32>();
        if size > self.capacity {
            return;
        }
        let mut g = self.lock();
        g.clock += 1;
        let now = g.clock;
        if let Some(old) = g.map.insert(
            key,
            Entry {
                feats,
                last_use: now,
            },
        ) {
            g.bytes -= old.feats.len() * std::mem::size_of::<f32>();
        }
        g.bytes += size;
        while g.bytes > self.capacity {
            let oldest = g
                .map
                .iter()
                .min_by_key(|(_, e)| e.last_use)
                .map(|(k, _)| *k)
                .expect("bytes > 0 means an entry exists");
            let e = g.map.remove(&oldest).expect("key just found");
            g.bytes -= e.feats.len() * std::mem::size_of::<f32>();
        }
    }

    pub fn stats(&self) -> FeatureCacheStats {
        let g = self.lock();
        FeatureCacheStats {
            entries: g.map.len(),
            bytes: g.bytes,
            capacity_bytes: self.capacity,
            hits: g.hits,
            misses: g.misses,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> Key {
        [b; 32]
    }

    #[test]
    fn evicts_least_recently_used_within_the_byte_bound() {
        // Room for two entries of 4 floats (16 bytes each).
        let c = FeatureCache::new(32);
        c.insert(key(1), Arc::new(vec![1.0; 4]));
        c.insert(key(2), Arc::new(vec![2.0; 4]));
        assert!(c.get(&key(1)).is_some()); // 1 is now more recent than 2
        c.insert(key(3), Arc::new(vec![3.0; 4]));
        assert!(c.get(&key(2)).is_none(), "2 was least recently used");
        assert_eq!(c.get(&key(1)).unwrap()[0], 1.0);
        assert_eq!(c.get(&key(3)).unwrap()[0], 3.0);
        let s = c.stats();
        assert_eq!((s.entries, s.bytes), (2, 32));
        assert_eq!((s.hits, s.misses), (3, 1));
    }

    #[test]
    fn oversized_entries_and_zero_capacity_store_nothing() {
        let c = FeatureCache::new(8);
        c.insert(key(1), Arc::new(vec![0.0; 4]));
        assert!(c.get(&key(1)).is_none());
        let c = FeatureCache::new(0);
        c.insert(key(1), Arc::new(vec![0.0; 1]));
        assert_eq!(c.stats().entries, 0);
    }

    #[test]
    fn replacing_a_key_keeps_the_byte_count_right() {
        let c = FeatureCache::new(64);
        c.insert(key(1), Arc::new(vec![0.0; 4]));
        c.insert(key(1), Arc::new(vec![0.0; 8]));
        assert_eq!(c.stats().bytes, 32);
    }
}
