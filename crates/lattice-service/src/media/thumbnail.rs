//! Thumbnails with the `image` crate, decoded under limits: a file that is not a PNG, JPEG,
//! GIF or WebP image, or whose header claims dimensions or memory beyond the limits (a
//! decompression bomb), gets no thumbnail and costs no more than the limits allow. Callers run
//! this on a blocking thread.

use std::io::Cursor;

use image::codecs::gif::{GifDecoder, GifEncoder, Repeat};
use image::codecs::png::PngDecoder;
use image::codecs::webp::WebPDecoder;
use image::{
    AnimationDecoder, DynamicImage, Frame, Frames, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits,
};

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

/// What answers a thumbnail request.
#[derive(Debug)]
pub enum Made {
    /// The original fits the box and may be served as it is, with this (detected) type.
    Original {
        content_type: &'static str,
    },
    Thumbnail(Thumbnail),
}

/// An animation is thumbnailed frame by frame up to this many frames; a longer one gets a still.
pub const MAX_ANIMATION_FRAMES: usize = 300;
/// Source pixels decoded across all frames of one animation (bounds the CPU time); past it, a
/// still.
pub const MAX_ANIMATION_PIXELS: u64 = 200_000_000;

/// A thumbnail of `original` for the box `width`x`height`. With `animated`, an animated GIF,
/// WebP or APNG gets an animated GIF thumbnail; without it the answer is never animated (the
/// spec's MUST NOT), so even an animation that fits the box becomes a still of its first frame.
pub fn make(
    original: &[u8],
    width: u32,
    height: u32,
    method: ThumbnailMethod,
    animated: bool,
) -> Result<Made, ThumbnailError> {
    let (source_width, source_height) = dimensions(original)?;
    let (reader, format) = reader(original)?;
    let fits = source_width <= width && source_height <= height;
    let may_animate = may_be_animated(original, format);
    if fits && (animated || !may_animate) {
        return Ok(Made::Original { content_type: content_type_of(format) });
    }
    if animated && may_animate {
        let pixels = u64::from(source_width) * u64::from(source_height);
        if let Some(thumbnail) = animated_thumbnail(original, format, width, height, method, pixels)? {
            return Ok(Made::Thumbnail(thumbnail));
        }
    }
    let image = reader.decode().map_err(classify)?;
    let resized = if fits { image } else { resize(image, width, height, method) };
    let (bytes, content_type) = encode(resized.clone(), format)?;
    Ok(Made::Thumbnail(Thumbnail { bytes, content_type, width: resized.width(), height: resized.height() }))
}

fn resize(image: DynamicImage, width: u32, height: u32, method: ThumbnailMethod) -> DynamicImage {
    match method {
        ThumbnailMethod::Crop => image.resize_to_fill(width, height, image::imageops::FilterType::Triangle),
        ThumbnailMethod::Scale => image.thumbnail(width, height),
    }
}

fn content_type_of(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Jpeg => "image/jpeg",
        ImageFormat::Gif => "image/gif",
        ImageFormat::WebP => "image/webp",
        _ => "image/png",
    }
}

/// Whether the image may hold more than one frame: every GIF (its frames are only counted by
/// decoding), a WebP with an animation chunk, an APNG.
fn may_be_animated(original: &[u8], format: ImageFormat) -> bool {
    match format {
        ImageFormat::Gif => true,
        ImageFormat::WebP => WebPDecoder::new(Cursor::new(original)).is_ok_and(|d| d.has_animation()),
        ImageFormat::Png => {
            PngDecoder::with_limits(Cursor::new(original), limits()).and_then(|d| d.is_apng()).unwrap_or(false)
        }
        _ => false,
    }
}

/// The frames of an animation, composited by the decoder, with their delays.
fn frames_of(original: &[u8], format: ImageFormat) -> Result<Frames<'_>, ImageError> {
    let cursor = Cursor::new(original);
    Ok(match format {
        ImageFormat::Gif => {
            let mut decoder = GifDecoder::new(cursor)?;
            decoder.set_limits(limits())?;
            decoder.into_frames()
        }
        ImageFormat::WebP => {
            let mut decoder = WebPDecoder::new(cursor)?;
            decoder.set_limits(limits())?;
            decoder.into_frames()
        }
        _ => PngDecoder::with_limits(cursor, limits())?.apng()?.into_frames(),
    })
}

/// An animated GIF thumbnail, or `None` when the source has a single frame or is over the
/// animation limits (then the caller makes a still).
fn animated_thumbnail(
    original: &[u8],
    format: ImageFormat,
    width: u32,
    height: u32,
    method: ThumbnailMethod,
    pixels_per_frame: u64,
) -> Result<Option<Thumbnail>, ThumbnailError> {
    let max_frames =
        usize::try_from(MAX_ANIMATION_PIXELS / pixels_per_frame.max(1)).unwrap_or(usize::MAX).min(MAX_ANIMATION_FRAMES);
    let mut frames = Vec::new();
    for frame in frames_of(original, format).map_err(classify)? {
        if frames.len() == max_frames {
            return Ok(None);
        }
        let frame = frame.map_err(classify)?;
        let delay = frame.delay();
        let resized = resize(DynamicImage::ImageRgba8(frame.into_buffer()), width, height, method).to_rgba8();
        frames.push(Frame::from_parts(resized, 0, 0, delay));
    }
    if frames.len() < 2 {
        return Ok(None);
    }
    let (out_width, out_height) = frames[0].buffer().dimensions();
    let mut out = Vec::new();
    {
        // Speed 10 of 30: a fair palette at a fraction of the best quality's cost.
        let mut encoder = GifEncoder::new_with_speed(&mut out, 10);
        encoder.set_repeat(Repeat::Infinite).map_err(classify)?;
        encoder.encode_frames(frames).map_err(classify)?;
    }
    Ok(Some(Thumbnail { bytes: out, content_type: "image/gif", width: out_width, height: out_height }))
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
        let crop = thumbnail(make(&original, 96, 96, ThumbnailMethod::Crop, false).unwrap());
        assert_eq!((crop.width, crop.height, crop.content_type), (96, 96, "image/png"));
        let scale = thumbnail(make(&original, 320, 240, ThumbnailMethod::Scale, true).unwrap());
        assert_eq!((scale.width, scale.height), (320, 160));
        let decoded = image::load_from_memory(&scale.bytes).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (320, 160));
    }

    fn thumbnail(made: Made) -> Thumbnail {
        match made {
            Made::Thumbnail(thumbnail) => thumbnail,
            Made::Original { .. } => panic!("expected a thumbnail, got the original"),
        }
    }

    /// An animated GIF of `frames` frames, each a different colour.
    fn gif(width: u32, height: u32, frames: u8) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut encoder = GifEncoder::new(&mut out);
            encoder.set_repeat(Repeat::Infinite).unwrap();
            let frames = (0..frames).map(|i| {
                let buffer =
                    image::RgbaImage::from_pixel(width, height, image::Rgba([i.wrapping_mul(60), 0, 200, 255]));
                Frame::from_parts(buffer, 0, 0, image::Delay::from_numer_denom_ms(100, 1))
            });
            encoder.encode_frames(frames).unwrap();
        }
        out
    }

    fn frame_count(gif: &[u8]) -> usize {
        GifDecoder::new(Cursor::new(gif)).unwrap().into_frames().count()
    }

    #[test]
    fn an_animation_is_animated_only_when_asked() {
        let original = gif(200, 100, 3);
        let animated = thumbnail(make(&original, 96, 96, ThumbnailMethod::Crop, true).unwrap());
        assert_eq!((animated.content_type, animated.width, animated.height), ("image/gif", 96, 96));
        assert_eq!(frame_count(&animated.bytes), 3);

        let still = thumbnail(make(&original, 96, 96, ThumbnailMethod::Crop, false).unwrap());
        assert_eq!((still.content_type, still.width, still.height), ("image/png", 96, 96));
        assert_eq!(image::guess_format(&still.bytes).unwrap(), ImageFormat::Png);
    }

    #[test]
    fn an_animation_that_fits_is_served_whole_only_when_animation_is_asked_for() {
        let original = gif(30, 20, 2);
        assert!(matches!(
            make(&original, 32, 32, ThumbnailMethod::Crop, true).unwrap(),
            Made::Original { content_type: "image/gif" }
        ));
        let still = thumbnail(make(&original, 32, 32, ThumbnailMethod::Crop, false).unwrap());
        assert_eq!((still.content_type, still.width, still.height), ("image/png", 30, 20));
    }

    #[test]
    fn a_still_asked_for_animated_is_a_still() {
        let one_frame = gif(200, 100, 1);
        let made = thumbnail(make(&one_frame, 96, 96, ThumbnailMethod::Crop, true).unwrap());
        assert_eq!(made.content_type, "image/png");
        let still = png(200, 100);
        assert_eq!(thumbnail(make(&still, 96, 96, ThumbnailMethod::Crop, true).unwrap()).content_type, "image/png");
    }

    #[test]
    fn a_small_original_is_its_own_thumbnail() {
        assert!(matches!(
            make(&png(20, 20), 32, 32, ThumbnailMethod::Crop, false).unwrap(),
            Made::Original { content_type: "image/png" }
        ));
    }

    #[test]
    fn not_an_image_and_a_bomb_get_no_thumbnail() {
        assert_eq!(
            make(b"hello, not an image", 32, 32, ThumbnailMethod::Crop, false).unwrap_err(),
            ThumbnailError::NotAnImage
        );
        let mut truncated = png(100, 100);
        truncated.truncate(60);
        assert!(make(&truncated, 32, 32, ThumbnailMethod::Crop, true).is_err());
        assert_eq!(
            make(&bomb_png(100_000, 100_000), 32, 32, ThumbnailMethod::Crop, false).unwrap_err(),
            ThumbnailError::TooLarge
        );
        // Within the dimension limit but over the allocation limit.
        assert_eq!(
            make(&bomb_png(11_000, 11_000), 32, 32, ThumbnailMethod::Crop, false).unwrap_err(),
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
