//! Media benchmark of the real `lattice` binary on loopback (issue #14):
//!
//! 1. upload of a `--mib N` file (default 100 MiB) through `POST /_matrix/media/v3/upload`:
//!    MB/s, and the server's peak RSS while it streams the body to disk;
//! 2. download of it through `GET /_matrix/client/v1/media/download`: MB/s and peak RSS;
//! 3. thumbnails: 20 distinct 1200x900 JPEG photos, each asked for in the five sizes clients use
//!    (2 concurrent clients): thumbnails generated per second; then the same requests again,
//!    answered from stored thumbnails;
//! 4. animated thumbnails: 10 distinct 400x300 animated GIFs of 10 frames, each asked for as an
//!    animated 96x96 crop (2 concurrent clients): animated thumbnails generated per second.
//!
//! With `LATTICE_MEDIA__S3__*` set in the environment (docs/media.md) the server stores media in
//! that bucket, and the figures are the S3 backend's.
//!
//! Usage: `cargo run --release --example media_bench -- [path/to/lattice] [--mib N]`
//! (default binary: `$CARGO_TARGET_DIR/release/lattice`). Prints a Markdown table.

#[path = "bench_support/mod.rs"]
mod bench_support;

use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use bench_support::{BenchServer as Server, Error};

impl Server {
    async fn upload(&self, token: &str, content_type: &str, bytes: Vec<u8>) -> Result<String, Error> {
        let response = self
            .http
            .post(format!("{}/_matrix/media/v3/upload", self.base))
            .bearer_auth(token)
            .header("content-type", content_type)
            .body(bytes)
            .send()
            .await?;
        let status = response.status();
        let value: Value = response.json().await?;
        if !status.is_success() {
            return Err(format!("upload: {status} {value}").into());
        }
        Ok(value["content_uri"].as_str().ok_or("no content_uri")?.trim_start_matches("mxc://").to_owned())
    }

    /// Streams a GET's body, counting bytes.
    async fn fetch(&self, token: &str, path: &str) -> Result<u64, Error> {
        let mut response = self.http.get(format!("{}{path}", self.base)).bearer_auth(token).send().await?;
        if !response.status().is_success() {
            return Err(format!("{path}: {}", response.status()).into());
        }
        let mut total = 0u64;
        while let Some(chunk) = response.chunk().await? {
            total += chunk.len() as u64;
        }
        Ok(total)
    }
}

/// Samples the server's RSS every 10 ms while `work` runs; returns its result and the peak.
async fn with_peak_rss<T>(server: &Server, work: impl Future<Output = T>) -> (T, f64) {
    let pid = server.child.id();
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                if let Some(pid) = pid {
                    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                    if let Some(kib) = status
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                    {
                        peak.fetch_max(kib, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let result = work.await;
    done.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    (result, peak.load(Ordering::Relaxed) as f64 / 1024.0)
}

fn photo(seed: u32) -> Vec<u8> {
    let image = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(1200, 900, |x, y| {
        image::Rgb([((x * 7 + seed) % 256) as u8, ((y * 3 + seed * 11) % 256) as u8, ((x ^ y) % 256) as u8])
    }));
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Jpeg).expect("JPEG encodes");
    out.into_inner()
}

/// A 400x300 animated GIF of 10 frames, distinct per seed.
fn animation(seed: u32) -> Vec<u8> {
    use image::codecs::gif::{GifEncoder, Repeat};
    let mut out = Vec::new();
    {
        let mut encoder = GifEncoder::new(&mut out);
        encoder.set_repeat(Repeat::Infinite).expect("repeat");
        let frames = (0..10u32).map(|f| {
            let buffer = image::RgbaImage::from_fn(400, 300, |x, y| {
                image::Rgba([((x + f * 20 + seed) % 256) as u8, ((y * 2 + seed) % 256) as u8, (f * 25) as u8, 255])
            });
            image::Frame::from_parts(buffer, 0, 0, image::Delay::from_numer_denom_ms(100, 1))
        });
        encoder.encode_frames(frames).expect("GIF encodes");
    }
    out
}

/// Fetches `requests` with two concurrent clients; returns requests per second.
async fn rate_of(server: &Server, token: &str, requests: &[String]) -> Result<f64, Error> {
    let started = Instant::now();
    let mut halves = requests.chunks(requests.len().div_ceil(2)).map(|c| c.to_vec());
    let (a, b) = (halves.next().unwrap_or_default(), halves.next().unwrap_or_default());
    let run = |paths: Vec<String>| async move {
        for path in paths {
            server.fetch(token, &path).await?;
        }
        Ok::<(), Error>(())
    };
    let (ra, rb) = tokio::join!(run(a), run(b));
    ra?;
    rb?;
    Ok(requests.len() as f64 / started.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let mut binary =
        format!("{}/release/lattice", std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".to_owned()));
    let mut mib = 100u64;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--mib" => mib = args.next().ok_or("--mib needs a number")?.parse()?,
            other => binary = other.to_owned(),
        }
    }
    let dir = tempfile::tempdir()?;
    let server =
        Server::start(&binary, dir.path(), &[("LATTICE_MEDIA__MAX_UPLOAD_SIZE", (1u64 << 30).to_string())]).await?;
    let token = server.register("bench").await?.0;
    let idle_rss = server.rss_mib();

    let size = mib << 20;
    let body: Vec<u8> = (0..size).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let started = Instant::now();
    let (uri, upload_rss) = with_peak_rss(&server, server.upload(&token, "application/octet-stream", body)).await;
    let uri = uri?;
    let upload_secs = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let path = format!("/_matrix/client/v1/media/download/{uri}");
    let (got, download_rss) = with_peak_rss(&server, server.fetch(&token, &path)).await;
    let download_secs = started.elapsed().as_secs_f64();
    if got? != size {
        return Err("the download's size differs from the upload's".into());
    }

    let mut photos = Vec::new();
    for seed in 0..20 {
        photos.push(server.upload(&token, "image/jpeg", photo(seed)).await?);
    }
    let sizes = [
        "width=32&height=32&method=crop",
        "width=96&height=96&method=crop",
        "width=320&height=240&method=scale",
        "width=640&height=480&method=scale",
        "width=800&height=600&method=scale",
    ];
    let requests: Vec<String> = photos
        .iter()
        .flat_map(|uri| sizes.iter().map(move |q| format!("/_matrix/client/v1/media/thumbnail/{uri}?{q}")))
        .collect();
    let mut rates = Vec::new();
    for _ in 0..2 {
        rates.push(rate_of(&server, &token, &requests).await?);
    }
    let mut animations = Vec::new();
    for seed in 0..10 {
        animations.push(server.upload(&token, "image/gif", animation(seed)).await?);
    }
    let animated: Vec<String> = animations
        .iter()
        .map(|uri| format!("/_matrix/client/v1/media/thumbnail/{uri}?width=96&height=96&method=crop&animated=true"))
        .collect();
    let animated_rate = rate_of(&server, &token, &animated).await?;
    let mb = size as f64 / 1e6;
    println!("| what | result |");
    println!("|---|---|");
    println!("| server RSS idle | {idle_rss:.1} MiB |");
    println!(
        "| upload of {mib} MiB | {upload_secs:.2} s: **{:.0} MB/s**; server peak RSS {upload_rss:.1} MiB |",
        mb / upload_secs
    );
    println!(
        "| download of {mib} MiB | {download_secs:.2} s: **{:.0} MB/s**; server peak RSS {download_rss:.1} MiB |",
        mb / download_secs
    );
    println!("| thumbnails generated, 1200x900 JPEG, 5 sizes x 20 photos, 2 clients | **{:.1}/s** |", rates[0]);
    println!("| the same thumbnails again, stored | {:.0}/s |", rates[1]);
    println!("| animated thumbnails generated, 400x300 GIF x 10 frames, 96x96, 2 clients | **{animated_rate:.1}/s** |");
    Ok(())
}
