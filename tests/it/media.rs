//! Media (issue #14): uploads and authenticated downloads through `matrix-sdk` and raw HTTP,
//! thumbnails of real images, the legacy endpoints frozen, async uploads, bad input (too
//! large, unknown, malformed, not an image, a decompression bomb), other servers' media over
//! federation, and a `kill -9` during an upload.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::time::Duration;

use matrix_sdk::Client;
use matrix_sdk::media::{MediaFormat, MediaRequestParameters};
use matrix_sdk::ruma::events::room::MediaSource;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::federation_keys::Network;
use crate::support::{ProcessServer, TestServer, assert_error};

/// Raw media requests (the support client speaks JSON only).
struct Raw {
    base: String,
    client: reqwest::Client,
}

struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    bytes: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes).unwrap_or_else(|_| json!({ "raw": String::from_utf8_lossy(&self.bytes) }))
    }

    fn error(&self) -> (StatusCode, Value) {
        (self.status, self.json())
    }

    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
}

impl Raw {
    fn new(base: &str) -> Self {
        let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(60)).build().expect("client");
        Self { base: base.to_owned(), client }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
    ) -> Answer {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some((content_type, bytes)) = body {
            request = request.header("content-type", content_type).body(bytes);
        }
        let response = request.send().await.expect("request sent");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("body").to_vec();
        Answer { status, headers, bytes }
    }

    async fn get(&self, path: &str, token: Option<&str>) -> Answer {
        self.send(reqwest::Method::GET, path, token, None).await
    }

    /// Uploads `bytes`; returns the `mxc://` URI.
    async fn upload(&self, token: &str, content_type: &str, filename: &str, bytes: Vec<u8>) -> String {
        let path = format!("/_matrix/media/v3/upload?filename={filename}");
        let answer = self.send(reqwest::Method::POST, &path, Some(token), Some((content_type, bytes))).await;
        assert_eq!(answer.status, 200, "{}", answer.json());
        answer.json()["content_uri"].as_str().expect("content_uri").to_owned()
    }
}

/// `mxc://server/id` → `server/id`.
fn mxc_path(uri: &str) -> &str {
    uri.strip_prefix("mxc://").expect("an mxc URI")
}

fn image_bytes(width: u32, height: u32, format: image::ImageFormat) -> Vec<u8> {
    let image = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    }));
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).expect("encode");
    out.into_inner()
}

/// A PNG whose header claims `width`x`height` over a few bytes of data: a decompression bomb.
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
        let body = [kind, data].concat();
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let ihdr = [width.to_be_bytes().as_slice(), &height.to_be_bytes(), &[8, 2, 0, 0, 0]].concat();
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &[0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01]);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// Every file under the media directory but unfinished uploads in `tmp/`.
fn stored_blobs(media_dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() { walk(&path, out) } else { out.push(path) }
        }
    }
    let mut files = Vec::new();
    walk(media_dir, &mut files);
    files.retain(|p| !p.starts_with(media_dir.join("tmp")));
    files
}

fn all_files(media_dir: &Path) -> Vec<PathBuf> {
    let mut files = stored_blobs(media_dir);
    if let Ok(entries) = std::fs::read_dir(media_dir.join("tmp")) {
        files.extend(entries.flatten().map(|e| e.path()));
    }
    files
}

async fn sdk_client(server: &TestServer, user: &str) -> Client {
    let client = Client::builder().homeserver_url(server.base_url()).build().await.expect("client builds");
    client.matrix_auth().login_username(user, "pw").send().await.expect("login");
    client
}

#[tokio::test]
async fn unauthenticated_unknown_and_malformed_media_requests_are_refused() {
    let server = TestServer::start().await;
    let token = server.register("alice", "pw").await;
    let raw = Raw::new(server.base_url());
    let uri = raw.upload(&token, "text/plain", "a.txt", b"hello".to_vec()).await;
    let path = mxc_path(&uri);

    // The authenticated endpoint wants a token; the legacy one does not serve new media.
    assert_error(
        &raw.get(&format!("/_matrix/client/v1/media/download/{path}"), None).await.error(),
        401,
        "M_MISSING_TOKEN",
    );
    assert_error(&raw.get(&format!("/_matrix/media/v3/download/{path}"), None).await.error(), 404, "M_NOT_FOUND");
    assert_error(
        &raw.get(&format!("/_matrix/media/v3/thumbnail/{path}?width=32&height=32"), None).await.error(),
        404,
        "M_NOT_FOUND",
    );
    let upload =
        raw.send(reqwest::Method::POST, "/_matrix/media/v3/upload", None, Some(("text/plain", b"x".to_vec()))).await;
    assert_error(&upload.error(), 401, "M_MISSING_TOKEN");

    // Unknown media, malformed IDs and server names.
    let unknown = format!("/_matrix/client/v1/media/download/{}/{}", server.server_name, "A".repeat(32));
    assert_error(&raw.get(&unknown, Some(&token)).await.error(), 404, "M_NOT_FOUND");
    let bad_id = format!("/_matrix/client/v1/media/download/{}/bad%20id", server.server_name);
    assert_error(&raw.get(&bad_id, Some(&token)).await.error(), 400, "M_INVALID_PARAM");
    assert_error(
        &raw.get("/_matrix/client/v1/media/download/bad%20server/abc", Some(&token)).await.error(),
        400,
        "M_INVALID_PARAM",
    );
    // Another server's media, with federation off: not found (nothing is fetched).
    assert_error(
        &raw.get("/_matrix/client/v1/media/download/elsewhere.test/abcdef", Some(&token)).await.error(),
        404,
        "M_NOT_FOUND",
    );
    let thumb = format!("/_matrix/client/v1/media/thumbnail/{path}?width=32&height=32&method=sideways");
    assert_error(&raw.get(&thumb, Some(&token)).await.error(), 400, "M_INVALID_PARAM");
    // URL previews are not built.
    assert_error(
        &raw.get("/_matrix/client/v1/media/preview_url?url=http://127.0.0.1/", Some(&token)).await.error(),
        404,
        "M_UNRECOGNIZED",
    );

    let config = raw.get("/_matrix/client/v1/media/config", Some(&token)).await;
    assert_eq!(config.json()["m.upload.size"], 50 << 20, "{}", config.json());
    server.stop().await;
}

#[tokio::test]
async fn oversized_uploads_are_refused_while_streaming_and_leave_no_file() {
    let dir_probe = std::sync::Arc::new(std::sync::Mutex::new(PathBuf::new()));
    let probe = dir_probe.clone();
    let server = TestServer::start_with(move |config| {
        config.media.max_upload_size = 1 << 20;
        config.media.max_user_bytes = Some(3 << 20);
        *probe.lock().unwrap() = config.data_dir.join("media");
    })
    .await;
    let media_dir = dir_probe.lock().unwrap().clone();
    let token = server.register("alice", "pw").await;
    let raw = Raw::new(server.base_url());

    // Declared too large, and streamed too large without a length.
    let too_big = vec![7u8; (1 << 20) + 1];
    let answer = raw
        .send(
            reqwest::Method::POST,
            "/_matrix/media/v3/upload",
            Some(&token),
            Some(("application/octet-stream", too_big)),
        )
        .await;
    assert_error(&answer.error(), 413, "M_TOO_LARGE");
    // Chunked, with no length to refuse up front: the server stops reading at the limit.
    let mut stream =
        start_request(&raw.base, "POST", "/_matrix/media/v3/upload", &token, "transfer-encoding: chunked").await;
    let chunk = [format!("{:x}\r\n", 64 * 1024).into_bytes(), vec![1u8; 64 * 1024], b"\r\n".to_vec()].concat();
    for _ in 0..40 {
        if stream.write_all(&chunk).await.is_err() {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("M_TOO_LARGE"), "{answer}");
    assert!(all_files(&media_dir).is_empty(), "no file left: {:?}", all_files(&media_dir));

    // The quota: three 1 MiB uploads fit in 3 MiB, a fourth byte does not.
    for i in 0..3 {
        raw.upload(&token, "application/octet-stream", "x.bin", vec![i; 1 << 20]).await;
    }
    let over = raw
        .send(reqwest::Method::POST, "/_matrix/media/v3/upload", Some(&token), Some(("text/plain", b"x".to_vec())))
        .await;
    assert_error(&over.error(), 403, "M_FORBIDDEN");
    assert_eq!(stored_blobs(&media_dir).len(), 3);
    server.stop().await;
}

#[tokio::test]
async fn async_uploads_belong_to_their_creator_and_happen_once() {
    let server = TestServer::start().await;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let raw = Raw::new(server.base_url());
    let created = raw.send(reqwest::Method::POST, "/_matrix/media/v1/create", Some(&alice), None).await;
    assert_eq!(created.status, 200, "{}", created.json());
    let uri = created.json()["content_uri"].as_str().unwrap().to_owned();
    assert!(created.json()["unused_expires_at"].as_u64().is_some());
    let path = mxc_path(&uri).to_owned();
    let media_id = path.split('/').nth(1).unwrap().to_owned();
    assert!(media_id.len() >= 24, "{media_id}");

    // Not uploaded yet: a download waits, then answers 504 M_NOT_YET_UPLOADED.
    let early = raw.get(&format!("/_matrix/client/v1/media/download/{path}?timeout_ms=300"), Some(&alice)).await;
    assert_error(&early.error(), 504, "M_NOT_YET_UPLOADED");

    let put = |token: String, bytes: &'static [u8]| {
        let raw = Raw::new(&raw.base);
        let path = path.clone();
        async move {
            raw.send(
                reqwest::Method::PUT,
                &format!("/_matrix/media/v3/upload/{path}"),
                Some(&token),
                Some(("text/plain", bytes.to_vec())),
            )
            .await
        }
    };
    assert_error(&put(bob.clone(), b"bob's").await.error(), 403, "M_FORBIDDEN");
    let first = put(alice.clone(), b"alice's").await;
    assert_eq!(first.status, 200, "{}", first.json());
    assert_error(&put(alice.clone(), b"again").await.error(), 409, "M_CANNOT_OVERWRITE_MEDIA");
    let unknown = format!("/_matrix/media/v3/upload/{}/{}", server.server_name, "Z".repeat(32));
    let answer = raw.send(reqwest::Method::PUT, &unknown, Some(&alice), Some(("text/plain", b"x".to_vec()))).await;
    assert_error(&answer.error(), 404, "M_NOT_FOUND");

    let got = raw.get(&format!("/_matrix/client/v1/media/download/{path}"), Some(&bob)).await;
    assert_eq!((got.status, got.bytes.as_slice()), (StatusCode::OK, b"alice's".as_slice()));
    server.stop().await;
}

#[tokio::test]
async fn downloads_carry_safe_headers() {
    let server = TestServer::start().await;
    let token = server.register("alice", "pw").await;
    let raw = Raw::new(server.base_url());
    let html = raw.upload(&token, "text/html", "page.html", b"<script>alert(1)</script>".to_vec()).await;
    let answer = raw.get(&format!("/_matrix/client/v1/media/download/{}", mxc_path(&html)), Some(&token)).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-disposition"), "attachment; filename=\"page.html\"");
    assert!(answer.header("content-security-policy").starts_with("sandbox; default-src 'none'; script-src 'none';"));
    assert_eq!(answer.header("x-content-type-options"), "nosniff");
    assert_eq!(answer.header("cross-origin-resource-policy"), "cross-origin");

    let png = raw.upload(&token, "image/png", "p%C3%A9.png", image_bytes(4, 4, image::ImageFormat::Png)).await;
    let named = format!("/_matrix/client/v1/media/download/{}/other.png", mxc_path(&png));
    let answer = raw.get(&named, Some(&token)).await;
    assert_eq!(answer.header("content-type"), "image/png");
    assert_eq!(answer.header("content-disposition"), "inline; filename=\"other.png\"");
    let answer = raw.get(&format!("/_matrix/client/v1/media/download/{}", mxc_path(&png)), Some(&token)).await;
    assert_eq!(answer.header("content-disposition"), "inline; filename=\"p_.png\"; filename*=utf-8''p%C3%A9.png");
    server.stop().await;
}

#[tokio::test]
async fn matrix_sdk_uploads_and_downloads_byte_exact_in_several_sizes() {
    let server = TestServer::start().await;
    server.register("alice", "pw").await;
    let client = sdk_client(&server, "alice").await;
    for size in [0usize, 1, 1 << 20, 10 << 20] {
        let data: Vec<u8> = (0..size).map(|i| (i * 31 % 253) as u8).collect();
        let uploaded = client
            .media()
            .upload(&mime::APPLICATION_OCTET_STREAM, data.clone(), None)
            .await
            .unwrap_or_else(|e| panic!("upload of {size} bytes: {e}"));
        let request =
            MediaRequestParameters { source: MediaSource::Plain(uploaded.content_uri), format: MediaFormat::File };
        let got = client.media().get_media_content(&request, false).await.expect("download");
        assert!(got == data, "{size} bytes came back different ({} bytes)", got.len());
    }
    server.stop().await;
}

#[tokio::test]
async fn thumbnails_of_real_png_and_jpeg_have_the_asked_dimensions() {
    let server = TestServer::start().await;
    let token = server.register("alice", "pw").await;
    let raw = Raw::new(server.base_url());
    for (format, content_type) in [(image::ImageFormat::Png, "image/png"), (image::ImageFormat::Jpeg, "image/jpeg")] {
        let uri = raw.upload(&token, content_type, "photo", image_bytes(1200, 900, format)).await;
        let path = mxc_path(&uri);
        for (query, expected) in [
            ("width=32&height=32&method=crop", (32, 32)),
            ("width=96&height=96&method=crop", (96, 96)),
            ("width=320&height=240&method=scale", (320, 240)),
            ("width=640&height=480", (640, 480)),
            ("width=800&height=600&method=scale", (800, 600)),
        ] {
            for _ in 0..2 {
                // The second answer comes from the stored thumbnail.
                let answer = raw.get(&format!("/_matrix/client/v1/media/thumbnail/{path}?{query}"), Some(&token)).await;
                assert_eq!(answer.status, 200, "{query}: {}", answer.json());
                assert_eq!(answer.header("content-type"), content_type);
                let decoded = image::load_from_memory(&answer.bytes).expect("a thumbnail decodes");
                assert_eq!((decoded.width(), decoded.height()), expected, "{content_type} {query}");
            }
        }
    }
    // An original smaller than asked is its own thumbnail.
    let small = image_bytes(20, 10, image::ImageFormat::Png);
    let uri = raw.upload(&token, "image/png", "small.png", small.clone()).await;
    let answer = raw
        .get(
            &format!("/_matrix/client/v1/media/thumbnail/{}?width=96&height=96&method=crop", mxc_path(&uri)),
            Some(&token),
        )
        .await;
    assert_eq!((answer.status, &answer.bytes), (StatusCode::OK, &small));
    server.stop().await;
}

/// An animated GIF of `frames` differently coloured frames.
fn animated_gif(width: u32, height: u32, frames: u8) -> Vec<u8> {
    use image::AnimationDecoder as _;
    let mut out = Vec::new();
    {
        let mut encoder = image::codecs::gif::GifEncoder::new(&mut out);
        encoder.set_repeat(image::codecs::gif::Repeat::Infinite).expect("repeat");
        let frames = (0..frames).map(|i| {
            let buffer = image::RgbaImage::from_pixel(width, height, image::Rgba([i.wrapping_mul(70), 20, 180, 255]));
            image::Frame::from_parts(buffer, 0, 0, image::Delay::from_numer_denom_ms(80, 1))
        });
        encoder.encode_frames(frames).expect("encode");
    }
    let count = image::codecs::gif::GifDecoder::new(Cursor::new(&out)).expect("gif").into_frames().count();
    assert_eq!(count, usize::from(frames));
    out
}

fn gif_frames(bytes: &[u8]) -> usize {
    use image::AnimationDecoder as _;
    image::codecs::gif::GifDecoder::new(Cursor::new(bytes)).expect("a GIF").into_frames().count()
}

#[tokio::test]
async fn animated_thumbnails_only_when_asked_and_never_otherwise() {
    let server = TestServer::start().await;
    let token = server.register("alice", "pw").await;
    let raw = Raw::new(server.base_url());
    let thumbnail = |path: String, query: &'static str| {
        let raw = &raw;
        let token = &token;
        async move { raw.get(&format!("/_matrix/client/v1/media/thumbnail/{path}?{query}"), Some(token)).await }
    };

    let big = raw.upload(&token, "image/gif", "dance.gif", animated_gif(400, 300, 4)).await;
    let animated = thumbnail(mxc_path(&big).to_owned(), "width=96&height=96&method=crop&animated=true").await;
    assert_eq!(animated.status, 200, "{}", animated.json());
    assert_eq!(animated.header("content-type"), "image/gif");
    assert_eq!(animated.header("content-disposition"), "inline; filename=\"thumbnail.gif\"");
    assert_eq!(gif_frames(&animated.bytes), 4);
    let decoded = image::load_from_memory(&animated.bytes).expect("decodes");
    assert_eq!((decoded.width(), decoded.height()), (96, 96));
    for query in ["width=96&height=96&method=crop", "width=96&height=96&method=crop&animated=false"] {
        let still = thumbnail(mxc_path(&big).to_owned(), query).await;
        assert_eq!((still.status, still.header("content-type")), (StatusCode::OK, "image/png"), "{query}");
        assert_eq!(still.header("content-disposition"), "inline; filename=\"thumbnail.png\"");
    }

    // Smaller than the box: the original is the animated answer, and a still otherwise (the
    // spec's MUST NOT when animation is not asked for).
    let small_gif = animated_gif(30, 20, 3);
    let small = raw.upload(&token, "image/gif", "small.gif", small_gif.clone()).await;
    let whole = thumbnail(mxc_path(&small).to_owned(), "width=96&height=96&method=crop&animated=true").await;
    assert_eq!((whole.status, &whole.bytes), (StatusCode::OK, &small_gif));
    let still = thumbnail(mxc_path(&small).to_owned(), "width=96&height=96&method=crop").await;
    assert_eq!(still.header("content-type"), "image/png");
    let decoded = image::load_from_memory(&still.bytes).expect("decodes");
    assert_eq!((decoded.width(), decoded.height()), (30, 20));

    // A JPEG asked for animated is answered as without.
    let photo = raw.upload(&token, "image/jpeg", "photo.jpg", image_bytes(400, 300, image::ImageFormat::Jpeg)).await;
    let answer = thumbnail(mxc_path(&photo).to_owned(), "width=96&height=96&method=crop&animated=true").await;
    assert_eq!((answer.status, answer.header("content-type")), (StatusCode::OK, "image/jpeg"));
    let bad = thumbnail(mxc_path(&photo).to_owned(), "width=96&height=96&animated=maybe").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    server.stop().await;
}

#[tokio::test]
async fn r0_media_paths_answer_as_v3() {
    let server = TestServer::start().await;
    let token = server.register("alice", "pw").await;
    let raw = Raw::new(server.base_url());
    let answer = raw
        .send(
            reqwest::Method::POST,
            "/_matrix/media/r0/upload?filename=a.txt",
            Some(&token),
            Some(("text/plain", b"hello r0".to_vec())),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.json());
    let uri = answer.json()["content_uri"].as_str().expect("content_uri").to_owned();
    let download = raw.get(&format!("/_matrix/client/v1/media/download/{}", mxc_path(&uri)), Some(&token)).await;
    assert_eq!(download.bytes, b"hello r0");
    let config = raw.get("/_matrix/media/r0/config", Some(&token)).await;
    assert_eq!(config.status, 200);
    assert!(config.json()["m.upload.size"].is_u64());
    // The r0 download is the legacy one: new media is frozen out of it, as under v3.
    let legacy = raw.get(&format!("/_matrix/media/r0/download/{}", mxc_path(&uri)), None).await;
    assert_error(&legacy.error(), 404, "M_NOT_FOUND");
    // Uploads to a reserved ID came after r0.
    let reserved = raw
        .send(reqwest::Method::PUT, &format!("/_matrix/media/r0/upload/{}", mxc_path(&uri)), Some(&token), None)
        .await;
    assert_error(&reserved.error(), 404, "M_UNRECOGNIZED");
    server.stop().await;
}

#[tokio::test]
async fn a_non_image_and_a_decompression_bomb_get_no_thumbnail_and_the_server_keeps_serving() {
    let server = TestServer::start().await;
    let token = server.register("alice", "pw").await;
    let raw = Raw::new(server.base_url());
    let text = raw.upload(&token, "image/png", "lie.png", b"this is not a picture".to_vec()).await;
    let answer = raw
        .get(&format!("/_matrix/client/v1/media/thumbnail/{}?width=32&height=32", mxc_path(&text)), Some(&token))
        .await;
    assert_error(&answer.error(), 400, "M_UNKNOWN");
    for (width, height) in [(100_000, 100_000), (11_000, 11_000)] {
        let bomb = raw.upload(&token, "image/png", "bomb.png", bomb_png(width, height)).await;
        let answer = raw
            .get(&format!("/_matrix/client/v1/media/thumbnail/{}?width=32&height=32", mxc_path(&bomb)), Some(&token))
            .await;
        assert_error(&answer.error(), 413, "M_TOO_LARGE");
    }
    let fine = raw.upload(&token, "image/png", "fine.png", image_bytes(100, 100, image::ImageFormat::Png)).await;
    let answer = raw
        .get(
            &format!("/_matrix/client/v1/media/thumbnail/{}?width=32&height=32&method=crop", mxc_path(&fine)),
            Some(&token),
        )
        .await;
    assert_eq!(answer.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn a_user_on_one_server_downloads_media_from_another_then_from_the_cache() {
    let net = Network::new(&["lat1.test", "lat2.test"]);
    let mut lat1 = net.start("lat1.test").await;
    let mut lat2 = net.start("lat2.test").await;
    let alice = lat1.register_user("alice").await;
    let bob = lat2.register_user("bob").await;
    let raw1 = Raw::new(&lat1.http.base);
    let png = image_bytes(400, 300, image::ImageFormat::Png);
    let uri = raw1.upload(&alice, "image/png", "cat.png", png.clone()).await;
    let path = mxc_path(&uri).to_owned();
    assert!(path.starts_with("lat1.test/"));

    // Over federation, unsigned: refused.
    let (status, _) = net
        .request(
            "lat1.test",
            reqwest::Method::GET,
            &format!("/_matrix/federation/v1/media/download/{}", &path[10..]),
            None,
            None,
        )
        .await;
    assert_eq!(status, 401);

    let raw2 = Raw::new(&lat2.http.base);
    let got = raw2.get(&format!("/_matrix/client/v1/media/download/{path}"), Some(&bob)).await;
    assert_eq!(got.status, 200, "{}", got.json());
    assert!(got.bytes == png, "the remote bytes arrive unchanged");
    assert_eq!(got.header("content-type"), "image/png");
    assert_eq!(got.header("content-disposition"), "inline; filename=\"cat.png\"");
    let thumb = raw2
        .get(&format!("/_matrix/client/v1/media/thumbnail/{path}?width=96&height=96&method=crop"), Some(&bob))
        .await;
    assert_eq!(thumb.status, 200, "{}", thumb.json());
    let decoded = image::load_from_memory(&thumb.bytes).expect("thumbnail decodes");
    assert_eq!((decoded.width(), decoded.height()), (96, 96));
    let unknown =
        raw2.get(&format!("/_matrix/client/v1/media/download/lat1.test/{}", "Q".repeat(32)), Some(&bob)).await;
    assert_error(&unknown.error(), 404, "M_NOT_FOUND");

    // lat1 goes away: lat2 serves both from its cache.
    lat1.stop().await;
    let again = raw2.get(&format!("/_matrix/client/v1/media/download/{path}"), Some(&bob)).await;
    assert_eq!(again.status, 200, "{}", again.json());
    assert!(again.bytes == png);
    let thumb = raw2.get(&format!("/_matrix/client/v1/media/thumbnail/{path}?width=320&height=240"), Some(&bob)).await;
    assert_eq!(thumb.status, 200, "{}", thumb.json());
    lat2.stop().await;
}

#[tokio::test]
async fn kill_9_during_an_upload_leaves_no_visible_partial_file_and_no_row() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = ProcessServer::start(dir.path()).await;
    let token =
        crate::support::register(&server.http, "alice", "pw", server.first_registration_token.as_deref().unwrap())
            .await["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
    let media_dir = dir.path().join("media");

    // A 40 MiB upload of which only 3 MiB are sent before the server is killed.
    let length = format!("content-length: {}", 40u64 << 20);
    let mut stream =
        start_request(&server.http.base, "POST", "/_matrix/media/v3/upload?filename=big.bin", &token, &length).await;
    for _ in 0..3 {
        stream.write_all(&vec![9u8; 1 << 20]).await.expect("the upload is being read");
    }
    // The server has the first bytes in its temporary file.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while all_files(&media_dir).is_empty() {
        assert!(std::time::Instant::now() < deadline, "the upload never reached the disk");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(stored_blobs(&media_dir).is_empty(), "nothing is visible before the upload completes");
    server.kill_9().await;
    drop(stream);

    // Opened again (as the server opens it): the unfinished file is gone, and no row counts it.
    {
        let config = crate::support::test_config(dir.path(), "hs1.localhost");
        let opened = lattice::open(&config).await.expect("open after the kill");
        let alice = ruma::UserId::parse("@alice:hs1.localhost").unwrap();
        assert_eq!(opened.service.media().used_bytes(&alice).await.unwrap(), 0);
        assert!(all_files(&media_dir).is_empty(), "left after restart: {:?}", all_files(&media_dir));
        let closed = opened.closed;
        drop(opened.service);
        closed.wait().await;
    }
    let server = ProcessServer::start(dir.path()).await;
    let raw = Raw::new(&server.http.base);
    let (status, login) = server.http.login("alice", "pw").await;
    assert_eq!(status, 200, "{login}");
    let token = login["access_token"].as_str().unwrap();
    let uri = raw.upload(token, "text/plain", "after.txt", b"after".to_vec()).await;
    assert_eq!(stored_blobs(&media_dir).len(), 1, "the upload after the restart is stored");
    let got = raw.get(&format!("/_matrix/client/v1/media/download/{}", mxc_path(&uri)), Some(token)).await;
    assert_eq!(got.bytes, b"after");
    server.kill_9().await;
}

/// An HTTP/1.1 request whose head is sent and whose body the caller writes as it likes.
async fn start_request(base: &str, method: &str, path: &str, token: &str, extra_header: &str) -> tokio::net::TcpStream {
    let address = base.strip_prefix("http://").expect("an http base URL");
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {address}\r\nauthorization: Bearer {token}\r\ncontent-type: application/octet-stream\r\nconnection: close\r\n{extra_header}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("request head sent");
    stream
}

#[tokio::test]
async fn operators_delete_media_and_purge_the_remote_cache_with_the_server_stopped() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = ProcessServer::start(dir.path()).await;
    let token =
        crate::support::register(&server.http, "alice", "pw", server.first_registration_token.as_deref().unwrap())
            .await["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
    let raw = Raw::new(&server.http.base);
    let kept = raw.upload(&token, "text/plain", "kept.txt", b"kept".to_vec()).await;
    let gone = raw.upload(&token, "text/plain", "gone.txt", b"gone".to_vec()).await;
    assert!(server.terminate().await);
    let media_dir = dir.path().join("media");
    assert_eq!(stored_blobs(&media_dir).len(), 2);

    let lattice = |args: &[&str]| {
        std::process::Command::new(crate::support::binary())
            .args(args)
            .envs(crate::support::process_env(dir.path(), "127.0.0.1:0".parse().unwrap()))
            .env_remove("LATTICE_CONFIG")
            .output()
            .expect("lattice runs")
    };
    let deleted = lattice(&["media", "delete", &gone]);
    assert!(deleted.status.success(), "{}", String::from_utf8_lossy(&deleted.stderr));
    assert_eq!(stored_blobs(&media_dir).len(), 1, "the deleted media's bytes are gone");
    let again = lattice(&["media", "delete", &gone]);
    assert!(!again.status.success(), "deleting it twice fails");
    assert!(!lattice(&["media", "delete", "mxc://hs1.localhost/bad id"]).status.success());
    let purged = lattice(&["media", "purge-remote", "--older-than", "0"]);
    assert!(purged.status.success(), "{}", String::from_utf8_lossy(&purged.stderr));
    assert!(String::from_utf8_lossy(&purged.stdout).contains("purged 0"));

    let server = ProcessServer::start(dir.path()).await;
    let (_, login) = server.http.login("alice", "pw").await;
    let token = login["access_token"].as_str().unwrap();
    let raw = Raw::new(&server.http.base);
    assert_eq!(
        raw.get(&format!("/_matrix/client/v1/media/download/{}", mxc_path(&kept)), Some(token)).await.bytes,
        b"kept"
    );
    let answer = raw.get(&format!("/_matrix/client/v1/media/download/{}", mxc_path(&gone)), Some(token)).await;
    assert_error(&answer.error(), 404, "M_NOT_FOUND");
    server.kill_9().await;
}
