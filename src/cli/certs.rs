//! `mesync tls init|issue|server`: the mini-CA ([`crate::tls::ca`]), and what to do with the
//! files it writes.

use std::path::Path;

use super::TlsAction;
use crate::error::Result;
use crate::tls::ca;

pub fn run(dir: &Path, action: TlsAction, days: u32) -> Result<()> {
    match action {
        TlsAction::Init { names } => {
            let (ca, hub) = ca::init(dir, &names, days)?;
            println!(
                "CA:  {}  (key {}: keep it here, 0600)",
                ca.cert.display(),
                ca.key.display()
            );
            println!("hub: {}  (key {})", hub.cert.display(), hub.key.display());
            println!();
            println!("In the hub's config file (then restart the hub):");
            println!("  [hub]");
            println!("  tls_cert = \"{}\"", hub.cert.display());
            println!("  tls_key = \"{}\"", hub.key.display());
            println!(
                "  client_ca = \"{}\"   # require client certificates",
                ca.cert.display()
            );
            println!();
            println!("Next: `mesync tls issue HOST` for each agent.");
        }
        TlsAction::Issue { host } => {
            let issued = ca::issue_host(dir, &host, days)?;
            let ca_cert = dir.join(ca::CA_CERT);
            println!(
                "{host}: {}  (key {})",
                issued.cert.display(),
                issued.key.display()
            );
            println!();
            println!("Copy these three files to {host} (the key over a safe channel, mode 0600),");
            println!("and in its agent's config file:");
            println!("  server_url = \"https://<hub name>:8080\"");
            println!(
                "  ca_file = \"/etc/mesync/ca.crt\"          # a copy of {}",
                ca_cert.display()
            );
            println!("  client_cert = \"/etc/mesync/{host}.crt\"");
            println!("  client_key = \"/etc/mesync/{host}.key\"");
        }
        TlsAction::Server { names } => {
            let hub = ca::server(dir, &names, days)?;
            println!("hub: {}  (key {})", hub.cert.display(), hub.key.display());
            println!("`systemctl reload mesync-hub` (or SIGHUP) makes a running hub use it.");
        }
    }
    Ok(())
}
