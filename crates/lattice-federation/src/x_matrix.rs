//! `X-Matrix` request authentication (server-server API, "Request Authentication"): signing
//! outbound requests and checking inbound ones. The header grammar and the signed object are
//! ruma's (`ruma::api::federation::authentication::XMatrix`).

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderValue, Method};
use ruma::ServerName;
use ruma::api::federation::authentication::{XMatrix, XMatrixSigningInput};
use ruma::serde::Base64;
use ruma::signatures::Ed25519KeyPair;

use crate::error::{FederationError, Result};

/// The `Authorization` header value for a request from `origin` to `destination`.
/// `path_and_query` is the request target as sent (`/_matrix/...?...`); `body` the JSON bytes.
pub fn sign_request(
    origin: &ServerName,
    destination: &ServerName,
    key_pair: &Ed25519KeyPair,
    method: &Method,
    path_and_query: &str,
    body: &[u8],
) -> Result<HeaderValue> {
    let request = build(method, path_and_query, body)?;
    let input = XMatrixSigningInput::new(origin.to_owned(), destination.to_owned(), key_pair);
    let x_matrix = XMatrix::sign_http_request(&request, input)
        .map_err(|e| FederationError::Invalid(format!("signing a request: {e}")))?;
    Ok(HeaderValue::from(&x_matrix))
}

/// The `X-Matrix` credentials of an inbound request: missing or malformed is unauthorized.
pub fn parse_authorization(headers: &HeaderMap) -> Result<XMatrix> {
    XMatrix::extract_from_http_headers(headers)
        .map_err(|e| FederationError::Unauthorized(format!("X-Matrix authorization: {e}")))
}

/// Refuses credentials addressed to another server (a request signed for a different
/// destination must not be replayable here). Credentials without `destination` are accepted, as
/// the spec asks for compatibility with older servers.
pub fn check_destination(x_matrix: &XMatrix, our_name: &ServerName) -> Result<()> {
    match &x_matrix.destination {
        Some(destination) if destination != our_name => Err(FederationError::Unauthorized(format!(
            "the request is signed for {destination}, not for this server ({our_name})"
        ))),
        _ => Ok(()),
    }
}

/// Checks the signature of an inbound request against `public_key` (unpadded base64), the
/// origin's key named in the credentials.
pub fn verify_request(
    x_matrix: &XMatrix,
    our_name: &ServerName,
    method: &Method,
    path_and_query: &str,
    body: &[u8],
    public_key: &str,
) -> Result<()> {
    check_destination(x_matrix, our_name)?;
    let request = build(method, path_and_query, body)?;
    let key = Base64::parse(public_key)
        .map_err(|_| FederationError::Unauthorized(format!("the stored key of {} is not base64", x_matrix.origin)))?;
    let keys = BTreeMap::from([(x_matrix.origin.to_string(), BTreeMap::from([(x_matrix.key.to_string(), key)]))]);
    x_matrix.verify_http_request(&request, our_name, &keys).map_err(|e| {
        FederationError::Unauthorized(format!("X-Matrix signature of {} does not verify: {e}", x_matrix.origin))
    })
}

fn build<'a>(method: &Method, path_and_query: &str, body: &'a [u8]) -> Result<http::Request<&'a [u8]>> {
    http::Request::builder()
        .method(method.clone())
        .uri(path_and_query)
        .body(body)
        .map_err(|e| FederationError::Unauthorized(format!("request target {path_and_query:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD_NO_PAD;
    use http::header::AUTHORIZATION;

    use super::*;

    fn key(version: &str) -> Ed25519KeyPair {
        Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), version.to_owned()).unwrap()
    }

    fn name(text: &str) -> &ServerName {
        <&ServerName>::try_from(text).unwrap()
    }

    fn headers(value: HeaderValue) -> HeaderMap {
        HeaderMap::from_iter([(AUTHORIZATION, value)])
    }

    #[test]
    fn a_signed_request_verifies_and_any_change_breaks_it() {
        let pair = key("k1");
        let public = STANDARD_NO_PAD.encode(pair.public_key());
        let body = br#"{"a":1}"#;
        let (origin, us) = (name("origin.test"), name("dest.test"));
        let value = sign_request(origin, us, &pair, &Method::POST, "/_matrix/federation/v1/x?y=1", body).unwrap();
        let x = parse_authorization(&headers(value)).unwrap();
        assert_eq!(x.origin.as_str(), "origin.test");
        assert_eq!(x.key.as_str(), "ed25519:k1");
        verify_request(&x, us, &Method::POST, "/_matrix/federation/v1/x?y=1", body, &public).unwrap();

        let tampered: [(&Method, &str, &[u8]); 4] = [
            (&Method::PUT, "/_matrix/federation/v1/x?y=1", body),
            (&Method::POST, "/_matrix/federation/v1/x?y=2", body),
            (&Method::POST, "/_matrix/federation/v1/x?y=1", br#"{"a":2}"#),
            (&Method::POST, "/_matrix/federation/v1/x?y=1", b""),
        ];
        for (method, uri, body) in tampered {
            assert!(verify_request(&x, us, method, uri, body, &public).is_err(), "{method} {uri}");
        }
        let other = STANDARD_NO_PAD.encode(key("k1").public_key());
        assert!(verify_request(&x, us, &Method::POST, "/_matrix/federation/v1/x?y=1", body, &other).is_err());
        let wrong_destination =
            verify_request(&x, name("else.test"), &Method::POST, "/_matrix/federation/v1/x?y=1", body, &public);
        assert!(matches!(wrong_destination, Err(FederationError::Unauthorized(m)) if m.contains("signed for")));
    }

    #[test]
    fn header_parsing_follows_the_spec_grammar() {
        let accepted = [
            r#"X-Matrix origin="o.test",destination="d.test",key="ed25519:k",sig="dGVzdA""#,
            r#"X-Matrix origin=o.test,destination=d.test,key="ed25519:k",sig=dGVzdA"#,
            r#"x-matrix ORIGIN="o.test", Key="ed25519:k",  sig="dGVzdA", extra="ignored""#,
            r#"X-Matrix origin="o.test:8448",key="ed25519:k",sig="dGVzdA""#,
        ];
        for value in accepted {
            let x = parse_authorization(&headers(HeaderValue::from_str(value).unwrap()));
            assert!(x.is_ok(), "{value}: {x:?}");
        }
        let refused = [
            "Bearer abc",
            r#"X-Matrix key="ed25519:k",sig="dGVzdA""#,
            r#"X-Matrix origin="o.test",sig="dGVzdA""#,
            r#"X-Matrix origin="o.test",key="ed25519:k""#,
            r#"X-Matrix origin="not a name",key="ed25519:k",sig="dGVzdA""#,
            r#"X-Matrix origin="o.test",key="nocolon",sig="dGVzdA""#,
            r#"X-Matrix origin="o.test",origin="p.test",key="ed25519:k",sig="dGVzdA""#,
        ];
        for value in refused {
            assert!(parse_authorization(&headers(HeaderValue::from_str(value).unwrap())).is_err(), "{value}");
        }
        assert!(parse_authorization(&HeaderMap::new()).is_err());
    }

    #[test]
    fn credentials_without_destination_are_checked_against_this_server() {
        let pair = key("k1");
        let public = STANDARD_NO_PAD.encode(pair.public_key());
        let us = name("dest.test");
        let value =
            sign_request(name("origin.test"), us, &pair, &Method::GET, "/_matrix/federation/v1/version", b"").unwrap();
        let signed = parse_authorization(&headers(value)).unwrap();
        // The same signature without the destination parameter: older servers send this.
        let legacy = format!(r#"X-Matrix origin="origin.test",key="ed25519:k1",sig="{}""#, signed.sig.encode());
        let x = parse_authorization(&headers(HeaderValue::from_str(&legacy).unwrap())).unwrap();
        verify_request(&x, us, &Method::GET, "/_matrix/federation/v1/version", b"", &public).unwrap();
        assert!(
            verify_request(&x, name("other.test"), &Method::GET, "/_matrix/federation/v1/version", b"", &public)
                .is_err()
        );
    }
}
