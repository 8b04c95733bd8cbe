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

use chrono::{Datelike, Utc};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

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
/// an existing CA: every certificate it signed would stop being trusted.
pub fn init(dir: &Path, hub_names: &[String], days: u32) -> Result<(Issued, Issued)> {
    let ca_key_path = dir.join(CA_KEY);
    if ca_key_path.exists() {
        return Err(Error::Config(format!(
            "{}: a CA exists already; remove {CA_KEY} and {CA_CERT} first to start over \
             (every certificate it signed then stops being trusted)",
            dir.display()
        )));
    }
    spool::ensure_dir(dir)?;
    let key = KeyPair::generate().map_err(rcgen_error)?;
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
    set_validity(&mut params, CA_DAYS);
    let cert = params.self_signed(&key).map_err(rcgen_error)?;
    spool::write_private(dir, CA_KEY, key.serialize_pem().as_bytes())?;
    spool::write_atomic(dir, CA_CERT, cert.pem().as_bytes())?;
    let ca = Issued {
        cert: dir.join(CA_CERT),
        key: ca_key_path,
    };
    let hub = server(dir, hub_names, days)?;
    Ok((ca, hub))
}

/// (Re)issues the hub's server certificate, valid for `names` (DNS names or IP
/// addresses) and for this machine's loopback names.
pub fn server(dir: &Path, names: &[String], days: u32) -> Result<Issued> {
    let issuer = load_issuer(dir)?;
    let mut all: Vec<String> = names.to_vec();
    let machine = system_hostname()
        .ok()
        .filter(|n| n.parse::<IpAddr>().is_err());
    for default in machine.into_iter().chain(["localhost".to_string()]) {
        if !all.contains(&default) {
            all.push(default);
        }
    }
    for ip in ["127.0.0.1", "::1"] {
        if !all
            .iter()
            .any(|n| n.parse::<IpAddr>().ok() == ip.parse().ok())
        {
            all.push(ip.into());
        }
    }
    let mut params = CertificateParams::new(all.clone()).map_err(|e| {
        Error::Invalid(format!(
            "hub names {all:?}: {e} (give DNS names or IP addresses)"
        ))
    })?;
    params.distinguished_name = name(&all[0]);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, i64::from(days));
    write_leaf(dir, HUB_CERT, HUB_KEY, &params, &issuer)
}

/// Issues HOST's client certificate: its host id is both the DNS name and the common name,
/// which is what the hub reads it from.
pub fn issue_host(dir: &Path, host: &str, days: u32) -> Result<Issued> {
    validate_name("host", host).map_err(Error::Invalid)?;
    let issuer = load_issuer(dir)?;
    let mut params = CertificateParams::new(vec![host.to_string()])
        .map_err(|e| Error::Invalid(format!("host {host}: {e}")))?;
    params.distinguished_name = name(host);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, i64::from(days));
    let hosts = dir.join(HOSTS_DIR);
    spool::ensure_dir(&hosts)?;
    write_leaf(
        &hosts,
        &format!("{host}.crt"),
        &format!("{host}.key"),
        &params,
        &issuer,
    )
}

fn write_leaf(
    dir: &Path,
    cert_name: &str,
    key_name: &str,
    params: &CertificateParams,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<Issued> {
    let key = KeyPair::generate().map_err(rcgen_error)?;
    let cert = params.signed_by(&key, issuer).map_err(rcgen_error)?;
    // The key first: a certificate without its key is useless, a key without its
    // certificate harmless.
    spool::write_private(dir, key_name, key.serialize_pem().as_bytes())?;
    spool::write_atomic(dir, cert_name, cert.pem().as_bytes())?;
    Ok(Issued {
        cert: dir.join(cert_name),
        key: dir.join(key_name),
    })
}

fn load_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    if !key_path.exists() {
        return Err(Error::Config(format!(
            "{}: no CA here; create one with `mesync tls init`",
            dir.display()
        )));
    }
    let cert = fs::read_to_string(&cert_path).ctx("read", &cert_path)?;
    let key = fs::read_to_string(&key_path).ctx("read", &key_path)?;
    let key = KeyPair::from_pem(&key)
        .map_err(|e| Error::Config(format!("{}: {e}", key_path.display())))?;
    Issuer::from_ca_cert_pem(&cert, key)
        .map_err(|e| Error::Config(format!("{}: {e}", cert_path.display())))
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "mesync");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// From yesterday (a clock a little behind still accepts it) for `days` days.
fn set_validity(params: &mut CertificateParams, days: i64) {
    let day = |offset: i64| {
        let date = (Utc::now() + chrono::Duration::days(offset)).date_naive();
        // Month and day always fit in u8.
        rcgen::date_time_ymd(date.year(), date.month() as u8, date.day() as u8)
    };
    params.not_before = day(-1);
    params.not_after = day(days);
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
}
