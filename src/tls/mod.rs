//! TLS between agents and the hub, with rustls: the hub's server configuration (asking for
//! client certificates when `[hub] client_ca` is set), the agent's client configuration, the
//! host id a client certificate names, and the mini-CA that makes certificates ([`ca`]).
//!
//! Only TLS 1.3 and 1.2 are spoken, with rustls' default cipher suites (all forward-secret
//! AEAD suites). Keys and certificates are PEM files.

pub mod ca;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::UnixTime;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::message::validate_name;

/// TLS 1.3 and 1.2; nothing older.
const VERSIONS: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file (a certificate and its chain, or a set of CAs).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| Error::Config(format!("{}: cannot read certificates: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Config(format!(
            "{}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
            path.display()
        )));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        Error::Config(format!(
            "{}: cannot read a private key: {e}",
            path.display()
        ))
    })
}

/// The CAs in `path`, as a trust store.
fn load_roots(path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| Error::Config(format!("{}: not a usable CA: {e}", path.display())))?;
    }
    Ok(roots)
}

/// The hub's TLS files, as configured.
#[derive(Debug, Clone)]
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CAs whose client certificates identify hosts; `None`: no client certificates.
    pub client_ca: Option<PathBuf>,
}

/// The hub's TLS configuration, replaced whole on reload (SIGHUP) so that renewed
/// certificates take effect without dropping connections.
pub struct ServerTls {
    /// Fixed at start-up: a reload may not turn client certificates on or off.
    asks_client_certs: bool,
    current: RwLock<Arc<Generation>>,
}

/// One loaded TLS configuration. When a reload replaces it, [`Generation::replaced`] fires,
/// so that open connections can check their client certificate against the new one.
pub struct Generation {
    config: Arc<ServerConfig>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    replaced: CancellationToken,
}

impl ServerTls {
    pub fn load(files: ServerFiles) -> Result<ServerTls> {
        let generation = Generation::load(&files)?;
        Ok(ServerTls {
            asks_client_certs: files.client_ca.is_some(),
            current: RwLock::new(Arc::new(generation)),
        })
    }

    /// Reads `files` (the same paths, or new ones from a reloaded config file); on error
    /// the configuration in use stays. Whether client certificates are asked for cannot
    /// change here: connections identified without them would keep that identity.
    pub fn reload(&self, files: ServerFiles) -> Result<()> {
        if files.client_ca.is_some() != self.asks_client_certs() {
            return Err(Error::Config(
                "[hub] client_ca was added or removed: that takes effect at the next restart"
                    .into(),
            ));
        }
        let next = Arc::new(Generation::load(&files)?);
        let previous = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|p| p.into_inner()),
            next,
        );
        previous.replaced.cancel();
        Ok(())
    }

    /// The configuration in use now.
    pub fn current(&self) -> Arc<Generation> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// True when callers are identified by client certificates.
    pub fn asks_client_certs(&self) -> bool {
        self.asks_client_certs
    }
}

impl Generation {
    fn load(files: &ServerFiles) -> Result<Generation> {
        let verifier = files
            .client_ca
            .as_deref()
            .map(client_verifier)
            .transpose()?;
        Ok(Generation {
            config: Arc::new(server_config(files, verifier.clone())?),
            verifier,
            replaced: CancellationToken::new(),
        })
    }

    /// An acceptor for a new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.config))
    }

    /// Cancelled once a reload has put another configuration in use.
    pub fn replaced(&self) -> CancellationToken {
        self.replaced.clone()
    }

    /// Whether this configuration accepts a client certificate chain now: after the client
    /// CA was changed, or when a certificate may have expired on a long-lived connection.
    pub fn trusts(&self, chain: &[CertificateDer<'static>]) -> bool {
        let (Some(verifier), Some((end_entity, intermediates))) =
            (&self.verifier, chain.split_first())
        else {
            return true;
        };
        verifier
            .verify_client_cert(end_entity, intermediates, UnixTime::now())
            .is_ok()
    }
}

/// Verifies client certificates against the CAs in `ca`. A connection without a
/// certificate is let through the handshake, so that /healthz stays open to load balancers
/// and a /v1 call gets a clear 401 instead of a bare TLS alert. A certificate that is
/// presented must chain to the CA.
fn client_verifier(ca: &Path) -> Result<Arc<dyn ClientCertVerifier>> {
    WebPkiClientVerifier::builder_with_provider(Arc::new(load_roots(ca)?), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| Error::Config(format!("{}: {e}", ca.display())))
}

fn server_config(
    files: &ServerFiles,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
) -> Result<ServerConfig> {
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| Error::Config(format!("TLS: {e}")))?;
    let builder = match verifier {
        None => builder.with_no_client_auth(),
        Some(verifier) => builder.with_client_cert_verifier(verifier),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        Error::Config(format!(
            "{} and {}: {e}",
            files.cert.display(),
            files.key.display()
        ))
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The agent's TLS files, as configured.
#[derive(Debug, Clone, Default)]
pub struct ClientFiles {
    /// CAs trusted instead of the system's.
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// The host the client certificate must name (the agent's `host_id`), when set.
    pub host_id: Option<String>,
}

/// The agent's TLS configuration: the CAs of `ca_file` when it is set, else the system's,
/// and a client certificate when one is configured.
///
/// `ca_file` replaces the system's CAs rather than adding to them (as curl's `--cacert`
/// does): a fleet with a private CA must not also trust every public CA, any of which could
/// then issue a certificate for the hub's name and read the tokens and messages.
pub fn client_config(files: &ClientFiles) -> Result<ClientConfig> {
    let roots = match &files.ca_file {
        Some(ca) => load_roots(ca)?,
        None => system_roots()?,
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| Error::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots);
    match (&files.client_cert, &files.client_key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let certs = load_certs(cert)?;
            if let Some(host_id) = &files.host_id {
                check_client_identity(cert, &certs[0], host_id)?;
            }
            builder
                .with_client_auth_cert(certs, load_key(key)?)
                .map_err(|e| {
                    Error::Config(format!("{} and {}: {e}", cert.display(), key.display()))
                })
        }
        _ => Err(Error::Config(
            "client_cert and client_key must be set together".into(),
        )),
    }
}

/// Refuses a client certificate that names another host than `host_id`: the hub would
/// take this agent for that host, sending as it while refusing its pulls.
fn check_client_identity(path: &Path, cert: &CertificateDer<'_>, host_id: &str) -> Result<()> {
    let named = host_of_certificate(cert)
        .map_err(|why| Error::Config(format!("{}: {why}", path.display())))?;
    if named != host_id {
        return Err(Error::Config(format!(
            "{} is host {named}'s certificate, but this host is {host_id} (host_id); \
             the hub would take this agent for {named}",
            path.display()
        )));
    }
    Ok(())
}

/// The system's trusted CAs.
fn system_roots() -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system store may hold certificates rustls cannot use; skipping them is what
        // every TLS client does.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(Error::Config(
            "https: the system has no trusted CA installed; set ca_file".into(),
        ));
    }
    Ok(roots)
}

/// A client configuration that trusts nothing: for plain-HTTP hubs, whose connector never
/// uses it.
pub fn unused_client_config() -> ClientConfig {
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth()
}

/// The host id a client certificate names: its first DNS subject alternative name, else,
/// when it has no subject alternative names at all, its subject's common name. `Err` says
/// why there is none.
pub fn host_of_certificate(der: &CertificateDer<'_>) -> std::result::Result<String, String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der.as_ref())
        .map_err(|e| format!("unreadable client certificate: {e}"))?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| format!("unreadable subject alternative names: {e}"))?;
    let name = match sans {
        Some(sans) => sans
            .value
            .general_names
            .iter()
            .find_map(|name| match name {
                GeneralName::DNSName(dns) => Some(dns.to_string()),
                _ => None,
            })
            .ok_or("the client certificate names no host (no DNS name)")?,
        None => cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string)
            .ok_or("the client certificate names no host (no DNS name, no common name)")?,
    };
    validate_name("host", &name)
        .map_err(|_| "the client certificate's name is not a valid host id".to_string())?;
    Ok(name)
}

/// When a certificate stops being valid.
pub fn expiry(der: &CertificateDer<'_>) -> Option<std::time::SystemTime> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
    let seconds = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(sans: &[&str], cn: Option<&str>) -> CertificateDer<'static> {
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("self-signed").der().clone()
    }

    #[test]
    fn host_comes_from_the_first_dns_name_then_the_common_name() {
        assert_eq!(
            host_of_certificate(&cert_with(&["web-1", "web-2"], Some("other"))),
            Ok("web-1".into())
        );
        assert_eq!(
            host_of_certificate(&cert_with(&["10.0.0.1", "db-1"], None)),
            Ok("db-1".into()),
            "IP addresses are not host ids"
        );
        assert!(
            host_of_certificate(&cert_with(&["10.0.0.1"], Some("cn-host"))).is_err(),
            "with subject alternative names, the common name does not count"
        );
        assert_eq!(
            host_of_certificate(&cert_with(&[], Some("cn-host"))),
            Ok("cn-host".into())
        );
        assert!(host_of_certificate(&cert_with(&[], None)).is_err());
        assert!(
            host_of_certificate(&cert_with(&[], Some("bad name/../x"))).is_err(),
            "a name that is not a host id identifies nobody"
        );
    }
}
