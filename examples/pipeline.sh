#!/bin/sh
# The same build as `cd examples/hello && contractor build`, composed in plain POSIX sh from
# the separate tools, each asked what `contractor build` asks it (docs/protocol.md, "Composing
# the tools"). It writes the same record but provenance.json, which the front end signs.
#   STORE=/var/tmp/pipe-store sh examples/pipeline.sh
# stdout: contractor-run's events. stderr: progress ("pipeline: ..."); the tools' own
# messages go to the record's tools.log. Exit code: contractor-run's (0 success, 1 failed or
# timed out, 3 infrastructure), a failed earlier step's (2 or 3; a missing tool or jq: 3),
# or 130 when interrupted.
# Environment (all optional): PROJECT [examples/hello], STORE [$PROJECT/.contractor],
# CONTRACTOR_BIN (the tools' directory) [target/release if it holds them, else PATH],
# CONTRACTOR_LIBVIRT_URI, CONTRACTOR_DATA_DIR, ACCEL (auto|kvm|tcg): as for contractor.
# The build: examples/hello/contractor.toml written out (sh reads no TOML).
IMAGE=debian-12-build
BUILD_SCRIPT='make
make check
'
ARTIFACTS='hello'              # [build] artifacts, space-separated
TIMEOUT_SECS=600 CPUS=2 MEMORY_MIB=2048 DISK_GIB=8      # timeout, [vm] cpus, memory, disk
MAX_LOG_BYTES=67108864 MAX_ARTIFACTS_BYTES=1073741824   # the defaults: 64MiB, 1GiB
ALLOW=''                       # [network] allow, space-separated host patterns
CACHE_PATHS='' CACHE_MAX_BYTES=1073741824  # [cache] paths (space-separated), max_size
DOWNLOAD_CACHE_BYTES=10737418240           # the download cache's size, 10GiB

set -eu
umask 022 # the record and the VM's files must be readable by libvirt's QEMU user
say() { printf 'pipeline: %s\n' "$*" >&2; }
die() { code=$1 && shift && say "$*" && exit "$code"; }
here=$(cd "$(dirname "$0")" && pwd)
PROJECT=$(cd "${PROJECT:-$here/hello}" && pwd)
STORE=${STORE:-$PROJECT/.contractor}
[ -n "${CONTRACTOR_BIN:-}" ] || [ ! -x "$here/../target/release/contractor-run" ] ||
    CONTRACTOR_BIN=$here/../target/release
tool() {
    if [ -z "${CONTRACTOR_BIN:-}" ]; then command -v "$1" || die 3 "$1 is not on PATH; set CONTRACTOR_BIN"
    elif [ -x "$CONTRACTOR_BIN/$1" ]; then printf '%s\n' "$CONTRACTOR_BIN/$1"
    else die 3 "no executable $CONTRACTOR_BIN/$1 (CONTRACTOR_BIN names the tools' directory)"; fi
}
STORE_TOOL=$(tool contractor-store); PROXY_TOOL=$(tool contractor-proxy)
VM_TOOL=$(tool contractor-vm); RUN_TOOL=$(tool contractor-run)
command -v jq >/dev/null || die 3 "jq is not installed (apt-get install jq)"
if [ "$(id -u)" = 0 ]; then URI=qemu:///system DATA=/var/lib/contractor
else URI=qemu:///session DATA=${XDG_DATA_HOME:-$HOME/.local/share}/contractor; fi
URI=${CONTRACTOR_LIBVIRT_URI:-$URI} DATA=${CONTRACTOR_DATA_DIR:-$DATA}

# Whatever was started is stopped on the way out: each tool stops cleanly on SIGTERM, the
# VM's holder (contractor-vm) destroying its VM.
TMP=$(mktemp -d "${TMPDIR:-/tmp}/contractor-pipeline.XXXXXX")
started=''
stop() { for pid in "$@"; do kill -TERM "$pid" 2>/dev/null && wait "$pid" || true; done; }
trap 'code=$?; stop $started; rm -rf "$TMP"; exit "$code"' EXIT
trap 'say interrupted; exit 130' INT TERM HUP

# 1. The VM host can run builders, and the image is built (or rebuilt for another agent).
"$VM_TOOL" check --uri "$URI" | jq -e '.libvirt.ok and .agent.ok' >/dev/null ||
    die 3 "this host cannot run builder VMs: $("$VM_TOOL" check --uri "$URI" | jq -c '[.libvirt, .agent]')"
say "image $IMAGE"
image=$("$VM_TOOL" image build "$IMAGE" --json-errors) || die $? "cannot build the image $IMAGE: $image"
boot=$(printf '%s\n' "$image" | jq -c .image.boot)

# 2. The record, opened by the store (abandoned ones closed first, owned by this script), packed.
opened=$("$STORE_TOOL" record open --root "$STORE" --owner $$ --json-errors) || die $? "cannot open the record: $opened"
ID=$(printf '%s\n' "$opened" | jq -r .id) REC=$(printf '%s\n' "$opened" | jq -r .dir)
since=$(date +%s.%N)
close() { # close [ARGS...] <EVENTS: the store writes result.json from what stdin says
    for a in $ARTIFACTS; do set -- "$@" --artifact "$a"; done
    "$STORE_TOOL" record close --root "$STORE" --build "$ID" --started "$since" "$@" |
        jq -r '.result | "build \(.id): \(.outcome)\n  log: \(.log)" + ([.artifacts[] | "\n  artifact: \(.)"] | add // "")' |
        while IFS= read -r line; do say "$line"; done
}
packed=$("$STORE_TOOL" pack --project "$PROJECT" --out "$REC/source.tar" --json-errors) ||
    { code=$?; printf '%s\n' "$packed" | close; exit "$code"; }
printf '%s\n' "$packed" | jq -r '.warnings[] | "pipeline: warning: \(.)"' >&2
say "build $ID: source packed ($(printf '%s\n' "$packed" | jq -r .entries) entries)"

# 3. The build cache, the store (it makes the agent's token and gives it in its ready line),
# and the proxy (with the download cache; it files its lines in the record); each service
# writes its ready line on descriptor 3, read here from a FIFO.
cache_tool() { # cache_tool prepare|keep FLAGS...: one --path per CACHE_PATHS
    sub=$1 && shift && for p in $CACHE_PATHS; do set -- "$@" --path "$p"; done
    "$STORE_TOOL" cache "$sub" --root "$STORE" --build "$ID" --json-errors "$@"
}
cache=$(cache_tool prepare --max-bytes "$CACHE_MAX_BYTES") || die 3 "cannot prepare the build cache: $cache"
printf '%s\n' "$cache" | jq -r '.warnings[] | "pipeline: warning: \(.)"' >&2
store_limit=$MAX_ARTIFACTS_BYTES # the new cache travels with the artifacts
[ "$(printf '%s' "$cache" | jq .cache)" = null ] || store_limit=$((MAX_ARTIFACTS_BYTES + CACHE_MAX_BYTES))
mkfifo "$TMP/store.ready" "$TMP/proxy.ready" "$TMP/vm.in" "$TMP/vm.out" "$TMP/run.out"
"$STORE_TOOL" serve --root "$STORE" --only-build "$ID" --own-token --no-access-log \
    --max-build-bytes "$store_limit" --ready-fd 3 3>"$TMP/store.ready" >/dev/null 2>>"$REC/tools.log" &
store_pid=$! started="$! $started"
IFS= read -r store_ready <"$TMP/store.ready" || die 3 "the store did not start (see $REC/tools.log)"
key=$({ cat /etc/machine-id 2>/dev/null || cat /proc/sys/kernel/hostname; printf '\000%s' "$PROJECT"; } |
    sha256sum | cut -c1-32)
set -- --record-downloads --cache "$DATA/downloads" --cache-project "$key" \
    --cache-size "$DOWNLOAD_CACHE_BYTES" --cache-max $((DOWNLOAD_CACHE_BYTES / 2))
for host in $ALLOW; do set -- "$@" --allow "$host"; done
[ -z "$ALLOW" ] || set -- "$@" --inspect
"$PROXY_TOOL" "$@" --record "$REC" --ready-fd 3 3>"$TMP/proxy.ready" >/dev/null 2>>"$REC/tools.log" &
proxy_pid=$! started="$! $started"
IFS= read -r proxy_ready <"$TMP/proxy.ready" || die 3 "the proxy did not start (see $REC/tools.log)"
say "store and proxy ready"

# 4. The VM, held by contractor-vm while descriptor 4, its stdin, stays open; its answer (the
# VM, or its error object) goes to contractor-run as it is, with the rest of the request.
mkdir -p "$DATA/vms"
"$VM_TOOL" create --json --hold --json-errors <"$TMP/vm.in" >"$TMP/vm.out" 2>>"$REC/tools.log" &
vm_pid=$! started="$! $started"
exec 4>"$TMP/vm.in"
jq -n --arg uri "$URI" --argjson image "$boot" --argjson cpus "$CPUS" --argjson memory "$MEMORY_MIB" \
    --argjson disk "$DISK_GIB" --arg accel "${ACCEL:-auto}" --arg console "$REC/console.log" \
    --arg work "$DATA/vms" '{type: "create", version: 1, uri: $uri, spec: {image: $image, cpus: $cpus,
        memory_mib: $memory, disk_gib: $disk, accel: $accel, console_log: $console,
        work_dir: $work, snapshot: true}}' >&4
IFS= read -r vm <"$TMP/vm.out" || vm=''
printf '%s\n' "$vm" >"$TMP/vm.json"
printf '%s\n' "$vm" | jq -r 'select(.type == "vm") | .vm | "pipeline: VM \(.name) started at \(.uri) (\(.accel))"' >&2

# 5. The run: events to stdout and to the close, the VM released after it.
jq -n --arg proxy "$(printf '%s' "$proxy_ready" | jq -r .addr)" --arg id "$ID" \
    --arg store "$(printf '%s' "$store_ready" | jq -r .addr)" --arg log "$REC/build.log" \
    --argjson timeout "$TIMEOUT_SECS" --argjson max_log "$MAX_LOG_BYTES" --arg script "$BUILD_SCRIPT" \
    --argjson memory "$MEMORY_MIB" --argjson disk "$DISK_GIB" \
    --arg token "$(printf '%s' "$store_ready" | jq -r .token)" \
    --arg artifacts "$ARTIFACTS" --argjson cache "$(printf '%s' "$cache" | jq .cache)" \
    --argjson ca "$(printf '%s' "$proxy_ready" | jq .ca_certificate)" \
    '{version: 1, proxy: $proxy, store: $store, log: $log, timeout_secs: $timeout,
      max_log_bytes: $max_log, memory_mib: $memory, disk_gib: $disk,
      job: ({script: $script, env: {CONTRACTOR_BUILD_ID: $id}, source: "/builds/\($id)/source.tar",
             artifacts: ($artifacts | split(" ") | map(select(. != ""))),
             artifacts_dest: "/builds/\($id)/artifacts/", store_token: $token}
            + if $cache then {cache: $cache} else {} end
            + if $ca then {ca_certificate: $ca} else {} end)}' >"$TMP/run.json"
"$RUN_TOOL" --json-errors --request "$TMP/run.json" <"$TMP/vm.json" >"$TMP/run.out" 2>>"$REC/tools.log" 4>&- &
run_pid=$! started="$! $started"
tee "$TMP/events" <"$TMP/run.out" 4>&- & # shown as they come, and kept for the close
code=0 && wait "$run_pid" || code=$?
wait $! || true
exec 4>&-
wait "$vm_pid" || [ "$code" != 0 ] || { code=3; say "contractor-vm did not release the VM cleanly"; }

# 6. The services stopped (the proxy filed its lines in the record), the cache kept, the
# record closed.
stop "$proxy_pid" "$store_pid" && started=''
success=$(jq -rs 'map(select(.type == "finished")) | if .[-1].outcome == "success" then "--success" else "" end' "$TMP/events")
cache_tool keep $success >/dev/null || say "cannot keep the build cache (see its message above)"
close <"$TMP/events"
exit "$code"
