//! The outbound address policy of federation: a peer whose name leads to a denied address is
//! never contacted (unless the operator allows the range), and another server's media
//! `Location` (a `multipart/mixed` part, or a 307 of the federation endpoint) is followed only
//! to allowed addresses. The peers here are small servers the test runs on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use lattice::Config;

use crate::support::{TestServer, enable_federation};

/// A TCP listener that counts connections and closes each at once.
async fn counting_listener() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (address, count)
}

async fn federated_server(tls: &tempfile::TempDir, adjust: impl FnOnce(&mut Config)) -> TestServer {
    let tls_dir = tls.path().to_path_buf();
    TestServer::start_with(move |config| {
        enable_federation(config, &tls_dir);
        adjust(config);
    })
    .await
}

async fn download(server: &TestServer, token: &str, server_name: &str, media_id: &str) -> (u16, Vec<u8>) {
    let response = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
        .get(format!("{}/_matrix/client/v1/media/download/{server_name}/{media_id}", server.base_url()))
        .bearer_auth(token)
        .send()
        .await
        .expect("request sent");
    (response.status().as_u16(), response.bytes().await.expect("body").to_vec())
}

#[tokio::test]
async fn a_peer_named_by_a_denied_address_is_not_contacted_unless_allowed() {
    let (peer, connections) = counting_listener().await;
    let peer_name = peer.to_string(); // an IP-literal server name: 127.0.0.1:PORT
    let tls = tempfile::tempdir().unwrap();

    let strict = federated_server(&tls, |_| {}).await;
    let alice = strict.register("alice", "password").await;
    let (status, _) = download(&strict, &alice, &peer_name, "abcdefgh").await;
    assert_eq!(status, 404, "the peer's media cannot be fetched");
    let (status, body) = strict
        .http
        .post(
            &format!("/_matrix/client/v3/join/!room:{peer_name}?server_name={peer_name}"),
            Some(&alice),
            &serde_json::json!({}),
        )
        .await;
    assert!(status.as_u16() >= 400, "joining through the peer fails: {status} {body}");
    assert_eq!(connections.load(Ordering::SeqCst), 0, "no connection to a denied address");
    strict.stop().await;

    // The operator allows loopback: the same request reaches the peer.
    let tls2 = tempfile::tempdir().unwrap();
    let allowing = federated_server(&tls2, |c| c.federation.ip_range_allow = vec!["127.0.0.0/8".into()]).await;
    let bob = allowing.register("bob", "password").await;
    let (status, _) = download(&allowing, &bob, &peer_name, "abcdefgh").await;
    assert_eq!(status, 404, "the peer closes the connection: no media");
    assert!(connections.load(Ordering::SeqCst) >= 1, "the allowed peer was contacted");
    allowing.stop().await;
}

/// A fake media server: answers the federation media endpoint (over TLS) with a `Location`,
/// as a server keeping media on a CDN does.
struct FakeMediaServer {
    name: String,
    address: SocketAddr,
}

async fn fake_media_server(tls: &std::path::Path, cdn: SocketAddr, redirect_status: bool) -> FakeMediaServer {
    let name = "media.test".to_owned();
    let (cert, key) = lattice::tls::write_self_signed(&name, tls).expect("certificate");
    let config = lattice::tls::server_config(&cert, &key).expect("TLS config");
    let location = format!("http://{cdn}/cdn/file.png");
    let app = axum::Router::new().fallback(move || {
        let location = location.clone();
        async move {
            if redirect_status {
                return (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, location)]).into_response();
            }
            let boundary = "gc0p4Jq0M2Yt08jU534c0p";
            let body = format!(
                "--{boundary}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{boundary}\r\nLocation: {location}\r\n\r\n\r\n--{boundary}--\r\n"
            );
            ([(header::CONTENT_TYPE, format!("multipart/mixed; boundary={boundary}"))], body).into_response()
        }
    });
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = tcp.local_addr().expect("address");
    let listener = lattice::tls::TlsListener::new(tcp, config).expect("TLS listener");
    tokio::spawn(async move { axum::serve(listener, app).await });
    FakeMediaServer { name, address }
}

/// The CDN: plain HTTP on loopback, counting requests.
async fn cdn(bytes: Vec<u8>) -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let hits = counted.clone();
        let bytes = bytes.clone();
        async move {
            hits.fetch_add(1, Ordering::SeqCst);
            ([(header::CONTENT_TYPE, "image/png")], bytes).into_response()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (address, hits)
}

#[tokio::test]
async fn remote_media_locations_are_followed_only_to_allowed_addresses() {
    let bytes: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let (cdn_address, cdn_hits) = cdn(bytes.clone()).await;
    for redirect_status in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let media = fake_media_server(&dir.path().join("media"), cdn_address, redirect_status).await;
        let pin = |config: &mut Config| {
            config.federation.verify_peer_tls = false;
            config.federation.resolve = [(media.name.clone(), media.address)].into_iter().collect();
        };
        let before = cdn_hits.load(Ordering::SeqCst);

        // Default policy: the CDN on loopback is refused, and never asked.
        let strict = federated_server(&tempfile::tempdir().unwrap(), pin).await;
        let alice = strict.register("alice", "password").await;
        let (status, _) = download(&strict, &alice, &media.name, "cdnmedia1").await;
        assert_eq!(status, 502, "redirect_status={redirect_status}");
        assert_eq!(cdn_hits.load(Ordering::SeqCst), before, "the denied CDN saw no request");
        strict.stop().await;

        // Loopback allowed: the Location is followed and the bytes cached as the server's media.
        let allowing = federated_server(&tempfile::tempdir().unwrap(), |c| {
            pin(c);
            c.federation.ip_range_allow = vec!["127.0.0.0/8".into()];
        })
        .await;
        let bob = allowing.register("bob", "password").await;
        let (status, got) = download(&allowing, &bob, &media.name, "cdnmedia1").await;
        assert_eq!(status, 200, "redirect_status={redirect_status}");
        assert!(got == bytes, "the CDN's bytes arrive unchanged");
        assert_eq!(cdn_hits.load(Ordering::SeqCst), before + 1);
        let (status, again) = download(&allowing, &bob, &media.name, "cdnmedia1").await;
        assert_eq!(status, 200);
        assert!(again == bytes);
        assert_eq!(cdn_hits.load(Ordering::SeqCst), before + 1, "then served from the cache");
        allowing.stop().await;
    }
}
