#!/bin/bash
# sdbox.sh - a REAL systemd (as PID 1) in throw-away namespaces, for testing
# otpd's unit on a machine whose PID 1 is not systemd (a developer's machine,
# CI). Needs root, util-linux (unshare, nsenter, setpriv), /lib/systemd/systemd
# and a cgroup2 hierarchy; nothing else.
#
#   sdbox.sh check                     # exit 0 if a box can run here, else say why (exit 1)
#   sdbox.sh start NAME [--ro-bind SRC[:DST]]... [--bind SRC[:DST]]... [--unit FILE]...
#                       [--host-net] [--boot-unit UNIT] [--timeout SECONDS]
#   sdbox.sh exec  NAME CMD [ARG]...   # run CMD inside the box (all its namespaces)
#   sdbox.sh pid   NAME                # host PID of the box's systemd (PID 1 inside)
#   sdbox.sh stop  NAME                # clean poweroff, then remove everything
#
# The box:
#   * new mount, pid, cgroup, uts, ipc and (unless --host-net) network namespaces;
#   * root = overlayfs(lower = the host's "/", upper = tmpfs): every write inside
#     is thrown away at stop; the host's files are visible but never changed
#     (--ro-bind brings in paths that are not on the root file system, e.g. a
#     checkout or a wheelhouse under /tmp, which is a tmpfs inside);
#   * a fresh /proc whose /proc/sys is READ-ONLY (a systemd PID 1 with a writable
#     /proc/sys would rewrite the host kernel's settings: keep it that way),
#     /sys read-only, a private cgroup2 at /sys/fs/cgroup (a child of the host's
#     cgroup2, removed at stop), a minimal /dev, tmpfs /run and /tmp;
#   * a capability bounding set without sys_module, sys_time, sys_rawio, ... so
#     nothing inside can load modules or set the clock;
#   * container=sdbox in PID 1's environment (systemd's container mode), booted to
#     sysinit.target (journald and the manager; no getty, no network setup);
#   * /run/otpd-sdbox exists inside (and nowhere else): scripts that change files
#     in the box check it first.
# State (logs, pids, console) lives in ${OTPD_SDBOX_STATE:-/tmp/otpd-sdbox}/NAME.
set -euo pipefail

STATE_ROOT=${OTPD_SDBOX_STATE:-/tmp/otpd-sdbox}
SYSTEMD=/lib/systemd/systemd

die() { echo "sdbox: $*" >&2; exit 1; }

cg2_root() {   # where the host's cgroup2 hierarchy is mounted
  if [ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" = cgroup2fs ]; then echo /sys/fs/cgroup
  elif [ "$(stat -fc %T /sys/fs/cgroup/unified 2>/dev/null)" = cgroup2fs ]; then echo /sys/fs/cgroup/unified
  else return 1; fi
}

check() {      # prints why a box cannot run here; exit status 0 when it can
  [ "$(id -u)" = 0 ] || { echo "needs root (namespaces, mounts, cgroups)"; return 1; }
  local t
  for t in unshare nsenter setpriv mount pivot_root; do
    command -v "$t" >/dev/null 2>&1 || { echo "needs $t (util-linux)"; return 1; }
  done
  [ -x "$SYSTEMD" ] || { echo "needs $SYSTEMD (the systemd package)"; return 1; }
  cg2_root >/dev/null || { echo "needs a cgroup2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified"; return 1; }
  grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || true
  grep -qw overlay /proc/filesystems || { echo "needs overlayfs"; return 1; }
  # unshare itself may be forbidden (a container without CAP_SYS_ADMIN, seccomp)
  unshare --mount --pid --fork --cgroup --uts --ipc --net true 2>/dev/null \
    || { echo "unshare of mount/pid/cgroup/uts/ipc/net namespaces is not permitted here"; return 1; }
  return 0
}

cmd=${1:-}
case "$cmd" in
  check) check; exit $?;;
  start|exec|pid|stop) ;;
  *) sed -n '2,12p' "$0" >&2; exit 2;;
esac
name=${2:-}
[[ "$name" =~ ^[A-Za-z0-9_.-]{1,40}$ ]] || die "a box NAME is 1-40 of [A-Za-z0-9_.-]"
shift 2
S="$STATE_ROOT/$name"

box_pid() {    # PID 1 of the box, checked: a systemd in another mount namespace
  [ -e "$S/inner.pid" ] || die "no box named $name"
  local p; p=$(cat "$S/inner.pid")
  [ "$(cat /proc/"$p"/comm 2>/dev/null)" = systemd ] || die "box $name: pid $p is not its systemd any more"
  [ "$(readlink /proc/"$p"/ns/mnt)" != "$(readlink /proc/self/ns/mnt)" ] || die "box $name: pid $p is not in a box"
  echo "$p"
}

alive() {      # a process that runs (a zombie does not)
  local st
  st=$(awk '{print $3}' /proc/"$1"/stat 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

case "$cmd" in
start)
  binds=(); units=(); net=--net; boot=sysinit.target; timeout=60
  while [ $# -gt 0 ]; do
    case "$1" in
      --ro-bind) binds+=("ro:$2"); shift 2;;
      --bind) binds+=("rw:$2"); shift 2;;
      --unit) units+=("$(readlink -f "$2")"); shift 2;;
      --host-net) net=; shift;;
      --boot-unit) boot=$2; shift 2;;
      --timeout) timeout=$2; shift 2;;
      *) die "unknown option $1";;
    esac
  done
  why=$(check) || die "cannot run a box here: $why"
  [ ! -e "$S/inner.pid" ] || die "box $name already runs (sdbox.sh stop $name)"
  rm -rf "$S"; mkdir -p "$S/units" "$S/mnt"
  : > "$S/console.log"
  for u in "${units[@]}"; do cp -r "$u" "$S/units/"; done
  for b in "${binds[@]}"; do
    src=${b#*:}; src=${src%%:*}
    [ -e "$src" ] || die "no such path to bind: $src"
  done
  printf '%s\n' "${binds[@]}" > "$S/binds"
  CG="$(cg2_root)/otpd-sdbox-$name"
  mkdir -p "$CG"; echo "$CG" > "$S/cgroup"
  # The inner stage runs as PID 1 of the new pid namespace: it builds the root and execs systemd.
  cat > "$S/inner.sh" <<'INNER'
#!/bin/sh
set -eu
S=$1; BOOT=$2; W=$S/mnt
mount -t tmpfs -o mode=755 sdbox "$W"
mkdir -p "$W/upper" "$W/work" "$W/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$W/upper,workdir=$W/work" "$W/root"
R=$W/root
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount --bind "$R/proc/sys" "$R/proc/sys"
mount -o remount,bind,ro,nosuid,nodev,noexec "$R/proc/sys"     # never writable: it is the host kernel's
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 -o nsdelegate,nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=755,nosuid tmpfs "$R/dev"
for n in null zero full random urandom tty; do touch "$R/dev/$n"; mount --bind "/dev/$n" "$R/dev/$n"; done
mkdir -p "$R/dev/pts" "$R/dev/shm" "$R/dev/mqueue"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/dev/shm"
mount -t mqueue -o nosuid,nodev,noexec mqueue "$R/dev/mqueue"
ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"; ln -s /proc/self/fd/1 "$R/dev/stdout"; ln -s /proc/self/fd/2 "$R/dev/stderr"
touch "$R/dev/console"; mount --bind "$S/console.log" "$R/dev/console"
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/tmp"
echo "$S" > "$R/run/otpd-sdbox"
mkdir -p "$R/etc/systemd/system"
for u in "$S"/units/*; do [ -e "$u" ] && cp -r "$u" "$R/etc/systemd/system/"; done
while IFS= read -r b; do
  [ -n "$b" ] || continue
  mode=${b%%:*}; rest=${b#*:}
  src=${rest%%:*}; dst=${rest#*:}; [ "$dst" = "$rest" ] && dst=$src
  if [ -d "$src" ]; then mkdir -p "$R$dst"; else mkdir -p "$(dirname "$R$dst")"; touch "$R$dst"; fi
  mount --rbind "$src" "$R$dst"
  [ "$mode" = ro ] && mount -o remount,bind,ro "$R$dst"
done < "$S/binds"
mkdir -p "$R/.oldroot"
cd "$R"
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot 2>/dev/null || true
exec env -i container=sdbox PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  setpriv --bounding-set -sys_module,-sys_time,-sys_rawio,-wake_alarm,-syslog,-mac_admin,-mac_override,-sys_pacct,-block_suspend,-bpf,-perfmon,-checkpoint_restore \
  /lib/systemd/systemd --unit="$BOOT" --show-status=no
INNER
  chmod +x "$S/inner.sh"
  # The outer stage enters the box's cgroup, then makes the namespaces.  setsid: no
  # controlling terminal, and a signal to the caller's process group does not reach the box.
  ( echo $BASHPID > "$CG/cgroup.procs"
    exec setsid unshare --mount --pid --fork --cgroup --uts --ipc $net --propagation private \
         "$S/inner.sh" "$S" "$boot" ) >"$S/unshare.log" 2>&1 </dev/null &
  echo $! > "$S/unshare.pid"
  up=$!
  fail() { echo "sdbox: $*" >&2; cat "$S/unshare.log" >&2 || true; "$0" stop "$name" >/dev/null 2>&1 || true; exit 1; }
  # The forked child of unshare is PID 1 inside; wait (bounded) until it is systemd.
  end=$((SECONDS + timeout))
  while :; do
    c=$(cat /proc/"$up"/task/*/children 2>/dev/null | awk '{print $1}')
    if [ -n "$c" ] && [ "$(cat /proc/"$c"/comm 2>/dev/null)" = systemd ]; then echo "$c" > "$S/inner.pid"; break; fi
    alive "$up" || fail "the box did not start"
    [ $SECONDS -lt $end ] || fail "systemd did not start within ${timeout}s"
    sleep 0.05
  done
  # Then until the manager is up (its private socket) and the boot target is reached.
  nsenter -t "$c" -a -- timeout "$timeout" sh -c \
    'until [ -S /run/systemd/private ]; do sleep 0.05; done; systemctl is-system-running --wait >/dev/null' || true
  state=$(nsenter -t "$c" -a -- systemctl is-system-running 2>/dev/null || true)
  case "$state" in
    running|degraded) echo "sdbox $name: systemd PID $c (host), $state";;
    *) fail "systemd in box $name is '$state', not running";;
  esac
  ;;
exec)
  [ $# -gt 0 ] || die "exec needs a command"
  p=$(box_pid)
  exec nsenter -t "$p" -a -- "$@"
  ;;
pid)
  box_pid
  ;;
stop)
  if [ -e "$S/unshare.pid" ]; then
    up=$(cat "$S/unshare.pid")
    if p=$(box_pid 2>/dev/null); then
      kill -RTMIN+4 "$p" 2>/dev/null || true               # systemd: start poweroff.target
    fi
    end=$((SECONDS + 30))
    while alive "$up" && [ $SECONDS -lt $end ]; do sleep 0.05; done
    if alive "$up"; then                                  # no poweroff in 30 s
      echo "sdbox: $name did not power off; SIGKILL" >&2
      if [ -n "${p:-}" ]; then kill -KILL "$p" 2>/dev/null || true; fi   # PID 1 dies: the kernel kills its pid ns
      end=$((SECONDS + 10))
      while alive "$up" && [ $SECONDS -lt $end ]; do sleep 0.05; done
      kill -KILL "$up" 2>/dev/null || true
    fi
    wait "$up" 2>/dev/null || true                        # ours only if started by this shell
  fi
  if [ -e "$S/cgroup" ]; then
    CG=$(cat "$S/cgroup")
    case "$CG" in */otpd-sdbox-"$name") ;; *) die "refusing to remove cgroup $CG";; esac
    if [ -d "$CG" ]; then find "$CG" -depth -type d -exec rmdir {} \; 2>/dev/null || true; fi
    [ ! -d "$CG" ] || echo "sdbox: could not remove $CG" >&2
  fi
  rm -rf "$S"
  ;;
esac
