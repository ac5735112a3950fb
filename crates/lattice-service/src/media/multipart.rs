//! The `multipart/mixed` answers of the federation media endpoints: the first part is JSON
//! metadata (`{}` today), the second the bytes (or a `Location` header, which this server
//! never sends). Written as a head and a tail around the streamed bytes; read incrementally, so
//! a remote file is never held whole in memory.

use rand::Rng;

/// The most bytes of a remote answer read before the second part's body starts.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

pub fn new_boundary() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..32).map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())])).collect()
}

/// Everything before the bytes: the metadata part and the second part's headers.
pub fn head(boundary: &str, content_type: &str, disposition: &str) -> Vec<u8> {
    format!(
        "--{boundary}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{boundary}\r\nContent-Type: {content_type}\r\nContent-Disposition: {disposition}\r\n\r\n"
    )
    .into_bytes()
}

/// Everything after the bytes.
pub fn tail(boundary: &str) -> Vec<u8> {
    format!("\r\n--{boundary}--\r\n").into_bytes()
}

/// The `boundary` parameter of a `multipart/mixed` content type.
pub fn boundary_of(content_type: &str) -> Option<String> {
    let mut params = content_type.split(';');
    if !params.next()?.trim().eq_ignore_ascii_case("multipart/mixed") {
        return None;
    }
    params
        .find_map(|p| {
            let (name, value) = p.split_once('=')?;
            name.trim().eq_ignore_ascii_case("boundary").then(|| value.trim().trim_matches('"').to_owned())
        })
        .filter(|b| !b.is_empty() && b.len() <= 70)
}

/// The `filename` of a `Content-Disposition` value (`filename*` UTF-8 preferred).
pub fn disposition_filename(value: &str) -> Option<String> {
    let mut plain = None;
    for param in value.split(';').skip(1) {
        let Some((name, raw)) = param.split_once('=') else { continue };
        let name = name.trim().to_ascii_lowercase();
        let raw = raw.trim();
        if name == "filename*" {
            let encoded = raw.strip_prefix("utf-8''").or_else(|| raw.strip_prefix("UTF-8''"))?;
            let bytes = percent_encoding::percent_decode_str(encoded).collect::<Vec<u8>>();
            if let Ok(name) = String::from_utf8(bytes) {
                return Some(name);
            }
        } else if name == "filename" {
            plain = Some(raw.trim_matches('"').to_owned());
        }
    }
    plain
}

/// The headers of the part holding the media.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PartHeaders {
    pub content_type: Option<String>,
    pub content_disposition: Option<String>,
    pub location: Option<String>,
}

/// An incremental reader of the answer: feed the head until it yields the media part's
/// headers, then feed body chunks, then `finish`.
pub struct MultipartReader {
    delimiter: Vec<u8>,
    buf: Vec<u8>,
    head_done: bool,
    finished: bool,
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_headers(block: &[u8]) -> Result<PartHeaders, String> {
    let text = std::str::from_utf8(block).map_err(|_| "part headers are not UTF-8".to_owned())?;
    let mut headers = PartHeaders::default();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or_else(|| format!("malformed part header {line:?}"))?;
        let value = Some(value.trim().to_owned());
        match name.trim().to_ascii_lowercase().as_str() {
            "content-type" => headers.content_type = value,
            "content-disposition" => headers.content_disposition = value,
            "location" => headers.location = value,
            _ => {}
        }
    }
    Ok(headers)
}

impl MultipartReader {
    pub fn new(boundary: &str) -> Self {
        // The stream is read as if it began with CRLF, so every delimiter is `CRLF--boundary`.
        Self {
            delimiter: format!("\r\n--{boundary}").into_bytes(),
            buf: b"\r\n".to_vec(),
            head_done: false,
            finished: false,
        }
    }

    /// Feeds bytes of the head; `Some` once the media part's headers are complete (its first
    /// body bytes stay buffered for [`MultipartReader::body`]).
    pub fn feed_head(&mut self, chunk: &[u8]) -> Result<Option<PartHeaders>, String> {
        self.buf.extend_from_slice(chunk);
        if self.buf.len() > MAX_HEAD_BYTES {
            return Err(format!("multipart head longer than {MAX_HEAD_BYTES} bytes"));
        }
        let d = &self.delimiter;
        // Delimiter, CRLF, metadata headers, CRLFCRLF, metadata, delimiter, CRLF, media
        // headers, CRLFCRLF.
        let Some(first) = find(&self.buf, d) else { return Ok(None) };
        let mut at = first + d.len();
        let Some(rest) = self.buf.get(at..at + 2) else { return Ok(None) };
        if rest != b"\r\n" {
            return Err("no metadata part".into());
        }
        at += 2;
        let Some(second) = find(&self.buf[at..], d) else { return Ok(None) };
        at += second + d.len();
        let Some(rest) = self.buf.get(at..at + 2) else { return Ok(None) };
        if rest != b"\r\n" {
            return Err("no media part".into());
        }
        at += 2;
        let Some(end) = find(&self.buf[at..], b"\r\n\r\n") else { return Ok(None) };
        let headers = parse_headers(&self.buf[at..at + end])?;
        self.buf.drain(..at + end + 4);
        self.head_done = true;
        Ok(Some(headers))
    }

    /// Feeds body bytes; returns those certainly part of the media (a possible delimiter's
    /// start is held back until the next chunk shows what it is).
    pub fn body(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.finished || !self.head_done {
            return Vec::new();
        }
        self.buf.extend_from_slice(chunk);
        if let Some(end) = find(&self.buf, &self.delimiter) {
            self.finished = true;
            let out = self.buf[..end].to_vec();
            self.buf.clear();
            return out;
        }
        let keep = (self.delimiter.len() - 1).min(self.buf.len());
        let out: Vec<u8> = self.buf.drain(..self.buf.len() - keep).collect();
        out
    }

    /// The end of the answer: the delimiter must have been seen.
    pub fn finish(self) -> Result<(), String> {
        if self.finished { Ok(()) } else { Err("multipart answer ended before its closing delimiter".into()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(answer: &[u8], boundary: &str, chunk: usize) -> (PartHeaders, Vec<u8>) {
        let mut reader = MultipartReader::new(boundary);
        let mut headers = None;
        let mut body = Vec::new();
        for piece in answer.chunks(chunk) {
            if headers.is_none() {
                headers = reader.feed_head(piece).unwrap();
                if headers.is_some() {
                    body.extend(reader.body(&[]));
                }
            } else {
                body.extend(reader.body(piece));
            }
        }
        reader.finish().unwrap();
        (headers.unwrap(), body)
    }

    #[test]
    fn what_is_written_reads_back_in_any_chunking() {
        let boundary = new_boundary();
        let bytes: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).chain(b"\r\n--almost".iter().copied()).collect();
        let mut answer = head(&boundary, "image/png", "inline; filename=\"a.png\"");
        answer.extend_from_slice(&bytes);
        answer.extend(tail(&boundary));
        for chunk in [1, 2, 7, 64, 4096, 100_000] {
            let (headers, body) = read_all(&answer, &boundary, chunk);
            assert_eq!(headers.content_type.as_deref(), Some("image/png"));
            assert_eq!(disposition_filename(headers.content_disposition.as_deref().unwrap()).as_deref(), Some("a.png"));
            assert_eq!(body, bytes, "chunk {chunk}");
        }
    }

    #[test]
    fn a_location_part_and_bad_answers() {
        let answer = b"--xyz\r\nContent-Type: application/json\r\n\r\n{}\r\n--xyz\r\nLocation: https://cdn.example/a\r\n\r\n\r\n--xyz--\r\n";
        let (headers, body) = read_all(answer, "xyz", 5);
        assert_eq!(headers.location.as_deref(), Some("https://cdn.example/a"));
        assert!(body.is_empty());
        let mut truncated = MultipartReader::new("xyz");
        let head_only =
            b"--xyz\r\nContent-Type: application/json\r\n\r\n{}\r\n--xyz\r\nContent-Type: image/png\r\n\r\n";
        assert!(truncated.feed_head(head_only).unwrap().is_some());
        assert_eq!(truncated.body(b"some bytes but no end"), b"some bytes but ".to_vec());
        assert!(truncated.finish().is_err());
        let mut huge = MultipartReader::new("xyz");
        assert!(huge.feed_head(&vec![b'a'; MAX_HEAD_BYTES + 1]).is_err());
        assert_eq!(boundary_of("multipart/mixed; boundary=\"abc\"").as_deref(), Some("abc"));
        assert_eq!(boundary_of("application/json"), None);
        assert_eq!(disposition_filename("attachment; filename*=utf-8''r%C3%A9.pdf").as_deref(), Some("ré.pdf"));
    }
}
