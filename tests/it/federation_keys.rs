//! Federation foundations between real Lattice servers on loopback: each on its own 127.x.y.z
//! address, named `lat1.test`, `lat2.test`, … and pinned to those addresses with
//! `federation.resolve`, with self-signed certificates that every server trusts through
//! `federation.trusted_ca` (so TLS verification is exercised, not switched off).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use lattice::Config;
use reqwest::{Method, StatusCode};
use ruma::ServerName;
use ruma::signatures::Ed25519KeyPair;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::support::{Http, assert_error, register, test_config};

/// One server of a test network.
struct Member {
    name: String,
    federation: SocketAddr,
    cert: PathBuf,
    key: PathBuf,
}

/// Names, addresses and certificates of a few servers, decided before any starts (each one's
/// configuration pins all the others).
pub(crate) struct Network {
    dir: TempDir,
    members: Vec<Member>,
    ca: PathBuf,
    client: reqwest::Client,
}

fn free_loopback_address() -> SocketAddr {
    let [a, b, c] = rand::random::<[u8; 3]>();
    let ip = IpAddr::V4(Ipv4Addr::new(127, a.max(1), b, c.clamp(2, 254)));
    let probe = std::net::TcpListener::bind((ip, 0)).expect("bind a loopback address");
    probe.local_addr().expect("address")
}

impl Network {
    pub(crate) fn new(names: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut members = Vec::new();
        let mut bundle = String::new();
        let mut client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).https_only(true);
        for name in names {
            let (cert, key) =
                lattice::tls::write_self_signed(name, &dir.path().join(name).join("tls")).expect("certificate");
            let pem = std::fs::read(&cert).expect("cert");
            bundle.push_str(std::str::from_utf8(&pem).expect("PEM text"));
            client = client.add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("PEM"));
            let federation = free_loopback_address();
            client = client.resolve(name, federation);
            members.push(Member { name: name.to_string(), federation, cert, key });
        }
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, bundle).expect("CA bundle");
        Self { dir, members, ca, client: client.build().expect("client") }
    }

    fn member(&self, name: &str) -> &Member {
        self.members.iter().find(|m| m.name == name).expect("a member of the network")
    }

    fn config(&self, name: &str) -> Config {
        let member = self.member(name);
        let mut config = test_config(&self.dir.path().join(name).join("data"), name);
        config.federation.listen = Some(member.federation);
        config.federation.tls_cert = Some(member.cert.clone());
        config.federation.tls_key = Some(member.key.clone());
        config.federation.trusted_ca = Some(self.ca.clone());
        config.federation.resolve = self.members.iter().map(|m| (m.name.clone(), m.federation)).collect();
        // No DNS: names outside the network fail at once rather than leave the machine.
        config.federation.dns = false;
        config
    }

    /// The `LATTICE_*` variables that run `name` as its own process
    /// ([`ProcessServer`](crate::support::ProcessServer)) in this network, as [`Network::start`]
    /// configures it in-process.
    pub(crate) fn process_env(&self, name: &str) -> Vec<(&'static str, String)> {
        let member = self.member(name);
        let pins: Vec<String> = self.members.iter().map(|m| format!("\"{}\" = \"{}\"", m.name, m.federation)).collect();
        vec![
            ("LATTICE_SERVER_NAME", name.to_owned()),
            ("LATTICE_FEDERATION__LISTEN", member.federation.to_string()),
            ("LATTICE_FEDERATION__TLS_CERT", member.cert.display().to_string()),
            ("LATTICE_FEDERATION__TLS_KEY", member.key.display().to_string()),
            ("LATTICE_FEDERATION__TRUSTED_CA", self.ca.display().to_string()),
            ("LATTICE_FEDERATION__RESOLVE", format!("{{ {} }}", pins.join(", "))),
            ("LATTICE_FEDERATION__DNS", "false".to_owned()),
        ]
    }

    pub(crate) async fn start(&self, name: &str) -> Server {
        self.start_with(name, |_| {}).await
    }

    pub(crate) async fn start_with(&self, name: &str, adjust: impl FnOnce(&mut Config)) -> Server {
        let mut config = self.config(name);
        adjust(&mut config);
        Server::start(config).await
    }

    /// A request to `to`'s federation listener, over TLS verified against the network's
    /// certificates, with `authorization` as given.
    pub(crate) async fn request(
        &self,
        to: &str,
        method: Method,
        path: &str,
        authorization: Option<&str>,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        let member = self.member(to);
        let url = format!("https://{}:{}{path}", member.name, member.federation.port());
        let mut request = self.client.request(method, url);
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body.to_string());
        }
        let response = request.send().await.expect("federation request sent");
        let status = response.status();
        let bytes = response.bytes().await.expect("body");
        (status, serde_json::from_slice(&bytes).unwrap_or_else(|_| json!({ "raw": String::from_utf8_lossy(&bytes) })))
    }

    async fn get(&self, to: &str, path: &str) -> (StatusCode, Value) {
        self.request(to, Method::GET, path, None, None).await
    }
}

pub(crate) struct Server {
    config: Config,
    running: Option<lattice::Running>,
    pub(crate) http: Http,
    pub(crate) registration_token: String,
}

impl Server {
    async fn start(config: Config) -> Self {
        let running = lattice::start(config.clone()).await.expect("server starts");
        assert_eq!(running.federation_address, config.federation.listen);
        let http = Http::new(format!("http://{}", running.address));
        let registration_token = running.first_registration_token.clone().unwrap_or_default();
        Self { config, running: Some(running), http, registration_token }
    }

    pub(crate) async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await.expect("clean stop");
        }
    }

    /// Restarts with the configuration changed by `adjust` (kept for later restarts).
    pub(crate) async fn restart_with(&mut self, adjust: impl FnOnce(&mut Config)) {
        adjust(&mut self.config);
        self.restart().await;
    }

    pub(crate) async fn restart(&mut self) {
        self.stop().await;
        let running = lattice::start(self.config.clone()).await.expect("server restarts");
        self.http = Http::new(format!("http://{}", running.address));
        self.running = Some(running);
    }

    /// Registers `name` with password `password`; returns the access token.
    /// The server's name (`lat1.test`).
    pub(crate) fn name(&self) -> String {
        self.config.server_name.to_string()
    }

    pub(crate) async fn register_user(&self, name: &str) -> String {
        let session = crate::support::register(&self.http, name, "password", &self.registration_token).await;
        session["access_token"].as_str().expect("access token").to_owned()
    }

    /// The server's current signing key, read from its data directory as the server reads it.
    pub(crate) fn signing_key(&self) -> Ed25519KeyPair {
        let text = std::fs::read_to_string(self.config.signing_key_path()).expect("signing key file");
        let parts: Vec<&str> = text.split_whitespace().collect();
        let document = STANDARD_NO_PAD.decode(parts[2]).expect("base64");
        Ed25519KeyPair::from_der(&document, parts[1].to_owned()).expect("key pair")
    }
}

/// An `X-Matrix` header for a request from `origin` to `destination`, signed with `key`.
pub(crate) fn x_matrix(
    key: &Ed25519KeyPair,
    origin: &str,
    destination: &str,
    method: &Method,
    path: &str,
    body: &[u8],
) -> String {
    let value = lattice_federation::x_matrix::sign_request(
        <&ServerName>::try_from(origin).unwrap(),
        <&ServerName>::try_from(destination).unwrap(),
        key,
        method,
        path,
        body,
    )
    .expect("signed");
    value.to_str().expect("ASCII header").to_owned()
}

fn document_for<'a>(answer: &'a Value, server: &str) -> Option<&'a Value> {
    answer["server_keys"].as_array()?.iter().find(|document| document["server_name"] == server)
}

#[tokio::test]
async fn servers_fetch_each_others_keys_over_verified_tls_and_notarise_them() {
    let net = Network::new(&["lat1.test", "lat2.test"]);
    let mut lat1 = net.start("lat1.test").await;
    let mut lat2 = net.start("lat2.test").await;

    // Each publishes a self-signed key document on its federation listener.
    let (status, own1) = net.get("lat1.test", "/_matrix/key/v2/server").await;
    assert_eq!(status, StatusCode::OK, "{own1}");
    assert_eq!(own1["server_name"], "lat1.test");
    let key1 = own1["verify_keys"].as_object().expect("verify_keys").keys().next().expect("a key").clone();
    assert!(own1["signatures"]["lat1.test"][&key1].is_string());
    assert!(own1["valid_until_ts"].as_u64().is_some());
    assert_eq!(own1["old_verify_keys"], json!({}));
    // The client port serves it too (for a reverse proxy that sends everything there).
    let (status, via_client_port) = lat1.http.get("/_matrix/key/v2/server", None).await;
    assert_eq!((status, &via_client_port["server_name"]), (StatusCode::OK, &json!("lat1.test")));

    // lat1 as notary for lat2: it fetches lat2's keys from lat2 (TLS verified against the
    // trusted CA bundle), checks them, and countersigns.
    let (status, answer) = net.get("lat1.test", "/_matrix/key/v2/query/lat2.test").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let document = document_for(&answer, "lat2.test").expect("lat2's keys through lat1");
    let (_, own2) = net.get("lat2.test", "/_matrix/key/v2/server").await;
    assert_eq!(document["verify_keys"], own2["verify_keys"]);
    assert!(document["signatures"]["lat2.test"].is_object(), "lat2's own signature kept");
    assert!(document["signatures"]["lat1.test"][&key1].is_string(), "countersigned by the notary");

    // And the other way round, through the batch query.
    let query = json!({ "server_keys": { "lat1.test": {}, "lat2.test": { "ed25519:whatever": {} } } });
    let (status, answer) = net.request("lat2.test", Method::POST, "/_matrix/key/v2/query", None, Some(&query)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let document = document_for(&answer, "lat1.test").expect("lat1's keys through lat2");
    assert_eq!(document["verify_keys"], own1["verify_keys"]);
    assert!(document["signatures"]["lat2.test"].is_object());
    assert!(document_for(&answer, "lat2.test").is_some(), "a notary answers for itself too");

    // The version endpoint needs no signature.
    let (status, version) = net.get("lat2.test", "/_matrix/federation/v1/version").await;
    assert_eq!((status, &version["server"]["name"]), (StatusCode::OK, &json!("Lattice")));

    // Servers that cannot be reached (a closed loopback port: no DNS in tests): an empty
    // answer, not an error.
    let (status, answer) = net.get("lat1.test", "/_matrix/key/v2/query/127.0.0.1:1").await;
    assert_eq!((status, answer["server_keys"].as_array().map(Vec::len)), (StatusCode::OK, Some(0)));
    assert_error(&net.get("lat1.test", "/_matrix/key/v2/query/not%20a%20name").await, 400, "M_INVALID_PARAM");

    lat1.stop().await;
    lat2.stop().await;
}

#[tokio::test]
async fn a_server_that_does_not_trust_the_peer_certificate_gets_no_keys() {
    let net = Network::new(&["lat1.test", "lat2.test"]);
    let mut lat2 = net.start("lat2.test").await;
    // lat1 trusts only its own certificate: lat2's must fail verification.
    let own_cert = net.member("lat1.test").cert.clone();
    let mut lat1 = net.start_with("lat1.test", |config| config.federation.trusted_ca = Some(own_cert)).await;
    let (status, answer) = net.get("lat1.test", "/_matrix/key/v2/query/lat2.test").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["server_keys"], json!([]), "keys fetched over an unverified connection");
    lat1.stop().await;
    lat2.stop().await;
}

#[tokio::test]
async fn signed_requests_are_accepted_and_every_bad_one_is_refused() {
    let net = Network::new(&["lat1.test", "lat2.test"]);
    let mut lat1 = net.start("lat1.test").await;
    let mut lat2 = net.start("lat2.test").await;
    let alice = register(&lat2.http, "alice", "correct horse battery", &lat2.registration_token).await;
    let token = alice["access_token"].as_str().expect("token");
    let (status, _) = lat2
        .http
        .put("/_matrix/client/v3/profile/@alice:lat2.test/displayname", Some(token), &json!({ "displayname": "Alice" }))
        .await;
    assert_eq!(status, StatusCode::OK);

    let key1 = lat1.signing_key();
    let path = "/_matrix/federation/v1/query/profile?user_id=%40alice%3Alat2.test";
    let signed = x_matrix(&key1, "lat1.test", "lat2.test", &Method::GET, path, b"");
    let (status, profile) = net.request("lat2.test", Method::GET, path, Some(&signed), None).await;
    assert_eq!(status, StatusCode::OK, "{profile}");
    assert_eq!(profile, json!({ "displayname": "Alice" }));
    let field = "/_matrix/federation/v1/query/profile?user_id=%40alice%3Alat2.test&field=avatar_url";
    let signed_field = x_matrix(&key1, "lat1.test", "lat2.test", &Method::GET, field, b"");
    let (status, profile) = net.request("lat2.test", Method::GET, field, Some(&signed_field), None).await;
    assert_eq!((status, profile), (StatusCode::OK, json!({})));

    let stranger = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), key1.version().to_owned()).unwrap();
    let refused = [
        ("no header", None),
        ("a bearer token", Some("Bearer abc".to_owned())),
        ("signed for another target", Some(x_matrix(&key1, "lat1.test", "lat2.test", &Method::GET, "/other", b""))),
        ("signed for another method", Some(x_matrix(&key1, "lat1.test", "lat2.test", &Method::POST, path, b""))),
        ("signed for another destination", Some(x_matrix(&key1, "lat1.test", "lat3.test", &Method::GET, path, b""))),
        (
            "signed with another key under lat1's key ID",
            Some(x_matrix(&stranger, "lat1.test", "lat2.test", &Method::GET, path, b"")),
        ),
        ("a key ID lat1 never had", {
            let other = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), "never".to_owned()).unwrap();
            Some(x_matrix(&other, "lat1.test", "lat2.test", &Method::GET, path, b""))
        }),
        (
            "an origin that cannot be reached",
            Some(x_matrix(&key1, "127.0.0.1:1", "lat2.test", &Method::GET, path, b"")),
        ),
        ("a mangled signature", Some(signed.replace("sig=", "sig=AAAA"))),
    ];
    for (case, authorization) in refused {
        let response = net.request("lat2.test", Method::GET, path, authorization.as_deref(), None).await;
        assert_eq!(response.0.as_u16(), 401, "{case}: {}", response.1);
        assert_eq!(response.1["errcode"], "M_UNAUTHORIZED", "{case}: {}", response.1);
    }
    // Unbuilt federation endpoints and client routes on the federation listener: 404.
    let unbuilt = "/_matrix/federation/v1/exchange_third_party_invite/%21room%3Alat2.test";
    let signed_put = x_matrix(&key1, "lat1.test", "lat2.test", &Method::PUT, unbuilt, b"{}");
    let response = net.request("lat2.test", Method::PUT, unbuilt, Some(&signed_put), Some(&json!({}))).await;
    assert_error(&response, 404, "M_UNRECOGNIZED");
    // An empty transaction is accepted, with no results.
    let send = "/_matrix/federation/v1/send/txn1";
    let signed_put = x_matrix(&key1, "lat1.test", "lat2.test", &Method::PUT, send, b"{}");
    let response = net.request("lat2.test", Method::PUT, send, Some(&signed_put), Some(&json!({}))).await;
    assert_eq!((response.0.as_u16(), &response.1), (200, &json!({ "pdus": {} })));
    assert_error(&net.get("lat2.test", "/_matrix/client/versions").await, 404, "M_UNRECOGNIZED");
    // A signed request for a user of another server, and for an unknown one.
    let remote = "/_matrix/federation/v1/query/profile?user_id=%40bob%3Alat1.test";
    let signed_remote = x_matrix(&key1, "lat1.test", "lat2.test", &Method::GET, remote, b"");
    assert_error(
        &net.request("lat2.test", Method::GET, remote, Some(&signed_remote), None).await,
        400,
        "M_INVALID_PARAM",
    );
    let unknown = "/_matrix/federation/v1/query/profile?user_id=%40nobody%3Alat2.test";
    let signed_unknown = x_matrix(&key1, "lat1.test", "lat2.test", &Method::GET, unknown, b"");
    assert_error(
        &net.request("lat2.test", Method::GET, unknown, Some(&signed_unknown), None).await,
        404,
        "M_NOT_FOUND",
    );
    lat1.stop().await;
    lat2.stop().await;
}

#[tokio::test]
async fn without_a_federation_listener_the_server_server_routes_do_not_exist() {
    let server = crate::support::TestServer::start().await;
    for path in ["/_matrix/key/v2/server", "/_matrix/key/v2/query/a.test", "/_matrix/federation/v1/version"] {
        assert_error(&server.http.get(path, None).await, 404, "M_UNRECOGNIZED");
    }
    let query = json!({ "server_keys": {} });
    assert_error(&server.http.post("/_matrix/key/v2/query", None, &query).await, 404, "M_UNRECOGNIZED");
    server.stop().await;
}

#[tokio::test]
async fn a_rotated_key_is_published_as_old_and_no_longer_signs_requests() {
    let net = Network::new(&["lat1.test", "lat2.test"]);
    let mut lat1 = net.start("lat1.test").await;
    let mut lat2 = net.start("lat2.test").await;
    let old_key = lat1.signing_key();
    let old_id = format!("ed25519:{}", old_key.version());
    let path = "/_matrix/federation/v1/version";
    // lat2 learns lat1's current key.
    let (status, answer) = net.get("lat2.test", "/_matrix/key/v2/query/lat1.test").await;
    assert_eq!(status, StatusCode::OK);
    assert!(document_for(&answer, "lat1.test").expect("lat1's keys")["verify_keys"][&old_id].is_object());

    lat1.stop().await;
    lattice::admin::rotate_signing_key(&lat1.config).await.expect("rotation");
    lat1.restart().await;
    // lat2 fetches one server's keys at most once a second; let that second pass, so the
    // fetch below is not skipped as too soon after the one above.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let new_key = lat1.signing_key();
    let new_id = format!("ed25519:{}", new_key.version());
    assert_ne!(new_id, old_id);

    let (_, own) = net.get("lat1.test", "/_matrix/key/v2/server").await;
    assert!(own["verify_keys"][&new_id].is_object(), "{own}");
    assert!(own["verify_keys"].get(&old_id).is_none(), "{own}");
    assert_eq!(own["old_verify_keys"][&old_id]["key"], STANDARD_NO_PAD.encode(old_key.public_key()));
    assert!(own["old_verify_keys"][&old_id]["expired_ts"].as_u64().is_some());

    // A request signed with the new key: lat2 does not know it yet, fetches, accepts.
    let profile_path = "/_matrix/federation/v1/query/profile?user_id=%40nobody%3Alat2.test";
    let signed_new = x_matrix(&new_key, "lat1.test", "lat2.test", &Method::GET, profile_path, b"");
    assert_error(
        &net.request("lat2.test", Method::GET, profile_path, Some(&signed_new), None).await,
        404,
        "M_NOT_FOUND",
    );
    // Having seen the new document, lat2 knows the old key is old: it no longer signs
    // requests, though lat2 still lists it (for events signed before it expired).
    let signed_old = x_matrix(&old_key, "lat1.test", "lat2.test", &Method::GET, profile_path, b"");
    assert_error(
        &net.request("lat2.test", Method::GET, profile_path, Some(&signed_old), None).await,
        401,
        "M_UNAUTHORIZED",
    );
    let far_future = 4_000_000_000_000u64;
    let (_, answer) =
        net.get("lat2.test", &format!("/_matrix/key/v2/query/lat1.test?minimum_valid_until_ts={far_future}")).await;
    let document = document_for(&answer, "lat1.test").expect("lat1's keys");
    assert!(document["verify_keys"][&new_id].is_object(), "{document}");
    assert_eq!(document["old_verify_keys"][&old_id]["key"], STANDARD_NO_PAD.encode(old_key.public_key()));
    let (status, _) = net.get("lat2.test", path).await;
    assert_eq!(status, StatusCode::OK);

    // A second rotation keeps both old keys published.
    lat1.stop().await;
    lattice::admin::rotate_signing_key(&lat1.config).await.expect("second rotation");
    lat1.restart().await;
    let (_, own) = net.get("lat1.test", "/_matrix/key/v2/server").await;
    let old: BTreeMap<String, Value> = serde_json::from_value(own["old_verify_keys"].clone()).unwrap();
    assert!(old.contains_key(&old_id) && old.contains_key(&new_id), "{own}");
    lat1.stop().await;
    lat2.stop().await;
}

#[tokio::test]
async fn expired_cached_keys_are_fetched_again_and_refused_when_they_cannot_be() {
    let net = Network::new(&["lat1.test", "lat2.test"]);
    // lat1's keys are valid for one second only.
    let mut lat1 = net.start_with("lat1.test", |config| config.federation.key_valid_for = "1s".into()).await;
    let mut lat2 = net.start("lat2.test").await;
    let key1 = lat1.signing_key();
    let path = "/_matrix/federation/v1/query/profile?user_id=%40nobody%3Alat2.test";
    let signed = || x_matrix(&key1, "lat1.test", "lat2.test", &Method::GET, path, b"");

    assert_error(&net.request("lat2.test", Method::GET, path, Some(&signed()), None).await, 404, "M_NOT_FOUND");
    let (_, first) = net.get("lat2.test", "/_matrix/key/v2/query/lat1.test?minimum_valid_until_ts=0").await;
    let first_valid_until = document_for(&first, "lat1.test").expect("cached")["valid_until_ts"].as_u64().unwrap();

    // Past the validity, the cached key no longer verifies: lat2 fetches lat1's keys again.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_error(&net.request("lat2.test", Method::GET, path, Some(&signed()), None).await, 404, "M_NOT_FOUND");
    let (_, second) = net.get("lat2.test", "/_matrix/key/v2/query/lat1.test?minimum_valid_until_ts=0").await;
    let second_valid_until = document_for(&second, "lat1.test").expect("cached")["valid_until_ts"].as_u64().unwrap();
    assert!(second_valid_until > first_valid_until, "{first_valid_until} then {second_valid_until}");

    // Expired again and lat1 unreachable: the key cannot be checked, the request is refused.
    lat1.stop().await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_error(&net.request("lat2.test", Method::GET, path, Some(&signed()), None).await, 401, "M_UNAUTHORIZED");
    lat2.stop().await;
}

#[tokio::test]
async fn keys_of_an_unreachable_server_come_from_a_trusted_notary() {
    let net = Network::new(&["lat1.test", "lat2.test", "lat3.test"]);
    let mut lat1 = net.start("lat1.test").await;
    let mut lat2 = net.start("lat2.test").await;
    // lat1 caches lat2's keys, then lat2 goes away.
    let (_, answer) = net.get("lat1.test", "/_matrix/key/v2/query/lat2.test").await;
    let lat2_keys = document_for(&answer, "lat2.test").expect("lat2's keys")["verify_keys"].clone();
    lat2.stop().await;

    // lat1 still answers for lat2 from its store.
    let (_, answer) = net.get("lat1.test", "/_matrix/key/v2/query/lat2.test").await;
    assert_eq!(document_for(&answer, "lat2.test").expect("served from the store")["verify_keys"], lat2_keys);

    // lat3 cannot reach lat2, and asks its notary lat1.
    let mut lat3 =
        net.start_with("lat3.test", |config| config.federation.trusted_key_servers = vec!["lat1.test".into()]).await;
    let (status, answer) = net.get("lat3.test", "/_matrix/key/v2/query/lat2.test").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let document = document_for(&answer, "lat2.test").expect("lat2's keys through lat1");
    assert_eq!(document["verify_keys"], lat2_keys);
    assert!(document["signatures"]["lat2.test"].is_object(), "{document}");
    assert!(document["signatures"]["lat3.test"].is_object(), "{document}");

    // Restarted without a notary, lat3 answers from what it stored.
    lat3.stop().await;
    let mut lat3 = net.start_with("lat3.test", |config| config.federation.trusted_key_servers = Vec::new()).await;
    let (_, answer) = net.get("lat3.test", "/_matrix/key/v2/query/lat2.test").await;
    assert!(
        document_for(&answer, "lat2.test").is_some(),
        "lat3 stored lat2's keys from the notary and still answers from its store"
    );
    lat3.stop().await;
    lat1.stop().await;
}

#[tokio::test]
async fn bad_certificate_files_stop_start_up_naming_the_option() {
    let net = Network::new(&["lat1.test"]);
    let garbage = net.dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not PEM").expect("write");
    type Adjust<'a> = Box<dyn Fn(&mut Config) + 'a>;
    let cases: [(&str, Adjust); 3] = [
        ("federation.tls_cert", Box::new(|config| config.federation.tls_cert = Some("/nonexistent/cert.pem".into()))),
        ("federation.tls_key", Box::new(|config| config.federation.tls_key = Some(garbage.clone()))),
        ("federation.trusted_ca", Box::new(|config| config.federation.trusted_ca = Some(garbage.clone()))),
    ];
    for (option, adjust) in cases {
        let mut config = net.config("lat1.test");
        adjust(&mut config);
        let error = match lattice::start(config).await {
            Ok(running) => {
                running.stop().await.expect("stop");
                panic!("started despite a bad {option}");
            }
            Err(error) => format!("{error:#}"),
        };
        assert!(error.contains(option), "{option}: {error}");
    }
}

#[tokio::test]
async fn the_cli_writes_a_certificate_the_federation_listener_accepts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("tls");
    let output = std::process::Command::new(crate::support::binary())
        .args(["tls", "self-signed", "--name", "cli.test:8448", "--out"])
        .arg(&out)
        .output()
        .expect("run lattice");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let (cert, key) = (out.join("cert.pem"), out.join("key.pem"));
    lattice::tls::server_config(&cert, &key).expect("a usable pair");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).expect("key file").permissions().mode();
        assert_eq!(mode & 0o077, 0, "the private key is readable by others: {mode:o}");
    }
}
