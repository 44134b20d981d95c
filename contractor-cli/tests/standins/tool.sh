#!/bin/sh
# A stand-in for one Contractor tool (the one named by $0: contractor-vm, contractor-store,
# contractor-proxy or contractor-run), answering the front end with the JSON the real tool
# writes (docs/protocol.md), with no VM and no network.
#
# Each step of the tool first creates "$STANDIN_DIR/reached-STEP", then behaves as the
# environment variable STANDIN_STEP says (STEP in upper case; unset: as the real tool):
#   die      exits 3 without an answer
#   error    writes the tool's error object (code "standin"), exits 3
#   killed   is killed by SIGKILL
#   garbage  writes a line that is not JSON, then exits 0
#   hang     writes nothing more and never exits (until it is sent SIGTERM)
#   deaf     the same, and ignores SIGTERM (only SIGKILL ends it)
#   detached leaves the caller's session (setsid, as the real VM holder does when it lets go
#            of its VM) and then behaves as deaf: a destroy libvirt is slow to confirm
# contractor-run keeps the request it read in "$STANDIN_DIR/run-request", and contractor-vm
# create its request in "$STANDIN_DIR/vm-request", for the test to check.
# contractor-store's `record` requests are the real store's ($STANDIN_STORE), after their step.
# Every process (and each child it starts) records its pid in "$STANDIN_DIR/pids", so that
# a test can tell whether one outlived the front end, and stop it if so.
set -u
tool=${0##*/}
echo $$ >>"$STANDIN_DIR/pids"

step() {
	: >"$STANDIN_DIR/reached-$1"
	how=$(printenv "STANDIN_$(echo "$1" | tr a-z- A-Z_)" || true)
	case $how in
	'') ;;
	die) echo "$tool: stand-in: dies at $1" >&2; exit 3 ;;
	error)
		printf '{"type":"error","version":1,"code":"standin","chain":["stand-in failure at %s","the cause"]}\n' "$1"
		echo "$tool: stand-in failure at $1" >&2
		exit 3 ;;
	killed) kill -KILL $$ ;;
	garbage) echo "stand-in garbage at $1, not JSON"; exit 0 ;;
	hang) exec sleep 100000 ;;
	deaf) trap '' TERM; exec sleep 100000 ;;
	detached) trap '' TERM INT HUP; exec setsid sleep 100000 ;;
	*) echo "$tool: stand-in: unknown behaviour $how for $1" >&2; exit 99 ;;
	esac
}

confinement='{"enforced":true,"no_new_privs":true,"landlock_abi":7,"landlock_fs":true,"landlock_net":true,"seccomp":true,"rlimits":true,"warnings":[]}'

# A service: its ready line, then serving until SIGTERM (exit 0, as the real ones do).
# A store asked for its own token (--own-token) gives $STANDIN_STORE_TOKEN_VALUE (default
# standintoken0; empty: none) in its ready line.
serve() {
	step "$1-serve"
	# Trapped before the ready line: the front end may stop the service as soon as it has
	# read it (another service failed), and a TERM before the trap would leave the sleeper.
	sleeper=
	trap 'kill $sleeper 2>/dev/null; exit 0' TERM INT
	token=
	case " $* " in
	*" --own-token "*)
		value=${STANDIN_STORE_TOKEN_VALUE-standintoken0}
		[ -n "$value" ] && token=$(printf ',"token":"%s"' "$value") ;;
	esac
	printf '{"type":"ready","version":1,"service":"%s","addr":"127.0.0.1:9","confinement":%s%s}\n' "$1" "$confinement" "$token"
	step "$1-serving"
	sleep 100000 >/dev/null &
	sleeper=$!
	echo $sleeper >>"$STANDIN_DIR/pids"
	wait $sleeper
}

case $tool in
contractor-vm)
	case $1 in
	image)
		step vm-image
		dir=$CONTRACTOR_DATA_DIR/images/debian-12-build
		printf '{"type":"image","version":1,"image":{"name":"debian-12-build","dir":"%s","boot":{"disk":"%s/disk.qcow2","kernel":"%s/vmlinuz","initrd":"%s/initramfs.img","cmdline":"root=/dev/vda"},"size":3,"manifest":{"version":2,"name":"debian-12-build","suite":"bookworm","created":1,"disk_sha256":"d","agent_version":"0.1.0","agent_sha256":"a","cmdline":"root=/dev/vda"}}}\n' "$dir" "$dir" "$dir" "$dir" ;;
	create)
		read -r request
		printf '%s\n' "$request" >"$STANDIN_DIR/vm-request"
		step vm-create
		printf '{"type":"vm","version":1,"vm":{"name":"contractor-standin0001","uri":"qemu:///system","state":"running","control_socket":"%s/control","tunnel_socket":"%s/tunnel","accel":"tcg"}}\n' "$STANDIN_DIR" "$STANDIN_DIR"
		case $* in
		*--hold*)
			# As the real holder: it destroys the VM when its stdin closes (exit 0) or
			# on SIGTERM or SIGINT (exit 130).
			step vm-hold
			exec 3<&0
			cat <&3 >/dev/null &
			reader=$!
			echo $reader >>"$STANDIN_DIR/pids"
			trap 'kill $reader; : >"$STANDIN_DIR/vm-released"; exit 130' TERM INT
			wait $reader
			step vm-release
			: >"$STANDIN_DIR/vm-released"
			exit 0 ;;
		esac ;;
	destroy)
		step vm-destroy
		if [ -e "$STANDIN_DIR/vm-released" ]; then
			echo '{"type":"error","version":1,"code":"not_found","chain":["no VM named contractor-standin0001"]}'
			echo "contractor-vm: no VM named contractor-standin0001" >&2
			exit 2
		fi
		echo '{"type":"destroyed","version":1,"name":"contractor-standin0001"}' ;;
	*) echo "contractor-vm: stand-in: no $1" >&2; exit 2 ;;
	esac ;;
contractor-store)
	case $1 in
	pack)
		step store-pack
		while [ $# -gt 0 ] && [ "$1" != --out ]; do shift; done
		: >"$2"
		echo '{"type":"packed","version":1,"entries":1,"bytes":0,"warnings":[]}' ;;
	cache)
		step "store-cache-$2"
		case $2 in
		prepare) echo '{"type":"cache_prepared","version":1,"cache":null,"warnings":[]}' ;;
		keep) echo '{"type":"cache_kept","version":1,"bytes":null}' ;;
		esac ;;
	serve) serve store "$@" ;;
	record)
		# The record is the real store's to open and close (it needs no VM):
		# $STANDIN_STORE names the built contractor-store.
		step "store-record-$2"
		exec "$STANDIN_STORE" "$@" ;;
	index)
		step store-index
		root=$3 build=$5
		index=$(printf '{"version":1,"build":"%s","artifacts":[]}' "$build")
		echo "$index" >"$root/builds/$build/artifacts.json"
		echo "$index" ;;
	*) echo "contractor-store: stand-in: no $1" >&2; exit 2 ;;
	esac ;;
contractor-proxy) serve proxy ;;
contractor-run)
	read -r request
	printf '%s\n' "$request" >"$STANDIN_DIR/run-request"
	step run-start
	printf '{"type":"started","version":1,"confinement":%s}\n' "$confinement"
	echo '{"type":"agent_ready","agent_version":"0.1.0"}'
	echo '{"type":"phase","phase":"source"}'
	echo '{"type":"phase","phase":"fetch"}'
	step run-fetch
	echo '{"type":"phase","phase":"script"}'
	printf '%s\n' '{"type":"output","text":"stand-in output\n"}'
	step run-script
	echo '{"type":"phase","phase":"artifacts"}'
	step run-artifacts
	step run-finish
	echo '{"type":"finished","outcome":"success","exit_code":0,"duration_secs":0.1}' ;;
*) echo "stand-in: unknown tool $tool" >&2; exit 99 ;;
esac
