//! Inbound federation limits: a server flooding this one is slowed (`429`) without holding up
//! other servers, an address sending badly signed requests is cut off before its requests cost
//! key fetches, and the notary API is limited per address.

use lattice::config::RateConfig;
use reqwest::Method;
use ruma::signatures::Ed25519KeyPair;
use serde_json::Value;

use crate::federation_keys::{Network, x_matrix};
use crate::federation_rooms::signed_request;
use crate::support::assert_error;

const PROFILE: &str = "/_matrix/federation/v1/query/profile?user_id=%40alice%3Alat1.test";

fn tight(burst: u32) -> RateConfig {
    // Nothing refills within a test.
    RateConfig { per_second: 0.001, burst }
}

fn assert_limited(response: &(reqwest::StatusCode, Value)) {
    assert_error(response, 429, "M_LIMIT_EXCEEDED");
    assert!(response.1["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{}", response.1);
}

#[tokio::test]
async fn a_flooding_server_is_limited_and_other_servers_are_still_answered() {
    let net = Network::new(&["lat1.test", "lat2.test", "lat3.test"]);
    let mut lat1 = net
        .start_with("lat1.test", |config| {
            config.rate_limits.enabled = true;
            config.rate_limits.federation_per_origin = tight(3);
        })
        .await;
    let mut lat2 = net.start("lat2.test").await;
    let mut lat3 = net.start("lat3.test").await;
    lat1.register_user("alice").await;
    let key2 = lat2.signing_key();
    for attempt in 1..=3 {
        let (status, body) = signed_request(&net, ("lat2.test", &key2), Method::GET, PROFILE, None).await;
        assert_eq!(status, 200, "request {attempt} of lat2 is within its burst: {body}");
    }
    assert_limited(&signed_request(&net, ("lat2.test", &key2), Method::GET, PROFILE, None).await);
    let key3 = lat3.signing_key();
    let (status, body) = signed_request(&net, ("lat3.test", &key3), Method::GET, PROFILE, None).await;
    assert_eq!(status, 200, "lat3 has a budget of its own: {body}");
    lat3.stop().await;
    lat2.stop().await;
    lat1.stop().await;
}

#[tokio::test]
async fn an_address_sending_badly_signed_requests_is_cut_off() {
    let net = Network::new(&["lat1.test", "lat2.test"]);
    let mut lat1 = net
        .start_with("lat1.test", |config| {
            config.rate_limits.enabled = true;
            config.rate_limits.federation_failed_auth_per_ip = tight(3);
        })
        .await;
    let mut lat2 = net.start("lat2.test").await;
    lat1.register_user("alice").await;
    let key2 = lat2.signing_key();
    // Good requests never count against the address.
    for _ in 0..5 {
        let (status, body) = signed_request(&net, ("lat2.test", &key2), Method::GET, PROFILE, None).await;
        assert_eq!(status, 200, "{body}");
    }
    let forger = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), key2.version().to_owned()).expect("key");
    let forged = x_matrix(&forger, "lat2.test", "lat1.test", &Method::GET, PROFILE, b"");
    for _ in 1..=4 {
        let response = net.request("lat1.test", Method::GET, PROFILE, Some(&forged), None).await;
        assert_error(&response, 401, "M_UNAUTHORIZED");
    }
    // The fourth failure used up the budget: now even a correctly signed request from this
    // address is refused before its signature is checked.
    assert_limited(&signed_request(&net, ("lat2.test", &key2), Method::GET, PROFILE, None).await);
    assert_limited(&net.request("lat1.test", Method::GET, PROFILE, Some(&forged), None).await);
    lat2.stop().await;
    lat1.stop().await;
}

#[tokio::test]
async fn notary_queries_are_limited_per_address() {
    let net = Network::new(&["lat1.test", "lat2.test"]);
    let mut lat1 = net
        .start_with("lat1.test", |config| {
            config.rate_limits.enabled = true;
            config.rate_limits.key_query_per_ip = tight(2);
        })
        .await;
    let mut lat2 = net.start("lat2.test").await;
    let path = "/_matrix/key/v2/query/lat2.test";
    for _ in 0..2 {
        let (status, body) = net.request("lat1.test", Method::GET, path, None, None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["server_keys"][0]["server_name"], "lat2.test", "{body}");
    }
    assert_limited(&net.request("lat1.test", Method::GET, path, None, None).await);
    let batch = serde_json::json!({ "server_keys": { "lat2.test": {} } });
    assert_limited(&net.request("lat1.test", Method::POST, "/_matrix/key/v2/query", None, Some(&batch)).await);
    // The server's own keys are not a query: always served.
    let (status, _) = net.request("lat1.test", Method::GET, "/_matrix/key/v2/server", None, None).await;
    assert_eq!(status, 200);
    lat2.stop().await;
    lat1.stop().await;
}
