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
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};
use tokio_rustls::TlsAcceptor;

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
    files: ServerFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl ServerTls {
    pub fn load(files: ServerFiles) -> Result<ServerTls> {
        let config = server_config(&files)?;
        Ok(ServerTls {
            files,
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// Reads the files again; on error the configuration in use stays.
    pub fn reload(&self) -> Result<()> {
        let config = server_config(&self.files)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        Ok(())
    }

    /// An acceptor for the next connection, with the configuration in use now.
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = self.current.read().unwrap_or_else(|p| p.into_inner());
        TlsAcceptor::from(Arc::clone(&config))
    }

    /// True when callers are identified by client certificates.
    pub fn asks_client_certs(&self) -> bool {
        self.files.client_ca.is_some()
    }
}

fn server_config(files: &ServerFiles) -> Result<ServerConfig> {
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| Error::Config(format!("TLS: {e}")))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            // A connection without a certificate is let through the handshake, so that
            // /healthz stays open to load balancers and a /v1 call gets a clear 401 instead
            // of a bare TLS alert. A certificate that is presented must chain to the CA.
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(load_roots(ca)?), provider())
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| Error::Config(format!("{}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
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
    /// CAs trusted besides the system's.
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// The agent's TLS configuration: the system's trusted CAs plus `ca_file`, and a client
/// certificate when one is configured.
pub fn client_config(files: &ClientFiles) -> Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    let system = rustls_native_certs::load_native_certs();
    for cert in system.certs {
        // A system store may hold certificates rustls cannot use; skipping them is what
        // every TLS client does.
        let _ = roots.add(cert);
    }
    if let Some(ca) = &files.ca_file {
        roots.extend(load_roots(ca)?.roots);
    }
    if roots.is_empty() {
        return Err(Error::Config(
            "https: no trusted CA: the system has none installed and ca_file is not set".into(),
        ));
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| Error::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots);
    match (&files.client_cert, &files.client_key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| Error::Config(format!("{} and {}: {e}", cert.display(), key.display()))),
        _ => Err(Error::Config(
            "client_cert and client_key must be set together".into(),
        )),
    }
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

/// The host id a client certificate names: its first DNS subject alternative name, else its
/// subject's common name. `Err` says why there is none.
pub fn host_of_certificate(der: &CertificateDer<'_>) -> std::result::Result<String, String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der.as_ref())
        .map_err(|e| format!("unreadable client certificate: {e}"))?;
    let san_dns = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|name| match name {
                GeneralName::DNSName(dns) => Some(dns.to_string()),
                _ => None,
            })
        });
    let name = match san_dns {
        Some(name) => name,
        None => cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string)
            .ok_or("the client certificate names no host (no DNS name, no common name)")?,
    };
    validate_name("host", &name)
        .map_err(|e| format!("the client certificate's name is not a host id: {e}"))?;
    Ok(name)
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
