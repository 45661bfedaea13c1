//! How long the vault waits on the network: a transfer is given up when
//! it stalls, never because it is slow.
//!
//! No request has a total time limit: a part of 160 MiB over a link of a
//! few Mbit/s takes minutes, and must be let finish. What fails a request
//! is its connection not being made within [`CONNECT_TIMEOUT`], or no byte
//! of it moving, in either direction, for the stall timeout
//! (`KNIB_VAULT_STALL_TIMEOUT`, [`DEFAULT_STALL`] by default, see
//! `config`): the request is then dropped (its connection closed) and fails
//! with [`Stalled`], a timeout the requests' retries treat like any other
//! (`config::retry`: the S3 client's, and `spool`'s for a direct backup's
//! parts).
//!
//! "A byte moving" is seen where knib can see it:
//!
//! - A request's body (a part, an object, an XML document) is handed to
//!   the HTTP client in slices of at most [`SLICE`] bytes, and each slice
//!   the client takes is progress: the client takes the next one only when
//!   its connection has taken the last (its own buffer and the socket's are
//!   bounded), so the slices are taken at the pace of the link, and a link
//!   that moves nothing leaves the next slice untaken. The request's
//!   answer (its status and headers, then each piece of its body, read
//!   whole: such answers are small) is progress too. [`watch`] runs the
//!   request and fails it once no progress was seen for the stall timeout.
//!   What the socket's buffers hold when the last slice is taken (a few
//!   round trips' worth of the link) must drain within the stall timeout.
//! - A request without a body (a GET, ranged or whole; a HEAD, a list, a
//!   delete) is sent by a client whose read timeout is the stall timeout:
//!   `reqwest` starts it when the request is sent and stops it at the
//!   answer's headers, then restarts it for each read of the answer's
//!   body, so a download fails only when nothing came for that long,
//!   whatever its length. (That timeout cannot serve a request with a
//!   body: until the answer's headers come, it runs from the request's
//!   start, the body's upload included.)
//!
//! `reqwest`'s `timeout` (total, the body included) is set by no client
//! here: it is what cut every part that took more than 30 s before (the
//! S3 client's default, and the one the direct backup's parts had).
//!
//! The S3 client (`object_store`) sends its requests through [`Connector`]
//! (its `HttpConnector`), which routes each to one of two `reqwest` clients
//! as above; a direct backup's parts, which knib sends itself (`spool`),
//! go through [`client`] and [`watch`] the same way.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpResponseBody, HttpService,
};
use object_store::{ClientConfigKey, ClientOptions};
use reqwest::header::CONTENT_LENGTH;

/// The time a connection (TCP and TLS) may take to be made.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The time a transfer may go without a byte moving, by default.
pub(super) const DEFAULT_STALL: Duration = Duration::from_secs(30);
/// The most bytes of a request's body handed to the HTTP client at once:
/// progress is seen at least every `SLICE` bytes the link takes (a link
/// slower than `SLICE` per stall timeout, 0.5 KiB/s by default, is taken
/// for a stalled one).
pub(super) const SLICE: usize = 16 << 10;
/// The most bytes of an answer to a request with a body (S3 answers those
/// with an empty body or a small XML document).
const MAX_ANSWER: usize = 16 << 20;

/// When a transfer last moved a byte.
#[derive(Debug)]
pub(super) struct Progress {
    start: Instant,
    /// Milliseconds from `start` to the last progress.
    last: AtomicU64,
}

impl Progress {
    pub(super) fn new() -> Arc<Progress> {
        Arc::new(Progress { start: Instant::now(), last: AtomicU64::new(0) })
    }

    /// A byte moved now.
    pub(super) fn mark(&self) {
        self.last.fetch_max(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// When the last byte moved.
    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }
}

/// A transfer in which no byte moved for `stall`: given up.
#[derive(Debug, Clone)]
pub(super) struct Stalled {
    pub(super) stall: Duration,
    /// What was being waited for: "sending the request" (its body, or
    /// its answer after the body), "reading the answer".
    pub(super) waiting: &'static str,
}

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the transfer stalled: no byte moved for {} s while {} (the stall timeout, KNIB_VAULT_STALL_TIMEOUT)",
            self.stall.as_secs_f64(),
            self.waiting
        )
    }
}

impl std::error::Error for Stalled {}

/// `fut`'s output, or [`Stalled`] once `progress` has not moved for
/// `stall` (`fut` is then dropped: its request, and its connection, with it).
pub(super) async fn watch<F: Future>(
    fut: F,
    progress: &Progress,
    stall: Duration,
    waiting: &'static str,
) -> Result<F::Output, Stalled> {
    let mut fut = std::pin::pin!(fut);
    loop {
        let deadline = progress.last() + stall;
        let timer = std::pin::pin!(tokio::time::sleep_until(deadline.into()));
        match futures::future::select(fut.as_mut(), timer).await {
            futures::future::Either::Left((out, _)) => return Ok(out),
            futures::future::Either::Right(((), _)) => {
                if progress.last() + stall <= Instant::now() {
                    return Err(Stalled { stall, waiting });
                }
            }
        }
    }
}

/// `chunks` cut in slices of at most [`SLICE`] bytes (sharing their
/// memory), each marking `progress` when the HTTP client takes it.
pub(super) fn sliced<S, E>(chunks: S, progress: Arc<Progress>) -> impl Stream<Item = Result<Bytes, E>> + Send + 'static
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Send + 'static,
{
    chunks
        .flat_map(|c| {
            let slices: Vec<Result<Bytes, E>> = match c {
                Ok(b) => (0..b.len()).step_by(SLICE).map(|i| Ok(b.slice(i..(i + SLICE).min(b.len())))).collect(),
                Err(e) => vec![Err(e)],
            };
            futures::stream::iter(slices)
        })
        .inspect(move |_| progress.mark())
}

/// An HTTP client of the vault: HTTP/1.1 only, as the S3 client's by
/// default, [`CONNECT_TIMEOUT`] to connect, no total timeout; with
/// `read_timeout`, each read of an answer (and the wait for its headers)
/// may take that long (for requests without a body only: see the module
/// docs).
pub(super) fn client(read_timeout: Option<Duration>, https_only: bool) -> reqwest::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .user_agent(concat!("knib/", env!("CARGO_PKG_VERSION")))
        .http1_only()
        .connect_timeout(CONNECT_TIMEOUT)
        .https_only(https_only)
        .no_gzip()
        .no_brotli()
        .no_zstd()
        .no_deflate();
    if let Some(t) = read_timeout {
        b = b.read_timeout(t);
    }
    b.build()
}

/// The S3 client's HTTP connector: its requests go through [`Transport`].
#[derive(Debug)]
pub(super) struct Connector {
    pub(super) stall: Duration,
}

impl HttpConnector for Connector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let https_only = options.get_config_value(&ClientConfigKey::AllowHttp).as_deref() != Some("true");
        let made = |read| {
            client(read, https_only).map_err(|e| object_store::Error::Generic { store: "S3", source: Box::new(e) })
        };
        Ok(HttpClient::new(Transport { sends: made(None)?, reads: made(Some(self.stall))?, stall: self.stall }))
    }
}

/// How the S3 client's requests are sent (see the module docs): those
/// with a body by `sends`, watched for stalls; the others by `reads`,
/// whose read timeout is the stall timeout.
#[derive(Debug)]
struct Transport {
    sends: reqwest::Client,
    reads: reqwest::Client,
    stall: Duration,
}

impl HttpService for Transport {
    fn call<'a, 'b>(
        &'a self,
        req: HttpRequest,
    ) -> Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + 'b>>
    where
        'a: 'b,
        Self: 'b,
    {
        Box::pin(async move {
            if req.body().content_length() == 0 {
                let r = HttpService::call(&self.reads, req).await;
                return r.map_err(|e| self.read_error(e));
            }
            self.send(req).await
        })
    }
}

impl Transport {
    /// A request with a body, watched for stalls; its answer read whole.
    async fn send(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let (parts, body) = req.into_parts();
        let len = body.content_length();
        let progress = Progress::new();
        // The body's pieces (a part is one or more buffers), as a stream.
        let pieces = HttpResponseBody::new(body).bytes_stream();
        let url = reqwest::Url::parse(&parts.uri.to_string()).map_err(|e| HttpError::new(HttpErrorKind::Unknown, e))?;
        let mut r = reqwest::Request::new(parts.method, url);
        *r.headers_mut() = parts.headers;
        r.headers_mut().insert(CONTENT_LENGTH, len.into());
        *r.body_mut() = Some(reqwest::Body::wrap_stream(sliced(pieces, Arc::clone(&progress))));
        let stalled = |s: Stalled| HttpError::new(HttpErrorKind::Timeout, s);
        let mut answer = watch(self.sends.execute(r), &progress, self.stall, "sending the request")
            .await
            .map_err(stalled)?
            .map_err(http_error)?;
        progress.mark();
        let read = async {
            let mut got: Vec<u8> = Vec::new();
            while let Some(c) = answer.chunk().await.map_err(http_error)? {
                progress.mark();
                if got.len() + c.len() > MAX_ANSWER {
                    let e = format!("the answer's body is longer than {MAX_ANSWER} bytes");
                    return Err(HttpError::new(HttpErrorKind::Decode, std::io::Error::other(e)));
                }
                got.extend_from_slice(&c);
            }
            Ok(got)
        };
        let got = watch(read, &progress, self.stall, "reading the answer").await.map_err(stalled)??;
        let mut out = HttpResponse::new(HttpResponseBody::from(got));
        *out.status_mut() = answer.status();
        *out.version_mut() = answer.version();
        *out.headers_mut() = std::mem::take(answer.headers_mut());
        Ok(out)
    }

    /// A request without a body that timed out while it waited for bytes
    /// (not for its connection): [`Stalled`].
    fn read_error(&self, e: HttpError) -> HttpError {
        let read_timeout = e.kind() == HttpErrorKind::Timeout
            && std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<reqwest::Error>())
                .is_some_and(|r| r.is_timeout() && !r.is_connect());
        if read_timeout {
            HttpError::new(HttpErrorKind::Timeout, Stalled { stall: self.stall, waiting: "waiting for the answer" })
        } else {
            e
        }
    }
}

/// A `reqwest` error as the S3 client's: whether and how it is retried
/// (as object_store sorts its own client's errors, as far as `reqwest`
/// shows them).
fn http_error(e: reqwest::Error) -> HttpError {
    let mut kind = if e.is_timeout() {
        HttpErrorKind::Timeout
    } else if e.is_connect() {
        HttpErrorKind::Connect
    } else if e.is_decode() {
        HttpErrorKind::Decode
    } else {
        HttpErrorKind::Unknown
    };
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            match io.kind() {
                K::TimedOut => kind = HttpErrorKind::Timeout,
                K::ConnectionAborted | K::ConnectionReset | K::BrokenPipe | K::UnexpectedEof
                    if kind == HttpErrorKind::Unknown =>
                {
                    kind = HttpErrorKind::Interrupted
                }
                _ => {}
            }
        }
        source = s.source();
    }
    // The request failed on its way (the connection closed, the body
    // cut): sent again if it may be.
    if kind == HttpErrorKind::Unknown && (e.is_request() || e.is_body()) {
        kind = HttpErrorKind::Interrupted;
    }
    HttpError::new(kind, e.without_url())
}

/// Whether `e` (an error or one of its sources) is a transfer that
/// stalled: [`Stalled`], or `reqwest`'s read timeout (a download's body).
pub(super) fn stalled(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if e.is::<Stalled>() {
            return true;
        }
        if let Some(r) = e.downcast_ref::<reqwest::Error>() {
            if r.is_timeout() && !r.is_connect() {
                return true;
            }
        }
        cur = e.source();
    }
    false
}
