//! Decompressing the compressed clusters of a qcow2 image (raw deflate, or
//! zstd frames); the image reads their input
//! ([`super::Qcow2Image::read_compressed`]).
//!
//! # Invariants
//!
//! - The compressed input is at most two clusters (4 MiB) long, read whole
//!   from the file; a zstd frame may not ask for a window over 8 MiB.
//! - The data must decompress to at least one whole cluster; exactly one
//!   cluster is used. Anything else is a `corrupt` error naming the image
//!   and the cluster, never a panic.

use super::header::CompressionType;

/// zstd frames may not ask for a window over 8 MiB (a cluster is at most 2 MiB).
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// A zstd streaming decoder (opaque so that the image stays `Debug`).
struct ZstdDecoder(zstd::stream::raw::Decoder<'static>);

impl std::fmt::Debug for ZstdDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ZstdDecoder")
    }
}

/// The decompressors of one image, made on first use and reused.
#[derive(Debug, Default)]
pub(super) struct Decompressor {
    inflater: Option<flate2::Decompress>,
    zstd: Option<ZstdDecoder>,
}

impl Decompressor {
    /// Decompress `input` (of compression type `t`) until `out` is full;
    /// why not, when it cannot be.
    pub(super) fn run(&mut self, t: CompressionType, input: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
        match t {
            CompressionType::Zlib => self.inflate(input, out),
            CompressionType::Zstd => self.unzstd(input, out),
        }
    }

    /// Raw deflate `input` until `out` is full.
    fn inflate(&mut self, input: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
        let d = self.inflater.get_or_insert_with(|| flate2::Decompress::new(false));
        d.reset(false);
        loop {
            let (in_before, out_before) = (d.total_in() as usize, d.total_out() as usize);
            let status = d
                .decompress(&input[in_before..], &mut out[out_before..], flate2::FlushDecompress::None)
                .map_err(|e| format!("bad deflate data: {e}"))?;
            let (in_now, out_now) = (d.total_in() as usize, d.total_out() as usize);
            if out_now == out.len() {
                return Ok(());
            }
            if status == flate2::Status::StreamEnd {
                return Err(format!("decompresses to {out_now} bytes, not a whole cluster of {}", out.len()));
            }
            if in_now == in_before && out_now == out_before {
                return Err(format!("deflate data ends early (after {out_now} of {} bytes)", out.len()));
            }
        }
    }

    /// Decode the zstd frames at the start of `input` until `out` is full,
    /// as QEMU decodes them: the frame filling `out` must end there (QEMU
    /// fails a frame of more than a cluster), and a frame ending early is
    /// followed by the next one.
    fn unzstd(&mut self, input: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
        use zstd::stream::raw::{DParameter, Decoder, Operation};
        if self.zstd.is_none() {
            let mut d = Decoder::new().map_err(|e| format!("zstd decoder: {e}"))?;
            d.set_parameter(DParameter::WindowLogMax(ZSTD_WINDOW_LOG_MAX)).map_err(|e| format!("zstd decoder: {e}"))?;
            self.zstd = Some(ZstdDecoder(d));
        }
        let Some(ZstdDecoder(d)) = self.zstd.as_mut() else { return Err("no zstd decoder".into()) };
        d.reinit().map_err(|e| format!("zstd decoder: {e}"))?;
        let (mut read, mut written) = (0usize, 0usize);
        loop {
            let st =
                d.run_on_buffers(&input[read..], &mut out[written..]).map_err(|e| format!("bad zstd data: {e}"))?;
            read += st.bytes_read;
            written += st.bytes_written;
            if written == out.len() {
                if st.remaining != 0 {
                    return Err(format!("zstd data decompresses to more than a cluster of {} bytes", out.len()));
                }
                return Ok(());
            }
            if st.remaining == 0 && read == input.len() {
                return Err(format!(
                    "zstd frame decompresses to {written} bytes, not a whole cluster of {}",
                    out.len()
                ));
            }
            if st.bytes_read == 0 && st.bytes_written == 0 {
                return Err(format!("zstd data ends early (after {written} of {} bytes)", out.len()));
            }
        }
    }
}
