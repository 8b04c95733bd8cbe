//! The mini-CA behind `mesync tls`: a private CA, the hub's server certificate and one
//! client certificate per host, so that a fleet gets mutual TLS without openssl.
//!
//! Everything lives in one directory (by default `tls/` in the hub's data dir):
//!
//! | file | what | goes to |
//! |---|---|---|
//! | `ca.crt` | the CA certificate | every agent (`ca_file`) and the hub (`[hub] client_ca`) |
//! | `ca.key` | the CA's key (0600) | stays here; whoever holds it can mint any host |
//! | `hub.crt`, `hub.key` | the hub's server certificate | `[hub] tls_cert`, `tls_key` |
//! | `hosts/HOST.crt`, `hosts/HOST.key` | HOST's client certificate | that agent's `client_cert`, `client_key` |
//!
//! Keys are ECDSA P-256, written with mode 0600 from the start. Certificates carry the key
//! usages their role needs and nothing more: the CA may sign certificates only (path length
//! 0: it cannot make other CAs), the hub's certificate is for server authentication, a
//! host's for client authentication, so a host's certificate cannot pose as the hub.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
};
use time::OffsetDateTime;

use crate::config::system_hostname;
use crate::error::{Error, IoContext, Result};
use crate::message::validate_name;
use crate::spool;

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const HUB_CERT: &str = "hub.crt";
pub const HUB_KEY: &str = "hub.key";
pub const HOSTS_DIR: &str = "hosts";

/// How long the CA is valid.
const CA_DAYS: i64 = 3650;
/// How long a hub or host certificate is valid unless told otherwise.
pub const DEFAULT_DAYS: u32 = 825;

/// A certificate and its key, as written.
#[derive(Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Creates the CA in `dir`, and the hub's certificate for `hub_names`. Refuses to replace
/// an existing CA: every certificate it signed would stop being trusted. Everything is
/// made before anything is written, and the CA's key is written last, so a failed `init`
/// can simply be run again.
pub fn init(dir: &Path, hub_names: &[String], days: u32) -> Result<(Issued, Issued)> {
    let ca_key_path = dir.join(CA_KEY);
    if ca_key_path.exists() {
        return Err(Error::Config(format!(
            "{}: a CA exists already; remove {CA_KEY} and {CA_CERT} first to start over \
             (every certificate it signed then stops being trusted)",
            dir.display()
        )));
    }
    let names = with_default_names(hub_names)?;
    let ca_key = KeyPair::generate().map_err(rcgen_error)?;
    let ca_params = ca_params()?;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(rcgen_error)?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = Ca {
        not_after: ca_params.not_after,
        issuer: Issuer::new(ca_params, ca_key),
    };
    let (hub_key, hub_cert) = ca.sign(hub_params(&names)?, days)?;
    spool::ensure_dir(dir)?;
    spool::write_atomic(dir, CA_CERT, ca_cert.pem().as_bytes())?;
    let hub = write_leaf(dir, HUB_CERT, HUB_KEY, &hub_key, &hub_cert)?;
    spool::write_private(dir, CA_KEY, ca_key_pem.as_bytes())?;
    let ca = Issued {
        cert: dir.join(CA_CERT),
        key: ca_key_path,
    };
    Ok((ca, hub))
}

/// (Re)issues the hub's server certificate, valid for `names` (DNS names or IP addresses)
/// and for this machine's own names; with no names, for the names of the certificate it
/// replaces, so a renewal cannot drop one by accident.
pub fn server(dir: &Path, names: &[String], days: u32) -> Result<Issued> {
    let names = if names.is_empty() {
        names_in(&dir.join(HUB_CERT))?
    } else {
        with_default_names(names)?
    };
    let ca = Ca::load(dir)?;
    let (key, cert) = ca.sign(hub_params(&names)?, days)?;
    write_leaf(dir, HUB_CERT, HUB_KEY, &key, &cert)
}

/// Issues HOST's client certificate: its host id is both the DNS name and the common name,
/// which is what the hub reads it from.
pub fn issue_host(dir: &Path, host: &str, days: u32) -> Result<Issued> {
    validate_name("host", host).map_err(Error::Invalid)?;
    let ca = Ca::load(dir)?;
    let mut params = CertificateParams::new(vec![host.to_string()])
        .map_err(|e| Error::Invalid(format!("host {host}: {e}")))?;
    params.distinguished_name = name(host);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let (key, cert) = ca.sign(params, days)?;
    let hosts = dir.join(HOSTS_DIR);
    spool::ensure_dir(&hosts)?;
    write_leaf(
        &hosts,
        &format!("{host}.crt"),
        &format!("{host}.key"),
        &key,
        &cert,
    )
}

/// The CA's certificate parameters: its own name, signing certificates only.
fn ca_params() -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    // A name of its own: two CAs with one name (made on two hubs with the same hostname)
    // would be mistaken for each other when a chain is built.
    let machine = system_hostname().unwrap_or_else(|_| "localhost".into());
    let mut tag = [0u8; 4];
    getrandom::fill(&mut tag).map_err(|e| Error::Config(format!("no randomness: {e}")))?;
    let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    params.distinguished_name = name(&format!("mesync CA {machine} {tag}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = day(-1);
    params.not_after = day(CA_DAYS);
    Ok(params)
}

/// The hub's certificate parameters, for `names` (checked already).
fn hub_params(names: &[String]) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(names.to_vec())
        .map_err(|e| Error::Invalid(format!("hub names {names:?}: {e}")))?;
    params.distinguished_name = name(&names[0]);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    Ok(params)
}

/// `names`, each checked, then this machine's hostname (when it is a usable DNS name),
/// `localhost`, `127.0.0.1` and `::1`.
fn with_default_names(names: &[String]) -> Result<Vec<String>> {
    for name in names {
        check_hub_name(name)?;
    }
    let mut all: Vec<String> = names.to_vec();
    let machine = system_hostname().ok().filter(|n| check_hub_name(n).is_ok());
    for default in machine
        .into_iter()
        .chain(["localhost", "127.0.0.1", "::1"].map(String::from))
    {
        if !all.iter().any(|n| same_name(n, &default)) {
            all.push(default);
        }
    }
    Ok(all)
}

/// A name agents can reach the hub by: an IP address or a DNS name (no wildcard, port,
/// scheme or path).
fn check_hub_name(name: &str) -> Result<()> {
    if name.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let valid = !name.contains('*')
        && matches!(
            rustls::pki_types::ServerName::try_from(name),
            Ok(rustls::pki_types::ServerName::DnsName(_))
        );
    if !valid {
        return Err(Error::Invalid(format!(
            "hub name {name:?}: give a DNS name (hub.example.com) or an IP address, \
             without wildcard, scheme, port or path"
        )));
    }
    Ok(())
}

fn same_name(a: &str, b: &str) -> bool {
    match (a.parse::<IpAddr>(), b.parse::<IpAddr>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a.eq_ignore_ascii_case(b),
    }
}

/// The DNS names and IP addresses a certificate is for.
fn names_in(path: &Path) -> Result<Vec<String>> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let certs = crate::tls::load_certs(path)
        .map_err(|e| Error::Config(format!("{e}; give the hub's names with --name")))?;
    let (_, cert) = X509Certificate::from_der(certs[0].as_ref())
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    let names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::DNSName(dns) => Some(dns.to_string()),
                    GeneralName::IPAddress(bytes) => ip_from_bytes(bytes).map(|ip| ip.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        return Err(Error::Config(format!(
            "{}: names no host; give the hub's names with --name",
            path.display()
        )));
    }
    Ok(names)
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// The CA, loaded to sign certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    not_after: OffsetDateTime,
}

impl Ca {
    /// Loads `ca.crt` and `ca.key` from `dir`, checking that they belong together.
    fn load(dir: &Path) -> Result<Ca> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        if !key_path.exists() {
            return Err(Error::Config(format!(
                "{}: no CA here; create one with `mesync tls init`",
                dir.display()
            )));
        }
        let key = fs::read_to_string(&key_path).ctx("read", &key_path)?;
        let key = KeyPair::from_pem(&key)
            .map_err(|e| Error::Config(format!("{}: {e}", key_path.display())))?;
        let der = crate::tls::load_certs(&cert_path)?;
        let (_, cert) = X509Certificate::from_der(der[0].as_ref())
            .map_err(|e| Error::Config(format!("{}: {e}", cert_path.display())))?;
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(Error::Config(format!(
                "{} is not the key of {}: the certificates it signed would not verify",
                key_path.display(),
                cert_path.display()
            )));
        }
        let not_after = cert.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&der[0], key)
            .map_err(|e| Error::Config(format!("{}: {e}", cert_path.display())))?;
        Ok(Ca { issuer, not_after })
    }

    /// Signs `params` with a new key, valid from yesterday (a clock a little behind still
    /// accepts it) for `days` days, but never beyond the CA itself.
    fn sign(&self, mut params: CertificateParams, days: u32) -> Result<(KeyPair, Certificate)> {
        // A certificate bounded by an expired CA could never be valid.
        if self.not_after <= day(0) {
            return Err(Error::Config(format!(
                "the CA expired on {}; make a new one with `mesync tls init` in another directory",
                self.not_after.date()
            )));
        }
        params.not_before = day(-1);
        params.not_after = day(i64::from(days)).min(self.not_after);
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(rcgen_error)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(rcgen_error)?;
        Ok((key, cert))
    }
}

/// Writes a certificate and its key: the key first, since a certificate without its key is
/// useless, a key without its certificate harmless.
fn write_leaf(
    dir: &Path,
    cert_name: &str,
    key_name: &str,
    key: &KeyPair,
    cert: &Certificate,
) -> Result<Issued> {
    spool::write_private(dir, key_name, key.serialize_pem().as_bytes())?;
    spool::write_atomic(dir, cert_name, cert.pem().as_bytes())?;
    Ok(Issued {
        cert: dir.join(cert_name),
        key: dir.join(key_name),
    })
}

/// Now, `offset` days away.
fn day(offset: i64) -> OffsetDateTime {
    OffsetDateTime::now_utc() + time::Duration::days(offset)
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "mesync");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn rcgen_error(e: rcgen::Error) -> Error {
    Error::Config(format!("certificate: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_then_issue_writes_private_keys_and_refuses_a_second_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = dir.path().join("tls");
        let (ca, hub) = init(&tls, &["hub.example.com".into()], 30).expect("init");
        let host = issue_host(&tls, "web-1", 30).expect("issue");
        for key in [&ca.key, &hub.key, &host.key] {
            let mode = fs::metadata(key).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let der = crate::tls::load_certs(&host.cert).expect("host cert");
        assert_eq!(crate::tls::host_of_certificate(&der[0]), Ok("web-1".into()));
        assert!(init(&tls, &[], 30).is_err(), "a second init keeps the CA");
        assert!(issue_host(&tls, "../etc", 30).is_err());
        assert!(issue_host(&dir.path().join("none"), "web-2", 30).is_err());
    }

    #[test]
    fn bad_hub_names_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = dir.path().join("tls");
        for bad in [
            "bad name",
            "https://hub.example.com:8080",
            "*.example.com",
            "hub.example.com:8080",
            "hüb.example.com",
        ] {
            let err = init(&tls, &[bad.to_string()], 30).expect_err(bad);
            assert!(err.to_string().contains("hub name"), "{bad}: {err}");
            assert!(!tls.exists(), "{bad}: nothing written");
        }
        init(&tls, &["10.0.0.5".into(), "hub.example.com".into()], 30).expect("good names");
    }

    #[test]
    fn renewing_without_names_keeps_the_names_and_the_ca_bounds_validity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = dir.path().join("tls");
        init(&tls, &["hub.example.com".into(), "10.0.0.5".into()], 30).expect("init");
        let before = names_in(&tls.join(HUB_CERT)).expect("names");
        server(&tls, &[], 3650).expect("renew");
        let after = names_in(&tls.join(HUB_CERT)).expect("names");
        assert_eq!(before, after);
        assert!(after.contains(&"hub.example.com".to_string()), "{after:?}");
        assert!(after.contains(&"10.0.0.5".to_string()), "{after:?}");
        let ca = Ca::load(&tls).expect("ca");
        let der = crate::tls::load_certs(&tls.join(HUB_CERT)).expect("hub cert");
        let expiry = crate::tls::expiry(&der[0]).expect("expiry");
        let ca_expiry = std::time::UNIX_EPOCH
            + std::time::Duration::from_secs(ca.not_after.unix_timestamp() as u64);
        assert!(expiry <= ca_expiry, "a certificate never outlives its CA");
    }

    #[test]
    fn an_expired_ca_signs_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = dir.path().join("tls");
        init(&tls, &[], 30).expect("init");
        let mut ca = Ca::load(&tls).expect("ca");
        ca.not_after = day(-1);
        let params = CertificateParams::new(vec!["web-1".to_string()]).expect("params");
        let err = ca.sign(params, 30).expect_err("an expired CA");
        assert!(err.to_string().contains("the CA expired"), "{err}");
    }

    #[test]
    fn a_ca_key_that_is_not_the_certificates_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (one, two) = (dir.path().join("one"), dir.path().join("two"));
        init(&one, &[], 30).expect("init one");
        init(&two, &[], 30).expect("init two");
        fs::copy(two.join(CA_KEY), one.join(CA_KEY)).expect("swap the key");
        let err = issue_host(&one, "web-1", 30).expect_err("mismatched key");
        assert!(err.to_string().contains("is not the key of"), "{err}");
    }
}
