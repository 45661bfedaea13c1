//! Screenshots of a domain's first screen (virDomainScreenshot), saved as
//! PNG.
//!
//! # Invariants
//!
//! - libvirt hands PNG from QEMU 7.2 on and binary PPM before: PPM is
//!   converted; anything else is a `hypervisor` error naming its type.
//! - The file is written under a temporary name, then renamed: it is
//!   whole or absent.

use std::io::BufWriter;
use std::path::Path;

use super::{virt_error, Hypervisor, Vm};
use crate::error::{ErrorKind, KnibError, Result};
use crate::fsio;

/// Take a screenshot of the domain's first screen and save it as PNG at
/// `dest` (written under a temporary name, then renamed).
pub fn screenshot(hv: &Hypervisor, vm: &Vm, dest: &Path) -> Result<()> {
    let what = || format!("screenshot of domain {}", vm.name());
    let stream = hv.conn().new_stream(0).map_err(|e| virt_error(what(), &e))?;
    let mime = vm.dom().screenshot(&stream, 0).map_err(|e| virt_error(what(), &e))?;
    let mut data = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = stream.recv(&mut buf).map_err(|e| virt_error(what(), &e))?;
        if n == 0 {
            break;
        }
        data.extend_from_slice(&buf[..n]);
    }
    let _ = stream.finish();
    let png = if data.starts_with(PNG_MAGIC) {
        data
    } else if data.starts_with(b"P6") {
        ppm_to_png(&data).map_err(|e| e.context(what()))?
    } else {
        return Err(KnibError::hypervisor(format!(
            "{}: libvirt sent {} bytes of {mime}, neither PNG nor PPM",
            what(),
            data.len()
        )));
    };
    fsio::write_atomic(dest, &png)
}

/// The first bytes of every PNG file.
pub const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

/// Convert a binary PPM (P6, 8 bits a sample) to PNG.
pub fn ppm_to_png(ppm: &[u8]) -> Result<Vec<u8>> {
    let bad = |why: &str| KnibError::new(ErrorKind::Hypervisor, format!("the screenshot is not a valid PPM: {why}"));
    let mut pos = 2;
    let mut fields = [0usize; 3];
    if !ppm.starts_with(b"P6") {
        return Err(bad("no P6 magic"));
    }
    for field in &mut fields {
        // White space and comments, then a decimal number.
        loop {
            match ppm.get(pos) {
                Some(c) if c.is_ascii_whitespace() => pos += 1,
                Some(b'#') => {
                    while ppm.get(pos).is_some_and(|&c| c != b'\n') {
                        pos += 1;
                    }
                }
                _ => break,
            }
        }
        let start = pos;
        while ppm.get(pos).is_some_and(u8::is_ascii_digit) {
            pos += 1;
        }
        *field = std::str::from_utf8(&ppm[start..pos])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("a bad header"))?;
    }
    // One white-space byte ends the header.
    pos += 1;
    let [width, height, maxval] = fields;
    if maxval == 0 || maxval > 255 {
        return Err(bad("not 8 bits a sample"));
    }
    if width == 0 || height == 0 || width > 1 << 15 || height > 1 << 15 {
        return Err(bad("a bad size"));
    }
    let len = width * height * 3;
    let pixels = ppm.get(pos..pos + len).ok_or_else(|| bad("too short"))?;
    let scaled: Vec<u8>;
    let pixels = if maxval == 255 {
        pixels
    } else {
        scaled = pixels.iter().map(|&p| ((p as usize * 255) / maxval) as u8).collect();
        &scaled
    };
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(BufWriter::new(&mut out), width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(|e| KnibError::internal(format!("PNG encoder: {e}")))?;
        w.write_image_data(pixels).map_err(|e| KnibError::internal(format!("PNG encoder: {e}")))?;
        w.finish().map_err(|e| KnibError::internal(format!("PNG encoder: {e}")))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_ppm() {
        let mut ppm = b"P6\n# a comment\n2 1\n255\n".to_vec();
        ppm.extend_from_slice(&[255, 0, 0, 0, 0, 255]);
        let png = ppm_to_png(&ppm).unwrap();
        assert!(png.starts_with(PNG_MAGIC));
        let mut reader = png::Decoder::new(std::io::Cursor::new(&png)).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (2, 1));
        assert_eq!(&buf[..info.buffer_size()], &[255, 0, 0, 0, 0, 255]);
        assert!(ppm_to_png(b"P6\n2 1\n255\n\x01").is_err());
        assert!(ppm_to_png(b"P5\n2 1\n255\n").is_err());
    }
}
