#!/usr/bin/env bash
# Builds the Debian package and the release tarball of tbot, under target/package/:
#   tbot_<version>_<arch>.deb                      (dpkg -i it; see the README's "Install")
#   tbot-<version>-linux-<arch>.tar.gz (+ .sha256) (both binaries, the unit, the examples, schemas)
#
# Usage: scripts/package.sh   (from anywhere; needs dpkg-deb, strip, gzip, tar and sha256sum, all of
# them on any Debian machine). It builds the release binaries first (`cargo build --release`, a few
# minutes on 2 cores the first time); TBOT_PACKAGE_BINARIES=DIR packages the tbot and tbotctl
# already in DIR instead (the tests package their debug build that way).
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture 2>/dev/null || uname -m)
out=target/package
binaries=${TBOT_PACKAGE_BINARIES:-}
if [ -z "$binaries" ]; then
    cargo build --release --locked --bins
    binaries=target/release
fi
for bin in tbot tbotctl; do
    [ -x "$binaries/$bin" ] || { echo "error: no $binaries/$bin; build it first (cargo build --release)" >&2; exit 2; }
done

rm -rf "$out/deb" "$out/tarball"
mkdir -p "$out"

# The unit, as `tbot install systemd` writes it for the installed binary and the `tbot` user.
unit=$(mktemp)
trap 'rm -f "$unit"' EXIT
# (The `tbot` user need not exist on the build machine: the package's postinst creates it.)
"$binaries/tbot" install systemd --config /etc/tbot.d --exe /usr/bin/tbot --user tbot --group tbot \
    >"$unit" 2>/dev/null

# --- the .deb ---
root="$out/deb/tbot_${version}_${arch}"
install -d "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" "$root/usr/lib/tmpfiles.d" \
    "$root/usr/share/tbot/schemas" "$root/usr/share/doc/tbot"
for bin in tbot tbotctl; do
    strip --strip-unneeded -o "$root/usr/bin/$bin" "$binaries/$bin"
    chmod 0755 "$root/usr/bin/$bin"
done
install -m 0644 "$unit" "$root/lib/systemd/system/tbot.service"
install -m 0644 packaging/debian/tmpfiles.conf "$root/usr/lib/tmpfiles.d/tbot.conf"
install -m 0644 schemas/*.json "$root/usr/share/tbot/schemas/"
install -m 0644 packaging/debian/copyright "$root/usr/share/doc/tbot/copyright"
# A native package's changelog.
{
    echo "tbot ($version) unstable; urgency=medium"
    echo
    echo "  * Release $version (commit $("$binaries/tbot" --version | sed -n 's/.*(commit \(.*\))/\1/p'))."
    echo
    echo " -- tbot developers <tbot-dev@example.org>  $(date -R -u -d @"${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")"
} | gzip -9n >"$root/usr/share/doc/tbot/changelog.gz"
chmod 0644 "$root/usr/share/doc/tbot/changelog.gz"
# /etc/tbot.d: a README and commented examples (in a subdirectory, which tbot does not read), as
# conffiles: an administrator's edits survive upgrades.
cp -r packaging/etc "$root/etc"
find "$root/etc" -type d -exec chmod 0755 {} +
find "$root/etc" -type f -exec chmod 0644 {} +
(cd "$root" && find etc -type f | sort | sed 's|^|/|') >"$root/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    install -m 0755 "packaging/debian/$script" "$root/DEBIAN/$script"
done
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<EOF
Package: tbot
Version: $version
Architecture: $arch
Maintainer: tbot developers <tbot-dev@example.org>
Installed-Size: $size
Depends: libc6 (>= 2.34), libgcc-s1, adduser
Section: admin
Priority: optional
Description: declarative machine and workload identity agent (SPIFFE)
 tbot gives every service on a host a short-lived SPIFFE identity (X509-SVIDs
 and JWT-SVIDs on a SPIFFE Workload API socket), from YAML documents in
 /etc/tbot.d: a bot joins its issuer (a token, or an AWS IAM role), and
 edits take effect live, shown first by "tbotctl diff".
 .
 The tbot service runs as the tbot user, keeps its state in /var/lib/tbot and
 its sockets in /run/tbot, and stays idle until /etc/tbot.d holds a document.
EOF
deb="$out/tbot_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "built $deb"

# --- the tarball, for other distributions ---
name="tbot-${version}-linux-${arch}"
tree="$out/tarball/$name"
install -d "$tree/examples" "$tree/schemas"
cp "$root/usr/bin/tbot" "$root/usr/bin/tbotctl" "$tree/"
install -m 0644 "$unit" "$tree/tbot.service"
install -m 0644 packaging/debian/tmpfiles.conf "$tree/tbot.tmpfiles.conf"
cp -r packaging/etc/tbot.d/examples/. "$tree/examples/"
cp packaging/etc/tbot.d/README "$tree/examples/README"
install -m 0644 schemas/*.json "$tree/schemas/"
install -m 0644 README.md "$tree/README.md"
(cd "$tree" && find . -type f ! -name SHA256SUMS | sort | xargs sha256sum >SHA256SUMS)
tarball="$out/$name.tar.gz"
tar -C "$out/tarball" --owner=0 --group=0 --sort=name -czf "$tarball" "$name"
(cd "$out" && sha256sum "$name.tar.gz" >"$name.tar.gz.sha256")
echo "built $tarball (and $tarball.sha256)"
