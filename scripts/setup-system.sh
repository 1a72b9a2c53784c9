#!/usr/bin/env bash
# System set-up for the labs: Debian packages (with a browser and CJK fonts for the book's tests),
# a running Docker engine, and Debian's cloud kernel for the QEMU labs. Idempotent and quick when
# everything is there already.
# Not root: says what is missing and which labs that disables, and exits 0 so the rest goes on.
set -euo pipefail
cd "$(dirname "$0")/.."
home=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}   # HOME may be unset under CI or sudo -i
CACHE=${CNLAB_CACHE:-${XDG_CACHE_HOME:-$home/.cache}/cnlab}   # as helpers/resources.py

PACKAGES=(docker.io busybox-static binutils qemu-system-x86 etcd-server etcd-client cpio graphviz iproute2
          containernetworking-plugins kmod fonts-noto-cjk)   # CJK: the glossary's Chinese terms

say() { printf 'setup: %s\n' "$*"; }

# A fresh machine may have no package lists yet: the probes below need them.
if [ "$(id -u)" -eq 0 ] && ! compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null; then
  apt-get update -qq
fi
# virtiofsd has its own package from Debian 13 on (before, it ships in qemu-system-common).
apt-cache show virtiofsd >/dev/null 2>&1 && PACKAGES+=(virtiofsd)
# Debian's chromium, for the browser tests of the book and of JupyterLab (Ubuntu has only a snap).
apt-cache show chromium >/dev/null 2>&1 && PACKAGES+=(chromium)
# An engine that already answers (Docker Desktop, a CI runner's docker-ce) is kept as it is.
docker info >/dev/null 2>&1 && PACKAGES=("${PACKAGES[@]/docker.io}")

missing=()
for p in "${PACKAGES[@]}"; do
  [ -n "$p" ] || continue
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if [ "$(id -u)" -ne 0 ]; then
  if [ ${#missing[@]} -gt 0 ]; then
    say "not root: cannot install ${missing[*]}"
    say "labs that need root, Docker, QEMU or etcd will be skipped; run 'sudo make test' to set them up"
  fi
  exit 0
fi

if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# A Docker engine: start dockerd when none answers, and wait until it does.
if ! docker info >/dev/null 2>&1; then
  say "starting dockerd"
  mkdir -p /var/log
  nohup dockerd >/var/log/dockerd.log 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { say "dockerd did not start; see /var/log/dockerd.log"; exit 1; }
fi

# Debian's cloud kernel for the QEMU labs (Ubuntu's kvm flavour elsewhere): download the
# package and keep only the kernel and its modules; never install it as this machine's kernel.
if [ ! -s "$CACHE/kernel/vmlinuz" ]; then
  image=""
  for meta in linux-image-cloud-amd64 linux-image-kvm; do
    image=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
    [ -n "$image" ] && break
  done
  if [ -z "$image" ]; then
    say "no cloud kernel package in this distribution's archive: the QEMU labs will be skipped"
    exit 0
  fi
  say "fetching $image for the QEMU labs"
  tmp=$(mktemp -d) && chmod 755 "$tmp"  # apt-get download runs as _apt
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && apt-get download -qq "$image" >/dev/null)
  dpkg -x "$tmp"/*.deb "$tmp/x"
  mkdir -p "$CACHE/kernel"
  rm -rf "$CACHE/kernel/modules"
  mv "$tmp"/x/lib/modules "$CACHE/kernel/modules"
  echo "$image" > "$CACHE/kernel/VERSION"
  cp "$tmp"/x/boot/vmlinuz-* "$CACHE/kernel/vmlinuz.new"
  mv "$CACHE/kernel/vmlinuz.new" "$CACHE/kernel/vmlinuz"   # last: its presence means "complete"
fi
