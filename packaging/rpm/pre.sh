# %pre scriptlet of the mesync .rpm package (`cargo xtask dist` puts it in the package's
# header, with the sysusers.d line of packaging/sysusers.conf in place of the SYSUSERS
# placeholder below). Creates the system user "mesync" the hub runs as before the files
# land, as Fedora's %sysusers_create_compat does: systemd-sysusers reads the line on stdin
# (the package's sysusers.d file is not installed yet), else useradd. Works without a
# running systemd.
if command -v systemd-sysusers >/dev/null 2>&1; then
    echo '@SYSUSERS@' | systemd-sysusers --replace=/usr/lib/sysusers.d/mesync.conf - || :
elif ! getent passwd mesync >/dev/null; then
    useradd --system --user-group --home-dir /var/lib/mesync --no-create-home \
        --shell /sbin/nologin --comment "mesync hub" mesync || :
fi
