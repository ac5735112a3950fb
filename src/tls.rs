//! TLS for the federation listener: loading the certificate and key (with errors that name the
//! option and the file), a listener that completes handshakes off the accept loop, and
//! self-signed certificates for test networks (`lattice tls self-signed`).

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// A handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections wait in the kernel's backlog.
const MAX_CONCURRENT_HANDSHAKES: usize = 256;
/// Completed handshakes waiting for the HTTP server to take them.
const ACCEPTED_QUEUE: usize = 64;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The rustls server configuration from `federation.tls_cert` (PEM chain, leaf first) and
/// `federation.tls_key` (PEM private key).
pub fn server_config(cert_path: &Path, key_path: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let cert_text =
        std::fs::read(cert_path).with_context(|| format!("reading federation.tls_cert {}", cert_path.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_text)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("federation.tls_cert {} is not valid PEM: {e}", cert_path.display()))?;
    if certs.is_empty() {
        bail!("federation.tls_cert {} holds no PEM certificate", cert_path.display());
    }
    let key_text =
        std::fs::read(key_path).with_context(|| format!("reading federation.tls_key {}", key_path.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_text).map_err(|e| {
        anyhow::anyhow!("federation.tls_key {} holds no usable PEM private key: {e}", key_path.display())
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            anyhow::anyhow!(
                "federation.tls_cert {} and federation.tls_key {} do not form a usable pair: {e}",
                cert_path.display(),
                key_path.display()
            )
        })?;
    // The HTTP server speaks HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A TLS listener for `axum::serve`: a background task accepts TCP connections and runs each
/// handshake in its own task (bounded in number and time), so one slow client never stalls
/// the others' accepts.
pub struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor_task: JoinHandle<()>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (sender, accepted) = mpsc::channel(ACCEPTED_QUEUE);
        let acceptor = TlsAcceptor::from(config);
        let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
        let acceptor_task = tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else { return };
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: wait rather than spin.
                        tracing::warn!(%error, "federation listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let sender = sender.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = sender.send((tls, peer)).await;
                        }
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { accepted, local, acceptor_task })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor_task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(accepted) => accepted,
            // The acceptor task ended (only when the runtime shuts down): accept nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Writes `cert.pem` and `key.pem` for `name` (a DNS name or an IP address) into `out`: a
/// self-signed certificate valid for server authentication, for test networks. Peers trust it
/// through their `federation.trusted_ca` (or run with `verify_peer_tls = false`).
pub fn write_self_signed(name: &str, out: &Path) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    // A server name may carry a port (`lat1.test:8448`, `[::1]:8448`); the certificate names
    // the host only. A bare IPv6 address has colons but no port.
    let host = if name.parse::<std::net::IpAddr>().is_ok() {
        name
    } else {
        let host = name.rsplit_once(':').filter(|(_, port)| port.parse::<u16>().is_ok()).map_or(name, |(host, _)| host);
        host.trim_start_matches('[').trim_end_matches(']')
    };
    let mut params = rcgen::CertificateParams::new(vec![host.to_owned()])
        .with_context(|| format!("{host:?} is not a DNS name or IP address"))?;
    params.distinguished_name.push(rcgen::DnType::CommonName, host);
    params.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    let key = rcgen::KeyPair::generate().context("generating a key")?;
    let cert = params.self_signed(&key).context("signing the certificate")?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let cert_path = out.join("cert.pem");
    let key_path = out.join("key.pem");
    crate::signing_key::write_durably(&cert_path, cert.pem().as_bytes(), false)?;
    crate::signing_key::write_durably(&key_path, key.serialize_pem().as_bytes(), true)?;
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_pair_loads_and_bad_files_name_their_option() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_self_signed("lat1.test:8448", dir.path()).unwrap();
        server_config(&cert, &key).unwrap();

        let missing = server_config(&dir.path().join("nope.pem"), &key).unwrap_err();
        assert!(format!("{missing:#}").contains("federation.tls_cert"), "{missing:#}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        let err = server_config(&garbage, &key).unwrap_err();
        assert!(format!("{err:#}").contains("holds no PEM certificate"), "{err:#}");
        let err = server_config(&cert, &garbage).unwrap_err();
        assert!(format!("{err:#}").contains("federation.tls_key"), "{err:#}");
        let (other_cert, _) = write_self_signed("other.test", &dir.path().join("other")).unwrap();
        let err = server_config(&other_cert, &key).unwrap_err();
        assert!(format!("{err:#}").contains("usable pair"), "{err:#}");
        for name in ["127.0.0.1", "127.0.0.1:8448", "::1", "[::1]:8448"] {
            let (cert, key) = write_self_signed(name, &dir.path().join("ip")).unwrap();
            server_config(&cert, &key).unwrap();
        }
    }
}
