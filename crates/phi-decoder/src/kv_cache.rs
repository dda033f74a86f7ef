//! Post-RoPE keys and values of every layer, `[capacity, hidden]` each, filled front to back.
//! Allocated once for the whole request (prompt + new tokens) so decoding never reallocates.

use crate::{Error, Phi3Config, Result};

#[derive(Debug, Clone)]
pub struct KvCache {
    pub(crate) k: Vec<Vec<f32>>,
    pub(crate) v: Vec<Vec<f32>>,
    len: usize,
    capacity: usize,
    width: usize,
}

impl KvCache {
    /// Room for `capacity` positions; errors when that exceeds the model's positions.
    pub fn new(cfg: &Phi3Config, capacity: usize) -> Result<Self> {
        if capacity > cfg.max_position_embeddings {
            return Err(Error::ContextOverflow {
                needed: capacity,
                limit: cfg.max_position_embeddings,
                what: "max_position_embeddings",
            });
        }
        let width = cfg.hidden_size;
        let layers = cfg.num_hidden_layers;
        Ok(KvCache {
            k: (0..layers).map(|_| vec![0f32; capacity * width]).collect(),
            v: (0..layers).map(|_| vec![0f32; capacity * width]).collect(),
            len: 0,
            capacity,
            width,
        })
    }

    /// Bytes of keys and values one position holds over all layers (what each decode step
    /// reads per cached position).
    pub fn bytes_per_position(cfg: &Phi3Config) -> usize {
        2 * cfg.num_hidden_layers * cfg.hidden_size * std::mem::size_of::<f32>()
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn width(&self) -> usize {
        self.width
    }

    /// Drops everything (a new conversation) without freeing.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub(crate) fn check_room(&self, t: usize) -> Result<()> {
        if self.len + t > self.capacity {
            return Err(Error::ContextOverflow {
                needed: self.len + t,
                limit: self.capacity,
                what: "KV cache capacity",
            });
        }
        Ok(())
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
