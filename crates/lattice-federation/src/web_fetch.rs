//! Plain HTTP(S) fetches of URLs that someone else chose — a page a user asked to preview, a
//! `Location` another server's media answer points at — under the outbound
//! [`AddressPolicy`]:
//!
//! - every name is resolved by a resolver hook that drops the addresses the policy denies, so
//!   reqwest connects only to checked addresses (no window for DNS rebinding between a check
//!   and the connection); an IP-literal host, which reqwest connects to without asking the
//!   resolver, is checked before the request;
//! - redirects are followed here, not by reqwest, at most [`WebLimits::max_redirects`] times,
//!   each hop checked the same way (scheme, host, addresses);
//! - no proxy from the environment (a proxy would resolve names where no policy applies);
//! - bodies are read through [`read_body_limited`], which stops at the limit.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::header::{ACCEPT, LOCATION};
use reqwest::Url;

use crate::address_policy::AddressPolicy;
use crate::client::TlsSettings;
use crate::error::{FederationError, Result};

/// Timeouts and bounds of one fetch.
#[derive(Clone, Debug)]
pub struct WebLimits {
    pub connect_timeout: Duration,
    /// One request, body included.
    pub request_timeout: Duration,
    pub max_redirects: usize,
    /// Refuse `http://` URLs, redirects included (`.well-known`).
    pub https_only: bool,
}

impl Default for WebLimits {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            max_redirects: 5,
            https_only: false,
        }
    }
}

/// The resolver hook: system DNS (`getaddrinfo`), then only the addresses the policy permits.
#[derive(Clone)]
struct PolicyResolver {
    policy: Arc<AddressPolicy>,
}

/// Every address a name resolved to is denied; found again in reqwest's error chain.
#[derive(Debug)]
struct AllAddressesDenied(String);

impl std::fmt::Display for AllAddressesDenied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} resolves only to addresses this server does not connect to", self.0)
    }
}

impl std::error::Error for AllAddressesDenied {}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let permitted: Vec<SocketAddr> = found.iter().copied().filter(|addr| policy.permits(addr.ip())).collect();
            if permitted.is_empty() && !found.is_empty() {
                tracing::info!(%host, "outbound request refused: every address is denied by the address policy");
                return Err(Box::new(AllAddressesDenied(host)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(permitted.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// A fetcher of http(s) URLs under an address policy.
#[derive(Clone)]
pub struct WebFetcher {
    http: reqwest::Client,
    policy: Arc<AddressPolicy>,
    limits: WebLimits,
}

/// A 2xx answer, its body unread, and the URL it came from after redirects.
pub struct WebResponse {
    pub url: Url,
    pub response: reqwest::Response,
}

impl WebFetcher {
    /// Certificates are checked as `tls` says (the system's roots plus `trusted_ca`).
    pub fn new(policy: Arc<AddressPolicy>, limits: WebLimits, tls: &TlsSettings) -> Result<Self> {
        let mut builder = reqwest::Client::builder()
            .tls_backend_rustls()
            .https_only(limits.https_only)
            .dns_resolver(Arc::new(PolicyResolver { policy: policy.clone() }))
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(limits.connect_timeout)
            .timeout(limits.request_timeout)
            .pool_max_idle_per_host(2)
            .user_agent(concat!(
                "Mozilla/5.0 (compatible; Lattice/",
                env!("CARGO_PKG_VERSION"),
                "; Matrix homeserver)"
            ));
        if !tls.verify_peer_tls {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        if let Some(pem) = &tls.trusted_ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| FederationError::Invalid(format!("trusted_ca is not a PEM certificate bundle: {e}")))?;
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder.build().map_err(|e| FederationError::Invalid(format!("building the HTTP client: {e}")))?;
        Ok(Self { http, policy, limits })
    }

    pub fn policy(&self) -> &AddressPolicy {
        &self.policy
    }

    /// `GET url`, following redirects; a 2xx answer with its body unread. `accept` is sent as
    /// the `Accept` header.
    pub async fn get(&self, url: &str, accept: &str) -> Result<WebResponse> {
        let mut url = parse_web_url(url)?;
        for _ in 0..=self.limits.max_redirects {
            if self.limits.https_only && url.scheme() != "https" {
                return Err(FederationError::InvalidUrl(format!("{url} is not an https URL")));
            }
            self.check_literal_host(&url)?;
            let host = url.host_str().unwrap_or_default().to_owned();
            let response = self
                .http
                .get(url.clone())
                .header(ACCEPT, accept)
                .send()
                .await
                .map_err(|error| request_error(&host, &error))?;
            let status = response.status();
            if status.is_redirection() && status != http::StatusCode::NOT_MODIFIED {
                let location = response
                    .headers()
                    .get(LOCATION)
                    .and_then(|value| value.to_str().ok())
                    .ok_or_else(|| invalid_response(&host, "a redirect without a Location"))?;
                let next = url.join(location).map_err(|e| invalid_response(&host, &format!("bad Location: {e}")))?;
                url = parse_web_url(next.as_str())?;
                continue;
            }
            if !status.is_success() {
                return Err(FederationError::Status { server: host, status: status.as_u16(), body: String::new() });
            }
            return Ok(WebResponse { url, response });
        }
        Err(invalid_response(
            url.host_str().unwrap_or_default(),
            &format!("more than {} redirects", self.limits.max_redirects),
        ))
    }

    /// reqwest connects to an IP-literal host without the resolver: check it here.
    fn check_literal_host(&self, url: &Url) -> Result<()> {
        let host = url.host_str().unwrap_or_default();
        let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() else { return Ok(()) };
        if self.policy.permits(ip) {
            Ok(())
        } else {
            tracing::info!(%ip, "outbound request refused by the address policy");
            Err(FederationError::AddressDenied(ip.to_string()))
        }
    }
}

/// An absolute `http`/`https` URL with a host and no credentials.
pub fn parse_web_url(text: &str) -> Result<Url> {
    let url = Url::parse(text).map_err(|e| FederationError::InvalidUrl(format!("{text:?} is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(FederationError::InvalidUrl(format!(
            "only http and https URLs are fetched, not {:?}",
            url.scheme()
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(FederationError::InvalidUrl(format!("{text:?} has no host")));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(FederationError::InvalidUrl("URLs with credentials are not fetched".into()));
    }
    Ok(url)
}

fn invalid_response(host: &str, detail: &str) -> FederationError {
    FederationError::InvalidResponse { server: host.to_owned(), detail: detail.to_owned() }
}

/// A transport error: the policy's refusal, a timeout, or the host being unreachable.
fn request_error(host: &str, error: &reqwest::Error) -> FederationError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = source {
        if let Some(denied) = cause.downcast_ref::<AllAddressesDenied>() {
            return FederationError::AddressDenied(denied.0.clone());
        }
        source = cause.source();
    }
    if error.is_timeout() {
        return FederationError::TimedOut(host.to_owned());
    }
    FederationError::Transport { server: host.to_owned(), detail: crate::client::error_chain(error) }
}

/// Reads a body up to `max_bytes`; a longer one is refused as soon as it passes the limit
/// (the rest is never read).
pub async fn read_body_limited(host: &str, mut response: reqwest::Response, max_bytes: usize) -> Result<Vec<u8>> {
    let too_large = || invalid_response(host, &format!("the body is larger than {max_bytes} bytes"));
    if response.content_length().is_some_and(|length| length > max_bytes as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|error| request_error(host, &error))? {
        if body.len() + chunk.len() > max_bytes {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_absolute_http_urls_with_a_host_are_fetched() {
        assert!(parse_web_url("https://example.org/page").is_ok());
        assert!(parse_web_url("http://127.0.0.1:8080/").is_ok());
        for bad in [
            "ftp://example.org/",
            "file:///etc/passwd",
            "/relative",
            "not a url",
            "https://user:pw@example.org/",
            "data:text/html,hi",
        ] {
            assert!(matches!(parse_web_url(bad), Err(FederationError::InvalidUrl(_))), "{bad}");
        }
    }

    #[tokio::test]
    async fn denied_literal_hosts_are_refused_before_any_connection() {
        let tls = TlsSettings { verify_peer_tls: true, trusted_ca_pem: None };
        let fetcher = WebFetcher::new(Arc::new(AddressPolicy::default()), WebLimits::default(), &tls).unwrap();
        for url in
            ["http://127.0.0.1:1/", "http://[::1]:1/", "http://[::ffff:10.0.0.1]/", "http://169.254.169.254/latest"]
        {
            assert!(matches!(fetcher.get(url, "*/*").await, Err(FederationError::AddressDenied(_))), "{url}");
        }
    }
}
