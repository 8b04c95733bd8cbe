# %post scriptlet of the mesync .rpm package (`cargo xtask dist` puts it in the package's
# header), as Fedora's %systemd_post: on first installation ($1 = 1) the hub's units and the
# system agent's are set up by the distribution's preset policy (`systemctl preset`), which
# enables the hub only where the policy says so and starts nothing. Then systemd reloads
# its units, if it is running. `systemctl preset` works on unit files alone, without a
# running systemd (containers, chroots).
if [ "$1" -eq 1 ]; then
    if [ -x /usr/lib/systemd/systemd-update-helper ]; then
        /usr/lib/systemd/systemd-update-helper install-system-units \
            mesync-hub.socket mesync-hub.service mesync-agent-system.service || :
    elif command -v systemctl >/dev/null 2>&1; then
        systemctl --no-reload preset \
            mesync-hub.socket mesync-hub.service mesync-agent-system.service >/dev/null 2>&1 || :
    fi
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
