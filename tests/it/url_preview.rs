//! URL previews (`/preview_url`) against a small web server the test runs on loopback: Open
//! Graph tags and the page's image (stored as local media), the cache, the address policy
//! (loopback refused unless allowed, redirects checked), bounded bodies, non-HTML answers,
//! authentication, the per-user rate limit, and previews switched off.

use std::collections::HashMap;
use std::io::Cursor;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use lattice::Config;
use serde_json::Value;

use crate::support::{TestServer, assert_error};

/// A web server on loopback that counts the requests for each path.
struct Site {
    address: SocketAddr,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

const IMAGE_WIDTH: u32 = 64;
const IMAGE_HEIGHT: u32 = 48;

fn png() -> Vec<u8> {
    let image = image::RgbImage::from_fn(IMAGE_WIDTH, IMAGE_HEIGHT, |x, y| image::Rgb([x as u8, y as u8, 128]));
    let mut out = Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(image).write_to(&mut out, image::ImageFormat::Png).expect("encode PNG");
    out.into_inner()
}

const PAGE: &str = r#"<!doctype html>
<html><head>
<title>Fallback</title>
<meta property="og:title" content="The Lattice &amp; Friends">
<meta property="og:description" content="A page about previews">
<meta property="og:image" content="/image.png">
<meta property="og:type" content="website">
</head><body><h1>Hello</h1></body></html>"#;

const PLAIN_PAGE: &str = "<html><head><title>Only a title</title>\
    <meta name=\"description\" content=\"Described\"></head></html>";

fn answer(content_type: &'static str, body: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

impl Site {
    async fn start() -> Self {
        let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let counted = hits.clone();
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri, _headers: HeaderMap| {
            let hits = counted.clone();
            async move {
                *hits.lock().unwrap().entry(uri.path().to_owned()).or_default() += 1;
                match uri.path() {
                    "/page" => answer("text/html; charset=utf-8", PAGE.as_bytes().to_vec()),
                    "/plain" => answer("text/html", PLAIN_PAGE.as_bytes().to_vec()),
                    "/image.png" | "/direct.png" => answer("image/png", png()),
                    "/file.bin" => answer("application/octet-stream", vec![0u8; 100]),
                    "/big" => {
                        let mut page = String::from("<html><head><title>Big</title></head><body>");
                        page.push_str(&"x".repeat(64 * 1024));
                        answer("text/html", page.into_bytes())
                    }
                    "/to-page" => (StatusCode::FOUND, [(header::LOCATION, "/page")]).into_response(),
                    // IPv6 loopback: not in the allowed 127.0.0.0/8, so denied.
                    "/to-denied" => (StatusCode::FOUND, [(header::LOCATION, "http://[::1]:9/secret")]).into_response(),
                    "/slow" => {
                        tokio::time::sleep(Duration::from_secs(20)).await;
                        answer("text/html", PLAIN_PAGE.as_bytes().to_vec())
                    }
                    "/gone" => StatusCode::NOT_FOUND.into_response(),
                    _ => StatusCode::NOT_FOUND.into_response(),
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the test site");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { address, hits }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    fn total_hits(&self) -> usize {
        self.hits.lock().unwrap().values().sum()
    }
}

fn enable_previews(config: &mut Config, allow_loopback: bool) {
    config.media.url_preview.enabled = true;
    config.media.url_preview.max_page_size = 16 * 1024;
    config.media.url_preview.timeout = "2s".into();
    if allow_loopback {
        config.media.url_preview.ip_range_allow = vec!["127.0.0.0/8".into()];
    }
}

async fn preview(server: &TestServer, token: Option<&str>, url: &str) -> (reqwest::StatusCode, Value) {
    let query = format!("url={}", percent_encoding::utf8_percent_encode(url, percent_encoding::NON_ALPHANUMERIC));
    server.http.get(&format!("/_matrix/client/v1/media/preview_url?{query}"), token).await
}

#[tokio::test]
async fn a_page_is_previewed_with_its_image_then_served_from_the_cache() {
    let site = Site::start().await;
    let server = TestServer::start_with(|c| enable_previews(c, true)).await;
    let alice = server.register("alice", "password").await;

    let (status, body) = preview(&server, Some(&alice), &site.url("/page")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["og:title"], "The Lattice & Friends");
    assert_eq!(body["og:description"], "A page about previews");
    assert_eq!(body["og:type"], "website");
    assert_eq!(body["og:image:type"], "image/png");
    assert_eq!(body["og:image:width"], IMAGE_WIDTH);
    assert_eq!(body["og:image:height"], IMAGE_HEIGHT);
    assert_eq!(body["matrix:image:size"], png().len());
    let mxc = body["og:image"].as_str().expect("og:image");
    let path = mxc.strip_prefix("mxc://").expect("an mxc:// URI");
    assert!(path.starts_with("hs1.localhost/"), "{mxc}");
    assert_eq!((site.hits("/page"), site.hits("/image.png")), (1, 1));

    // The image is local media now: it downloads, byte for byte.
    let download = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{}/_matrix/client/v1/media/download/{path}", server.base_url()))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(download.status(), 200);
    assert_eq!(download.bytes().await.unwrap().to_vec(), png());

    // The second request (another user, a fragment, the legacy path) is the cache's.
    let bob = server.register("bob", "password").await;
    let (status, again) = preview(&server, Some(&bob), &format!("{}#section", site.url("/page"))).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again, body);
    let query = format!(
        "url={}&ts=1510610716656",
        percent_encoding::utf8_percent_encode(&site.url("/page"), percent_encoding::NON_ALPHANUMERIC)
    );
    let (status, legacy) = server.http.get(&format!("/_matrix/media/v3/preview_url?{query}"), Some(&bob)).await;
    assert_eq!(status, 200, "{legacy}");
    assert_eq!(legacy, body);
    assert_eq!((site.hits("/page"), site.hits("/image.png")), (1, 1), "served from the cache");

    // A redirect inside the allowed range is followed.
    let (status, redirected) = preview(&server, Some(&alice), &site.url("/to-page")).await;
    assert_eq!(status, 200, "{redirected}");
    assert_eq!(redirected["og:title"], "The Lattice & Friends");
    assert_eq!(site.hits("/page"), 2);
    server.stop().await;
}

#[tokio::test]
async fn fallbacks_images_and_other_content_types() {
    let site = Site::start().await;
    let server = TestServer::start_with(|c| enable_previews(c, true)).await;
    let alice = server.register("alice", "password").await;

    let (status, plain) = preview(&server, Some(&alice), &site.url("/plain")).await;
    assert_eq!(status, 200, "{plain}");
    assert_eq!(plain["og:title"], "Only a title");
    assert_eq!(plain["og:description"], "Described");
    assert!(plain.get("og:image").is_none());

    // An image URL is previewed as the image itself.
    let (status, direct) = preview(&server, Some(&alice), &site.url("/direct.png")).await;
    assert_eq!(status, 200, "{direct}");
    assert!(direct["og:image"].as_str().unwrap().starts_with("mxc://hs1.localhost/"));
    assert_eq!(direct["og:image:width"], IMAGE_WIDTH);
    assert_eq!(direct["matrix:image:size"], png().len());

    // Neither HTML nor an image: an empty preview, the body never read as a page.
    let (status, binary) = preview(&server, Some(&alice), &site.url("/file.bin")).await;
    assert_eq!(status, 200, "{binary}");
    assert_eq!(binary, serde_json::json!({}));

    // Larger than max_page_size: refused, not parsed.
    let (status, big) = preview(&server, Some(&alice), &site.url("/big")).await;
    assert_eq!(status, 502, "{big}");
    assert_eq!(big["errcode"], "M_UNKNOWN");

    // The page's server answers 404: the preview fails as another server's failure.
    assert_error(&preview(&server, Some(&alice), &site.url("/gone")).await, 502, "M_UNKNOWN");
    // Too slow: 504.
    assert_error(&preview(&server, Some(&alice), &site.url("/slow")).await, 504, "M_UNKNOWN");
    server.stop().await;
}

#[tokio::test]
async fn private_addresses_are_refused_before_any_request() {
    let site = Site::start().await;
    // Previews on, but no allow list: loopback is denied like any private range.
    let strict = TestServer::start_with(|c| enable_previews(c, false)).await;
    let alice = strict.register("alice", "password").await;
    for url in [site.url("/page"), format!("http://localhost:{}/page", site.address.port())] {
        let answer = preview(&strict, Some(&alice), &url).await;
        assert_error(&answer, 403, "M_FORBIDDEN");
        assert!(answer.1["error"].as_str().unwrap().contains("IP address blocked"), "{}", answer.1);
    }
    assert_eq!(site.total_hits(), 0, "the test site saw no request");
    strict.stop().await;

    // Loopback allowed: a redirect from there to a denied address is still refused.
    let server = TestServer::start_with(|c| enable_previews(c, true)).await;
    let bob = server.register("bob", "password").await;
    assert_error(&preview(&server, Some(&bob), &site.url("/to-denied")).await, 403, "M_FORBIDDEN");
    assert_eq!(site.hits("/to-denied"), 1);
    assert_eq!(site.hits("/secret"), 0);
    server.stop().await;
}

#[tokio::test]
async fn bad_requests_authentication_and_previews_off() {
    let site = Site::start().await;
    let server = TestServer::start_with(|c| enable_previews(c, true)).await;
    let alice = server.register("alice", "password").await;
    assert_error(&preview(&server, None, &site.url("/page")).await, 401, "M_MISSING_TOKEN");
    assert_error(
        &server.http.get(&format!("/_matrix/media/v3/preview_url?url={}", site.url("/page")), None).await,
        401,
        "M_MISSING_TOKEN",
    );
    assert_error(&server.http.get("/_matrix/client/v1/media/preview_url", Some(&alice)).await, 400, "M_MISSING_PARAM");
    for bad in ["ftp://example.org/file", "file:///etc/passwd", "not a url", "http://user:pw@example.org/"] {
        assert_error(&preview(&server, Some(&alice), bad).await, 400, "M_INVALID_PARAM");
    }
    assert_error(
        &server
            .http
            .get("/_matrix/client/v1/media/preview_url?url=http%3A%2F%2Fa.example%2F&ts=yesterday", Some(&alice))
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_eq!(site.total_hits(), 0);
    server.stop().await;

    // Off (the default): the endpoint is not offered, and nothing is fetched.
    let off = TestServer::start().await;
    let bob = off.register("bob", "password").await;
    assert_error(&preview(&off, Some(&bob), &site.url("/page")).await, 404, "M_UNRECOGNIZED");
    assert_eq!(site.total_hits(), 0);
    off.stop().await;
}

#[tokio::test]
async fn previews_are_rate_limited_per_user() {
    let site = Site::start().await;
    let server = TestServer::start_with(|c| {
        enable_previews(c, true);
        c.rate_limits.enabled = true;
        c.rate_limits.registration_per_ip = lattice::config::RateConfig { per_second: 100.0, burst: 100 };
        c.rate_limits.url_preview_per_user = lattice::config::RateConfig { per_second: 0.001, burst: 2 };
    })
    .await;
    let alice = server.register("alice", "password").await;
    let bob = server.register("bob", "password").await;
    for _ in 0..2 {
        assert_eq!(preview(&server, Some(&alice), &site.url("/plain")).await.0, 200);
    }
    let limited = preview(&server, Some(&alice), &site.url("/plain")).await;
    assert_error(&limited, 429, "M_LIMIT_EXCEEDED");
    assert_eq!(preview(&server, Some(&bob), &site.url("/plain")).await.0, 200, "bob has his own bucket");
    server.stop().await;
}
