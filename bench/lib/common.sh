# Shared helpers of bench/run (bash; sourced, not executed).
#
# Timing uses bash's $EPOCHREALTIME (microseconds, no fork per sample); arithmetic on
# seconds is done with awk. Long steps run as `step ARGS & wait $!` so that a signal to
# bench/run is handled at once, and they leave their results in files under $BENCH_TMP
# rather than on stdout. Every process a helper starts is recorded as
# $BENCH_TMP/pids/<tag>.<command name> holding its PID, and every VM a build starts is
# named in that build's log, so that bench_cleanup stops exactly those and nothing else.

# bench_log MESSAGE...: progress on stderr (stdout carries the table).
bench_log() {
    printf 'bench: %s\n' "$*" >&2
}

# calc EXPR: evaluates a floating-point expression with awk; prints it with 3 decimals.
calc() {
    awk "BEGIN { printf \"%.3f\", ($1) }"
}

# median X...: the median of the numbers given (mean of the middle two for an even count);
# empty arguments are left out, and with none left it prints nothing (so a row says "-").
median() {
    printf '%s\n' "$@" | sort -g | awk '$1 != "" { v[++n] = $1 } END {
        if (n == 0) { print ""; exit }
        if (n % 2) printf "%.3f", v[(n + 1) / 2]
        else printf "%.3f", (v[n / 2] + v[n / 2 + 1]) / 2 }'
}

# mean X...: the arithmetic mean (of the non-empty arguments; nothing when there are none).
mean() {
    printf '%s\n' "$@" | awk '$1 != "" { s += $1; n++ } END { if (n) printf "%.3f", s / n }'
}

# secs X: "1.23 s" (or "-" when X is empty).
secs() {
    if [ -z "$1" ]; then echo "-"; else awk "BEGIN { printf \"%.2f s\", $1 }"; fi
}

# ratio OURS BASE: "OURS/BASE" as "1.23x" ("-" when either is missing or BASE is 0).
ratio() {
    if [ -z "$1" ] || [ -z "$2" ]; then echo "-"; return; fi
    awk "BEGIN { if (($2) + 0 == 0) print \"-\"; else printf \"%.2fx\", ($1) / ($2) }"
}

# rate MIB SECONDS: "123.4 MiB/s (1.62 s)".
rate() {
    if [ -z "$2" ]; then echo "-"; return; fi
    awk "BEGIN { if (($2) <= 0) printf \"- (%.2f s)\", $2; else printf \"%.1f MiB/s (%.2f s)\", $1 / ($2), $2 }"
}

# row FIGURE OURS BASELINE RATIO: one Markdown table row, on stdout and in $BENCH_ROWS.
row() {
    printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" | tee -a "$BENCH_ROWS"
}

# stamp: copies stdin to stdout, each line prefixed with the time it arrived.
stamp() {
    local line
    while IFS= read -r line; do
        printf '%s %s\n' "$EPOCHREALTIME" "$line"
    done
}

# contractor_build DIR TAG: runs `contractor build` in DIR. Its stderr, each line
# timestamped, goes to $BENCH_TMP/logs/TAG.ts between a "bench-start" and a "bench-end RC"
# line; its stdout (the script's output) to TAG.out. Returns contractor's exit code.
contractor_build() {
    local dir=$1 tag=$2 rc
    local ts="$BENCH_TMP/logs/$tag.ts" out="$BENCH_TMP/logs/$tag.out"
    printf '%s bench-start\n' "$EPOCHREALTIME" >"$ts"
    (cd "$dir" && echo "$BASHPID" >"$BENCH_TMP/pids/$tag.contractor" && exec "$CONTRACTOR" build) \
        2>&1 >"$out" | stamp >>"$ts"
    rc=${PIPESTATUS[0]}
    printf '%s bench-end %s\n' "$EPOCHREALTIME" "$rc" >>"$ts"
    rm -f "$BENCH_TMP/pids/$tag.contractor"
    if [ "$rc" -ne 0 ]; then
        bench_log "contractor build in $dir failed (exit $rc); its last lines:"
        tail -n 15 "$ts" | cut -d' ' -f2- >&2
    fi
    return "$rc"
}

# build_time TAG: the wall time of a finished contractor_build, in seconds.
build_time() {
    awk '$2 == "bench-start" { s = $1 } $2 == "bench-end" { e = $1 }
         END { if (s && e) printf "%.3f", e - s }' "$BENCH_TMP/logs/$1.ts"
}

# build_ok TAG: true when that build exited 0.
build_ok() {
    awk '$2 == "bench-end" { rc = $3 } END { exit (rc == "0" ? 0 : 1) }' "$BENCH_TMP/logs/$1.ts"
}

# phases TAG: the phase boundaries of a finished build as "NAME SECONDS" lines, each the
# time from the previous boundary: packed, vm, boot, source, script, artifacts, exit.
phases() {
    awk '
        $2 == "bench-start" { t["start"] = $1 }
        $2 == "contractor:" && $3 == "build" && /source packed/ { t["packed"] = $1 }
        $2 == "contractor:" && $3 == "VM" && /started/ { t["vm"] = $1 }
        $2 == "contractor:" && $3 == "phase" { t[$4] = $1 }
        $2 == "build" && / succeeded in / { t["summary"] = $1 }
        $2 == "bench-end" { t["end"] = $1 }
        END {
            n = split("start packed vm source script artifacts summary end", k, " ")
            name["packed"] = "packed"; name["vm"] = "vm"; name["source"] = "boot"
            name["script"] = "source"; name["artifacts"] = "script"
            name["summary"] = "artifacts"; name["end"] = "exit"
            for (i = 2; i <= n; i++)
                if ((k[i] in t) && (k[i - 1] in t))
                    printf "%s %.3f\n", name[k[i]], t[k[i]] - t[k[i - 1]]
        }' "$BENCH_TMP/logs/$1.ts"
}

# artifact_split TAG: "UPLOAD TEARDOWN": from "phase artifacts" to the last "artifact"
# line, and from there to the summary (VM power-off and destroy, services stopped).
artifact_split() {
    awk '$2 == "contractor:" && $3 == "phase" && $4 == "artifacts" { a = $1; last = $1 }
         $2 == "contractor:" && $3 == "artifact" { last = $1 }
         $2 == "build" && / succeeded in / { s = $1 }
         END { if (a && s) printf "%.3f %.3f", last - a, s - last }' "$BENCH_TMP/logs/$1.ts"
}

# phase TAG NAME: one phase's duration (see phases).
phase() {
    phases "$1" | awk -v n="$2" '$1 == n { print $2 }'
}

# new_project DIR SCRIPT [ARTIFACTS_TOML]: a project whose contractor.toml runs SCRIPT on
# the same VM size as bare_boot (2 CPUs, 2 GiB), stated explicitly.
new_project() {
    local dir=$1 script=$2 artifacts=${3:-[]}
    mkdir -p "$dir"
    cat >"$dir/contractor.toml" <<EOF
[build]
image = "debian-12-build"
script = """
$script
"""
artifacts = $artifacts
timeout = "10m"

[vm]
cpus = $BENCH_CPUS
memory = "${BENCH_MEMORY_MIB}MiB"

[network]
allow = []
EOF
}

# hello_project DIR: a fresh copy of examples/hello with the VM size set explicitly.
hello_project() {
    mkdir -p "$1"
    cp "$BENCH_ROOT/examples/hello/hello.c" "$BENCH_ROOT/examples/hello/Makefile" "$1/"
    new_project "$1" 'make
make check' '["hello"]'
}

# The kernel command line of the bare boot: what a person types to boot the image by hand
# with a shell as init. Fixed here rather than taken from the image's manifest, so that
# Contractor's own boot settings never leak into its baseline.
BENCH_BARE_CMDLINE="console=ttyS0 root=/dev/vda rw panic=-1 quiet init=/bin/sh"

# bare_boot SRC_DIR SCRIPT TAG: boots the builder image with plain qemu-system-x86_64 (no
# libvirt, no agent: the image's kernel and Debian's initrd, with /bin/sh as init), unpacks SRC_DIR's files from a raw tar disk and runs
# SCRIPT, then powers off. Writes the wall time (overlay creation to QEMU's exit) to
# $BENCH_TMP/logs/TAG.time; the console goes to $BENCH_TMP/logs/TAG.console and carries the guest's uptime at three points
# (bench-up0: shell started, bench-up1: source unpacked, bench-up2: script done).
# With OUT_MIB, a blank raw disk of that size is /dev/vdc, for the script to write to.
# Fails unless SCRIPT succeeded.
bare_boot() {
    local src=$1 script=$2 tag=$3 out_mib=${4:-}
    local work="$BENCH_TMP/bare-$tag" console="$BENCH_TMP/logs/$tag.console"
    local cmdline start end rc out_disk=()
    mkdir -p "$work"
    cmdline="$BENCH_BARE_CMDLINE -- -c \"PATH=/usr/bin:/bin:/usr/sbin:/sbin; read u _ </proc/uptime; echo bench-up0 \$u; mkdir -p /b; cd /b; tar xf /dev/vdb; read u _ </proc/uptime; echo bench-up1 \$u; $script && echo bench-ok; read u _ </proc/uptime; echo bench-up2 \$u; echo o >/proc/sysrq-trigger\""
    start=$EPOCHREALTIME
    qemu-img create -q -f qcow2 -F qcow2 -b "$BENCH_IMAGE_DIR/disk.qcow2" "$work/overlay.qcow2"
    tar cf "$work/src.tar" -C "$src" .
    if [ -n "$out_mib" ]; then
        truncate -s "${out_mib}M" "$work/out.raw"
        out_disk=(-drive "file=$work/out.raw,if=virtio,format=raw,cache=unsafe")
    fi
    timeout 600 qemu-system-x86_64 -accel "$BENCH_QEMU_ACCEL" -machine q35 -cpu "$BENCH_QEMU_CPU" \
        -smp "$BENCH_CPUS" -m "$BENCH_MEMORY_MIB" -nographic -no-reboot \
        -kernel "$BENCH_IMAGE_DIR/vmlinuz" -initrd "$BENCH_IMAGE_DIR/initrd.img" \
        -drive "file=$work/overlay.qcow2,if=virtio,format=qcow2,cache=unsafe" \
        -drive "file=$work/src.tar,if=virtio,format=raw,readonly=on" "${out_disk[@]}" \
        -append "$cmdline" </dev/null >"$console" 2>&1 &
    echo $! >"$BENCH_TMP/pids/$tag.timeout"
    wait $!
    rc=$?
    end=$EPOCHREALTIME
    rm -f "$BENCH_TMP/pids/$tag.timeout"
    rm -rf "$work"
    if [ "$rc" -ne 0 ] || ! grep -q '^bench-ok' "$console"; then
        bench_log "bare QEMU boot $tag failed (exit $rc); its last console lines:"
        tail -n 15 "$console" >&2
        return 1
    fi
    calc "$end - $start" >"$BENCH_TMP/logs/$tag.time"
}

# bare_shell_time TAG: boots the image bare whose shell prints one line and powers off;
# prints the wall time from starting QEMU to that line reaching the host (the baseline of
# "time to the script's first output line").
bare_shell_time() {
    local tag=$1 work="$BENCH_TMP/bare-$1" console="$BENCH_TMP/logs/$1.console" start
    mkdir -p "$work"
    qemu-img create -q -f qcow2 -F qcow2 -b "$BENCH_IMAGE_DIR/disk.qcow2" "$work/overlay.qcow2"
    start=$EPOCHREALTIME
    timeout 300 qemu-system-x86_64 -accel "$BENCH_QEMU_ACCEL" -machine q35 -cpu "$BENCH_QEMU_CPU" \
        -smp "$BENCH_CPUS" -m "$BENCH_MEMORY_MIB" -nographic -no-reboot \
        -kernel "$BENCH_IMAGE_DIR/vmlinuz" -initrd "$BENCH_IMAGE_DIR/initrd.img" \
        -drive "file=$work/overlay.qcow2,if=virtio,format=qcow2,cache=unsafe" \
        -append "$BENCH_BARE_CMDLINE -- -c \"echo bench-first-line; echo o >/proc/sysrq-trigger\"" \
        </dev/null 2>&1 | stamp >"$console"
    rm -rf "$work"
    awk -v s="$start" '/bench-first-line/ { printf "%.3f", $1 - s; exit }' "$console"
}

# first_output_time DIR TAG: runs `contractor build --json` in DIR; prints the wall time
# from starting it to its first `output` event (the script's first line).
first_output_time() {
    local dir=$1 tag=$2 log="$BENCH_TMP/logs/$2.json" start
    start=$EPOCHREALTIME
    (cd "$dir" && exec "$CONTRACTOR" build --json) 2>"$BENCH_TMP/logs/$tag.err" | stamp >"$log"
    awk -v s="$start" '/"type":"output"/ { printf "%.3f", $1 - s; exit }' "$log"
}

# bare_time TAG: the wall time bare_boot recorded ("" when it failed).
bare_time() {
    cat "$BENCH_TMP/logs/$1.time" 2>/dev/null
}

# bare_uptime TAG N: the guest uptime printed as bench-upN by bare_boot (or by its script).
bare_uptime() {
    # The console starts with terminal escapes, so the marker may not begin its line.
    grep -ao "bench-up$2 [0-9.]*" "$BENCH_TMP/logs/$1.console" | awk '{ print $2; exit }'
}

# host_run DIR SCRIPT: runs SCRIPT with sh -e in a fresh copy of DIR on the host; prints
# the wall time.
host_run() {
    local src=$1 script=$2 work="$BENCH_TMP/host-run" start end
    rm -rf "$work"
    mkdir -p "$work"
    start=$EPOCHREALTIME
    cp -a "$src/." "$work/"
    (cd "$work" && sh -e -c "$script") >/dev/null 2>&1 || {
        bench_log "host run of '$script' failed"
        return 1
    }
    end=$EPOCHREALTIME
    rm -rf "$work"
    calc "$end - $start"
}

# host_tar SRC: copies the tree SRC with `tar cf - | tar xf -` on the host; prints the time.
host_tar() {
    local dest="$BENCH_TMP/host-tar" start end
    rm -rf "$dest"
    mkdir -p "$dest"
    start=$EPOCHREALTIME
    tar cf - -C "$1" . | tar xf - -C "$dest"
    end=$EPOCHREALTIME
    rm -rf "$dest"
    calc "$end - $start"
}

# run_logged TAG COMMAND...: runs COMMAND with its output in $BENCH_TMP/logs/TAG.log and
# its PID recorded; writes its wall time to TAG.time on success. Returns its exit code.
run_logged() {
    local tag=$1 start end rc name
    shift
    name=$(basename "$1" | cut -c1-15)
    start=$EPOCHREALTIME
    "$@" </dev/null >"$BENCH_TMP/logs/$tag.log" 2>&1 &
    echo $! >"$BENCH_TMP/pids/$tag.$name"
    wait $!
    rc=$?
    end=$EPOCHREALTIME
    rm -f "$BENCH_TMP/pids/$tag.$name"
    if [ "$rc" -ne 0 ]; then
        bench_log "$* failed (exit $rc); its last lines:"
        tail -n 15 "$BENCH_TMP/logs/$tag.log" >&2
        return "$rc"
    fi
    calc "$end - $start" >"$BENCH_TMP/logs/$tag.time"
}

# bench_cleanup: stops what this run started (by recorded PID, after checking the process
# still has the recorded name), destroys VMs its builds started that still exist, and
# removes the scratch directory. Sets BENCH_LEFTOVER_VMS to the number of this run's VMs
# that still existed (0 when the builds cleaned up after themselves, as they should).
bench_cleanup() {
    local file pid name vm waited
    BENCH_LEFTOVER_VMS=0
    [ -d "$BENCH_TMP" ] || return 0
    for file in "$BENCH_TMP"/pids/*; do
        [ -f "$file" ] || continue
        pid=$(cat "$file")
        name=${file##*.}
        if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
            # contractor destroys its VM on SIGINT; TERM if it does not stop.
            kill -INT "$pid" 2>/dev/null
            waited=0
            while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 20 ]; do
                sleep 0.5
                waited=$((waited + 1))
            done
            kill -TERM "$pid" 2>/dev/null
        fi
    done
    for vm in $(cat "$BENCH_TMP"/logs/*.ts 2>/dev/null |
        awk '$2 == "contractor:" && $3 == "VM" && $5 == "started" { print $4 }' | sort -u); do
        # contractor returns before libvirt confirms the destroy, which its VM holder
        # finishes alone: give that a moment before calling the VM left over.
        waited=0
        while virsh -c "$BENCH_URI" domstate "$vm" >/dev/null 2>&1 && [ "$waited" -lt 60 ]; do
            sleep 0.5
            waited=$((waited + 1))
        done
        if virsh -c "$BENCH_URI" domstate "$vm" >/dev/null 2>&1; then
            BENCH_LEFTOVER_VMS=$((BENCH_LEFTOVER_VMS + 1))
            bench_log "destroying leftover VM $vm"
            virsh -c "$BENCH_URI" destroy "$vm" >/dev/null 2>&1
            virsh -c "$BENCH_URI" undefine "$vm" >/dev/null 2>&1
        fi
    done
    rm -rf "$BENCH_TMP"
}
