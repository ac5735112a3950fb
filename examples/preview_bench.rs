//! URL preview latency of the real `lattice` binary on loopback (issue #14): a small web server
//! in this process serves an HTML page with Open Graph tags and a 64×48 PNG; the server runs
//! with previews on and `127.0.0.0/8` allowed. Measured, each one request at a time:
//!
//! 1. cold previews of a page with an image (`/page?n=I`, a new URL each time: page fetch,
//!    parse, image fetch, image stored as media, cache row written);
//! 2. cold previews of a page without an image (`/plain?n=I`);
//! 3. the same URLs again: cache hits.
//!
//! Usage: `cargo run --release --example preview_bench -- [path/to/lattice] [--n N]`
//! (default binary: `$CARGO_TARGET_DIR/release/lattice`, N = 200). Prints a Markdown table.

#[path = "bench_support/mod.rs"]
mod bench_support;

use std::io::Cursor;
use std::time::{Duration, Instant};

use axum::http::header;
use axum::response::IntoResponse;
use serde_json::Value;

use bench_support::{BenchServer as Server, Error};

const PAGE: &str = r#"<!doctype html><html><head><title>Bench page</title>
<meta property="og:title" content="A page to preview">
<meta property="og:description" content="Open Graph tags and an image, as news sites have them">
<meta property="og:image" content="/image.png"><meta property="og:type" content="article">
</head><body><p>Some text.</p></body></html>"#;

const PLAIN: &str = "<html><head><title>Plain</title><meta name=\"description\" content=\"No image\"></head></html>";

fn png() -> Vec<u8> {
    let image = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8, y as u8, 99]));
    let mut out = Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(image).write_to(&mut out, image::ImageFormat::Png).expect("encode PNG");
    out.into_inner()
}

async fn start_site() -> Result<String, Error> {
    let image = png();
    let app = axum::Router::new()
        .route("/page", axum::routing::get(|| async { ([(header::CONTENT_TYPE, "text/html")], PAGE) }))
        .route("/plain", axum::routing::get(|| async { ([(header::CONTENT_TYPE, "text/html")], PLAIN) }))
        .route(
            "/image.png",
            axum::routing::get(move || {
                let image = image.clone();
                async move { ([(header::CONTENT_TYPE, "image/png")], image).into_response() }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{address}"))
}

impl Server {
    /// One preview; its latency.
    async fn preview(&self, token: &str, url: &str) -> Result<Duration, Error> {
        let started = Instant::now();
        let response = self
            .http
            .get(format!(
                "{}/_matrix/client/v1/media/preview_url?url={}",
                self.base,
                percent_encoding::utf8_percent_encode(url, percent_encoding::NON_ALPHANUMERIC)
            ))
            .bearer_auth(token)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        let elapsed = started.elapsed();
        if !status.is_success() || body.get("og:title").is_none() {
            return Err(format!("preview of {url}: {status} {body}").into());
        }
        Ok(elapsed)
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

async fn measure(server: &Server, token: &str, urls: &[String]) -> Result<(f64, f64, f64), Error> {
    let mut times = Vec::with_capacity(urls.len());
    for url in urls {
        times.push(server.preview(token, url).await?);
    }
    times.sort();
    Ok((percentile(&times, 0.5), percentile(&times, 0.9), percentile(&times, 0.99)))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let mut binary =
        format!("{}/release/lattice", std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".to_owned()));
    let mut n = 200usize;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--n" => n = args.next().ok_or("--n needs a number")?.parse()?,
            other => binary = other.to_owned(),
        }
    }
    let site = start_site().await?;
    let dir = tempfile::tempdir()?;
    let server = Server::start(
        &binary,
        dir.path(),
        &[
            ("LATTICE_MEDIA__URL_PREVIEW__ENABLED", "true".into()),
            ("LATTICE_MEDIA__URL_PREVIEW__IP_RANGE_ALLOW", "[\"127.0.0.0/8\"]".into()),
        ],
    )
    .await?;
    let token = server.register("bench").await?.0;
    let with_image: Vec<String> = (0..n).map(|i| format!("{site}/page?n={i}")).collect();
    let plain: Vec<String> = (0..n).map(|i| format!("{site}/plain?n={i}")).collect();

    let cold_image = measure(&server, &token, &with_image).await?;
    let cold_plain = measure(&server, &token, &plain).await?;
    let cached = measure(&server, &token, &with_image).await?;

    println!("| what ({n} requests, one at a time) | p50 | p90 | p99 |");
    println!("|---|---|---|---|");
    for (what, (p50, p90, p99)) in [
        ("cold: page + og:image fetched, image stored as media", cold_image),
        ("cold: page without image", cold_plain),
        ("cache hit", cached),
    ] {
        println!("| {what} | {p50:.2} ms | {p90:.2} ms | {p99:.2} ms |");
    }
    Ok(())
}
