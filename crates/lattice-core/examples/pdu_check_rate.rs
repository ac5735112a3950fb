//! Benchmark: PDUs fully checked per second on one core (parse + format + event ID +
//! signature + content hash), beside the raw ed25519 verify rate that bounds it.
//!
//! Run: `cargo run --release -p lattice-core --example pdu_check_rate`

use std::hint::black_box;
use std::time::{Duration, Instant};

use ed25519_dalek::{Signer, SigningKey, Verifier};
use lattice_core::pdu;
use lattice_core::room_version::RoomVersion;
use ruma::serde::Base64;
use ruma::signatures::{Ed25519KeyPair, PublicKeyMap};
use ruma::{CanonicalJsonObject, CanonicalJsonValue};

const RUN_FOR: Duration = Duration::from_secs(3);

/// Calls `work` repeatedly for `RUN_FOR` and returns calls per second.
fn rate(mut work: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut calls = 0_u64;
    while start.elapsed() < RUN_FOR {
        for _ in 0..64 {
            work();
        }
        calls += 64;
    }
    calls as f64 / start.elapsed().as_secs_f64()
}

fn typical_pdu(version: &RoomVersion, key: &Ed25519KeyPair) -> Vec<u8> {
    let value = serde_json::json!({
        "room_id": "!abcdefghijklmnop:origin.example.org",
        "sender": "@alice:origin.example.org",
        "origin_server_ts": 1_700_000_000_000_u64,
        "type": "m.room.message",
        "content": { "msgtype": "m.text", "body": "Hello there! This is a fairly typical chat message of a sentence or two." },
        "prev_events": ["$Ahd7y2nSP8Xqc3uGMRrGBfMlKE0PXXpDrRNP6IQmZ0o"],
        "auth_events": [
            "$CreatEv3ntCreatEv3ntCreatEv3ntCreatEv3ntABC",
            "$P0werLev3lsP0werLev3lsP0werLev3lsP0werLev3l",
            "$Memb3rsh1pMemb3rsh1pMemb3rsh1pMemb3rsh1pMem"
        ],
        "depth": 4242, "hashes": {}, "signatures": {}, "unsigned": { "age": 120 },
    });
    let CanonicalJsonValue::Object(mut object) = CanonicalJsonValue::try_from(value).expect("canonical") else {
        unreachable!("built as an object")
    };
    pdu::hash_and_sign(&mut object, "origin.example.org", key, version).expect("signs");
    serde_json::to_vec::<CanonicalJsonObject>(&object).expect("serialises")
}

fn main() {
    let version = RoomVersion::parse("12").expect("v12");
    let key = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), "1".into()).expect("key");
    let mut keys = PublicKeyMap::new();
    keys.insert("origin.example.org".into(), [("ed25519:1".to_owned(), Base64::new(key.public_key().to_vec()))].into());
    let bytes = typical_pdu(&version, &key);

    let signing = SigningKey::from_bytes(&[7; 32]);
    let message = vec![0x5a_u8; 400];
    let signature = signing.sign(&message);
    let verifying = signing.verifying_key();
    let raw = rate(|| verifying.verify(black_box(&message), &signature).expect("valid"));

    let full = rate(|| {
        let object = pdu::parse(black_box(&bytes), &version).expect("parses");
        black_box(pdu::event_id(&object, &version).expect("event id"));
        match pdu::check_signatures_and_hashes(object, &version, &keys).expect("verifies") {
            pdu::Checked::Intact(object) => black_box(object),
            pdu::Checked::Redacted(_) => panic!("hash mismatch"),
        };
    });
    let parse_only = rate(|| {
        black_box(pdu::parse(black_box(&bytes), &version).expect("parses"));
    });

    println!("PDU size: {} bytes (room version 12, one signature)", bytes.len());
    println!("raw ed25519 verify (ed25519-dalek 3, 400-byte message): {raw:.0}/s");
    println!(
        "full PDU check (parse, format, event ID, signature, content hash): {full:.0}/s = {:.0}% of raw verify",
        100.0 * full / raw
    );
    println!("parse + format check alone: {parse_only:.0}/s");
}
