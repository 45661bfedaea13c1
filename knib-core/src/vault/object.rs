//! One object of a vault read by ranged GETs, as a [`ReadAt`] source of
//! knib's qcow2 reader: blocks of [`BLOCK`] bytes in a bounded LRU cache,
//! read-ahead that grows while reads are sequential, and (when asked) the
//! xxh3-128 of the object taken from the bytes fetched.
//!
//! # The hash from the bytes fetched
//!
//! The object's hash runs over a prefix `0..pos` of it. A fetched range
//! that reaches past `pos` while starting at or before it extends the
//! prefix; one that starts a little ahead (at most [`GAP_FILL`]: an L2
//! table between two runs of data, clusters an upper layer overrides) has
//! the gap fetched and hashed first; one far ahead (the L1 table at the
//! end of the file, read when the image is opened) is not hashed then.
//! [`RemoteObject::finish_hash`] fetches what is left. A restore of a
//! knib-written file, which is laid out in guest order, fetches it about
//! once.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path as Key;
use object_store::ObjectStore;
use parking_lot::Mutex;
use xxhash_rust::xxh3::Xxh3;

use super::Inner;
use crate::error::{KnibError, Result};
use crate::qcow2::ReadAt;

/// Bytes per cache block.
pub const BLOCK: u64 = 256 << 10;
/// The most blocks one read-ahead fetches (4 MiB).
const MAX_AHEAD: u64 = 16;
/// A range at most this far past the hashed prefix has the gap fetched
/// for the hash.
const GAP_FILL: u64 = 8 << 20;
/// Ranges fetched for the hash alone, at most this long each.
const HASH_CHUNK: u64 = 8 << 20;

/// An object of a vault, read by ranged GETs.
pub struct RemoteObject {
    vault: Arc<Inner>,
    key: Key,
    len: u64,
    state: Mutex<State>,
}

struct State {
    /// (block number, bytes, last use).
    blocks: Vec<(u64, Bytes, u64)>,
    capacity: usize,
    clock: u64,
    /// The block after the last read (reads from there are sequential).
    next: u64,
    /// The current read-ahead, in blocks.
    ahead: u64,
    hash: Option<(u64, Xxh3)>,
}

impl std::fmt::Debug for RemoteObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteObject").field("key", &self.key.as_ref()).field("len", &self.len).finish()
    }
}

impl RemoteObject {
    /// The object at `key`, `len` bytes long, with a cache of about
    /// `cache_bytes` (at least four blocks); with `hash`, its hash is taken
    /// as it is read.
    pub(super) fn new(vault: Arc<Inner>, key: Key, len: u64, cache_bytes: u64, hash: bool) -> RemoteObject {
        let capacity = (cache_bytes / BLOCK).max(4) as usize;
        RemoteObject {
            vault,
            key,
            len,
            state: Mutex::new(State {
                blocks: Vec::new(),
                capacity,
                clock: 0,
                next: u64::MAX,
                ahead: 1,
                hash: hash.then(|| (0, Xxh3::new())),
            }),
        }
    }

    /// `s3://bucket/key`, for messages.
    pub fn name(&self) -> String {
        self.vault.show(&self.key)
    }

    /// GET bytes `start..end` (inside the object), counted.
    fn fetch(&self, start: u64, end: u64) -> Result<Bytes> {
        let s3 = Arc::clone(&self.vault.s3);
        let key = self.key.clone();
        let r = self.vault.rt.block_on(async move { s3.get_range(&key, start..end).await });
        self.vault.gets.fetch_add(1, Ordering::Relaxed);
        let b = r.map_err(|e| self.vault.error(&format!("cannot read {}", self.name()), &e))?;
        self.vault.fetched.fetch_add(b.len() as u64, Ordering::Relaxed);
        if b.len() as u64 != end - start {
            return Err(KnibError::corrupt(format!(
                "{}: asked for bytes {start}..{end}, got {} bytes: the object changed or is shorter than its manifest says",
                self.name(),
                b.len()
            )));
        }
        Ok(b)
    }

    /// Feed the fetched range at `start` to the hash (see the module docs).
    fn feed(&self, st: &mut State, start: u64, data: &[u8]) -> Result<()> {
        let Some((pos, _)) = st.hash.as_ref() else { return Ok(()) };
        let pos = *pos;
        let end = start + data.len() as u64;
        if start > pos && start - pos <= GAP_FILL {
            let gap = self.fetch(pos, start)?;
            if let Some((p, h)) = st.hash.as_mut() {
                h.update(&gap);
                *p = start;
            }
        }
        if let Some((p, h)) = st.hash.as_mut() {
            if start <= *p && end > *p {
                h.update(&data[(*p - start) as usize..]);
                *p = end;
            }
        }
        Ok(())
    }

    /// Fetch what is left of the object for its hash and return it (32
    /// lower-case hex digits); `None` when it is not hashed.
    pub fn finish_hash(&self) -> Result<Option<String>> {
        let mut st = self.state.lock();
        let Some((mut pos, _)) = st.hash.as_ref().map(|(p, _)| (*p, ())) else { return Ok(None) };
        while pos < self.len {
            let end = (pos + HASH_CHUNK).min(self.len);
            let b = self.fetch(pos, end)?;
            if let Some((p, h)) = st.hash.as_mut() {
                h.update(&b);
                *p = end;
            }
            pos = end;
        }
        Ok(st.hash.as_ref().map(|(_, h)| format!("{:032x}", h.digest128())))
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let end = (offset.saturating_add(buf.len() as u64)).min(self.len);
        if offset >= end {
            buf.fill(0);
            return Ok(0);
        }
        let n = (end - offset) as usize;
        buf[n..].fill(0);
        let mut st = self.state.lock();
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        // A read larger than half the cache goes straight through.
        if last - first + 1 > st.capacity as u64 / 2 {
            let b = self.fetch(offset, end)?;
            self.feed(&mut st, offset, &b)?;
            buf[..n].copy_from_slice(&b);
            st.next = last + 1;
            return Ok(n);
        }
        let sequential = first == st.next || first + 1 == st.next;
        st.ahead = if sequential { (st.ahead * 2).min(MAX_AHEAD).min(st.capacity as u64 / 2) } else { 1 };
        let mut block = first;
        while block <= last {
            st.clock += 1;
            let clock = st.clock;
            let hit = st.blocks.iter_mut().find(|b| b.0 == block).map(|b| {
                b.2 = clock;
                b.1.clone()
            });
            let data = match hit {
                Some(d) => d,
                None => {
                    // Fetch the missing run from here, and read-ahead past
                    // the end of the read while reads are sequential.
                    let mut to = block + 1;
                    while to <= last && !st.blocks.iter().any(|b| b.0 == to) {
                        to += 1;
                    }
                    if to > last && sequential {
                        to = (last + st.ahead).max(to);
                    }
                    let end_byte = (to * BLOCK).min(self.len);
                    let start_byte = block * BLOCK;
                    let got = self.fetch(start_byte, end_byte)?;
                    self.feed(&mut st, start_byte, &got)?;
                    let mut first_data = None;
                    let mut b = block;
                    while b * BLOCK < end_byte {
                        let s = ((b - block) * BLOCK) as usize;
                        let e = (s + BLOCK as usize).min(got.len());
                        let piece = got.slice(s..e);
                        if b == block {
                            first_data = Some(piece.clone());
                        }
                        insert(&mut st, b, piece);
                        b += 1;
                    }
                    first_data.unwrap_or_default()
                }
            };
            let bstart = block * BLOCK;
            let from = offset.max(bstart);
            let to = end.min(bstart + data.len() as u64);
            if to > from {
                let dst = (from - offset) as usize..(to - offset) as usize;
                buf[dst].copy_from_slice(&data[(from - bstart) as usize..(to - bstart) as usize]);
            }
            block += 1;
        }
        st.next = last + 1;
        Ok(n)
    }
}

/// Put `data` in the cache as block `b`, evicting the least recently used.
fn insert(st: &mut State, b: u64, data: Bytes) {
    st.clock += 1;
    let clock = st.clock;
    if let Some(slot) = st.blocks.iter_mut().find(|s| s.0 == b) {
        *slot = (b, data, clock);
    } else if st.blocks.len() < st.capacity {
        st.blocks.push((b, data, clock));
    } else if let Some(lru) = st.blocks.iter_mut().min_by_key(|s| s.2) {
        *lru = (b, data, clock);
    }
}

impl ReadAt for RemoteObject {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        self.read(offset, buf).map_err(|e| std::io::Error::other(e.message))
    }

    fn len(&self) -> u64 {
        self.len
    }
}
