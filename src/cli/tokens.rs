//! `mesync token issue|revoke|list`: the hub's bearer tokens, in its data dir.

use super::TokenAction;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::hub::auth;

pub fn run(config: &Config, action: TokenAction) -> Result<()> {
    let dir = &config.hub.data_dir;
    match action {
        TokenAction::Issue { host } => {
            let token = auth::issue(dir, &host)?;
            eprintln!(
                "token for {host} (shown this once; give it to that host as `token` or MESYNC_TOKEN):"
            );
            println!("{token}");
        }
        TokenAction::Revoke { host } => {
            if !auth::revoke(dir, &host)? {
                return Err(Error::Invalid(format!(
                    "no token for host {host} in {}",
                    dir.display()
                )));
            }
            eprintln!("revoked the token of {host}");
            if auth::list(dir)?.is_empty() {
                eprintln!(
                    "no tokens left: the hub refuses every /v1 call until one is issued \
                     (to return to open mode, stop the hub and delete {})",
                    dir.join(auth::TOKENS_FILE).display()
                );
            }
        }
        TokenAction::List => {
            for (host, issued_at) in auth::list(dir)? {
                println!("{host}  issued {issued_at}");
            }
        }
    }
    Ok(())
}
