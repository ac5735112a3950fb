//! Pure rules of serving media: which media IDs are valid, which content types a browser may
//! show inline, the `Content-Disposition` header, and which stored thumbnail size answers a
//! requested one.

use rand::Rng;

/// Media IDs this server makes: 32 characters of `[A-Za-z0-9]` (190 bits).
pub const MEDIA_ID_LENGTH: usize = 32;
/// The longest media ID accepted from a path (ours are 32; other servers' may be longer).
pub const MAX_MEDIA_ID_LENGTH: usize = 255;

pub fn new_media_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..MEDIA_ID_LENGTH).map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())])).collect()
}

/// The spec's media ID grammar: `[A-Za-z0-9_-]+` (it becomes a path segment and a key).
pub fn valid_media_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_MEDIA_ID_LENGTH
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Content types a browser may render inline from a media URL: images that cannot carry
/// script, plain text, and common audio and video. Never HTML, SVG, XML or JavaScript.
const INLINE_TYPES: &[&str] = &[
    "image/png",
    "image/apng",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "image/avif",
    "text/plain",
    "text/csv",
    "audio/mpeg",
    "audio/mp4",
    "audio/ogg",
    "audio/wav",
    "audio/webm",
    "audio/flac",
    "audio/aac",
    "audio/opus",
    "video/mp4",
    "video/webm",
    "video/ogg",
    "video/quicktime",
    "application/json",
    "application/ld+json",
];

/// The bare, lowercase type of a `Content-Type` value (`Text/Plain; charset=x` → `text/plain`).
pub fn essence(content_type: &str) -> String {
    content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase()
}

pub fn is_inline_safe(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| INLINE_TYPES.contains(&essence(ct).as_str()))
}

/// The `Content-Type` to answer with: the stored type when it is a plausible `type/subtype`
/// header value, else `application/octet-stream`. `text/plain` gets a charset so browsers do
/// not sniff one.
pub fn served_content_type(content_type: Option<&str>) -> String {
    let Some(ct) = content_type.map(str::trim).filter(|ct| valid_content_type(ct)) else {
        return "application/octet-stream".to_owned();
    };
    if essence(ct) == "text/plain" && !ct.to_ascii_lowercase().contains("charset") {
        return "text/plain; charset=utf-8".to_owned();
    }
    ct.to_owned()
}

/// A content type as uploaded: printable ASCII, `type/subtype`, at most 255 bytes.
pub fn valid_content_type(ct: &str) -> bool {
    ct.len() <= 255 && ct.bytes().all(|b| (0x20..0x7f).contains(&b)) && essence(ct).split_once('/').is_some()
}

/// `Content-Disposition`: `inline` only for the allow-list, `attachment` otherwise, with the
/// filename sanitised: path separators and control characters become `_`, quotes and
/// backslashes are dropped, and a non-ASCII name is sent as RFC 6266 / 8187 `filename*`
/// (UTF-8, percent-encoded) beside an ASCII fallback.
pub fn content_disposition(content_type: Option<&str>, filename: Option<&str>) -> String {
    let kind = if is_inline_safe(content_type) { "inline" } else { "attachment" };
    let Some(name) = filename.map(sanitise_filename).filter(|n| !n.is_empty()) else { return kind.to_owned() };
    if name.is_ascii() {
        return format!("{kind}; filename=\"{name}\"");
    }
    let fallback: String = name.chars().map(|c| if c.is_ascii() { c } else { '_' }).collect();
    let encoded: String = name
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!("{kind}; filename=\"{fallback}\"; filename*=utf-8''{encoded}")
}

/// A filename made safe for a header and a save dialog: at most 255 bytes.
pub fn sanitise_filename(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        let replaced = match c {
            '"' | '\\' => continue,
            '/' | ':' => '_',
            c if c.is_control() => '_',
            c => c,
        };
        if out.len() + replaced.len_utf8() > 255 {
            break;
        }
        out.push(replaced);
    }
    let trimmed = out.trim().trim_start_matches('.');
    trimmed.to_owned()
}

/// How a thumbnail fits the requested box.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThumbnailMethod {
    /// Fills the box exactly, cutting what is outside.
    Crop,
    /// Fits inside the box, keeping the aspect ratio.
    Scale,
}

impl ThumbnailMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            ThumbnailMethod::Crop => "crop",
            ThumbnailMethod::Scale => "scale",
        }
    }
}

/// The sizes thumbnails are made in (the sizes clients ask for, as Synapse's defaults are).
pub const THUMBNAIL_SIZES: &[(u32, u32, ThumbnailMethod)] = &[
    (32, 32, ThumbnailMethod::Crop),
    (96, 96, ThumbnailMethod::Crop),
    (320, 240, ThumbnailMethod::Scale),
    (640, 480, ThumbnailMethod::Scale),
    (800, 600, ThumbnailMethod::Scale),
];

/// The stored size answering a request: the smallest of the requested method at least as
/// large as asked in both dimensions, else the largest of that method; a crop request larger
/// than every crop size gets the smallest scale size covering it (the spec lets a server
/// answer with a different size and method).
pub fn choose_thumbnail_size(width: u32, height: u32, method: ThumbnailMethod) -> (u32, u32, ThumbnailMethod) {
    let covering = |m: ThumbnailMethod| {
        THUMBNAIL_SIZES.iter().copied().filter(|s| s.2 == m).find(|&(w, h, _)| w >= width && h >= height)
    };
    if let Some(size) = covering(method) {
        return size;
    }
    if let Some(size) = covering(ThumbnailMethod::Scale) {
        return size;
    }
    *THUMBNAIL_SIZES.last().expect("thumbnail sizes are not empty")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_ids_are_long_random_and_valid() {
        let a = new_media_id();
        assert_eq!(a.len(), MEDIA_ID_LENGTH);
        assert!(valid_media_id(&a));
        assert_ne!(a, new_media_id());
        for bad in ["", "a/b", "a b", "..", "é", &"a".repeat(256), "a%2F"] {
            assert!(!valid_media_id(bad), "{bad:?}");
        }
        assert!(valid_media_id("AQwafuaFswefuhsfAFAgsw-_9"));
    }

    #[test]
    fn only_the_allow_list_is_inline() {
        for ok in ["image/png", "IMAGE/JPEG", "text/plain; charset=utf-8", "video/mp4", "image/apng"] {
            assert!(is_inline_safe(Some(ok)), "{ok}");
        }
        for bad in [
            "text/html",
            "image/svg+xml",
            "application/javascript",
            "text/javascript",
            "application/xhtml+xml",
            "text/xml",
            "application/pdf",
            "",
        ] {
            assert!(!is_inline_safe(Some(bad)), "{bad}");
        }
        assert!(!is_inline_safe(None));
        assert_eq!(content_disposition(Some("text/html"), Some("a.html")), "attachment; filename=\"a.html\"");
        assert_eq!(content_disposition(Some("image/png"), None), "inline");
    }

    #[test]
    fn filenames_are_sanitised_and_non_ascii_uses_filename_star() {
        assert_eq!(
            content_disposition(Some("image/png"), Some("../../etc/pa\"ss\r\nwd.png")),
            "inline; filename=\"_.._etc_pass__wd.png\""
        );
        assert_eq!(
            content_disposition(Some("application/pdf"), Some("résumé.pdf")),
            "attachment; filename=\"r_sum_.pdf\"; filename*=utf-8''r%C3%A9sum%C3%A9.pdf"
        );
        assert_eq!(content_disposition(None, Some("  ")), "attachment");
        assert!(sanitise_filename(&"é".repeat(300)).len() <= 255);
        assert_eq!(served_content_type(Some("text/plain")), "text/plain; charset=utf-8");
        assert_eq!(served_content_type(Some("nonsense")), "application/octet-stream");
        assert_eq!(served_content_type(Some("image/png\r\nX-Evil: 1")), "application/octet-stream");
        assert_eq!(served_content_type(None), "application/octet-stream");
    }

    #[test]
    fn thumbnail_sizes_cover_the_request_when_they_can() {
        use ThumbnailMethod::*;
        assert_eq!(choose_thumbnail_size(32, 32, Crop), (32, 32, Crop));
        assert_eq!(choose_thumbnail_size(40, 40, Crop), (96, 96, Crop));
        assert_eq!(choose_thumbnail_size(1, 1, Scale), (320, 240, Scale));
        assert_eq!(choose_thumbnail_size(320, 240, Scale), (320, 240, Scale));
        assert_eq!(choose_thumbnail_size(321, 240, Scale), (640, 480, Scale));
        assert_eq!(choose_thumbnail_size(200, 200, Crop), (320, 240, Scale));
        assert_eq!(choose_thumbnail_size(5000, 5000, Scale), (800, 600, Scale));
        assert_eq!(choose_thumbnail_size(5000, 5000, Crop), (800, 600, Scale));
    }
}
