//! Image decoding and CLIP preprocessing.
//!
//! The pipeline reproduces open_clip's inference transform (`open_clip.image_transform(size,
//! is_train=False)`, open_clip 3.3 with torchvision 0.29 and Pillow 13.0): torchvision
//! `Resize(size, BICUBIC)` on a PIL image, which is Pillow's `Image.resize` with its bicubic
//! convolution resampler, then `CenterCrop(size)`, `convert("RGB")`, `ToTensor()` and
//! `Normalize(CLIP_MEAN, CLIP_STD)`. On 8-bit input that decodes to the same pixels as in Pillow,
//! the output equals open_clip's bit for bit.
//!
//! It deliberately differs from that pipeline in three places, because there Pillow does not do
//! what the image shows:
//! - EXIF orientation is applied, so a phone photo is seen upright. Pillow's `Image.open` ignores
//!   the tag, so open_clip receives such a photo lying on its side.
//! - Every input is converted to 8-bit RGB before resizing. open_clip resizes in the file's own
//!   mode and converts afterwards. So Pillow resizes palette images (`P`, including GIF frames)
//!   with nearest-neighbour sampling instead of bicubic. It resizes RGBA and LA images with
//!   premultiplied alpha, which turns fully transparent pixels black, and it resizes the CMYK
//!   channels of a CMYK JPEG before converting them to RGB.
//! - 16-bit samples are scaled to 8 bits (`round(v * 255 / 65535)`). Pillow opens a 16-bit
//!   grayscale PNG as mode `I;16` and its `convert("RGB")` clamps each value to 255, so almost
//!   every pixel becomes white. For 16-bit RGB, Pillow keeps the high byte, which differs from
//!   the rounded value by one level on some samples.
//!
//! NOTE: JPEG files are decoded by zune-jpeg, whose chroma upsampling and YCbCr conversion round
//! differently from the libjpeg-turbo inside Pillow. On the 4:2:0 test photographs about a sixth
//! of the decoded samples differ by 1 to 4 levels, which moves model inputs by up to 0.06.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits};

use crate::error::{EngineError, Result};

// The literals are written as open_clip 3.3 spells OPENAI_DATASET_MEAN and OPENAI_DATASET_STD,
// so they can be compared by eye, and Rust rounds them to the same f32 values as torch.
/// Per-channel mean of OpenAI's CLIP training images, in RGB order on the 0..1 scale.
pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
/// Per-channel standard deviation of OpenAI's CLIP training images, in RGB order on the 0..1 scale.
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Largest accepted image, in pixels (width * height), checked from the header before decoding.
///
/// 64 megapixels admits the full-resolution output of current cameras (a 48 MP phone sensor is
/// 8064 x 6048, a 61 MP full-frame sensor 9504 x 6336). At the cap the decoded 8-bit RGB buffer
/// is 192 MB, and a 16-bit RGBA one 512 MB, which still leaves most of a wasm32 module's 4 GiB
/// address space to the model.
pub const MAX_PIXELS: u64 = 64_000_000;

/// Largest number of bytes a decoder may allocate, enough for a `MAX_PIXELS` image decoded as
/// 16-bit RGBA (8 bytes per pixel), the widest layout PNG and TIFF produce for ordinary photos.
const MAX_DECODER_BYTES: u64 = MAX_PIXELS * 8;

const SUPPORTED_FORMATS: &str = "PNG, JPEG, GIF, WebP, BMP or TIFF";

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// The model input and the image it was computed from.
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocessed {
    /// Normalized float32 pixels, shape [3, size, size], channel-major.
    pub pixels: Vec<f32>,
    /// The resized and center-cropped 8-bit image, size x size.
    pub cropped: RgbImage,
}

/// Decodes any supported format (detected from the bytes, never the file name) to 8-bit RGB, EXIF orientation applied, first frame of animations.
///
/// Alpha is dropped without compositing, as Pillow's `convert("RGB")` does. Supported formats are
/// PNG (including APNG), JPEG (including CMYK), GIF, WebP, BMP and TIFF. Fails on empty,
/// unrecognized, corrupt or truncated input, on zero-sized images, and on images of more than
/// [`MAX_PIXELS`] pixels, which are rejected from the header before the pixels are decoded.
///
/// NOTE: where a GIF's first frame covers only part of the canvas, the rest comes out black,
/// while Pillow fills it with a palette color.
pub fn decode(bytes: &[u8]) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(EngineError::Image(format!(
            "image data is empty (0 bytes); expected a {SUPPORTED_FORMATS} file"
        )));
    }

    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| EngineError::Image(format!("failed to read the image header: {e}")))?;
    let Some(format) = reader.format() else {
        return Err(EngineError::Image(format!(
            "unrecognized image format (first bytes: {}); expected a {SUPPORTED_FORMATS} file",
            hex_prefix(bytes)
        )));
    };
    // The PNG decoder parses every chunk up to the image data before it reports the size, so a
    // header-only or cut-off file would fail as truncated before the size check below could
    // name the real problem. The IHDR chunk sits at a fixed offset, so check it first.
    if format == ImageFormat::Png {
        if let Some((width, height)) = png_header_dimensions(bytes) {
            check_dimensions(width, height)?;
        }
    }
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_DECODER_BYTES);
    reader.limits(limits);

    // Constructing a decoder parses the header (the JPEG decoder also copies the compressed
    // bytes), so the size check below runs before the pixel buffer is allocated.
    let mut decoder = reader.into_decoder().map_err(|e| decode_error(format, e))?;
    let (width, height) = decoder.dimensions();
    check_dimensions(width, height)?;
    if format == ImageFormat::Jpeg {
        check_jpeg_complete(bytes)?;
    }

    let orientation = match decoder.orientation() {
        Ok(orientation) => orientation,
        Err(e) => {
            log::warn!(
                "ignoring unreadable EXIF orientation in {} image: {e}",
                format_name(format)
            );
            image::metadata::Orientation::NoTransforms
        }
    };
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(format, e))?;
    image.apply_orientation(orientation);

    let rgb = match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.into_rgb8(),
    };
    Ok(RgbImage { width: rgb.width(), height: rgb.height(), data: rgb.into_raw() })
}

/// Pillow-compatible bicubic resize of the shorter side to `size` (antialiased when shrinking) then center crop to size x size, as open_clip's preprocessing (torchvision Resize(size, BICUBIC) + CenterCrop(size)) does on a PIL image.
///
/// The longer side becomes `int(size * long / short)` (truncated, as torchvision 0.29 computes it)
/// and the crop offsets are `int(round((side - size) / 2.0))` with Python's round half to even.
/// Only the pixels inside the crop are resampled, which gives the same values as resizing the
/// whole image and cropping afterwards.
///
/// # Panics
///
/// Panics if `size` is 0, if the image has zero width or height, or if `data` does not hold
/// `width * height * 3` bytes. [`decode`] never returns such an image.
pub fn resize_and_crop(image: &RgbImage, size: usize) -> RgbImage {
    assert!(size > 0, "resize_and_crop: size must be positive");
    check_buffer(image);

    let (width, height) = (image.width as usize, image.height as usize);
    let (new_width, new_height) = if width <= height {
        (size, scale_longer_side(size, height, width))
    } else {
        (scale_longer_side(size, width, height), size)
    };
    let left = center_crop_offset(new_width, size);
    let top = center_crop_offset(new_height, size);
    resample::bicubic_window(image, new_width, new_height, left..left + size, top..top + size)
}

/// Resizes to `width` x `height` with Pillow's `Image.resize((width, height), Image.BICUBIC)`
/// arithmetic, so the output equals Pillow's byte for byte on 8-bit RGB.
///
/// # Panics
///
/// Panics if the input or the requested size has zero width or height, or if `data` does not
/// hold `width * height * 3` bytes.
pub fn resize_bicubic(image: &RgbImage, width: usize, height: usize) -> RgbImage {
    assert!(width > 0, "resize_bicubic: output width must be positive");
    assert!(height > 0, "resize_bicubic: output height must be positive");
    check_buffer(image);
    resample::bicubic_window(image, width, height, 0..width, 0..height)
}

/// CLIP normalization: float32 [3, size, size] channel-major, (x/255 - mean)/std.
///
/// Works for any image size, giving [3, height, width]. Each value is computed in f32 in the order
/// torchvision's `ToTensor` and `Normalize` use, so it matches them bit for bit.
pub fn normalize(image: &RgbImage) -> Vec<f32> {
    let plane = image.width as usize * image.height as usize;
    let mut pixels = vec![0.0f32; 3 * plane];
    for (channel, out) in pixels.chunks_exact_mut(plane.max(1)).enumerate().take(3) {
        let (mean, std) = (CLIP_MEAN[channel], CLIP_STD[channel]);
        for (value, rgb) in out.iter_mut().zip(image.data.chunks_exact(3)) {
            *value = (rgb[channel] as f32 / 255.0 - mean) / std;
        }
    }
    pixels
}

/// decode + resize_and_crop + normalize.
pub fn preprocess(bytes: &[u8], size: usize) -> Result<Preprocessed> {
    if size == 0 {
        return Err(EngineError::Image(
            "invalid model input size 0; expected a positive size such as 224".into(),
        ));
    }
    let image = decode(bytes)?;
    let cropped = resize_and_crop(&image, size);
    let pixels = normalize(&cropped);
    Ok(Preprocessed { pixels, cropped })
}

/// Rejects images with no pixels or with more than [`MAX_PIXELS`].
fn check_dimensions(width: u32, height: u32) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(EngineError::Image(format!(
            "image has no pixels ({width} x {height}); the file is invalid"
        )));
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > MAX_PIXELS {
        return Err(EngineError::Image(format!(
            "image is {width} x {height} = {pixels} pixels, above the limit of {MAX_PIXELS} \
             pixels; downscale it before loading"
        )));
    }
    Ok(())
}

/// Reads width and height from a PNG's IHDR chunk, which must directly follow the signature.
fn png_header_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    if bytes.get(12..16)? != b"IHDR" {
        return None;
    }
    let width = u32::from_be_bytes(bytes.get(16..20)?.try_into().ok()?);
    let height = u32::from_be_bytes(bytes.get(20..24)?.try_into().ok()?);
    Some((width, height))
}

fn check_buffer(image: &RgbImage) {
    assert!(
        image.width > 0 && image.height > 0,
        "image has no pixels ({} x {})",
        image.width,
        image.height
    );
    assert_eq!(
        image.data.len(),
        image.width as usize * image.height as usize * 3,
        "RGB buffer length does not match {} x {} x 3",
        image.width,
        image.height
    );
}

/// Computes torchvision's `int(size * long / short)`: an exact integer product, a correctly
/// rounded float64 division (as Python's `/` on integers), then truncation.
fn scale_longer_side(size: usize, long: usize, short: usize) -> usize {
    ((size as u64 * long as u64) as f64 / short as f64) as usize
}

/// Computes torchvision's `int(round((side - size) / 2.0))`, where `round` breaks ties to even.
fn center_crop_offset(side: usize, size: usize) -> usize {
    let excess = side - size;
    let half = excess / 2;
    if excess % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

/// Checks that a JPEG's entropy-coded data ends with an EOI marker.
///
/// The JPEG decoder runs in non-strict mode and fills the missing part of a truncated file with
/// gray instead of failing, so without this check a cut-off download would be classified silently.
fn check_jpeg_complete(bytes: &[u8]) -> Result<()> {
    if jpeg::has_end_marker(bytes) {
        Ok(())
    } else {
        Err(EngineError::Image(
            "failed to decode JPEG image: the file ends before its end-of-image marker, so it is \
             truncated; re-download or re-export it"
                .into(),
        ))
    }
}

fn decode_error(format: ImageFormat, error: ImageError) -> EngineError {
    let format = format_name(format);
    match error {
        ImageError::Limits(e) => EngineError::Image(format!(
            "{format} image needs more memory than the decoder limit of {MAX_DECODER_BYTES} \
             bytes ({e}); downscale it or convert it to 8-bit RGB before loading"
        )),
        ImageError::Unsupported(e) => EngineError::Image(format!(
            "unsupported {format} image: {e}; convert it to an 8-bit PNG or JPEG"
        )),
        e => EngineError::Image(format!(
            "failed to decode {format} image: {e}; the file is corrupt or truncated"
        )),
    }
}

fn format_name(format: ImageFormat) -> String {
    match format {
        ImageFormat::Png => "PNG".into(),
        ImageFormat::Jpeg => "JPEG".into(),
        ImageFormat::Gif => "GIF".into(),
        ImageFormat::WebP => "WebP".into(),
        ImageFormat::Bmp => "BMP".into(),
        ImageFormat::Tiff => "TIFF".into(),
        other => format!("{other:?}"),
    }
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

/// A walk over JPEG marker segments, enough to tell a complete file from a truncated one.
mod jpeg {
    const SOI: u8 = 0xD8;
    const EOI: u8 = 0xD9;
    const SOS: u8 = 0xDA;

    /// Returns whether the file reaches an EOI marker after at least one scan.
    ///
    /// Segments with a length field are skipped whole, so EXIF thumbnails (complete JPEGs inside
    /// an APP1 segment) cannot end the walk early. Inside entropy-coded data, `FF 00` is a
    /// stuffed byte and `FF D0`..`FF D7` are restart markers; any other marker ends the scan.
    pub(super) fn has_end_marker(bytes: &[u8]) -> bool {
        if bytes.len() < 4 || bytes[0] != 0xFF || bytes[1] != SOI {
            return false;
        }
        let mut pos = 2;
        let mut seen_scan = false;
        while pos + 1 < bytes.len() {
            if bytes[pos] != 0xFF {
                // Decoders skip stray bytes between segments, and so does this walk.
                pos += 1;
                continue;
            }
            let marker = bytes[pos + 1];
            match marker {
                0xFF => pos += 1, // fill byte
                EOI => return seen_scan,
                0x01 | 0xD0..=0xD7 => pos += 2, // markers without a length field
                _ => {
                    let Some(length) = bytes.get(pos + 2..pos + 4) else { return false };
                    let length = u16::from_be_bytes([length[0], length[1]]) as usize;
                    pos += 2 + length;
                    if marker == SOS {
                        seen_scan = true;
                        pos = skip_entropy_coded(bytes, pos);
                    }
                }
            }
        }
        false
    }

    /// Returns the position of the first marker after entropy-coded data starting at `pos`.
    fn skip_entropy_coded(bytes: &[u8], mut pos: usize) -> usize {
        while pos + 1 < bytes.len() {
            if bytes[pos] == 0xFF && !matches!(bytes[pos + 1], 0x00 | 0xD0..=0xD7 | 0xFF) {
                return pos;
            }
            pos += 1;
        }
        bytes.len()
    }
}

/// Pillow's separable convolution resampler (`src/libImaging/Resample.c`, Pillow 13.0) for the
/// bicubic filter on 8-bit RGB.
mod resample {
    use std::ops::Range;

    use super::RgbImage;

    /// Fractional bits of the fixed-point filter weights: 32 bits minus 8 for the sample and 2 of
    /// headroom, because the cubic kernel's negative lobes let partial sums leave 0..255.
    const PRECISION_BITS: u32 = 22;

    /// Keys' cubic convolution kernel with a = -0.5, which Pillow calls BICUBIC.
    fn bicubic_kernel(x: f64) -> f64 {
        const A: f64 = -0.5;
        let x = x.abs();
        if x < 1.0 {
            ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * A
        } else {
            0.0
        }
    }

    /// Filter weights of one axis, for output samples `window.start..window.end`.
    struct Weights {
        /// First input sample of each output sample.
        first: Vec<usize>,
        /// Number of input samples of each output sample.
        count: Vec<usize>,
        /// Fixed-point weights, `taps` per output sample, zero-padded.
        values: Vec<i32>,
        taps: usize,
    }

    impl Weights {
        /// Computes the weights as Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` do:
        /// the kernel is stretched by the downscale factor (so shrinking is antialiased),
        /// evaluated in f64, divided by its sum and rounded half away from zero to 22 bits.
        fn new(in_size: usize, out_size: usize, window: Range<usize>) -> Self {
            // Pillow passes the input extent as a C float, so sizes above 2^24 round here too.
            let scale = (in_size as f32) as f64 / out_size as f64;
            let filter_scale = scale.max(1.0);
            let support = 2.0 * filter_scale;
            let taps = support.ceil() as usize * 2 + 1;
            let inverse_filter_scale = 1.0 / filter_scale;

            let len = window.len();
            let mut weights = Weights {
                first: Vec::with_capacity(len),
                count: Vec::with_capacity(len),
                values: vec![0; len * taps],
                taps,
            };
            let mut row = vec![0.0f64; taps];
            for (i, out) in window.enumerate() {
                let center = (out as f64 + 0.5) * scale;
                // `as` truncates toward zero, like Pillow's (int) cast.
                let first = ((center - support + 0.5) as i64).max(0) as usize;
                let end = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
                let count = end.saturating_sub(first).min(taps);

                let mut sum = 0.0;
                for (k, w) in row[..count].iter_mut().enumerate() {
                    *w = bicubic_kernel(((first + k) as f64 - center + 0.5) * inverse_filter_scale);
                    sum += *w;
                }
                let fixed = &mut weights.values[i * taps..i * taps + count];
                for (dst, &w) in fixed.iter_mut().zip(&row[..count]) {
                    let w = if sum != 0.0 { w / sum } else { w };
                    let scaled = w * f64::from(1u32 << PRECISION_BITS);
                    *dst = if w < 0.0 { (scaled - 0.5) as i32 } else { (scaled + 0.5) as i32 };
                }
                weights.first.push(first);
                weights.count.push(count);
            }
            weights
        }

        /// Returns the first input sample and the weights of output sample `i` of the window.
        fn of(&self, i: usize) -> (usize, &[i32]) {
            let start = i * self.taps;
            (self.first[i], &self.values[start..start + self.count[i]])
        }

        /// Returns the number of output samples.
        fn len(&self) -> usize {
            self.first.len()
        }

        /// Returns the input samples that any output sample reads.
        fn source_range(&self) -> Range<usize> {
            let start = self.first.iter().copied().min().unwrap_or(0);
            let end = self.first.iter().zip(&self.count).map(|(f, c)| f + c).max().unwrap_or(0);
            start..end
        }
    }

    /// Rounds a fixed-point sum (which starts at half a unit) down to 8 bits and clamps it.
    #[inline]
    fn clip8(sum: i32) -> u8 {
        (sum >> PRECISION_BITS).clamp(0, 255) as u8
    }

    const ROUNDING: i32 = 1 << (PRECISION_BITS - 1);

    /// Resamples `image` to `out_width` x `out_height` and returns only the pixels in `columns`
    /// x `rows` of that output.
    ///
    /// Like Pillow, an axis whose size does not change is not filtered at all, and when both
    /// change the first pass rounds to 8 bits before the second. Pillow 13.0 runs the vertical
    /// pass first when the height shrinks by more than twice as many pixels as the width, and the
    /// horizontal pass first otherwise.
    ///
    /// NOTE: Pillow 12.x and older always run the horizontal pass first. For the shapes that take
    /// the vertical-first branch, their output differs from this one by a level on some pixels.
    /// With CLIP's shorter-side resize these are images more than about twice as tall as wide.
    pub(super) fn bicubic_window(
        image: &RgbImage,
        out_width: usize,
        out_height: usize,
        columns: Range<usize>,
        rows: Range<usize>,
    ) -> RgbImage {
        let (in_width, in_height) = (image.width as usize, image.height as usize);
        assert!(columns.end <= out_width, "window columns {columns:?} outside width {out_width}");
        assert!(rows.end <= out_height, "window rows {rows:?} outside height {out_height}");
        assert!(!columns.is_empty(), "empty window columns");
        assert!(!rows.is_empty(), "empty window rows");
        let (window_width, window_height) = (columns.len(), rows.len());
        let source = &image.data;

        let horizontal = (out_width != in_width).then(|| Weights::new(in_width, out_width, columns.clone()));
        let vertical = (out_height != in_height).then(|| Weights::new(in_height, out_height, rows.clone()));
        let vertical_first = out_height < in_height
            && 2 * (in_width as i64 - out_width as i64) < (in_height - out_height) as i64;

        let data = match (&horizontal, &vertical) {
            (None, None) => crop(source, in_width, columns, rows),
            (Some(horizontal), None) => horizontal_pass(source, in_width, rows, horizontal, 0),
            (None, Some(vertical)) => vertical_pass(source, in_width, columns, vertical, 0),
            (Some(horizontal), Some(vertical)) if vertical_first => {
                // Vertical pass over the input columns the horizontal window reads.
                let source_columns = horizontal.source_range();
                let stage = vertical_pass(source, in_width, source_columns.clone(), vertical, 0);
                horizontal_pass(&stage, source_columns.len(), 0..window_height, horizontal, source_columns.start)
            }
            (Some(horizontal), Some(vertical)) => {
                // Horizontal pass over the input rows the vertical window reads.
                let source_rows = vertical.source_range();
                let stage = horizontal_pass(source, in_width, source_rows.clone(), horizontal, 0);
                vertical_pass(&stage, window_width, 0..window_width, vertical, source_rows.start)
            }
        };
        RgbImage { width: window_width as u32, height: window_height as u32, data }
    }

    /// Filters each of `rows` of `source` (an RGB buffer `width` pixels wide) along x. Input
    /// column `c` of the weights is column `c - shift` of `source`.
    fn horizontal_pass(source: &[u8], width: usize, rows: Range<usize>, weights: &Weights, shift: usize) -> Vec<u8> {
        let in_stride = width * 3;
        let out_stride = weights.len() * 3;
        let mut out = vec![0u8; rows.len() * out_stride];
        for (y, out_row) in rows.zip(out.chunks_exact_mut(out_stride)) {
            let in_row = &source[y * in_stride..(y + 1) * in_stride];
            for (x, pixel) in out_row.chunks_exact_mut(3).enumerate() {
                let (first, taps) = weights.of(x);
                let start = (first - shift) * 3;
                let pixels = &in_row[start..start + taps.len() * 3];
                let (mut r, mut g, mut b) = (ROUNDING, ROUNDING, ROUNDING);
                for (&w, rgb) in taps.iter().zip(pixels.chunks_exact(3)) {
                    r += i32::from(rgb[0]) * w;
                    g += i32::from(rgb[1]) * w;
                    b += i32::from(rgb[2]) * w;
                }
                pixel[0] = clip8(r);
                pixel[1] = clip8(g);
                pixel[2] = clip8(b);
            }
        }
        out
    }

    /// Filters `columns` of `source` (an RGB buffer `width` pixels wide) along y. Input row `r`
    /// of the weights is row `r - shift` of `source`.
    fn vertical_pass(source: &[u8], width: usize, columns: Range<usize>, weights: &Weights, shift: usize) -> Vec<u8> {
        let in_stride = width * 3;
        let out_stride = columns.len() * 3;
        let mut out = vec![0u8; weights.len() * out_stride];
        // Integer sums are exact, so accumulating whole rows at a time gives Pillow's per-pixel
        // result while reading memory in order.
        let mut sums = vec![0i32; out_stride];
        for (y, out_row) in out.chunks_exact_mut(out_stride).enumerate() {
            let (first, taps) = weights.of(y);
            sums.fill(ROUNDING);
            for (k, &w) in taps.iter().enumerate() {
                let row_start = (first + k - shift) * in_stride;
                let pixels = &source[row_start + columns.start * 3..row_start + columns.end * 3];
                for (sum, &v) in sums.iter_mut().zip(pixels) {
                    *sum += i32::from(v) * w;
                }
            }
            for (dst, &sum) in out_row.iter_mut().zip(&sums) {
                *dst = clip8(sum);
            }
        }
        out
    }

    fn crop(source: &[u8], width: usize, columns: Range<usize>, rows: Range<usize>) -> Vec<u8> {
        let stride = width * 3;
        let mut out = Vec::with_capacity(columns.len() * rows.len() * 3);
        for y in rows {
            out.extend_from_slice(&source[y * stride + columns.start * 3..y * stride + columns.end * 3]);
        }
        out
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn weights_sum_to_one_in_fixed_point() {
            for (in_size, out_size) in [(256, 224), (64, 224), (4000, 224), (7, 3), (3, 7)] {
                let weights = Weights::new(in_size, out_size, 0..out_size);
                for i in 0..out_size {
                    let sum: i32 = weights.of(i).1.iter().sum();
                    assert!((sum - (1 << PRECISION_BITS)).abs() <= 8, "{in_size}->{out_size} at {i}: {sum}");
                }
            }
        }

        #[test]
        fn kernel_interpolates() {
            assert_eq!(bicubic_kernel(0.0), 1.0);
            assert_eq!(bicubic_kernel(1.0), 0.0);
            assert_eq!(bicubic_kernel(-2.0), 0.0);
            assert_eq!(bicubic_kernel(0.5), 0.5625);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_offset_rounds_half_to_even() {
        // Python: int(round(1 / 2.0)) == 0, int(round(3 / 2.0)) == 2, int(round(5 / 2.0)) == 2.
        assert_eq!(center_crop_offset(225, 224), 0);
        assert_eq!(center_crop_offset(227, 224), 2);
        assert_eq!(center_crop_offset(229, 224), 2);
        assert_eq!(center_crop_offset(231, 224), 4);
        assert_eq!(center_crop_offset(228, 224), 2);
        assert_eq!(center_crop_offset(224, 224), 0);
    }

    #[test]
    fn longer_side_truncates() {
        // Python: int(224 * 451 / 300) == 336, int(224 * 4000 / 3000) == 298.
        assert_eq!(scale_longer_side(224, 451, 300), 336);
        assert_eq!(scale_longer_side(224, 4000, 3000), 298);
        assert_eq!(scale_longer_side(224, 224, 224), 224);
    }

    #[test]
    fn normalize_is_channel_major() {
        let image = RgbImage { width: 2, height: 1, data: vec![0, 128, 255, 255, 0, 128] };
        let pixels = normalize(&image);
        assert_eq!(pixels.len(), 6);
        assert_eq!(pixels[0], (0.0 - CLIP_MEAN[0]) / CLIP_STD[0]);
        assert_eq!(pixels[1], (1.0 - CLIP_MEAN[0]) / CLIP_STD[0]);
        assert_eq!(pixels[2], (128.0 / 255.0 - CLIP_MEAN[1]) / CLIP_STD[1]);
        assert_eq!(pixels[5], (128.0 / 255.0 - CLIP_MEAN[2]) / CLIP_STD[2]);
    }

    #[test]
    fn same_size_is_a_copy() {
        let image = RgbImage { width: 3, height: 2, data: (0..18).collect() };
        assert_eq!(resize_bicubic(&image, 3, 2), image);
        // The 3 x 2 image needs no resize, and the crop offset round(0.5) is 0.
        assert_eq!(resize_and_crop(&image, 2).data, vec![0, 1, 2, 3, 4, 5, 9, 10, 11, 12, 13, 14]);
    }

    #[test]
    fn uniform_image_stays_uniform() {
        let image = RgbImage { width: 37, height: 19, data: [10u8, 200, 77].repeat(37 * 19) };
        for size in [5, 19, 64, 224] {
            let out = resize_and_crop(&image, size);
            assert_eq!((out.width, out.height), (size as u32, size as u32));
            assert!(out.data.chunks_exact(3).all(|p| p == [10, 200, 77]), "size {size}");
        }
    }

    #[test]
    fn jpeg_end_marker_detection() {
        let header = [0xFF, 0xD8, 0xFF, 0xDA, 0x00, 0x02];
        let complete = [&header[..], &[0x12, 0xFF, 0x00, 0xFF, 0xD3, 0x34, 0xFF, 0xD9]].concat();
        assert!(jpeg::has_end_marker(&complete));
        assert!(!jpeg::has_end_marker(&complete[..complete.len() - 2]));
        // An EOI inside an APP1 segment (an EXIF thumbnail) does not count.
        let thumbnail = [0xFF, 0xD8, 0xFF, 0xE1, 0x00, 0x04, 0xFF, 0xD9, 0xFF, 0xDA, 0x00, 0x02, 0x55];
        assert!(!jpeg::has_end_marker(&thumbnail));
    }

    #[test]
    fn empty_input_is_rejected() {
        let error = decode(&[]).unwrap_err().to_string();
        assert!(error.contains("empty"), "{error}");
    }
}
