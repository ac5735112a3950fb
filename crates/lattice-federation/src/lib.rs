//! Lattice's server-server layer below the service: server discovery ([`discovery`]), the
//! outbound HTTPS client with `X-Matrix` signing and per-destination back-off ([`client`],
//! [`x_matrix`], [`backoff`]), this server's published keys ([`own_keys`]), and other servers'
//! keys fetched, checked, cached and served as a notary ([`key_cache`]). Inbound requests are
//! authenticated with [`authenticate_request`]; the HTTP routes live in `lattice-api`.

pub mod address_policy;
pub mod backoff;
mod bounded;
pub mod client;
pub mod clock;
pub mod deny;
pub mod discovery;
mod error;
pub mod key_cache;
pub mod own_keys;
pub mod sender;
pub mod web_fetch;
pub mod x_matrix;

use http::{HeaderMap, Method};
use ruma::OwnedServerName;

pub use address_policy::AddressPolicy;
pub use client::{Auth, ClientLimits, ClientSettings, FederationClient, TlsSettings, Transport};
pub use clock::{Clock, SystemClock};
pub use deny::DenyList;
pub use discovery::{Discovery, HickoryResolver, NameResolver, NoDns};
pub use error::{FederationError, Result};
pub use key_cache::{KeyCache, StoredKey};
pub use own_keys::{OldVerifyKey, OwnKeys};
pub use sender::Sender;
pub use web_fetch::{WebFetcher, WebLimits, WebResponse};

/// Checks an inbound request's `X-Matrix` authorization and returns the origin server: the
/// credentials must parse, name this server as destination (when they name one), use a key of
/// the origin valid now (fetched when unknown), and sign exactly this method, target and body.
pub async fn authenticate_request(
    keys: &KeyCache,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<OwnedServerName> {
    let our_name = keys.own_keys().server_name();
    let credentials = x_matrix::parse_authorization(headers)?;
    x_matrix::check_destination(&credentials, our_name)?;
    if keys.client().denies(&credentials.origin) {
        return Err(FederationError::Denied(credentials.origin.to_string()));
    }
    let public_key = keys.request_key(&credentials.origin, credentials.key.as_str()).await?;
    x_matrix::verify_request(&credentials, our_name, method, path_and_query, body, &public_key)?;
    Ok(credentials.origin)
}
