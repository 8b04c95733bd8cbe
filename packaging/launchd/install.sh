#!/bin/sh
# Installs mesync on macOS with launchd, from the tarball `cargo xtask dist` writes
# (target/dist/mesync-<version>-launchd.tar.gz: this script and the plists of launchd/).
# The binary is not in the tarball: build it on the Mac (`cargo build --release`). Each
# step is the one written at the top of the plist it installs.
#
#   sudo ./install.sh --binary target/release/mesync   # /usr/local/bin/mesync
#   sudo ./install.sh --hub       # the hub as a LaunchDaemon (user "nobody", state in
#                                 # /usr/local/var/mesync, log /usr/local/var/log/mesync-hub.log)
#   ./install.sh --agent          # the agent as a LaunchAgent of the user running this
#                                 # (queues under ~/.daemon, log ~/Library/Logs/mesync-agent.log)
#
# Options combine (`sudo ./install.sh --binary ./mesync --hub`), but --agent must run as
# the user who will own the agent, not as root. Uninstall: `sudo launchctl bootout
# system/com.mesync.hub`, `launchctl bootout gui/$(id -u)/com.mesync.agent`, and remove
# the files named here.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
binary=
hub=no
agent=no

usage() {
    sed -n '2,20s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --binary) [ $# -ge 2 ] || usage; binary=$2; shift 2 ;;
        --hub) hub=yes; shift ;;
        --agent) agent=yes; shift ;;
        *) usage ;;
    esac
done
[ -n "$binary" ] || [ "$hub" = yes ] || [ "$agent" = yes ] || usage

if [ -n "$binary" ]; then
    install -d -m 0755 /usr/local/bin
    install -m 0755 "$binary" /usr/local/bin/mesync
    echo "installed /usr/local/bin/mesync"
fi

if [ "$hub" = yes ]; then
    [ "$(id -u)" -eq 0 ] || { echo "install.sh: --hub needs root (sudo)" >&2; exit 1; }
    install -d -o nobody -g nobody -m 0700 /usr/local/var/mesync
    install -d -m 0755 /usr/local/var/log /usr/local/etc/mesync
    [ -e /usr/local/var/log/mesync-hub.log ] ||
        install -o nobody -g nobody -m 0640 /dev/null /usr/local/var/log/mesync-hub.log
    install -o root -g wheel -m 0644 "$here/com.mesync.hub.plist" /Library/LaunchDaemons/
    launchctl bootout system/com.mesync.hub 2>/dev/null || true
    launchctl bootstrap system /Library/LaunchDaemons/com.mesync.hub.plist
    echo "hub started: sudo launchctl print system/com.mesync.hub"
fi

if [ "$agent" = yes ]; then
    [ "$(id -u)" -ne 0 ] || { echo "install.sh: run --agent as the agent's user, not root" >&2; exit 1; }
    mkdir -p "$HOME/Library/LaunchAgents" "$HOME/Library/Logs"
    sed "s|@HOME@|$HOME|g" "$here/com.mesync.agent.plist" \
        > "$HOME/Library/LaunchAgents/com.mesync.agent.plist"
    launchctl bootout "gui/$(id -u)/com.mesync.agent" 2>/dev/null || true
    launchctl bootstrap "gui/$(id -u)" "$HOME/Library/LaunchAgents/com.mesync.agent.plist"
    echo "agent started: launchctl print gui/$(id -u)/com.mesync.agent"
fi
