#!/usr/bin/env bash
# A real S3 server for knib's S3 tests: a single-node Ceph cluster (Debian
# bookworm's Ceph 16 "Pacific": one ceph-mon, one ceph-mgr, one ceph-osd with
# BlueStore on a sparse file, and radosgw with the beast frontend), started
# without systemd, bound to 127.0.0.1 only. Run as root.
#
#   bash scripts/ceph.sh start [DIR]         start (a no-op when it runs)
#   bash scripts/ceph.sh stop [--keep] [DIR] stop every daemon and remove DIR;
#                                            --keep keeps DIR, and the next
#                                            start reuses its data (faster)
#   bash scripts/ceph.sh status [DIR]        exit 0 when it runs and RGW answers
#   bash scripts/ceph.sh env [DIR]           print the S3 env as `export` lines:
#                                            eval "$(bash scripts/ceph.sh env)"
#
# DIR (default $KNIB_CEPH_DIR, else /var/tmp/knib-ceph) holds everything:
# ceph.conf, keys/, the daemons' data (mon/ mgr/ osd/ rgw/), log/, run/ (pid
# files, admin sockets) and s3.env, the S3 settings the tests read (KEY=VALUE
# lines, no quotes):
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY  a fixed test user's keys
#   AWS_ENDPOINT_URL, KNIB_S3_ENDPOINT        http://127.0.0.1:7480
#   AWS_REGION, AWS_DEFAULT_REGION            us-east-1
#   AWS_ALLOW_HTTP=true                       (object_store refuses http without it)
#   AWS_EC2_METADATA_DISABLED=true            (no instance-metadata look-ups)
#   KNIB_S3_BUCKET                            knib-test, an empty bucket made at start
# Requests must be path-style (http://127.0.0.1:7480/bucket/key).
# Ports: KNIB_CEPH_MON_PORT (default 3300, msgr2 only) and KNIB_CEPH_RGW_PORT
# (default 7480); the mgr and the OSD take free ports from 6800 up.
# KNIB_CEPH_OSD_SIZE (default 16G) is the size of the sparse BlueStore file
# (DIR's file system must take O_DIRECT: ext4, xfs). Calls on one DIR take
# turns on the lock file DIR.lock, which stays.
# Missing Debian packages (ceph-mon ceph-mgr ceph-osd radosgw ceph-common
# curl) are installed with apt-get.
#
# Measured on a 2-core Debian 12 VM shared with builds (load 2 to 8): a fresh
# start takes 8 to 11 s (the first one also installs the packages, about
# 90 s), a start on kept data 7 s, a stop 3 s. The daemons' resident memory is
# about 280 MB idle (mgr 160, osd 54, mon 38, rgw 35) and peaks at 600 MB while
# a 4 GiB object goes up in 8 parallel 16 MiB parts (rgw 200, osd 205).
#
# What RGW 16.2 does that the tests meet: multipart uploads work (parts but
# the last under 5 MiB are refused, EntityTooSmall), as do ranged GETs and
# conditional GETs. A PUT with `If-None-Match: *` on an existing key is
# refused with 412 PreconditionFailed, atomically (of 8 racing writers one
# wins); a PUT with `If-Match` works only with the ETag unquoted (a quoted
# ETag always gets 412); CompleteMultipartUpload ignores `If-None-Match`.
set -euo pipefail

usage() { sed -n '7,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "ceph.sh: $*" >&2; exit 1; }

cmd=${1:-}; [ $# -gt 0 ] && shift
keep=0
dir=${KNIB_CEPH_DIR:-/var/tmp/knib-ceph}
for a in "$@"; do
    case "$a" in
        --keep) [ "$cmd" = stop ] || usage; keep=1 ;;
        -*) usage ;;
        *) dir=$a ;;
    esac
done
case "$dir" in /*) ;; *) dir=$PWD/$dir ;; esac
dir=${dir%/}
[ -n "$dir" ] || die "the cluster's directory cannot be /"

mon_port=${KNIB_CEPH_MON_PORT:-3300}
rgw_port=${KNIB_CEPH_RGW_PORT:-7480}
osd_size=${KNIB_CEPH_OSD_SIZE:-16G}
conf=$dir/ceph.conf
marker=$dir/.knib-ceph       # this directory is one of ours (stop may remove it)
built=$dir/.built            # the cluster was made completely (a start may reuse it)
endpoint=http://127.0.0.1:$rgw_port
# Test credentials of a throw-away cluster that only listens on 127.0.0.1.
access_key=KNIBTESTACCESSKEY0001
secret_key=knibtestsecretkey0000000000000000000001
region=us-east-1
bucket=knib-test
daemons=(mon.a mgr.x osd.0 client.rgw.a)

# The pids of the processes started with this cluster's ceph.conf (daemons,
# and any ceph/radosgw-admin client of it still running).
our_pids() {
    local p args
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [ "$p" = $$ ] && continue
        args=$(tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline") || continue
        case "$args" in *" -c $conf "*) echo "$p" ;; esac
    done
}

daemon_alive() { # NAME: its pid file names a live process of this cluster
    local pid
    pid=$(cat "$dir/run/$1.pid" 2>/dev/null) || return 1
    [ -n "$pid" ] && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF -- " -c $conf "
}

rgw_answers() { curl -s -o /dev/null -m 2 "$endpoint/"; }

running() {
    local d
    [ -f "$built" ] || return 1
    for d in "${daemons[@]}"; do daemon_alive "$d" || return 1; done
    rgw_answers
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

stop_daemons() { # [SIGNAL]: TERM (a clean stop) unless given
    local pids i
    pids=$(our_pids)
    [ -n "$pids" ] || return 0
    # shellcheck disable=SC2086
    kill -"${1:-TERM}" $pids 2>/dev/null || true
    for i in $(seq 1 100); do
        pids=$(our_pids)
        [ -n "$pids" ] || return 0
        sleep 0.2
    done
    echo "ceph.sh: killing $(echo $pids) (no exit 20 s after SIG${1:-TERM})" >&2
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    for i in $(seq 1 50); do
        [ -n "$(our_pids)" ] || return 0
        sleep 0.2
    done
    die "processes of $dir still run: $(our_pids | tr '\n' ' ')"
}

purge() {
    [ -e "$dir" ] || return 0
    [ -f "$marker" ] || die "$dir is not a cluster made by this script (no $marker): not removed"
    rm -rf -- "$dir"
}

ensure_packages() {
    local need=0 t
    for t in ceph-mon ceph-mgr ceph-osd radosgw radosgw-admin ceph ceph-authtool monmaptool curl; do
        command -v "$t" >/dev/null || need=1
    done
    [ $need = 0 ] && return 0
    echo "ceph.sh: installing ceph-mon ceph-mgr ceph-osd radosgw ceph-common curl" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends ceph-mon ceph-mgr ceph-osd radosgw ceph-common curl >/dev/null
}

write_conf() {
    # $name, $id and $cluster are Ceph's own metavariables.
    cat >"$conf" <<EOF
# A single-node test cluster made by knib's scripts/ceph.sh; everything in $dir.
[global]
fsid = $1
mon_host = [v2:127.0.0.1:$mon_port]
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_ipv6 = false
ms_bind_msgr1 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
keyring = $dir/keys/\$name.keyring
run_dir = $dir/run
pid_file = $dir/run/\$name.pid
admin_socket = $dir/run/\$name.asok
log_file = $dir/log/\$name.log
crash_dir = $dir/crash
mon_data = $dir/mon/\$id
mgr_data = $dir/mgr/\$id
osd_data = $dir/osd/\$id
rgw_data = $dir/rgw/\$id
# One replica on one OSD: no warnings about it, no autoscaler.
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_delete = true
mon_warn_on_insecure_global_id_reclaim_allowed = false
auth_allow_insecure_global_id_reclaim = false
# The monitor refuses to start (and stops) when its file system has 1% or less
# free (mon_data_avail_crit); a CI machine's shared disk was at 1% (4.8 GiB
# free) and the start failed. The tests' data lives in the OSD's sparse file,
# so the check is off: a full disk shows as the tests' own write errors.
mon_data_avail_warn = 0
mon_data_avail_crit = -1
# The manager loads only its always-on modules (and iostat): half the memory.
mgr_initial_modules = iostat
mgr_disabled_modules = alerts,diskprediction_local,influx,insights,localpool,mirroring,nfs,osd_perf_query,osd_support,prometheus,restful,selftest,snap_schedule,stats,telegraf,test_orchestrator,zabbix

[mon]
keyring = $dir/mon/\$id/keyring
mon_cluster_log_file = $dir/log/cluster.log
# Commit changes (a new pool, a booting OSD) at once, not once a second.
paxos_propose_interval = 0.1

[osd]
osd_objectstore = bluestore
bluestore_block_size = $osd_size
bluestore_fsck_on_mkfs = false
bluestore_fsck_on_mount = false
osd_crush_initial_weight = 1
# Small memory: a fixed 64 MiB cache instead of one tuned up to 4 GiB.
bluestore_cache_autotune = false
bluestore_cache_size = 67108864
osd_memory_target = 939524096
osd_op_num_shards = 2
osd_op_num_threads_per_shard = 1

[client.rgw.a]
rgw_frontends = beast endpoint=127.0.0.1:$rgw_port
rgw_thread_pool_size = 32
rgw_enable_usage_log = false
rgw_enable_ops_log = false
EOF
}

key() { # NAME CAPS...: a new keyring for NAME
    local name=$1; shift
    ceph-authtool --create-keyring "$dir/keys/$name.keyring" --gen-key -n "$name" "$@" >/dev/null
}

# Starts a daemon (it goes to the background by itself) with what it writes
# before its log is open in log/NAME.out; fd 9, the lock, is not handed down.
daemon() { # NAME PROGRAM ARGS...
    local name=$1; shift
    "$@" -c "$conf" 9>&- >>"$dir/log/$name.out" 2>&1 || { cat "$dir/log/$name.out" >&2; die "$1 failed"; }
}

ceph_cli() { timeout 120 ceph -c "$conf" --connect-timeout 60 "$@" 9>&-; }

make_cluster() {
    local fsid osd_uuid
    purge
    mkdir -p "$dir"/{keys,mon/a,mgr/x,osd/0,rgw/a,log,run,crash}
    : >"$marker"
    fsid=$(cat /proc/sys/kernel/random/uuid)
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    write_conf "$fsid"
    key mon. --cap mon 'allow *'
    key client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *'
    key mgr.x --cap mon 'allow profile mgr' --cap osd 'allow *' --cap mds 'allow *'
    key osd.0 --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *'
    key client.rgw.a --cap mon 'allow rw' --cap osd 'allow rwx' --cap mgr 'allow rw'
    # The monitor starts knowing every key.
    cp "$dir/keys/mon..keyring" "$dir/mon-seed.keyring"
    for k in client.admin mgr.x osd.0 client.rgw.a; do
        ceph-authtool "$dir/mon-seed.keyring" --import-keyring "$dir/keys/$k.keyring" >/dev/null
    done
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$mon_port]" "$dir/monmap" >/dev/null
    daemon mon.a ceph-mon --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon-seed.keyring"
    rm -f "$dir/monmap" "$dir/mon-seed.keyring"
    daemon mon.a ceph-mon -i a
    ceph_cli osd new "$osd_uuid" 0 >/dev/null
    daemon osd.0 ceph-osd -i 0 --mkfs --osd-uuid "$osd_uuid"
    daemon osd.0 ceph-osd -i 0
    daemon client.rgw.a radosgw -n client.rgw.a
    wait_rgw
    # The manager is no part of the S3 path: it loads its Python modules
    # (seconds of CPU) while RGW already serves.
    daemon mgr.x ceph-mgr -i x
    timeout 120 radosgw-admin -c "$conf" user create --uid=knib-test --display-name="knib tests" \
        --access-key="$access_key" --secret="$secret_key" 9>&- >/dev/null
    # The tests' bucket, made by a signed request (which proves the keys work).
    curl -sS -f -m 30 --aws-sigv4 "aws:amz:$region:s3" --user "$access_key:$secret_key" \
        -H "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" \
        -X PUT "$endpoint/$bucket" >/dev/null || die "RGW refused to make bucket $bucket"
    : >"$built"
}

wait_rgw() {
    local i
    for i in $(seq 1 600); do
        rgw_answers && return 0
        daemon_alive client.rgw.a || [ "$i" -lt 50 ] || break
        sleep 0.2
    done
    echo "ceph.sh: RGW does not answer at $endpoint; the cluster's state and the logs' ends:" >&2
    ceph_cli -s >&2 || true
    tail -n 20 "$dir"/log/*.log >&2 || true
    die "RGW did not start"
}

write_env() {
    cat >"$dir/s3.env" <<EOF
AWS_ACCESS_KEY_ID=$access_key
AWS_SECRET_ACCESS_KEY=$secret_key
AWS_ENDPOINT_URL=$endpoint
KNIB_S3_ENDPOINT=$endpoint
AWS_REGION=$region
AWS_DEFAULT_REGION=$region
AWS_ALLOW_HTTP=true
AWS_EC2_METADATA_DISABLED=true
KNIB_S3_BUCKET=$bucket
EOF
}

start() {
    local t0=$SECONDS d
    [ "$(id -u)" = 0 ] || die "run as root"
    if running; then
        echo "ceph.sh: already running; S3 at $endpoint, env in $dir/s3.env"
        return 0
    fi
    ensure_packages
    stop_daemons
    # A failed start leaves no daemon behind, and its logs for a look.
    trap 'echo "ceph.sh: start failed; its daemons are stopped, logs in $dir/log" >&2; stop_daemons KILL' EXIT
    for p in "$mon_port" "$rgw_port"; do
        port_in_use "$p" && die "port $p on 127.0.0.1 is taken (set KNIB_CEPH_MON_PORT / KNIB_CEPH_RGW_PORT)"
    done
    if [ -f "$built" ]; then
        rm -f "$dir"/run/*.pid
        daemon mon.a ceph-mon -i a
        daemon osd.0 ceph-osd -i 0
        daemon client.rgw.a radosgw -n client.rgw.a
        wait_rgw
        daemon mgr.x ceph-mgr -i x
    else
        make_cluster
    fi
    for d in "${daemons[@]}"; do
        for _ in $(seq 1 50); do daemon_alive "$d" && break; sleep 0.2; done
        daemon_alive "$d" || die "$d is not running (see $dir/log/$d.log)"
    done
    write_env
    trap - EXIT
    echo "ceph.sh: Ceph RGW ready in $((SECONDS - t0)) s; S3 at $endpoint, env in $dir/s3.env"
}

stop() {
    if [ $keep = 1 ]; then
        stop_daemons
        echo "ceph.sh: stopped; data kept in $dir"
    else
        # The data goes: no need for a clean stop.
        [ ! -e "$dir" ] || [ -f "$marker" ] || die "$dir is not a cluster made by this script (no $marker): not touched"
        stop_daemons KILL
        purge
        echo "ceph.sh: stopped; $dir removed"
    fi
}

lock() {
    mkdir -p "$(dirname "$dir")"
    exec 9>"$dir.lock"
    flock -w 300 9 || die "another ceph.sh holds $dir.lock"
}

case "$cmd" in
    start) lock; start ;;
    stop) lock; stop ;;
    status)
        if running; then echo "ceph.sh: running; S3 at $endpoint, env in $dir/s3.env"; else echo "ceph.sh: not running"; exit 1; fi ;;
    env)
        [ -f "$dir/s3.env" ] || die "no $dir/s3.env: start the cluster first"
        sed 's/^/export /' "$dir/s3.env" ;;
    *) usage ;;
esac
