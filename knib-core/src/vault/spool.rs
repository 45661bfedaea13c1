//! The parts of a backup written straight to the vault ([`super::VaultSink`],
//! module `direct`), held on disk and sent with streamed bodies.
//!
//! Each part is written to a spool file: an anonymous temporary file
//! (`tempfile::tempfile_in`: `O_TMPFILE`, or made and unlinked at once) in
//! a directory of the local disk that the backup owns, so that nothing of
//! it is left when the process ends, killed or not. A part is sent by one
//! PUT whose body is read back from its file in chunks of [`CHUNK`] bytes
//! (a blocking read of the runtime's blocking pool), at most [`WINDOW`]
//! chunks of a part in memory at once: read, queued in the HTTP client, or
//! being written to its connection (each chunk holds a permit of its
//! part's window until the client drops it). A PUT that fails on the way
//! (no answer, a 5xx, 408 or 429) is sent again, its body read again from
//! the file's start, as the vault's S3 client retries its own requests
//! (`config::retry`: the same number of retries, backoff and time limit).
//!
//! # The bytes sent are the bytes written
//!
//! A spool file is not trusted between its write and its upload: the disk
//! under it may damage it, or anything else change it. Each block of
//! [`CHUNK`] bytes of it is hashed (xxh3-128) as it is written, from the
//! bytes handed to the write, and each chunk of a body is read as one
//! such block and checked against its hash before it is given to the HTTP
//! client: a block that changed is never sent, the body ends short (the
//! server keeps nothing of a request whose body is shorter than its
//! `Content-Length`), and the PUT fails, not sent again, as
//! [`PutError::Changed`] (a `corrupt` error of the backup). A patch (the
//! header of a compressed image, written last) reads the whole part back
//! first, each block checked the same way, rewrites the blocks it changes
//! with their new hashes, and takes the hash of the whole part afresh from
//! the bytes checked: the part's hash ([`Spool::hash`]) is that of the
//! bytes knib made, in their final order, whatever the file holds. The
//! hashes cost 16 bytes per block (64 bytes per MiB of part) and a
//! second xxh3 pass over every byte.
//!
//! The request is the one object_store's `put_part` makes, and is made by
//! object_store wherever it can be: the object's URL is its
//! `Signer::signed_url` with the query dropped (its endpoint, bucket,
//! path-style and key encoding), plus `partNumber=<idx + 1>` and
//! `uploadId` as `put_part` adds them; the headers are signed by its
//! `AwsAuthorizer` with the credentials of its provider, with an unsigned
//! payload (`UNSIGNED-PAYLOAD`: a streamed body is not hashed before it is
//! sent, and knib has no SHA-256 of its own; knib checks the body against
//! its hashes as written instead, above); the part's id is the answer's
//! `ETag` header, taken as `put_part` takes it, so that
//! `complete_multipart` and `abort_multipart` go through object_store's
//! `MultipartStore` unchanged. What is knib's is the sending: a `reqwest`
//! client (the crate and TLS object_store uses, with the vault's timeouts:
//! 5 s to connect, then no total timeout but a stall timeout, module
//! `net`) and a body streamed from the file, handed to the client in
//! slices whose taking is the PUT's progress.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::aws::{AmazonS3, AwsAuthorizer};
use object_store::client::{HttpRequest, HttpRequestBody};
use object_store::multipart::PartId;
use object_store::path::Path as Key;
use object_store::signer::Signer;
use object_store::RetryConfig;
use reqwest::header::{CONTENT_LENGTH, ETAG};
use reqwest::{Method, StatusCode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use xxhash_rust::xxh3::{xxh3_128, Xxh3};

use crate::error::{KnibError, Result};

/// Bytes of a spool file read at a time for a part's body.
pub(super) const CHUNK: usize = 256 << 10;
/// Chunks of one part's body in memory at once.
pub(super) const WINDOW: usize = 2;
/// The write buffer of the part being filled (small appends are gathered
/// into one write of the spool file).
pub(super) const WRITE_BUF: usize = 256 << 10;

/// Bytes of parts in memory (the write buffer, the chunks of the bodies
/// being sent), now and at their peak.
#[derive(Debug, Default)]
pub(super) struct Gauge {
    now: AtomicUsize,
    peak: AtomicUsize,
}

impl Gauge {
    pub(super) fn add(&self, n: usize) {
        let now = self.now.fetch_add(n, Ordering::Relaxed) + n;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    pub(super) fn sub(&self, n: usize) {
        self.now.fetch_sub(n, Ordering::Relaxed);
    }

    pub(super) fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }
}

/// One part's bytes, in an anonymous file of the spool directory (gone
/// when it is dropped, or when the process ends), with the hash of each
/// block of [`CHUNK`] bytes written (see the module docs).
pub(super) struct Spool {
    file: File,
    len: u64,
    /// The xxh3-128 of each whole block written, in order.
    sums: Vec<u128>,
    /// The hash of the block being written (after the last whole one).
    block: Xxh3,
    /// The hash of all the bytes written, when asked for (or patched).
    whole: Option<Xxh3>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("len", &self.len).finish_non_exhaustive()
    }
}

/// Bytes of a spool file that do not hash as they did when written.
#[derive(Debug, Clone)]
pub(super) struct Changed {
    start: u64,
    end: u64,
    got: u128,
    want: u128,
}

impl std::fmt::Display for Changed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "bytes {}..{} of its spool file hash {:032x}, not {:032x} as they were written: the file changed since it was written (damaged on the local disk?)",
            self.start, self.end, self.got, self.want
        )
    }
}

/// Why a patch of a spool file failed.
#[derive(Debug)]
pub(super) enum PatchError {
    /// The file could not be read or written.
    Io(std::io::Error),
    /// Its bytes changed since they were written: nothing more is written.
    Changed(Changed),
}

impl Spool {
    /// An empty spool file in `dir`; with `whole`, the hash of all its
    /// bytes is taken as they are written ([`Spool::hash`]).
    pub(super) fn new(dir: &Path, whole: bool) -> Result<Spool> {
        let file = tempfile::tempfile_in(dir).map_err(|e| KnibError::io("cannot make a spool file in", dir, e))?;
        Ok(Spool { file, len: 0, sums: Vec::new(), block: Xxh3::new(), whole: whole.then(Xxh3::new) })
    }

    /// Bytes written.
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// The xxh3-128 of the part's bytes as knib wrote them (patches
    /// included), when it was asked for or the part was patched.
    pub(super) fn hash(&self) -> Option<u128> {
        self.whole.as_ref().map(Xxh3::digest128)
    }

    /// The hashes of its blocks as written, the last one short.
    fn block_sums(&self) -> Vec<u128> {
        let mut sums = self.sums.clone();
        if !self.len.is_multiple_of(CHUNK as u64) {
            sums.push(self.block.digest128());
        }
        sums
    }

    /// Append `bytes`: written, then hashed.
    pub(super) fn append(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(bytes, self.len)?;
        if let Some(w) = self.whole.as_mut() {
            w.update(bytes);
        }
        while !bytes.is_empty() {
            let room = CHUNK - (self.len % CHUNK as u64) as usize;
            let k = room.min(bytes.len());
            self.block.update(&bytes[..k]);
            self.len += k as u64;
            bytes = &bytes[k..];
            if self.len.is_multiple_of(CHUNK as u64) {
                self.sums.push(self.block.digest128());
                self.block.reset();
            }
        }
        Ok(())
    }

    /// Overwrite bytes already written with `bytes`, from `offset` on:
    /// every block is read back into `buf` ([`CHUNK`] bytes) and checked
    /// against its hash first, the blocks changed are hashed again, and
    /// the hash of the whole part is taken afresh from the bytes checked
    /// (see the module docs).
    pub(super) fn patch(&mut self, offset: u64, bytes: &[u8], buf: &mut [u8]) -> std::result::Result<(), PatchError> {
        let end = offset + bytes.len() as u64;
        debug_assert!(end <= self.len && buf.len() == CHUNK);
        let mut whole = Xxh3::new();
        let mut start = 0u64;
        let mut k = 0;
        while start < self.len {
            let stop = (start + CHUNK as u64).min(self.len);
            let block = &mut buf[..(stop - start) as usize];
            self.file.read_exact_at(block, start).map_err(PatchError::Io)?;
            let want = if k < self.sums.len() { self.sums[k] } else { self.block.digest128() };
            let got = xxh3_128(block);
            if got != want {
                return Err(PatchError::Changed(Changed { start, end: stop, got, want }));
            }
            let (from, to) = (offset.max(start), end.min(stop));
            if from < to {
                let src = &bytes[(from - offset) as usize..(to - offset) as usize];
                block[(from - start) as usize..(to - start) as usize].copy_from_slice(src);
                self.file.write_all_at(src, from).map_err(PatchError::Io)?;
                if k < self.sums.len() {
                    self.sums[k] = xxh3_128(block);
                } else {
                    self.block.reset();
                    self.block.update(block);
                }
            }
            whole.update(block);
            start = stop;
            k += 1;
        }
        self.whole = Some(whole);
        Ok(())
    }
}

/// The HTTP client of the parts: as the S3 client's (HTTP/1.1 only, 5 s
/// to connect), with no total timeout: a part's PUT is watched for stalls
/// instead (module `net`).
pub(super) fn client() -> reqwest::Result<reqwest::Client> {
    super::net::client(None, false)
}

/// Where a direct backup's parts go and how: the object, the S3 client
/// that names and signs, the HTTP client that sends.
pub(super) struct Sender {
    pub(super) s3: Arc<AmazonS3>,
    pub(super) http: reqwest::Client,
    /// The region requests are signed for (the S3 client's).
    pub(super) region: String,
    pub(super) retry: RetryConfig,
    /// How long a PUT may go without a byte moving (module `net`).
    pub(super) stall: Duration,
    pub(super) key: Key,
    /// Counts the chunks of the bodies in memory.
    pub(super) gauge: Arc<Gauge>,
    /// The credentials, blanked out of what is logged (a server may echo
    /// the request's headers in its answer).
    pub(super) secrets: Vec<String>,
}

/// Why one PUT failed, and whether it is worth sending again.
struct Failed {
    message: String,
    retry: bool,
    /// The spool file changed: the PUT is not sent again.
    changed: Option<Changed>,
}

/// Why a part (or an object of one PUT) was not sent.
#[derive(Debug)]
pub(super) enum PutError {
    /// The request failed (after the retries).
    Store(object_store::Error),
    /// Its spool file changed since it was written: `what` (the part),
    /// and how; what was read of it was not sent whole.
    Changed { what: String, changed: Changed },
}

impl std::fmt::Display for PutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PutError::Store(e) => write!(f, "{e}"),
            PutError::Changed { what, changed } => write!(f, "{what}: {changed}; not sent"),
        }
    }
}

impl Sender {
    /// Send `spool` (`None`: no bytes) as part `idx` of multipart upload
    /// `id` (`part`), or as the whole object (`part` is `None`): the part's
    /// id, as object_store's `put_part` makes it (the whole object's is
    /// its ETag too, or empty). Retried as the vault's S3 client retries;
    /// every block of the body is checked against its hash as written
    /// before it is sent ([`PutError::Changed`], not retried).
    pub(super) async fn put(
        self: Arc<Self>,
        spool: Option<Spool>,
        part: Option<(usize, String)>,
    ) -> std::result::Result<PartId, PutError> {
        let (file, len, sums) = match spool {
            Some(s) => {
                let sums = Arc::new(s.block_sums());
                (Some(Arc::new(s.file)), s.len, sums)
            }
            None => (None, 0, Arc::new(Vec::new())),
        };
        let what = match &part {
            Some((idx, _)) => format!("part {idx} ({len} bytes)"),
            None => format!("the object ({len} bytes, one PUT)"),
        };
        let start = Instant::now();
        let mut wait = self.retry.backoff.init_backoff;
        let mut retries = 0;
        loop {
            match self.put_once(file.clone(), len, &sums, part.as_ref()).await {
                Ok(content_id) => return Ok(PartId { content_id }),
                Err(Failed { changed: Some(changed), .. }) => return Err(PutError::Changed { what, changed }),
                Err(f)
                    if f.retry
                        && retries < self.retry.max_retries
                        && start.elapsed() + wait <= self.retry.retry_timeout =>
                {
                    retries += 1;
                    log::info!(
                        "{}: {what}: {} (sent again in {wait:?}, retry {retries} of {})",
                        self.key,
                        super::redact(&self.secrets, &f.message),
                        self.retry.max_retries
                    );
                    tokio::time::sleep(wait).await;
                    wait = wait.mul_f64(self.retry.backoff.base).min(self.retry.backoff.max_backoff);
                }
                Err(f) => {
                    let after = if retries > 0 { format!(" (after {retries} retries)") } else { String::new() };
                    return Err(PutError::Store(object_store::Error::Generic {
                        store: "S3",
                        source: format!("{what}: {}{after}", f.message).into(),
                    }));
                }
            }
        }
    }

    /// One PUT of the file's `len` bytes, each block checked against
    /// `sums`: the answer's ETag.
    async fn put_once(
        &self,
        file: Option<Arc<File>>,
        len: u64,
        sums: &Arc<Vec<u128>>,
        part: Option<&(usize, String)>,
    ) -> std::result::Result<String, Failed> {
        let fatal = |e: &dyn std::error::Error| Failed { message: super::error_chain(e), retry: false, changed: None };
        let credential = self.s3.credentials().get_credential().await.map_err(|e| fatal(&e))?;
        let mut url =
            self.s3.signed_url(Method::PUT, &self.key, Duration::from_secs(3600)).await.map_err(|e| fatal(&e))?;
        url.set_query(None);
        if let Some((idx, id)) = part {
            url.query_pairs_mut().append_pair("partNumber", &(idx + 1).to_string()).append_pair("uploadId", id);
        }
        // A request without its body, only for its signed headers.
        let mut signed = HttpRequest::new(HttpRequestBody::empty());
        *signed.method_mut() = Method::PUT;
        *signed.uri_mut() = url.as_str().parse().map_err(|e| fatal(&e))?;
        AwsAuthorizer::new(&credential, "s3", &self.region).with_sign_payload(false).authorize(&mut signed, None);
        let changed = Arc::new(OnceLock::new());
        let progress = super::net::Progress::new();
        let body = match file {
            Some(f) if len > 0 => reqwest::Body::wrap_stream(super::net::sliced(
                chunks(f, len, Arc::clone(sums), Arc::clone(&changed), Arc::clone(&self.gauge)),
                Arc::clone(&progress),
            )),
            _ => reqwest::Body::from(Bytes::new()),
        };
        let request = self.http.put(url).headers(signed.headers().clone()).header(CONTENT_LENGTH, len).body(body);
        // No total timeout: the PUT fails when no byte of it moved for the
        // stall timeout (module `net`), and is sent again as any failure on
        // the way.
        let stalled = |s: super::net::Stalled| Failed { message: s.to_string(), retry: true, changed: None };
        let sent =
            super::net::watch(request.send(), &progress, self.stall, "sending the part").await.map_err(stalled)?;
        progress.mark();
        // A block that changed ends the body short: whatever the answer,
        // the part is not taken as sent.
        if let Some(c) = changed.get() {
            return Err(Failed { message: c.to_string(), retry: false, changed: Some(c.clone()) });
        }
        let answer = sent.map_err(|e| Failed { message: super::error_chain(&e), retry: true, changed: None })?;
        let status = answer.status();
        if status.is_success() {
            let no = |message: String| Failed { message, retry: false, changed: None };
            return match answer.headers().get(ETAG).map(|v| v.to_str()) {
                Some(Ok(etag)) => Ok(etag.to_string()),
                None if part.is_none() => Ok(String::new()),
                None => Err(no("the answer has no ETag header".into())),
                Some(Err(e)) => Err(no(format!("the answer's ETag header is not text: {e}"))),
            };
        }
        let retry = status.is_server_error()
            || status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS;
        let said = super::net::watch(first_bytes(answer, 512), &progress, self.stall, "reading the answer")
            .await
            .unwrap_or_else(|s| format!("(its body stalled: {s})"));
        Err(Failed { message: format!("HTTP status {status}: {said}"), retry, changed: None })
    }
}

/// The first `max` bytes of an answer's body, as one line of text.
async fn first_bytes(mut answer: reqwest::Response, max: usize) -> String {
    let mut got = Vec::new();
    while got.len() < max {
        match answer.chunk().await {
            Ok(Some(c)) => got.extend_from_slice(&c[..c.len().min(max - got.len())]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&got).replace(['\r', '\n'], " ");
    if text.trim().is_empty() {
        "(no body)".to_string()
    } else {
        text.trim().to_string()
    }
}

/// One chunk of a body: counted by the gauge, and holding a permit of its
/// part's window, until the HTTP client drops it.
struct Chunk {
    buf: Vec<u8>,
    gauge: Arc<Gauge>,
    _permit: OwnedSemaphorePermit,
}

impl Chunk {
    fn new(n: usize, gauge: Arc<Gauge>, permit: OwnedSemaphorePermit) -> Chunk {
        gauge.add(n);
        Chunk { buf: vec![0; n], gauge, _permit: permit }
    }
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.gauge.sub(self.buf.len());
    }
}

/// The `len` bytes of `file` from its start, in chunks of [`CHUNK`] (its
/// blocks), each checked against its hash in `sums` (a block that changed
/// is noted in `changed` and ends the stream with an error), at most
/// [`WINDOW`] of them alive at once.
fn chunks(
    file: Arc<File>,
    len: u64,
    sums: Arc<Vec<u128>>,
    changed: Arc<OnceLock<Changed>>,
    gauge: Arc<Gauge>,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    let window = Arc::new(Semaphore::new(WINDOW));
    futures::stream::try_unfold(0u64, move |off| {
        read_chunk(
            Arc::clone(&file),
            off,
            len,
            Arc::clone(&sums),
            Arc::clone(&changed),
            Arc::clone(&gauge),
            Arc::clone(&window),
        )
    })
}

/// The chunk of `file` at `off` (none at `len`), once the window has room
/// for it and it hashes as written, and the offset of the next.
async fn read_chunk(
    file: Arc<File>,
    off: u64,
    len: u64,
    sums: Arc<Vec<u128>>,
    changed: Arc<OnceLock<Changed>>,
    gauge: Arc<Gauge>,
    window: Arc<Semaphore>,
) -> std::io::Result<Option<(Bytes, u64)>> {
    if off >= len {
        return Ok(None);
    }
    let permit = window.acquire_owned().await.map_err(std::io::Error::other)?;
    let mut chunk = Chunk::new((len - off).min(CHUNK as u64) as usize, gauge, permit);
    let want = sums.get((off / CHUNK as u64) as usize).copied();
    let (chunk, got) = tokio::task::spawn_blocking(move || {
        file.read_exact_at(&mut chunk.buf, off).map(|()| {
            let got = xxh3_128(&chunk.buf);
            (chunk, got)
        })
    })
    .await
    .map_err(std::io::Error::other)??;
    let next = off + chunk.buf.len() as u64;
    if want != Some(got) {
        let c = Changed { start: off, end: next, got, want: want.unwrap_or_default() };
        let e = std::io::Error::new(std::io::ErrorKind::InvalidData, c.to_string());
        let _ = changed.set(c);
        return Err(e);
    }
    Ok(Some((Bytes::from_owner(chunk), next)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    /// A request as a fake S3 server got it.
    struct Got {
        line: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Got {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
        }
    }

    /// A server on loopback that answers each request, one connection
    /// each, with the next of `answers`; the requests it got.
    fn serve(answers: Vec<&'static str>) -> (u16, std::thread::JoinHandle<Vec<Got>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let mut got = Vec::new();
            for answer in answers {
                let (s, _) = l.accept().unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let mut headers = Vec::new();
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    let h = h.trim_end();
                    if h.is_empty() {
                        break;
                    }
                    let (k, v) = h.split_once(':').unwrap();
                    headers.push((k.trim().to_lowercase(), v.trim().to_string()));
                }
                let n: usize = headers.iter().find(|(k, _)| k == "content-length").unwrap().1.parse().unwrap();
                let mut body = vec![0; n];
                r.read_exact(&mut body).unwrap();
                (&s).write_all(answer.as_bytes()).unwrap();
                got.push(Got { line: line.trim_end().to_string(), headers, body });
            }
            got
        });
        (port, t)
    }

    fn sender(port: u16, gauge: &Arc<Gauge>) -> Arc<Sender> {
        let s3 = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name("bucket")
            .with_region("eu-west-3")
            .with_endpoint(format!("http://127.0.0.1:{port}"))
            .with_allow_http(true)
            .with_access_key_id("AKIDTEST")
            .with_secret_access_key("SECRETTEST")
            .build()
            .unwrap();
        let mut retry = crate::vault::config::retry();
        retry.backoff.init_backoff = Duration::from_millis(10);
        Arc::new(Sender {
            s3: Arc::new(s3),
            http: client().unwrap(),
            region: "eu-west-3".into(),
            retry,
            stall: Duration::from_secs(30),
            key: Key::from("vms/vm1/b1/root disk.qcow2"),
            gauge: Arc::clone(gauge),
            secrets: vec!["AKIDTEST".into(), "SECRETTEST".into()],
        })
    }

    fn spool_of(dir: &Path, bytes: &[u8]) -> Spool {
        let mut s = Spool::new(dir, false).unwrap();
        for piece in bytes.chunks(100_000) {
            s.append(piece).unwrap();
        }
        s
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
    }

    #[test]
    fn a_part_is_streamed_from_its_file_signed_and_sent_again_after_a_5xx() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..(CHUNK * 3 + 12_345)).map(|i| (i * 7 % 251) as u8).collect();
        let (port, server) = serve(vec![
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 9\r\nConnection: close\r\n\r\nSlowDown!",
            "HTTP/1.1 200 OK\r\nETag: \"e7a9\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        ]);
        let gauge = Arc::new(Gauge::default());
        let s = sender(port, &gauge);
        let part = rt().block_on(s.put(Some(spool_of(dir.path(), &bytes)), Some((2, "2~up/id+x".into())))).unwrap();
        // The ETag as the answer has it, as object_store's put_part takes it.
        assert_eq!(part.content_id, "\"e7a9\"");
        let got = server.join().unwrap();
        assert_eq!(got.len(), 2, "sent again after the 503");
        for g in &got {
            // object_store's URL (path-style, the key encoded), part idx + 1.
            assert_eq!(
                g.line,
                "PUT /bucket/vms/vm1/b1/root%20disk.qcow2?partNumber=3&uploadId=2%7Eup%2Fid%2Bx HTTP/1.1"
            );
            assert_eq!(g.header("content-length"), Some(bytes.len().to_string().as_str()));
            assert_eq!(g.header("x-amz-content-sha256"), Some("UNSIGNED-PAYLOAD"));
            let auth = g.header("authorization").unwrap();
            assert!(auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDTEST/"), "{auth}");
            assert!(auth.contains("/eu-west-3/s3/aws4_request"), "{auth}");
            assert!(!auth.contains("SECRETTEST"));
            assert!(g.body == bytes, "the body is the file's bytes, read again from its start");
        }
        // In memory: at most a window of chunks.
        assert!(gauge.peak() > 0 && gauge.peak() <= WINDOW * CHUNK, "{}", gauge.peak());
        assert_eq!(gauge.now.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_refused_part_is_an_error_naming_the_part_the_status_and_the_answer() {
        let dir = tempfile::tempdir().unwrap();
        let (port, server) = serve(vec![
            "HTTP/1.1 403 Forbidden\r\nContent-Length: 47\r\nConnection: close\r\n\r\n<Error><Code>AccessDenied</Code></Error>\n\n\n\n\n\n\n",
        ]);
        let gauge = Arc::new(Gauge::default());
        let s = sender(port, &gauge);
        let e = rt().block_on(s.put(Some(spool_of(dir.path(), b"0123456789")), Some((0, "u".into())))).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("part 0 (10 bytes)"), "{text}");
        assert!(text.contains("HTTP status 403 Forbidden: <Error><Code>AccessDenied</Code></Error>"), "{text}");
        assert_eq!(server.join().unwrap().len(), 1, "a 403 is not sent again");
    }

    #[test]
    fn an_object_of_one_part_or_none_is_one_put_without_a_query() {
        let dir = tempfile::tempdir().unwrap();
        let (port, server) = serve(vec![
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        ]);
        let gauge = Arc::new(Gauge::default());
        let s = sender(port, &gauge);
        let rt = rt();
        rt.block_on(Arc::clone(&s).put(Some(spool_of(dir.path(), b"abc")), None)).unwrap();
        rt.block_on(s.put(None, None)).unwrap();
        let got = server.join().unwrap();
        assert_eq!(got[0].line, "PUT /bucket/vms/vm1/b1/root%20disk.qcow2 HTTP/1.1");
        assert_eq!((got[0].body.as_slice(), got[0].header("content-length")), (&b"abc"[..], Some("3")));
        assert_eq!((got[1].body.len(), got[1].header("content-length")), (0, Some("0")));
    }

    /// A server on loopback that takes requests until none comes for a
    /// second, and reads each body until the client stops sending it (it
    /// answers only a whole one): the bytes of body of each request.
    fn serve_bodies() -> (u16, std::thread::JoinHandle<Vec<usize>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut idle = std::time::Instant::now();
            while idle.elapsed() < Duration::from_secs(1) {
                let s = match l.accept() {
                    Ok((s, _)) => s,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut n = 0;
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    let h = h.trim_end().to_lowercase();
                    if h.is_empty() {
                        break;
                    }
                    if let Some(v) = h.strip_prefix("content-length:") {
                        n = v.trim().parse().unwrap();
                    }
                }
                let mut body = Vec::new();
                let _ = r.take(n as u64).read_to_end(&mut body);
                if body.len() == n {
                    let _ = (&s)
                        .write_all(b"HTTP/1.1 200 OK\r\nETag: \"e\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                }
                got.push(body.len());
                idle = std::time::Instant::now();
            }
            got
        });
        (port, t)
    }

    /// A patch hashes the blocks it changes again and the whole part
    /// afresh; a spool file changed behind the spool's back is neither
    /// patched nor sent (not a block past the changed one, and not again).
    #[test]
    fn a_spool_file_changed_since_it_was_written_is_neither_patched_nor_sent() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes: Vec<u8> = (0..(CHUNK * 3 + 999)).map(|i| (i * 13 % 251) as u8).collect();
        let mut s = spool_of(dir.path(), &bytes);
        assert_eq!(s.hash(), None, "not asked for");
        let sums = |b: &[u8]| b.chunks(CHUNK).map(xxh3_128).collect::<Vec<_>>();
        assert_eq!(s.block_sums(), sums(&bytes));
        let mut buf = vec![0; CHUNK];
        // Across blocks 0 and 1; then in the last, short one.
        let header = vec![0xab; CHUNK + 10];
        s.patch(100, &header, &mut buf).unwrap();
        bytes[100..100 + header.len()].copy_from_slice(&header);
        let n = bytes.len();
        s.patch(n as u64 - 5, b"tail!", &mut buf).unwrap();
        bytes[n - 5..].copy_from_slice(b"tail!");
        assert_eq!((s.hash(), s.block_sums()), (Some(xxh3_128(&bytes)), sums(&bytes)));
        // Appended to after a patch: still the bytes made.
        s.append(b"more").unwrap();
        bytes.extend_from_slice(b"more");
        assert_eq!((s.hash(), s.block_sums()), (Some(xxh3_128(&bytes)), sums(&bytes)));

        // A byte of block 2 changed behind its back.
        let at = 2 * CHUNK + 7;
        s.file.write_all_at(&[!bytes[at]], at as u64).unwrap();
        match s.patch(0, b"x", &mut buf) {
            Err(PatchError::Changed(c)) => assert_eq!((c.start, c.end), (2 * CHUNK as u64, 3 * CHUNK as u64)),
            other => panic!("{other:?}"),
        }
        let (port, server) = serve_bodies();
        let gauge = Arc::new(Gauge::default());
        let e = rt().block_on(sender(port, &gauge).put(Some(s), Some((0, "u".into())))).unwrap_err();
        assert!(matches!(e, PutError::Changed { .. }), "{e}");
        let text = e.to_string();
        let says = format!("part 0 ({} bytes): bytes {}..{} of its spool file hash", bytes.len(), 2 * CHUNK, 3 * CHUNK);
        assert!(text.contains(&says) && text.ends_with("not sent"), "{text}");
        let got = server.join().unwrap();
        assert_eq!(got.len(), 1, "sent again: {got:?}");
        assert!(got[0] <= 2 * CHUNK, "bytes past the changed block were sent: {got:?}");
        assert_eq!(gauge.now.load(Ordering::Relaxed), 0);
    }
}
