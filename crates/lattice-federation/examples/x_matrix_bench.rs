//! How many inbound `X-Matrix` requests one core checks per second: parse the header and verify
//! the signature over method, target and a small JSON body (the key already cached), next to
//! the raw ed25519 verifications of the same key.
//!
//! `cargo run --release --example x_matrix_bench` (numbers in docs/benchmarks.md).

use std::time::Instant;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use http::header::AUTHORIZATION;
use http::{HeaderMap, Method};
use lattice_federation::x_matrix;
use ruma::ServerName;
use ruma::signatures::{Ed25519KeyPair, KeyPair};

const ROUNDS: u32 = 20_000;

fn main() {
    let pair = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), "bench".to_owned()).expect("key");
    let public = STANDARD_NO_PAD.encode(pair.public_key());
    let origin = <&ServerName>::try_from("origin.example").expect("name");
    let us = <&ServerName>::try_from("destination.example").expect("name");
    let path = "/_matrix/federation/v1/send/1700000000000";
    let body = br#"{"origin":"origin.example","origin_server_ts":1700000000000,"pdus":[],"edus":[{"edu_type":"m.typing","content":{"room_id":"!r:origin.example","user_id":"@a:origin.example","typing":true}}]}"#;
    let header = x_matrix::sign_request(origin, us, &pair, &Method::PUT, path, body).expect("signed");
    let headers = HeaderMap::from_iter([(AUTHORIZATION, header)]);

    let started = Instant::now();
    for _ in 0..ROUNDS {
        let credentials = x_matrix::parse_authorization(&headers).expect("parses");
        x_matrix::verify_request(&credentials, us, &Method::PUT, path, body, &public).expect("verifies");
    }
    let x_matrix_rate = f64::from(ROUNDS) / started.elapsed().as_secs_f64();

    let message = b"the same 200 bytes of canonical JSON a request object has, roughly, give or take a few more bytes of padding here and there..............................................";
    let signature = pair.sign(message);
    let verifying_key = ed25519_dalek::VerifyingKey::from_bytes(&pair.public_key()).expect("key");
    let signature = ed25519_dalek::Signature::from_slice(signature.as_bytes()).expect("signature");
    let started = Instant::now();
    for _ in 0..ROUNDS {
        verifying_key.verify_strict(message, &signature).expect("verifies");
    }
    let raw_rate = f64::from(ROUNDS) / started.elapsed().as_secs_f64();

    println!("X-Matrix checks (parse + canonical JSON + verify): {x_matrix_rate:>9.0}/s on one core");
    println!("raw ed25519 verifications:                        {raw_rate:>9.0}/s on one core");
    println!("ratio: {:.2}", x_matrix_rate / raw_rate);
}
