# %preun scriptlet of the mesync .rpm package (`cargo xtask dist` puts it in the package's
# header), as Fedora's %systemd_preun: on erase ($1 = 0), not on upgrade, the hub (its
# socket first) and the system agent are disabled, and stopped if systemd is running.
# Per-user agents run in their users' service managers and are left to them.
if [ "$1" -eq 0 ]; then
    if [ -x /usr/lib/systemd/systemd-update-helper ]; then
        /usr/lib/systemd/systemd-update-helper remove-system-units \
            mesync-hub.socket mesync-hub.service mesync-agent-system.service || :
    elif command -v systemctl >/dev/null 2>&1; then
        if [ -d /run/systemd/system ]; then
            systemctl --no-reload disable --now \
                mesync-hub.socket mesync-hub.service mesync-agent-system.service >/dev/null 2>&1 || :
        else
            systemctl --no-reload disable \
                mesync-hub.socket mesync-hub.service mesync-agent-system.service >/dev/null 2>&1 || :
        fi
    fi
fi
