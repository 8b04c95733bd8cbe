//! Signals: SIGTERM and SIGINT become one cancellation that every loop watches; SIGHUP asks
//! for the configuration to be read again.

use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// Cancels `token` on the first SIGTERM or SIGINT; a second one exits at once.
pub fn on_signals(token: CancellationToken) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let install = |kind: SignalKind| {
        signal(kind).map_err(|e| Error::Config(format!("cannot handle signals: {e}")))
    };
    let mut term = install(SignalKind::terminate())?;
    let mut int = install(SignalKind::interrupt())?;
    tokio::spawn(async move {
        for round in 0..2 {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            if round == 0 {
                tracing::info!(signal = name, "stopping");
                token.cancel();
            } else {
                tracing::warn!(signal = name, "second signal: exiting now");
                std::process::exit(1);
            }
        }
    });
    Ok(())
}

/// Calls `reload` on every SIGHUP.
pub fn on_hangup(reload: impl Fn() + Send + 'static) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())
        .map_err(|e| Error::Config(format!("cannot handle signals: {e}")))?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            reload();
        }
    });
    Ok(())
}
