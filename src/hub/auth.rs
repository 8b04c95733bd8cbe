//! Bearer tokens: who a caller is.
//!
//! `tokens.json` in the hub's data dir maps each host id to the SHA-256 of its token; the
//! token itself is printed once by `mesync token issue HOST` and never stored. Tokens are 32
//! random bytes, so a fast hash is enough (there is nothing to brute-force), and a presented
//! token is compared with every stored hash in constant time.
//!
//! Once any token exists, every `/v1` call needs one, and the caller's host id comes from it.
//! A running hub notices a changed file on the next request (and on SIGHUP at the latest).
//!
//! Open mode is the absence of the file, not an empty list: revoking the last token leaves
//! an empty `tokens.json` that refuses everyone, so that no revocation can open the hub.
//! A file that disappears under a running hub is treated the same way until a restart;
//! deleting it with the hub stopped is the deliberate way back to open mode.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};
use crate::message::{Timestamp, validate_name};
use crate::spool;

/// The file of token hashes, in the hub's data dir.
pub const TOKENS_FILE: &str = "tokens.json";
/// Tokens start with this, so that one found in a log or a repository is recognisable.
const TOKEN_PREFIX: &str = "msy_";

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    tokens: BTreeMap<String, TokenRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRecord {
    /// Hex SHA-256 of the token.
    sha256: String,
    issued_at: String,
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No token exists: open mode, anyone may act as any host.
    Open,
    /// The holder of this host's token.
    Host(String),
}

/// What a connection's client certificate says, on a hub that asks for them
/// (`[hub] client_ca`). Checked by rustls against the CA during the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCert {
    /// The hub does not ask: tokens alone say who calls.
    NotAsked,
    /// Asked; none was presented.
    Missing,
    /// A certificate from the CA naming this host.
    Host(String),
    /// A certificate from the CA that names no usable host id: why.
    Unusable(String),
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    Missing,
    Invalid,
}

/// Creates a token for `host` (replacing any it had) and returns it: the only time it is
/// shown.
pub fn issue(data_dir: &Path, host: &str) -> Result<String> {
    validate_name("host", host).map_err(Error::Invalid)?;
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::Config(format!("no randomness for a token: {e}")))?;
    let token = format!("{TOKEN_PREFIX}{}", hex(&bytes));
    let mut file = read(data_dir)?;
    file.tokens.insert(
        host.to_string(),
        TokenRecord {
            sha256: hex(&Sha256::digest(token.as_bytes())),
            issued_at: Timestamp::now().to_string(),
        },
    );
    write(data_dir, &file)?;
    Ok(token)
}

/// Removes `host`'s token; false when it had none.
pub fn revoke(data_dir: &Path, host: &str) -> Result<bool> {
    let mut file = read(data_dir)?;
    let had = file.tokens.remove(host).is_some();
    if had {
        write(data_dir, &file)?;
    }
    Ok(had)
}

/// The hosts that have a token, with when it was issued.
pub fn list(data_dir: &Path) -> Result<Vec<(String, String)>> {
    Ok(read(data_dir)?
        .tokens
        .into_iter()
        .map(|(host, record)| (host, record.issued_at))
        .collect())
}

fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(TOKENS_FILE)
}

fn read(data_dir: &Path) -> Result<TokenFile> {
    let path = path(data_dir);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TokenFile::default()),
        Err(source) => Err(Error::Io {
            action: "read",
            path,
            source,
        }),
    }
}

fn write(data_dir: &Path, file: &TokenFile) -> Result<()> {
    spool::ensure_dir(data_dir)?;
    let bytes = serde_json::to_vec_pretty(file).expect("the token file serializes");
    spool::write_private(data_dir, TOKENS_FILE, &bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The hub's view of the token file, reloaded when the file changes.
pub struct Tokens {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

#[derive(Default)]
struct Loaded {
    /// The modification time and size of the file last read; `None` when absent.
    stamp: Option<(SystemTime, u64)>,
    hashes: Vec<(String, [u8; 32])>,
    /// A token file has existed since start-up: every caller needs a token, even when
    /// none is left.
    required: bool,
}

impl Tokens {
    /// Loads the hub's tokens; an unreadable file is an error at start-up.
    pub fn load(data_dir: &Path) -> Result<Tokens> {
        let tokens = Tokens {
            path: path(data_dir),
            loaded: Mutex::new(Loaded::default()),
        };
        let file = read(data_dir)?;
        let mut loaded = tokens.lock();
        loaded.stamp = stamp(&tokens.path);
        loaded.hashes = hashes(&file)?;
        loaded.required = loaded.stamp.is_some();
        drop(loaded);
        Ok(tokens)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the file again if it changed. A broken file is logged and the tokens loaded
    /// before are kept.
    pub fn refresh(&self) {
        self.read_again(false);
    }

    /// Reads the file again even if its time and size look unchanged (SIGHUP): a rewrite
    /// of the same size within the file system's time granularity is picked up too.
    pub fn reload(&self) {
        self.read_again(true);
    }

    fn read_again(&self, always: bool) {
        let now = stamp(&self.path);
        let mut loaded = self.lock();
        if loaded.stamp == now && !(always && now.is_some()) {
            return;
        }
        if now.is_none() {
            tracing::error!(
                "{TOKENS_FILE} disappeared; keeping the tokens loaded before (open mode \
                 needs the file gone when the hub starts)"
            );
            loaded.stamp = now;
            return;
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        match read(dir).and_then(|file| hashes(&file)) {
            Ok(hashes) => {
                if hashes.is_empty() {
                    tracing::warn!("no tokens left: every /v1 call is refused until one is issued");
                }
                tracing::info!(hosts = hashes.len(), "tokens reloaded");
                loaded.hashes = hashes;
                loaded.stamp = now;
                loaded.required = true;
            }
            Err(err) => {
                tracing::error!(%err, "cannot reload the tokens; keeping the ones loaded before");
                // Logged once per change of the file, not on every request.
                loaded.stamp = now;
            }
        }
    }

    /// True in open mode: there is no token file.
    pub fn is_open(&self) -> bool {
        self.refresh();
        !self.lock().required
    }

    /// Who presents this `Authorization` header.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Caller, Denied> {
        self.refresh();
        let loaded = self.lock();
        if !loaded.required {
            return Ok(Caller::Open);
        }
        let token = header
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or(Denied::Missing)?;
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        // Every hash is compared, in constant time, whatever matches.
        for (host, hash) in &loaded.hashes {
            if bool::from(hash.ct_eq(&presented)) {
                found = Some(host.clone());
            }
        }
        found.map(Caller::Host).ok_or(Denied::Invalid)
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn hashes(file: &TokenFile) -> Result<Vec<(String, [u8; 32])>> {
    file.tokens
        .iter()
        .map(|(host, record)| {
            let bytes = (0..record.sha256.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(record.sha256.get(i..i + 2).unwrap_or("zz"), 16))
                .collect::<Result<Vec<u8>, _>>()
                .ok()
                .and_then(|v| <[u8; 32]>::try_from(v).ok())
                .ok_or_else(|| {
                    Error::Config(format!(
                        "{TOKENS_FILE}: the hash of {host} is not 64 hex digits"
                    ))
                })?;
            Ok((host.clone(), bytes))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn issued_tokens_identify_their_host_until_revoked() {
        let tmp = tempfile::tempdir().unwrap();
        let tokens = Tokens::load(tmp.path()).unwrap();
        assert_eq!(tokens.authenticate(None), Ok(Caller::Open));

        let a = issue(tmp.path(), "alpha").unwrap();
        let b = issue(tmp.path(), "beta").unwrap();
        assert!(a.starts_with(TOKEN_PREFIX) && a != b);
        let text = fs::read_to_string(path(tmp.path())).unwrap();
        assert!(
            !text.contains(&a[TOKEN_PREFIX.len()..]),
            "only hashes are stored"
        );
        let mode = fs::metadata(path(tmp.path())).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let header = |t: &str| format!("Bearer {t}");
        assert_eq!(
            tokens.authenticate(Some(&header(&a))),
            Ok(Caller::Host("alpha".into()))
        );
        assert_eq!(
            tokens.authenticate(Some(&header(&b))),
            Ok(Caller::Host("beta".into()))
        );
        assert_eq!(tokens.authenticate(None), Err(Denied::Missing));
        assert_eq!(
            tokens.authenticate(Some("Bearer msy_nope")),
            Err(Denied::Invalid)
        );
        assert_eq!(
            tokens.authenticate(Some(&a)),
            Err(Denied::Missing),
            "not a Bearer header"
        );

        assert!(revoke(tmp.path(), "alpha").unwrap());
        assert!(!revoke(tmp.path(), "alpha").unwrap());
        assert_eq!(tokens.authenticate(Some(&header(&a))), Err(Denied::Invalid));
        assert_eq!(list(tmp.path()).unwrap().len(), 1);
        assert!(issue(tmp.path(), "../x").is_err());
    }

    #[test]
    fn revoking_the_last_token_or_deleting_the_file_does_not_open_the_hub() {
        let tmp = tempfile::tempdir().unwrap();
        let a = issue(tmp.path(), "alpha").unwrap();
        let tokens = Tokens::load(tmp.path()).unwrap();
        assert!(revoke(tmp.path(), "alpha").unwrap());
        assert_eq!(tokens.authenticate(None), Err(Denied::Missing));
        assert_eq!(
            tokens.authenticate(Some(&format!("Bearer {a}"))),
            Err(Denied::Invalid)
        );
        assert!(!tokens.is_open());

        let b = issue(tmp.path(), "beta").unwrap();
        assert_eq!(
            tokens.authenticate(Some(&format!("Bearer {b}"))),
            Ok(Caller::Host("beta".into()))
        );
        fs::remove_file(path(tmp.path())).unwrap();
        assert_eq!(tokens.authenticate(None), Err(Denied::Missing));
        assert_eq!(
            tokens.authenticate(Some(&format!("Bearer {b}"))),
            Ok(Caller::Host("beta".into())),
            "the tokens loaded before stay in force"
        );
        // Started without the file: open mode, as deliberately chosen.
        let restarted = Tokens::load(tmp.path()).unwrap();
        assert_eq!(restarted.authenticate(None), Ok(Caller::Open));
    }

    #[test]
    fn reload_reads_a_file_whose_time_and_size_look_unchanged() {
        let tmp = tempfile::tempdir().unwrap();
        let old = issue(tmp.path(), "alpha").unwrap();
        let tokens = Tokens::load(tmp.path()).unwrap();
        let mtime = fs::metadata(path(tmp.path())).unwrap().modified().unwrap();
        let before = fs::read_to_string(path(tmp.path())).unwrap();
        let new = issue(tmp.path(), "alpha").unwrap();
        // The first file with only the hash changed (same size), and its time set back.
        let hash_of = |t: &str| hex(&Sha256::digest(t.as_bytes()));
        let rewritten = before.replace(&hash_of(&old), &hash_of(&new));
        assert_eq!(rewritten.len(), before.len());
        fs::write(path(tmp.path()), rewritten).unwrap();
        let file = fs::File::options()
            .write(true)
            .open(path(tmp.path()))
            .unwrap();
        file.set_modified(mtime).unwrap();
        let bearer = |t: &str| format!("Bearer {t}");
        assert_eq!(
            tokens.authenticate(Some(&bearer(&old))),
            Ok(Caller::Host("alpha".into())),
            "a request does not notice the change"
        );
        tokens.reload();
        assert_eq!(
            tokens.authenticate(Some(&bearer(&old))),
            Err(Denied::Invalid)
        );
        assert_eq!(
            tokens.authenticate(Some(&bearer(&new))),
            Ok(Caller::Host("alpha".into()))
        );
    }

    #[test]
    fn a_broken_file_keeps_the_tokens_loaded_before() {
        let tmp = tempfile::tempdir().unwrap();
        let a = issue(tmp.path(), "alpha").unwrap();
        let tokens = Tokens::load(tmp.path()).unwrap();
        fs::write(path(tmp.path()), b"{ broken").unwrap();
        let bearer = format!("Bearer {a}");
        assert_eq!(
            tokens.authenticate(Some(&bearer)),
            Ok(Caller::Host("alpha".into()))
        );
    }
}
