//! Spec appendix vectors and hostile input for PDU checking.

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use rand::{Rng, SeedableRng};
use ruma::serde::Base64;
use ruma::signatures::{Ed25519KeyPair, PublicKeyMap, sign_json};
use ruma::{CanonicalJsonObject, CanonicalJsonValue};
use serde_json::json;

use super::*;

/// The signing key of the spec's examples ("Signing Details" appendix).
const SPEC_KEY_SEED: &str = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1";

fn spec_key() -> Ed25519KeyPair {
    // PKCS#8 v1 wrapping of a raw ed25519 seed.
    let mut der = hex_literal("302e020100300506032b657004220420");
    // The spec's seed has non-zero trailing bits, which strict decoders refuse.
    let lenient = GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent);
    der.extend(GeneralPurpose::new(&base64::alphabet::STANDARD, lenient).decode(SPEC_KEY_SEED).unwrap());
    Ed25519KeyPair::from_der(&der, "1".into()).unwrap()
}

fn hex_literal(hex: &str) -> Vec<u8> {
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

fn object(value: serde_json::Value) -> CanonicalJsonObject {
    match CanonicalJsonValue::try_from(value).unwrap() {
        CanonicalJsonValue::Object(object) => object,
        _ => panic!("not an object"),
    }
}

fn version(id: &str) -> RoomVersion {
    RoomVersion::parse(id).unwrap()
}

fn keys_for(server: &str, key: &Ed25519KeyPair) -> PublicKeyMap {
    let mut set = std::collections::BTreeMap::new();
    set.insert(format!("ed25519:{}", key.version()), Base64::new(key.public_key().to_vec()));
    PublicKeyMap::from([(server.to_owned(), set)])
}

fn signature_of(object: &CanonicalJsonObject, server: &str) -> String {
    match &object["signatures"] {
        CanonicalJsonValue::Object(servers) => match &servers[server] {
            CanonicalJsonValue::Object(keys) => match &keys["ed25519:1"] {
                CanonicalJsonValue::String(s) => s.clone(),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

#[test]
fn spec_vector_signing_json() {
    let key = spec_key();
    let mut empty = CanonicalJsonObject::new();
    sign_json("domain", &key, &mut empty).unwrap();
    assert_eq!(
        signature_of(&empty, "domain"),
        "K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV/7Xg4ahLwYGYZzuHGZKM5ZAQ"
    );
    let mut data = object(json!({ "one": 1, "two": "Two" }));
    sign_json("domain", &key, &mut data).unwrap();
    assert_eq!(
        signature_of(&data, "domain"),
        "KqmLSbO39/Bzb0QIYE82zqLwsA+PDzYIpIRA2sRQ4sL53+sN6/fpNSoqE7BP7vBZhG6kYdD13EIMJpvhJI+6Bw"
    );
}

fn minimal_event() -> CanonicalJsonObject {
    object(json!({
        "room_id": "!x:domain", "sender": "@a:domain", "origin": "domain", "origin_server_ts": 1000000,
        "signatures": {}, "hashes": {}, "type": "X", "content": {}, "prev_events": [], "auth_events": [],
        "depth": 3, "unsigned": { "age_ts": 1000000 }
    }))
}

#[test]
fn spec_vector_signing_the_minimal_event() {
    // The appendix's example predates v11, whose redaction drops `origin` from what is signed:
    // the vector holds for every version that keeps it.
    for id in ["1", "3", "5", "6", "10"] {
        let mut event = minimal_event();
        hash_and_sign(&mut event, "domain", &spec_key(), &version(id)).unwrap();
        assert_eq!(
            event["hashes"],
            CanonicalJsonValue::Object(object(json!({ "sha256": "5jM4wQpv6lnBo7CLIghJuHdW+s2CMBJPUOGOC89ncos" })))
        );
        assert_eq!(
            signature_of(&event, "domain"),
            "KxwGjPSDEtvnFgU00fwFz+l6d2pJM6XBIaMEn81SXPTRl16AqLAYqfIReFGZlHi5KLjAWbOoMszkwsQma+lYAg",
            "room version {id}"
        );
    }
}

#[test]
fn spec_vector_content_hash_of_a_message() {
    let mut event = object(json!({
        "content": { "body": "Here is the message content" }, "event_id": "$0:domain", "origin": "domain",
        "origin_server_ts": 1000000, "type": "m.room.message", "room_id": "!r:domain", "sender": "@u:domain",
        "signatures": {}, "unsigned": { "age_ts": 1000000 }
    }));
    hash_and_sign(&mut event, "domain", &spec_key(), &version("1")).unwrap();
    assert_eq!(
        event["hashes"],
        CanonicalJsonValue::Object(object(json!({ "sha256": "onLKD1bGljeBWQhWZ1kaP9SorVmRQNdN5aM2JYU2n/g" })))
    );
}

/// A message event valid in every room version (with `event_id` for v1–2).
fn message(version_id: &str) -> CanonicalJsonObject {
    let mut value = json!({
        "room_id": "!room:origin.test", "sender": "@alice:origin.test", "origin_server_ts": 1_700_000_000_000_u64,
        "type": "m.room.message", "content": { "msgtype": "m.text", "body": "hello" },
        "prev_events": [], "auth_events": [], "depth": 5, "hashes": {}, "signatures": {},
    });
    if matches!(version_id, "1" | "2") {
        value["event_id"] = json!("$abc:origin.test");
        value["prev_events"] = json!([["$p:origin.test", { "sha256": "x" }]]);
        value["auth_events"] = json!([["$a:origin.test", { "sha256": "y" }]]);
    } else {
        value["prev_events"] = json!(["$prevevent"]);
        value["auth_events"] = json!(["$authevent"]);
    }
    object(value)
}

fn signed_message(version_id: &str) -> CanonicalJsonObject {
    let mut event = message(version_id);
    hash_and_sign(&mut event, "origin.test", &spec_key(), &version(version_id)).unwrap();
    event
}

#[test]
fn signed_events_verify_in_every_room_version() {
    let keys = keys_for("origin.test", &spec_key());
    for id in crate::room_version::SUPPORTED_ROOM_VERSIONS {
        let event = signed_message(id);
        let bytes = serde_json::to_vec(&event).unwrap();
        let parsed = parse(&bytes, &version(id)).unwrap_or_else(|e| panic!("v{id}: {e}"));
        let checked = check_signatures_and_hashes(parsed, &version(id), &keys).unwrap();
        assert_eq!(checked, Checked::Intact(event), "room version {id}");
    }
}

#[test]
fn a_changed_content_keeps_only_the_redacted_event() {
    let keys = keys_for("origin.test", &spec_key());
    for id in ["3", "11", "12"] {
        let mut event = signed_message(id);
        event.insert(
            "content".into(),
            CanonicalJsonValue::Object(object(json!({ "msgtype": "m.text", "body": "forged" }))),
        );
        match check_signatures_and_hashes(event, &version(id), &keys).unwrap() {
            Checked::Redacted(redacted) => {
                assert_eq!(redacted["content"], CanonicalJsonValue::Object(CanonicalJsonObject::new()))
            }
            other => panic!("v{id}: expected the redacted form, got {other:?}"),
        }
    }
}

#[test]
fn a_changed_signed_field_or_an_unknown_key_is_rejected() {
    let keys = keys_for("origin.test", &spec_key());
    let mut event = signed_message("12");
    event.insert("depth".into(), CanonicalJsonValue::Integer(6_u32.into()));
    assert!(matches!(check_signatures_and_hashes(event, &version("12"), &keys), Err(PduError::Signature(_))));

    let other_key = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), "1".into()).unwrap();
    let wrong_keys = keys_for("origin.test", &other_key);
    let event = signed_message("12");
    assert!(matches!(
        check_signatures_and_hashes(event.clone(), &version("12"), &wrong_keys),
        Err(PduError::Signature(_))
    ));
    assert!(matches!(
        check_signatures_and_hashes(event, &version("12"), &PublicKeyMap::new()),
        Err(PduError::Signature(_))
    ));
}

#[test]
fn event_ids_follow_the_room_version() {
    let v1 = event_id(&signed_message("1"), &version("1")).unwrap();
    assert_eq!(v1.as_str(), "$abc:origin.test");
    let v3 = event_id(&signed_message("3"), &version("3")).unwrap();
    let v4 = event_id(&signed_message("4"), &version("4")).unwrap();
    assert_eq!(v3.as_str().len(), 44, "$ + 43 characters of unpadded base64");
    // v3 and v4 redact alike; their IDs differ only in the base64 alphabet.
    assert_eq!(v4.as_str(), v3.as_str().replace('+', "-").replace('/', "_"));
    assert!(!v4.as_str()[1..].contains(['+', '/']));
    // Signatures and unsigned data are not part of the reference hash.
    let mut resigned = signed_message("10");
    resigned.insert("unsigned".into(), CanonicalJsonValue::Object(object(json!({ "age": 5 }))));
    resigned.remove("signatures");
    assert_eq!(event_id(&resigned, &version("10")).unwrap(), event_id(&signed_message("10"), &version("10")).unwrap());
}

#[test]
fn malformed_pdus_are_refused_with_the_rule_that_failed() {
    let v = version("12");
    let valid = serde_json::to_value(signed_message("12")).unwrap();
    let with = |key: &str, value: serde_json::Value| {
        let mut event = valid.clone();
        event[key] = value;
        serde_json::to_vec(&event).unwrap()
    };
    type Case = (&'static str, Vec<u8>, fn(&PduError) -> bool);
    let cases: Vec<Case> = vec![
        ("not JSON", b"{".to_vec(), |e| matches!(e, PduError::NotCanonicalJson(_))),
        ("not an object", b"[1]".to_vec(), |e| matches!(e, PduError::NotAnObject)),
        ("invalid UTF-8", b"{\"type\": \"\xff\"}".to_vec(), |e| matches!(e, PduError::NotCanonicalJson(_))),
        ("a float", with("depth", json!(1.5)), |e| matches!(e, PduError::NotCanonicalJson(_))),
        ("an integer over 2^53", with("depth", json!(9_007_199_254_740_992_u64)), |e| {
            matches!(e, PduError::NotCanonicalJson(_))
        }),
        ("a negative depth", with("depth", json!(-1)), |e| matches!(e, PduError::Format(_))),
        (
            "no type",
            {
                let mut e = valid.clone();
                e.as_object_mut().unwrap().remove("type");
                serde_json::to_vec(&e).unwrap()
            },
            |e| matches!(e, PduError::Format(_)),
        ),
        ("a long sender", with("sender", json!(format!("@{}:origin.test", "a".repeat(300)))), |e| {
            matches!(e, PduError::Format(_))
        }),
        ("21 prev_events", with("prev_events", json!(vec!["$x"; 21])), |e| matches!(e, PduError::Format(_))),
        ("11 auth_events", with("auth_events", json!(vec!["$x"; 11])), |e| matches!(e, PduError::Format(_))),
        ("a reference that is not an event ID", with("auth_events", json!(["not-an-id"])), |e| {
            matches!(e, PduError::Format(_))
        }),
        ("prev_events of the wrong shape", with("prev_events", json!([["$x", {}]])), |e| {
            matches!(e, PduError::Format(_))
        }),
        ("over 64 KiB", with("content", json!({ "body": "x".repeat(70_000) })), |e| {
            matches!(e, PduError::TooLarge { .. })
        }),
    ];
    let v1_with_v3_references = {
        let mut event = serde_json::to_value(signed_message("1")).unwrap();
        event["prev_events"] = json!(["$abc:origin.test"]);
        serde_json::to_vec(&event).unwrap()
    };
    assert!(matches!(parse(&v1_with_v3_references, &version("1")), Err(PduError::Format(_))));
    for (name, bytes, expected) in cases {
        let error = parse(&bytes, &v).expect_err(name);
        assert!(expected(&error), "{name}: got {error:?}");
    }
}

/// Random mutations of a valid PDU, and random bytes, never panic any step.
#[test]
fn random_and_mutated_input_never_panics() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x01a7_71ce);
    let keys = keys_for("origin.test", &spec_key());
    for id in ["1", "6", "12"] {
        let v = version(id);
        let valid = serde_json::to_vec(&signed_message(id)).unwrap();
        for round in 0..2_000 {
            let mut bytes = valid.clone();
            match round % 4 {
                0 => bytes.truncate(rng.random_range(0..bytes.len())),
                1 => {
                    for _ in 0..rng.random_range(1..8) {
                        let i = rng.random_range(0..bytes.len());
                        bytes[i] = rng.random();
                    }
                }
                2 => {
                    let i = rng.random_range(0..bytes.len());
                    let insert: &[u8] =
                        [&b"{}"[..], b"[]", b"\"", b"1e400", b"-0", b"\\u0000", b"null"][rng.random_range(0..7)];
                    bytes.splice(i..i, insert.iter().copied());
                }
                _ => bytes = (0..rng.random_range(0..64)).map(|_| rng.random()).collect(),
            }
            if let Ok(object) = parse(&bytes, &v) {
                let _ = event_id(&object, &v);
                let _ = check_signatures_and_hashes(object, &v, &keys);
            }
        }
    }
}

/// The spec's canonical JSON examples ("Appendices: Canonical JSON"), through ruma's canonical
/// form, which every hash and signature here is computed over.
#[test]
fn spec_vectors_canonical_json() {
    let cases = [
        (r#"{}"#, r#"{}"#),
        (r#"{"one": 1, "two": "Two"}"#, r#"{"one":1,"two":"Two"}"#),
        (r#"{"b": "2", "a": "1"}"#, r#"{"a":"1","b":"2"}"#),
        (r#"{"b":"2","a":"1"}"#, r#"{"a":"1","b":"2"}"#),
        (
            r#"{"auth": {"success": true, "mxid": "@john.doe:example.com", "profile": {"display_name": "John Doe", "three_pids": [{"medium": "email", "address": "john.doe@example.org"}, {"medium": "msisdn", "address": "123456789"}]}}}"#,
            r#"{"auth":{"mxid":"@john.doe:example.com","profile":{"display_name":"John Doe","three_pids":[{"address":"john.doe@example.org","medium":"email"},{"address":"123456789","medium":"msisdn"}]},"success":true}}"#,
        ),
        (r#"{"a": "日本語"}"#, r#"{"a":"日本語"}"#),
        (r#"{"本": 2, "日": 1}"#, r#"{"日":1,"本":2}"#),
        (r#"{"a": "\u65E5"}"#, r#"{"a":"日"}"#),
        (r#"{"a": null}"#, r#"{"a":null}"#),
    ];
    for (input, canonical) in cases {
        let value: CanonicalJsonValue = serde_json::from_str(input).unwrap();
        assert_eq!(serde_json::to_string(&value).unwrap(), canonical, "{input}");
    }
    // The spec's last example, `{"a": -0, "b": 1e10}`, writes integers in float syntax; JSON
    // parsers read those as floats, which canonical JSON cannot carry, so Lattice (with ruma)
    // refuses them rather than reinterpreting them.
    assert!(serde_json::from_str::<CanonicalJsonValue>(r#"{"a": -0}"#).is_err());
    assert!(serde_json::from_str::<CanonicalJsonValue>(r#"{"b": 1e10}"#).is_err());
}

/// What redaction keeps, per room version (spec: each room version's "Redactions" section).
#[test]
fn redaction_follows_the_room_version() {
    let redacted_content = |version_id: &str, kind: &str, content: serde_json::Value| {
        let mut event = serde_json::to_value(signed_message(version_id)).unwrap();
        event["type"] = json!(kind);
        event["state_key"] = json!("");
        event["content"] = content;
        let redacted = redacted(object(event), &version(version_id)).unwrap();
        serde_json::to_value(&redacted["content"]).unwrap()
    };
    let create = json!({ "creator": "@a:x", "room_version": "x", "m.federate": false, "extra": 1 });
    assert_eq!(redacted_content("10", "m.room.create", create.clone()), json!({ "creator": "@a:x" }));
    assert_eq!(redacted_content("11", "m.room.create", create.clone()), create, "v11 keeps all of create");

    let join_rules =
        json!({ "join_rule": "restricted", "allow": [{ "type": "m.room_membership", "room_id": "!r:x" }], "extra": 1 });
    assert_eq!(redacted_content("7", "m.room.join_rules", join_rules.clone()), json!({ "join_rule": "restricted" }));
    assert_eq!(
        redacted_content("8", "m.room.join_rules", join_rules.clone()),
        json!({ "join_rule": "restricted", "allow": [{ "type": "m.room_membership", "room_id": "!r:x" }] }),
        "v8 keeps allow"
    );

    let member = json!({ "membership": "join", "join_authorised_via_users_server": "@b:x", "displayname": "B" });
    assert_eq!(redacted_content("8", "m.room.member", member.clone()), json!({ "membership": "join" }));
    assert_eq!(
        redacted_content("9", "m.room.member", member.clone()),
        json!({ "membership": "join", "join_authorised_via_users_server": "@b:x" }),
        "v9 keeps join_authorised_via_users_server"
    );

    let power = json!({ "users": {}, "ban": 50, "invite": 0, "notifications": { "room": 50 } });
    assert_eq!(redacted_content("10", "m.room.power_levels", power.clone()), json!({ "users": {}, "ban": 50 }));
    assert_eq!(
        redacted_content("11", "m.room.power_levels", power.clone()),
        json!({ "users": {}, "ban": 50, "invite": 0 }),
        "v11 keeps invite"
    );

    let redaction = json!({ "redacts": "$x", "reason": "spam" });
    assert_eq!(redacted_content("10", "m.room.redaction", redaction.clone()), json!({}));
    assert_eq!(
        redacted_content("11", "m.room.redaction", redaction.clone()),
        json!({ "redacts": "$x" }),
        "v11 keeps content.redacts"
    );

    let aliases = json!({ "aliases": ["#a:x"] });
    assert_eq!(redacted_content("5", "m.room.aliases", aliases.clone()), aliases.clone(), "before v6 aliases survive");
    assert_eq!(redacted_content("6", "m.room.aliases", aliases), json!({}));

    // Top-level keys: v11 stops keeping `origin`, `membership` and `prev_state`.
    let keeps_origin = |version_id: &str| {
        let mut event = signed_message(version_id);
        event.insert("origin".into(), CanonicalJsonValue::String("origin.test".into()));
        redacted(event, &version(version_id)).unwrap().contains_key("origin")
    };
    assert!(keeps_origin("10"));
    assert!(!keeps_origin("11"));
}
