//! Thumbnails with the `image` crate, decoded under limits: a file that is not a PNG, JPEG,
//! GIF or WebP image, or whose header claims dimensions or memory beyond the limits (a
//! decompression bomb), gets no thumbnail and costs no more than the limits allow. Callers run
//! this on a blocking thread.

use std::io::Cursor;

use image::{DynamicImage, ImageError, ImageFormat, ImageReader, Limits};

use super::serving::ThumbnailMethod;

/// The largest width or height decoded (a 12000x12000 RGBA image is 576 MB, over the
/// allocation limit anyway; this refuses bigger headers before any allocation).
pub const MAX_SOURCE_DIMENSION: u32 = 12_000;
/// What the decoder may allocate for one image.
pub const MAX_DECODE_ALLOC: u64 = 256 << 20;
/// Originals larger than this are not read into memory to be thumbnailed.
pub const MAX_SOURCE_BYTES: u64 = 32 << 20;

#[derive(Debug, PartialEq, Eq)]
pub enum ThumbnailError {
    /// Not an image this server decodes (spec: `400 M_UNKNOWN`).
    NotAnImage,
    /// Over the decode limits (spec: `413 M_TOO_LARGE`).
    TooLarge,
}

#[derive(Debug)]
pub struct Thumbnail {
    pub bytes: Vec<u8>,
    pub content_type: &'static str,
    pub width: u32,
    pub height: u32,
}

fn limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SOURCE_DIMENSION);
    limits.max_image_height = Some(MAX_SOURCE_DIMENSION);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    limits
}

/// A reader of an image held in memory, with the limits set.
type MemoryReader<'a> = ImageReader<Cursor<&'a [u8]>>;

fn reader(original: &[u8]) -> Result<(MemoryReader<'_>, ImageFormat), ThumbnailError> {
    let mut reader =
        ImageReader::new(Cursor::new(original)).with_guessed_format().map_err(|_| ThumbnailError::NotAnImage)?;
    let format = match reader.format() {
        Some(format @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::Gif | ImageFormat::WebP)) => format,
        _ => return Err(ThumbnailError::NotAnImage),
    };
    reader.limits(limits());
    Ok((reader, format))
}

fn classify(error: ImageError) -> ThumbnailError {
    match error {
        ImageError::Limits(_) => ThumbnailError::TooLarge,
        _ => ThumbnailError::NotAnImage,
    }
}

/// The dimensions an image's header claims, checked against the limits.
pub fn dimensions(original: &[u8]) -> Result<(u32, u32), ThumbnailError> {
    let (reader, _) = reader(original)?;
    let (width, height) = reader.into_dimensions().map_err(classify)?;
    if width > MAX_SOURCE_DIMENSION || height > MAX_SOURCE_DIMENSION {
        return Err(ThumbnailError::TooLarge);
    }
    Ok((width, height))
}

/// A thumbnail of `original` for the box `width`x`height`; `Ok(None)` when the original already
/// fits the box (then the original is the answer).
pub fn make(
    original: &[u8],
    width: u32,
    height: u32,
    method: ThumbnailMethod,
) -> Result<Option<Thumbnail>, ThumbnailError> {
    let (source_width, source_height) = dimensions(original)?;
    if source_width <= width && source_height <= height {
        return Ok(None);
    }
    let (reader, format) = reader(original)?;
    let image = reader.decode().map_err(classify)?;
    let resized = match method {
        ThumbnailMethod::Crop => image.resize_to_fill(width, height, image::imageops::FilterType::Triangle),
        ThumbnailMethod::Scale => image.thumbnail(width, height),
    };
    let (bytes, content_type) = encode(resized.clone(), format)?;
    Ok(Some(Thumbnail { bytes, content_type, width: resized.width(), height: resized.height() }))
}

/// JPEG stays JPEG (photos); everything else becomes PNG (keeps transparency).
fn encode(image: DynamicImage, source: ImageFormat) -> Result<(Vec<u8>, &'static str), ThumbnailError> {
    let mut out = Cursor::new(Vec::new());
    if source == ImageFormat::Jpeg {
        DynamicImage::ImageRgb8(image.to_rgb8()).write_to(&mut out, ImageFormat::Jpeg).map_err(classify)?;
        Ok((out.into_inner(), "image/jpeg"))
    } else {
        image.write_to(&mut out, ImageFormat::Png).map_err(classify)?;
        Ok((out.into_inner(), "image/png"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let image = DynamicImage::ImageRgb8(image::RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 7])
        }));
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn crop_fills_the_box_and_scale_keeps_the_aspect_ratio() {
        let original = png(400, 200);
        let crop = make(&original, 96, 96, ThumbnailMethod::Crop).unwrap().unwrap();
        assert_eq!((crop.width, crop.height, crop.content_type), (96, 96, "image/png"));
        let scale = make(&original, 320, 240, ThumbnailMethod::Scale).unwrap().unwrap();
        assert_eq!((scale.width, scale.height), (320, 160));
        let decoded = image::load_from_memory(&scale.bytes).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (320, 160));
    }

    #[test]
    fn a_small_original_is_its_own_thumbnail() {
        assert!(make(&png(20, 20), 32, 32, ThumbnailMethod::Crop).unwrap().is_none());
    }

    #[test]
    fn not_an_image_and_a_bomb_get_no_thumbnail() {
        assert_eq!(
            make(b"hello, not an image", 32, 32, ThumbnailMethod::Crop).unwrap_err(),
            ThumbnailError::NotAnImage
        );
        let mut truncated = png(100, 100);
        truncated.truncate(60);
        assert!(make(&truncated, 32, 32, ThumbnailMethod::Crop).is_err());
        assert_eq!(
            make(&bomb_png(100_000, 100_000), 32, 32, ThumbnailMethod::Crop).unwrap_err(),
            ThumbnailError::TooLarge
        );
        // Within the dimension limit but over the allocation limit.
        assert_eq!(
            make(&bomb_png(11_000, 11_000), 32, 32, ThumbnailMethod::Crop).unwrap_err(),
            ThumbnailError::TooLarge
        );
    }

    /// A PNG whose header claims `width`x`height` with a tiny compressed body.
    fn bomb_png(width: u32, height: u32) -> Vec<u8> {
        fn crc32(bytes: &[u8]) -> u32 {
            let mut crc = 0xFFFF_FFFFu32;
            for &b in bytes {
                crc ^= u32::from(b);
                for _ in 0..8 {
                    crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
                }
            }
            !crc
        }
        fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let mut body = kind.to_vec();
            body.extend_from_slice(data);
            out.extend_from_slice(&body);
            out.extend_from_slice(&crc32(&body).to_be_bytes());
        }
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&width.to_be_bytes());
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        chunk(&mut out, b"IHDR", &ihdr);
        // A zlib stream of a few zero bytes: far too short, as a bomb's would be expanded.
        chunk(&mut out, b"IDAT", &[0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01]);
        chunk(&mut out, b"IEND", &[]);
        out
    }
}
