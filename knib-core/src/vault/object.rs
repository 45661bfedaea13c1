//! One object of a vault read by ranged GETs, as a [`ReadAt`] source of
//! knib's qcow2 reader: blocks of [`BLOCK`] bytes in a bounded LRU cache
//! ([`BlockCache`], one budget shared by every object of a chain),
//! read-ahead that grows while reads are sequential (at most
//! [`MAX_AHEAD`] blocks, and half the cache), and (when asked) the
//! xxh3-128 of the object taken from the bytes fetched.
//!
//! # Memory
//!
//! What a reader holds is bounded by its cache's budget, not by the
//! chain's depth or the object's size: the cached blocks (a block is a
//! slice of the range it was fetched with, so one fetch stays whole until
//! its last block is evicted: at most one read-ahead more than the
//! budget), plus the one range being fetched (a read larger than half the
//! cache goes straight through, as large as the read) and the hash's
//! chunks ([`HASH_CHUNK`]).
//!
//! # The hash from the bytes fetched
//!
//! The object's hash runs over a prefix `0..pos` of it. A fetched range
//! that reaches past `pos` while starting at or before it extends the
//! prefix; one that starts a little ahead (at most [`GAP_FILL`]: an L2
//! table between two runs of data, clusters an upper layer overrides) has
//! the gap fetched and hashed first; one far ahead (the L1 table at the
//! end of the file, read when the image is opened; the L2 table after the
//! data it maps) is not hashed then, since the reads that follow usually
//! come back to the prefix. When they do not (an upper layer overrides a
//! long run of this one, and the reads go on past it), every byte read
//! beyond the prefix would have to be fetched again by
//! [`RemoteObject::finish_hash`]; so once the reads beyond the prefix add
//! up to the gap they first left, the gap (and them) is fetched and hashed,
//! and the reads after it extend the prefix again: the rent-or-buy rule,
//! which fetches such a run at most three times where the best choice in
//! hindsight fetches it once, and not the rest of the object twice.
//! [`RemoteObject::finish_hash`] fetches what is left. A restore of a
//! knib-written file, which is laid out in guest order, fetches it about
//! once.
//!
//! # One version of the object
//!
//! An object opened with its ETag (from the HEAD that checked its length)
//! is read only in that version: every ranged GET says `If-Match` with it,
//! and an object replaced meanwhile is a `corrupt` error. So the bytes the
//! reader uses (the L1 table read when the image is opened, blocks fetched
//! again after the cache dropped them) and the bytes the hash covers come
//! from the same version, and a hash that matches vouches for all of them.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path as Key;
use object_store::ObjectStore;
use parking_lot::Mutex;
use xxhash_rust::xxh3::Xxh3;

use super::Inner;
use crate::error::{KnibError, Result};
use crate::progress::{Control, EveryPercent};
use crate::qcow2::ReadAt;

/// Bytes per cache block.
pub const BLOCK: u64 = 256 << 10;
/// The most blocks one read-ahead fetches (1 MiB).
pub const MAX_AHEAD: u64 = 4;
/// A range at most this far past the hashed prefix has the gap fetched
/// for the hash.
const GAP_FILL: u64 = 8 << 20;
/// Ranges fetched for the hash alone, at most this long each.
pub const HASH_CHUNK: u64 = 1 << 20;

/// A bounded LRU cache of blocks, shared by the objects of a chain: one
/// budget, whatever the chain's depth (the `lru` crate's map, keyed by
/// object and block number).
pub struct BlockCache {
    state: Mutex<CacheState>,
}

struct CacheState {
    /// (object, block number) -> bytes, least recently used first out.
    blocks: lru::LruCache<(u64, u64), Bytes>,
    /// The number of the next object to use this cache.
    objects: u64,
}

impl std::fmt::Debug for BlockCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCache").field("capacity", &self.capacity()).finish()
    }
}

impl BlockCache {
    /// A cache of about `bytes` (at least four blocks).
    pub fn new(bytes: u64) -> Arc<BlockCache> {
        let capacity = std::num::NonZeroUsize::new((bytes / BLOCK).max(4) as usize).expect("at least four blocks");
        Arc::new(BlockCache { state: Mutex::new(CacheState { blocks: lru::LruCache::new(capacity), objects: 0 }) })
    }

    fn capacity(&self) -> u64 {
        self.state.lock().blocks.cap().get() as u64
    }

    fn register(&self) -> u64 {
        let mut st = self.state.lock();
        st.objects += 1;
        st.objects
    }

    /// Block `b` of object `obj`, if cached (marked as used).
    fn get(&self, obj: u64, b: u64) -> Option<Bytes> {
        self.state.lock().blocks.get(&(obj, b)).cloned()
    }

    fn contains(&self, obj: u64, b: u64) -> bool {
        self.state.lock().blocks.contains(&(obj, b))
    }

    /// Put `data` in the cache as block `b` of `obj`, evicting the least
    /// recently used.
    fn insert(&self, obj: u64, b: u64, data: Bytes) {
        self.state.lock().blocks.put((obj, b), data);
    }
}

/// An object of a vault, read by ranged GETs.
pub struct RemoteObject {
    vault: Arc<Inner>,
    key: Key,
    len: u64,
    /// The ETag of the version read (every GET is conditional on it).
    etag: Option<String>,
    cache: Arc<BlockCache>,
    /// Its number in the cache.
    id: u64,
    state: Mutex<State>,
}

struct State {
    /// The block after the last read (reads from there are sequential).
    next: u64,
    /// The current read-ahead, in blocks.
    ahead: u64,
    hash: Option<(u64, Xxh3)>,
    /// Since the hashed prefix last grew: where the first read beyond it
    /// started, and the bytes fetched beyond it (see the module docs).
    beyond: Option<(u64, u64)>,
}

impl std::fmt::Debug for RemoteObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteObject").field("key", &self.key.as_ref()).field("len", &self.len).finish()
    }
}

impl RemoteObject {
    /// The object at `key`, `len` bytes long, its blocks kept in `cache`
    /// (which other objects may share); with `hash`, its hash is taken as
    /// it is read.
    pub(super) fn new(
        vault: Arc<Inner>,
        key: Key,
        len: u64,
        etag: Option<String>,
        cache: Arc<BlockCache>,
        hash: bool,
    ) -> RemoteObject {
        let id = cache.register();
        RemoteObject {
            vault,
            key,
            len,
            etag,
            cache,
            id,
            state: Mutex::new(State { next: u64::MAX, ahead: 1, hash: hash.then(|| (0, Xxh3::new())), beyond: None }),
        }
    }

    /// `s3://bucket/key`, for messages.
    pub fn name(&self) -> String {
        self.vault.show(&self.key)
    }

    /// GET bytes `start..end` (inside the object), counted; of the
    /// version opened, when its ETag is known.
    pub(super) fn fetch(&self, start: u64, end: u64) -> Result<Bytes> {
        let s3 = Arc::clone(&self.vault.s3);
        let key = self.key.clone();
        let opts = object_store::GetOptions {
            range: Some(object_store::GetRange::Bounded(start..end)),
            if_match: self.etag.clone(),
            ..Default::default()
        };
        let want = end - start;
        let r = self.vault.rt.block_on(async move { super::body_capped(s3.get_opts(&key, opts).await?, want).await });
        self.vault.gets.fetch_add(1, Ordering::Relaxed);
        let b = r.map_err(|e| match e {
            object_store::Error::Precondition { .. } => KnibError::corrupt(format!(
                "{} changed while it was read (it is no longer the version {} that was opened): the vault is being written by someone else",
                self.name(),
                self.etag.as_deref().unwrap_or("?")
            )),
            e => self.vault.error(&format!("cannot read {}", self.name()), &e),
        })?;
        let b = b.map_err(|got| {
            KnibError::corrupt(format!(
                "{}: asked for bytes {start}..{end}, got {got} bytes or more: the server sent more than it was asked for",
                self.name()
            ))
        })?;
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
        if start > pos {
            let (first, fetched) = st.beyond.get_or_insert((start, 0));
            if start - pos > GAP_FILL && *fetched < *first - pos {
                *fetched += data.len() as u64;
                return Ok(());
            }
            // In chunks: the gap may be larger than the cache.
            let mut at = pos;
            while at < start {
                let to = (at + HASH_CHUNK).min(start);
                let gap = self.fetch(at, to)?;
                if let Some((p, h)) = st.hash.as_mut() {
                    h.update(&gap);
                    *p = to;
                }
                at = to;
            }
        }
        if let Some((p, h)) = st.hash.as_mut() {
            if start <= *p && end > *p {
                h.update(&data[(*p - start) as usize..]);
                *p = end;
                st.beyond = None;
            }
        }
        Ok(())
    }

    /// The object at `key`, `len` bytes long, to be read whole for its
    /// hash ([`RemoteObject::hash_whole`], [`RemoteObject::finish_hash`]):
    /// hashed, with the smallest cache (its blocks are not used).
    pub(super) fn whole(vault: Arc<Inner>, key: Key, len: u64) -> RemoteObject {
        RemoteObject::new(vault, key, len, None, BlockCache::new(0), true)
    }

    /// The hash of the whole object (32 lower-case hex digits), read from
    /// its start by ranged GETs of [`HASH_CHUNK`] (an object made by
    /// [`RemoteObject::whole`] and not read), `ctl` checked between them
    /// and told the progress of "checking s3://..." every whole percent.
    pub(super) fn hash_whole(&self, ctl: &Control) -> Result<String> {
        let step = format!("checking {}", self.name());
        self.hash_rest(ctl, &step, Some(&mut EveryPercent::new(ctl, &step)))?
            .ok_or_else(|| KnibError::internal(format!("{} is not hashed", self.name())))
    }

    /// Fetch what is left of the object for its hash and return it (32
    /// lower-case hex digits); `None` when it is not hashed. `ctl` is
    /// checked between the fetches.
    pub fn finish_hash(&self, ctl: &Control) -> Result<Option<String>> {
        self.hash_rest(ctl, &format!("hash of {}", self.name()), None)
    }

    /// Fetch the object from the end of its hashed prefix to its end, by
    /// [`HASH_CHUNK`], into the hash; `ctl` checked (for `step`) before
    /// each fetch, and told the progress when asked.
    fn hash_rest(
        &self,
        ctl: &Control,
        step: &str,
        mut progress: Option<&mut EveryPercent<'_>>,
    ) -> Result<Option<String>> {
        let mut st = self.state.lock();
        let Some(mut pos) = st.hash.as_ref().map(|(p, _)| *p) else { return Ok(None) };
        if let Some(p) = progress.as_deref_mut() {
            p.at(pos, self.len);
        }
        while pos < self.len {
            ctl.check(step)?;
            let end = (pos + HASH_CHUNK).min(self.len);
            let b = self.fetch(pos, end)?;
            if let Some((p, h)) = st.hash.as_mut() {
                h.update(&b);
                *p = end;
            }
            pos = end;
            if let Some(p) = progress.as_deref_mut() {
                p.at(pos, self.len);
            }
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
        let capacity = self.cache.capacity();
        // A read larger than half the cache goes straight through.
        if last - first + 1 > capacity / 2 {
            let b = self.fetch(offset, end)?;
            self.feed(&mut st, offset, &b)?;
            buf[..n].copy_from_slice(&b);
            st.next = last + 1;
            return Ok(n);
        }
        let sequential = first == st.next || first + 1 == st.next;
        st.ahead = if sequential { (st.ahead * 2).min(MAX_AHEAD).min(capacity / 2) } else { 1 };
        let mut block = first;
        while block <= last {
            let hit = self.cache.get(self.id, block);
            let data = match hit {
                Some(d) => d,
                None => {
                    // Fetch the missing run from here, and read-ahead past
                    // the end of the read while reads are sequential.
                    let mut to = block + 1;
                    while to <= last && !self.cache.contains(self.id, to) {
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
                        self.cache.insert(self.id, b, piece);
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

impl ReadAt for RemoteObject {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        // The error itself, so that the reader keeps its kind.
        self.read(offset, buf).map_err(std::io::Error::other)
    }

    fn len(&self) -> u64 {
        self.len
    }
}
