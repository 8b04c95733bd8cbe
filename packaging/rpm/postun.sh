# %postun scriptlet of the mesync .rpm package (`cargo xtask dist` puts it in the package's
# header), as Fedora's %systemd_postun_with_restart: systemd reloads its units, and on
# upgrade ($1 >= 1) restarts the hub and the system agent if they were running. rpm has no
# purge: on erase, edited configuration files are kept as *.rpmsave and the data
# (/var/lib/mesync, /var/lib/mesync-agent) and the user "mesync" stay.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart mesync-hub.service mesync-agent-system.service >/dev/null 2>&1 || :
    fi
fi
