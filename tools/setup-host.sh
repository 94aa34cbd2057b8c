#!/usr/bin/env bash
# Install what Hatchery needs on a Debian 12 host, idempotently: system packages with apt
# (mkosi from bookworm-backports, pinned low so the host is never upgraded wholesale), then
# the project's venv from pyproject.toml with pinned versions (requirements.lock).
# The backports source is derived from this machine's own apt configuration, so no archive
# host name is written into the repository.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$here/.venv}
stamp_dir=$here/.cache/setup
mkdir -p "$stamp_dir"

log() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (apt installs system packages); hint: sudo make setup"
# shellcheck source=/dev/null
. /etc/os-release
[ "${VERSION_CODENAME:-}" = bookworm ] || die "Debian 12 (bookworm) is required, this is ${PRETTY_NAME:-unknown}"

packages=(
  # virtualisation and boot
  qemu-system-x86 qemu-utils ipxe-qemu ipxe ovmf kexec-tools qemu-system-arm qemu-efi-aarch64
  # HTTPS boot: systemd's EFI stub (the UKI's base); efitools and objdump check what we write
  systemd-boot-efi efitools binutils
  # guest and image plumbing
  busybox-static cpio zstd lz4 xz-utils kmod dosfstools mtools squashfs-tools erofs-utils
  bubblewrap systemd-container python3-pefile
  # networking and real protocol clients/peers (reference peers only in tests and benchmarks)
  nftables iproute2 iputils-ping curl atftp udhcpc dnsmasq-base tftpd-hpa nginx-light
  # DHCPv6 clients no one here wrote, for the IPv6 births tests
  isc-dhcp-client dhcpcd-base
  # metrics: promtool checks our /metrics, a real Prometheus scrapes it in a test
  prometheus
  # the appliance kernel, built from Debian's kernel source (tools/lab/hatchery_lab/appliance_kernel.py)
  flex bison bc libelf-dev patch
  # python and linters
  python3 python3-venv python3-dev gcc shellcheck make git
)
backport_packages=(mkosi)

# --- the backports source, derived from the host's own bookworm source ------------------
bp_file=/etc/apt/sources.list.d/hatchery-backports.sources
if [ ! -f "$bp_file" ]; then
  uri=""
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    # deb822: the first URIs: of a stanza whose Suites: holds exactly "bookworm"
    uri=$(awk -v RS='' '/(^|\n)Suites:[^\n]*(^| )bookworm( |\n|$)/ && /Types:[^\n]*deb/ {
            if (match($0, /URIs:[ \t]*[^ \t\n]+/)) { s=substr($0, RSTART, RLENGTH); sub(/URIs:[ \t]*/, "", s); print s; exit } }' "$f")
    [ -n "$uri" ] && break
  done
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk '$1=="deb" && $3=="bookworm" { u=$2; if (u ~ /^\[/) u=$3; print $2; exit }' /etc/apt/sources.list)
  fi
  [ -n "$uri" ] || die "cannot find this host's bookworm apt source to derive bookworm-backports from"
  log "adding bookworm-backports from $uri (low priority: nothing is upgraded unless asked for)"
  cat > "$bp_file" <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  rm -f "$stamp_dir/apt-updated"
fi

# --- apt ----------------------------------------------------------------------------------
missing=()
for p in "${packages[@]}" "${backport_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  if [ ! -f "$stamp_dir/apt-updated" ] || [ -n "$(find "$stamp_dir/apt-updated" -mmin +720)" ]; then
    log "apt-get update"
    apt-get update -q
    touch "$stamp_dir/apt-updated"
  fi
  log "installing system packages: ${missing[*]}"
  # The reference servers (nginx, tftpd-hpa, prometheus) are for tests and benchmarks only:
  # their packages must not start them, not even for a moment, on this machine's addresses.
  # policy-rc.d answering 101 ("action forbidden") is Debian's way to say so to invoke-rc.d.
  guard=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    guard=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\n# hatchery setup: no service starts while packages install\nexit 101\n' > "$guard"
    chmod 755 "$guard"
    trap 'rm -f "$guard"' EXIT
  fi
  apt-get install -y -q --no-install-recommends "${packages[@]}"
  apt-get install -y -q --no-install-recommends -t bookworm-backports "${backport_packages[@]}"
  if [ -n "$guard" ]; then rm -f "$guard"; trap - EXIT; fi
  # the reference servers are for tests and benchmarks only: never left running
  for svc in tftpd-hpa atftpd nginx prometheus; do
    if [ -x "/etc/init.d/$svc" ]; then "/etc/init.d/$svc" stop >/dev/null 2>&1 || true; fi
  done
else
  log "system packages present"
fi

# --- venv ---------------------------------------------------------------------------------
lock=$here/requirements.lock
if [ ! -x "$venv/bin/python" ]; then
  log "creating venv $venv"
  /usr/bin/python3 -m venv "$venv"
fi
want=$(cat "$lock" "$here/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$venv/.hatchery-installed" 2>/dev/null)" != "$want" ]; then
  log "installing Python packages (pinned by requirements.lock)"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$lock"
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps -e "$here"
  echo "$want" > "$venv/.hatchery-installed"
else
  log "venv up to date"
fi
log "setup done"
