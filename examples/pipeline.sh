#!/bin/sh
# The same build as `cd examples/hello && contractor build`, composed from the separate
# tools in plain POSIX sh: contractor-store, contractor-proxy, contractor-vm, contractor-run,
# passing their JSON from one to the next with jq. It is the reference composition of the
# tools (docs/protocol.md, "Composing the tools"). It writes the same record except
# provenance.json: signing is the front end's, with its key (docs/provenance.md).
#
#   STORE=/var/tmp/pipe-store sh examples/pipeline.sh
#
# stdout: contractor-run's events, one JSON object per line, exactly as it wrote them.
# stderr: progress ("pipeline: ...") and a summary; the tools' own messages go to the
#         record's tools.log, as with contractor build.
# Exit code: contractor-run's (0 success, 1 the build failed or timed out, 3 infrastructure);
# 2 or 3 when a step before the run fails (with that tool's code; a missing tool or jq is 3,
# as a missing host tool is for every tool); 130 when interrupted.
#
# Environment (all optional):
#   PROJECT          the source tree                  [examples/hello beside this script]
#   STORE            the store root; the record is $STORE/builds/$ID/   [$PROJECT/.contractor]
#   CONTRACTOR_BIN   the directory holding the tools  [target/release of this repository if
#                    it holds them, else each tool is looked up on PATH]
#   CONTRACTOR_LIBVIRT_URI   [qemu:///system for root, qemu:///session otherwise]
#   CONTRACTOR_DATA_DIR      where images (images/) and VM overlays (vms/) go [/var/lib/contractor for
#                    root, else $XDG_DATA_HOME/contractor or ~/.local/share/contractor]
#   ACCEL            auto | kvm | tcg                 [auto]
#
# The build itself is examples/hello/contractor.toml written out below (a shell script
# cannot read TOML without another tool); change these to build something else.
IMAGE=debian-12-build
BUILD_SCRIPT='make
make check
'
ARTIFACTS='["hello"]'
TIMEOUT_SECS=600   # timeout = "10m"
CPUS=2
MEMORY_MIB=2048    # memory = "2GiB"
DISK_GIB=8         # the default disk
MAX_LOG_BYTES=67108864          # max_log = "64MiB", the default
MAX_ARTIFACTS_BYTES=1073741824  # max_artifacts = "1GiB", the default
ALLOW=''           # [network] allow, space-separated host patterns
MAX_ARTIFACTS_BYTES=1073741824 # the default build.max_artifacts, 1GiB
CACHE_PATHS=''     # [cache] paths: absolute guest directories, space-separated (~ is /root)
CACHE_MAX_BYTES=1073741824     # the default cache.max_size, 1GiB

set -eu
umask 022 # the record and the overlay directory must be readable by libvirt's QEMU user

say() { printf 'pipeline: %s\n' "$*" >&2; }
die() {
    code=$1
    shift
    say "$*"
    exit "$code"
}

here=$(cd "$(dirname "$0")" && pwd)
PROJECT=${PROJECT:-$here/hello}
PROJECT=$(cd "$PROJECT" && pwd)
STORE=${STORE:-$PROJECT/.contractor}

# --- the tools ----------------------------------------------------------------------------
if [ -z "${CONTRACTOR_BIN:-}" ] && [ -x "$here/../target/release/contractor-run" ]; then
    CONTRACTOR_BIN=$(cd "$here/../target/release" && pwd)
fi
tool() {
    if [ -n "${CONTRACTOR_BIN:-}" ]; then
        [ -x "$CONTRACTOR_BIN/$1" ] || die 3 "no executable $CONTRACTOR_BIN/$1 (CONTRACTOR_BIN names the directory of the tools; build them with cargo build --release)"
        printf '%s\n' "$CONTRACTOR_BIN/$1"
    else
        command -v "$1" || die 3 "$1 is not on PATH; set CONTRACTOR_BIN to the directory of the tools"
    fi
}
STORE_TOOL=$(tool contractor-store)
PROXY_TOOL=$(tool contractor-proxy)
VM_TOOL=$(tool contractor-vm)
RUN_TOOL=$(tool contractor-run)
command -v jq >/dev/null || die 3 "jq is not installed (apt-get install jq)"

if [ -z "${CONTRACTOR_LIBVIRT_URI:-}" ]; then
    if [ "$(id -u)" = 0 ]; then URI=qemu:///system; else URI=qemu:///session; fi
else
    URI=$CONTRACTOR_LIBVIRT_URI
fi
if [ -n "${CONTRACTOR_DATA_DIR:-}" ]; then
    DATA=$CONTRACTOR_DATA_DIR
elif [ "$(id -u)" = 0 ]; then
    DATA=/var/lib/contractor
else
    DATA=${XDG_DATA_HOME:-$HOME/.local/share}/contractor
fi

# --- cleanup: stop what was started, newest first -------------------------------------------
store_pid='' proxy_pid='' vm_pid='' run_pid='' tee_pid='' vm_held='' interrupted=''
TMP=$(mktemp -d "${TMPDIR:-/tmp}/contractor-pipeline.XXXXXX")

stop() { # stop PID: SIGTERM, then wait for it (each tool stops cleanly on SIGTERM)
    if [ -n "$1" ]; then
        kill -TERM "$1" 2>/dev/null || true
        wait "$1" 2>/dev/null || true
    fi
}
release_vm() { # closing the holder's stdin makes it destroy the VM and delete its overlay;
    # with "now", SIGTERM does the same without waiting for stdin (exit code 130)
    if [ -n "$vm_held" ]; then
        vm_held=''
        exec 4>&-
        [ "${1:-}" = now ] && kill -TERM "$vm_pid" 2>/dev/null
        vm_status=0
        wait "$vm_pid" || vm_status=$?
        vm_pid=''
        case "${1:-}:$vm_status" in
        *:0 | now:130) ;;
        *)
            say "contractor-vm exited $vm_status while releasing the VM"
            return 1
            ;;
        esac
    fi
}
cleanup() {
    status=$?
    trap - EXIT INT TERM HUP
    set +e
    stop "$run_pid"
    stop "$tee_pid"
    if [ -n "$vm_held" ]; then
        release_vm now || { [ "$status" = 0 ] && status=3; }
    else
        stop "$vm_pid"
    fi
    stop "$proxy_pid"
    stop "$store_pid"
    rm -rf "$TMP"
    [ -n "$interrupted" ] && status=130
    exit "$status"
}
trap cleanup EXIT
trap 'interrupted=1; say "interrupted"; exit 130' INT TERM HUP

# --- 1. the image -----------------------------------------------------------------------------
say "image $IMAGE"
# contractor-vm builds it if it is missing or carries another agent, and prints one object
# {"type":"image",...,"image":{"name","dir","boot":{disk,kernel,initrd,cmdline},...}}: its
# "boot" is the "image" of the create request below. Its progress goes to stderr.
image_answer=$("$VM_TOOL" image build "$IMAGE" --json-errors) && code=0 || code=$?
[ "$code" -eq 0 ] || die "$code" "cannot build the image $IMAGE (exit code $code): $(printf '%s\n' "$image_answer" | jq -r '.chain // [] | join(": ")' 2>/dev/null)"
boot=$(printf '%s\n' "$image_answer" | jq -ec 'select(.type == "image") | .image.boot') ||
    die 3 "contractor-vm printed no image: $image_answer"

# --- 2. the build record, the source --------------------------------------------------------
ID=$(date -u +%Y%m%d-%H%M%S)-$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
REC=$STORE/builds/$ID
mkdir -p "$REC"
REC=$(cd "$REC" && pwd)
started=$(date +%s.%N)
# contractor-store pack walks the tree as `contractor build` does (links stay links; .git,
# .contractor left out; in a git work tree, what its .gitignore files name and git does not
# track left out too), so the tar is the same. When the project
# cannot be packed, the record is closed as the front end closes it: failed (the project's
# fault, exit code 2) or infrastructure (the host's, exit code 3).
pack_status=0
packed=$("$STORE_TOOL" pack --project "$PROJECT" --out "$REC/source.tar" --json-errors) ||
    pack_status=$?
if [ "$pack_status" != 0 ]; then
    [ "$pack_status" = 2 ] && pack_outcome=failed || pack_outcome=infrastructure
    printf '%s\n' "$packed" | jq -s --arg id "$ID" --arg rec "$REC" --arg outcome "$pack_outcome" \
        --arg exit "$pack_status" \
        --argjson duration "$(awk -v now="$(date +%s.%N)" -v t0="$started" 'BEGIN { printf "%.3f", now - t0 }')" \
        '(map(select(.type == "error")) | last //
            {code: "source_pack", chain: ["contractor-store pack exited \($exit)"]}) as $e
         | {version: 1, id: $id, outcome: $outcome, duration_secs: $duration,
            log: "\($rec)/build.log", console_log: "\($rec)/console.log", artifacts: [],
            refused_hosts: [], error: {code: $e.code, chain: (["cannot pack the source"] + $e.chain)}}' \
        >"$REC/result.json" 2>/dev/null || true
    die "$pack_status" "build $ID: cannot pack the source (contractor-store exited $pack_status)"
fi
printf '%s\n' "$packed" | jq -r '.warnings[] | "pipeline: warning: \(.)"' >&2
ln -sfn "builds/$ID" "$STORE/latest"
say "build $ID: source packed ($(printf '%s\n' "$packed" | jq -r .entries) entries)"

# --- 3. store and proxy: start each, read its ready line from a named pipe --------------------
# start_service NAME REST_FILE COMMAND...: runs COMMAND in the background with stdout on a
# pipe, reads the first line (the ready line), then copies the rest of stdout to REST_FILE.
# Sets $service_pid and $service_addr.
start_service() {
    name=$1 rest=$2
    shift 2
    mkfifo "$TMP/$name.out"
    "$@" >"$TMP/$name.out" 2>>"$REC/tools.log" &
    service_pid=$!
    exec 3<"$TMP/$name.out"
    if ! IFS= read -r ready <&3; then
        exec 3<&-
        wait "$service_pid" && code=3 || code=$?
        die "$code" "$name did not start (exit code $code; see its message above)"
    fi
    cat <&3 >"$rest" &
    service_copier=$!
    exec 3<&-
    service_addr=$(printf '%s\n' "$ready" | jq -er 'select(.type == "ready") | .addr') ||
        die 3 "$name printed no ready line: $ready"
    service_ready=$ready
}

# The build's cache: the tar of an earlier build linked into the record for the agent to
# restore, and where the agent saves the new one (null without CACHE_PATHS).
cache_tool() { # cache_tool SUBCOMMAND FLAGS...: contractor-store cache, one --path per CACHE_PATHS
    sub=$1
    shift
    for path in $CACHE_PATHS; do set -- "$@" --path "$path"; done
    "$STORE_TOOL" cache "$sub" --root "$STORE" --build "$ID" --json-errors "$@"
}
cache_prepared=$(cache_tool prepare --max-bytes "$CACHE_MAX_BYTES") ||
    die 3 "cannot prepare the build cache (contractor-store's message is above)"
printf '%s\n' "$cache_prepared" | jq -r '.warnings[] | "pipeline: warning: \(.)"' >&2
cache_job=$(printf '%s\n' "$cache_prepared" | jq -c .cache)
# The store serves only this build, only to the agent's token, and takes at most the
# artifacts' limit plus the cache's (the new cache travels through the artifacts). The token
# file is private to this script (its temp dir is 0700, the file 0600), never in the store.
store_limit=$MAX_ARTIFACTS_BYTES
[ "$cache_job" != null ] && store_limit=$((MAX_ARTIFACTS_BYTES + CACHE_MAX_BYTES))
store_token=$("$STORE_TOOL" token --build "$ID" --token-file "$TMP/store-tokens") ||
    die 3 "cannot make the store token"
start_service store /dev/null "$STORE_TOOL" serve --root "$STORE" --only-build "$ID" \
    --token-file "$TMP/store-tokens" --max-build-bytes "$store_limit" --no-access-log
store_pid=$service_pid store_addr=$service_addr store_copier=$service_copier
say "store ready at $store_addr"

# The proxy's flags: one --allow per host of $ALLOW, every download recorded, and TLS to the
# allowed hosts inspected with the proxy's throwaway authority, which the guest then trusts.
set -- --record-downloads
for host in $ALLOW; do set -- "$@" --allow "$host"; done
[ -n "$ALLOW" ] && set -- "$@" --inspect
start_service proxy "$TMP/proxy.lines" "$PROXY_TOOL" "$@"
proxy_pid=$service_pid proxy_addr=$service_addr proxy_copier=$service_copier
proxy_ca=$(printf '%s\n' "$service_ready" | jq -c '.ca_certificate // null')
say "proxy ready at $proxy_addr"

# --- 4. the VM, held by contractor-vm for as long as fd 4 (its stdin) stays open --------------
# As `contractor build` does, it is restored from the snapshot of a booted builder of this
# image and shape when there is one (and the first time booted cold and saved as one).
mkdir -p "$DATA/vms"
jq -n --arg uri "$URI" --argjson boot "$boot" \
    --argjson cpus "$CPUS" --argjson memory "$MEMORY_MIB" --argjson disk "$DISK_GIB" \
    --arg accel "${ACCEL:-auto}" --arg console "$REC/console.log" \
    --arg work "$DATA/vms" \
    '{type: "create", version: 1, uri: $uri,
      spec: {image: $boot,
             cpus: $cpus, memory_mib: $memory, disk_gib: $disk, accel: $accel,
             console_log: $console, work_dir: $work, snapshot: true}}' >"$TMP/vm-request.json"
mkfifo "$TMP/vm.in" "$TMP/vm.out"
"$VM_TOOL" create --json --hold --json-errors <"$TMP/vm.in" >"$TMP/vm.out" 2>>"$REC/tools.log" &
vm_pid=$!
exec 4>"$TMP/vm.in"
vm_held=1
exec 5<"$TMP/vm.out"
cat "$TMP/vm-request.json" >&4
IFS= read -r vm_result <&5 || vm_result=''
# Every process started from here on gets 4>&-: a copy of fd 4 would keep the VM held.
cat <&5 >"$TMP/vm.rest" 4>&- &
exec 5<&-
if [ "$(printf '%s\n' "$vm_result" | jq -r '.type' 2>/dev/null)" != vm ]; then
    vm_held=''
    exec 4>&-
    code=0
    wait "$vm_pid" || code=$?
    vm_pid=''
    [ "$code" = 0 ] && code=3
    printf '%s\n' "$vm_result" | jq -r 'select(.type == "error") |
        "pipeline: contractor-vm error \(.code): \(.chain | join(": "))"' >&2 2>/dev/null || true
    die "$code" "cannot create the VM (contractor-vm exited $code)"
fi
say "$(printf '%s\n' "$vm_result" | jq -r '"VM \(.vm.name) started at \(.vm.uri) (\(.vm.accel // "?"))" +
    (if .vm.snapshot.restored then ", restored from a snapshot"
     elif .vm.snapshot then ", booted cold (\(.vm.snapshot.reason // "?"))" else "" end)')"

# --- 5. the run: the RunRequest is the VM's result plus the two addresses and the job --------
printf '%s\n' "$vm_result" | jq -e --arg proxy "$proxy_addr" --arg store "$store_addr" \
    --arg log "$REC/build.log" --argjson timeout "$TIMEOUT_SECS" --arg script "$BUILD_SCRIPT" \
    --argjson artifacts "$ARTIFACTS" --arg id "$ID" --argjson max_log "$MAX_LOG_BYTES" \
    --argjson memory "$MEMORY_MIB" --argjson disk "$DISK_GIB" \
    --arg token "$store_token" --argjson cache "$cache_job" --argjson ca "$proxy_ca" \
    '{version: 1, control_socket: .vm.control_socket, tunnel_socket: .vm.tunnel_socket,
      proxy: $proxy, store: $store, log: $log, timeout_secs: $timeout, boot_timeout_secs: 300,
      max_log_bytes: $max_log, memory_mib: $memory, disk_gib: $disk,
      job: ({script: $script, env: {CONTRACTOR_BUILD_ID: $id}, source: "/builds/\($id)/source.tar",
            artifacts: $artifacts, artifacts_dest: "/builds/\($id)/artifacts/",
            store_token: $token}
            + (if $cache == null then {} else {cache: $cache} end)
            + (if $ca == null then {} else {ca_certificate: $ca} end))}
     | if .control_socket and .tunnel_socket then . else
         error("libvirt reported no channel sockets for the VM") end' \
    >"$TMP/run-request.json" || die 3 "cannot build the run request"
mkfifo "$TMP/events"
"$RUN_TOOL" --json-errors <"$TMP/run-request.json" >"$TMP/events" 2>>"$REC/tools.log" 4>&- &
run_pid=$!
tee "$TMP/events.jsonl" <"$TMP/events" 4>&- &
tee_pid=$!
run_status=0
wait "$run_pid" || run_status=$?
run_pid=''
wait "$tee_pid" || true
tee_pid=''

# --- 6. release the VM, stop the services, write result.json -------------------------------
release_vm || { [ "$run_status" = 0 ] && run_status=3; }
stop "$proxy_pid"
proxy_pid=''
wait "$proxy_copier" || true # the proxy's output is complete once the copier has seen EOF
# Its downloads go to downloads.jsonl, the rest (decisions, the summary) to proxy.jsonl.
grep '^{"type":"download"' "$TMP/proxy.lines" >"$REC/downloads.jsonl" || true
grep -v '^{"type":"download"' "$TMP/proxy.lines" >"$REC/proxy.jsonl" || true
stop "$store_pid"
store_pid=''
wait "$store_copier" || true

finished=$(jq -c 'select(.type == "finished")' "$TMP/events.jsonl" | tail -n 1)
# Keep the cache the build saved if it succeeded; drop it (and the input link) otherwise.
if [ "$(printf '%s\n' "${finished:-null}" | jq -r '.outcome // empty')" = success ]; then
    set -- --success
else
    set --
fi
cache_tool keep "$@" >/dev/null || say "cannot keep the build cache (contractor-store's message is above)"
if [ -z "$finished" ]; then
    jq -r 'select(.type == "error") | "pipeline: contractor-run error \(.code): \(.chain | join(": "))"' \
        "$TMP/events.jsonl" >&2 2>/dev/null || true
    say "contractor-run wrote no finished event (exit code $run_status)"
    [ "$run_status" = 0 ] && run_status=3
    exit "$run_status"
fi
# The artifacts are what the store's own index (artifacts.json, written now) names.
"$STORE_TOOL" index --root "$STORE" --build "$ID" 2>/dev/null |
    jq -r --arg rec "$REC" '.artifacts[] | "\($rec)/artifacts/\(.path)"' >"$TMP/artifacts" || true
jq -s --argjson finished "$finished" --arg id "$ID" --arg rec "$REC" \
    --argjson duration "$(awk -v now="$(date +%s.%N)" -v t0="$started" 'BEGIN { printf "%.3f", now - t0 }')" \
    --rawfile artifacts "$TMP/artifacts" \
    '{version: 1, id: $id, outcome: $finished.outcome}
     + (if $finished.exit_code == null then {} else {exit_code: $finished.exit_code} end)
     + {duration_secs: $duration, log: "\($rec)/build.log", console_log: "\($rec)/console.log",
        artifacts: ($artifacts | split("\n") | map(select(. != ""))),
        refused_hosts: ([.[] | select(.decision == "deny") | .host] | unique)}
     + (if $finished.limit == null then {} else {limit: $finished.limit} end)
     + (if $finished.error == null then {} else {error: $finished.error} end)' \
    "$REC/proxy.jsonl" >"$REC/result.json"

outcome=$(printf '%s\n' "$finished" | jq -r .outcome)
say "build $ID: $outcome"
say "  log:      $REC/build.log"
while IFS= read -r artifact; do say "  artifact: $artifact"; done <"$TMP/artifacts"
if [ "$outcome" = success ] && [ "$run_status" != 0 ]; then
    say "contractor-run reported success but exited $run_status"
fi
exit "$run_status"
