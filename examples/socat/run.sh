#!/bin/sh
# hostqueue from the shell: JSON lines over the Unix socket with socat, no Python client.
# Starts a supervisor on a temporary store (with the demo tasks that ship with
# hostqueue), then over one connection: submits a job, waits for it, asks for the
# stats, and stops the supervisor.
#
#     sh examples/socat/run.sh
#
# $HOSTQUEUE is the command that runs hostqueue (default: `hostqueue`, else
# `python3 -m hostqueue`). Needs socat (apt-get install socat).
set -eu

command -v socat >/dev/null || { echo "socat is not installed (apt-get install socat)" >&2; exit 2; }
if [ -z "${HOSTQUEUE:-}" ]; then
    if command -v hostqueue >/dev/null; then HOSTQUEUE=hostqueue; else HOSTQUEUE="python3 -m hostqueue"; fi
fi

dir=$(mktemp -d /tmp/hq-socat-XXXXXX)
sock="$dir/hq.sock"
supervisor=
connection=
cleanup() {
    exec 3>&- 4<&- 2>/dev/null || true
    [ -z "$connection" ] || kill "$connection" 2>/dev/null || true
    [ -z "$supervisor" ] || { kill -TERM "$supervisor" 2>/dev/null || true; wait "$supervisor" 2>/dev/null || true; }
    rm -rf "$dir"
}
trap cleanup EXIT INT TERM

$HOSTQUEUE run --store "$dir/hq.db" --socket "$sock" --tasks hostqueue.demo_tasks \
    --workers 1 --log-level warning &
supervisor=$!

i=0
until [ -S "$sock" ]; do
    i=$((i + 1))
    [ $i -lt 300 ] || { echo "the supervisor did not start" >&2; exit 1; }
    sleep 0.05
done

# One connection for the whole conversation: socat joins the socket to two FIFOs;
# we write requests to fd 3 and read replies from fd 4, one JSON object a line.
mkfifo "$dir/requests" "$dir/replies"
socat "UNIX-CONNECT:$sock" "GOPEN:$dir/requests!!GOPEN:$dir/replies" &
connection=$!
exec 3<>"$dir/requests" 4<>"$dir/replies"  # read-write opens of a FIFO never block

# Send a request; print its reply (replies are matched by "id": the requests here
# are sent one at a time, so the next line is the reply).
call() {
    echo ">>> $1" >&2
    printf '%s\n' "$1" >&3
    IFS= read -r reply <&4
    echo "<<< $reply" >&2
    printf '%s\n' "$reply"
}

reply=$(call '{"id": 1, "op": "submit", "task": "hostqueue.demo_tasks.sleep", "args": {"seconds": 0.3}}')
job=$(printf '%s' "$reply" | sed -n 's/.*"job":{"id":\([0-9]*\).*/\1/p')
[ -n "$job" ] || { echo "submit failed: $reply" >&2; exit 1; }
echo "submitted job $job"

reply=$(call "{\"id\": 2, \"op\": \"wait\", \"job\": $job, \"timeout\": 20}")
status=$(printf '%s' "$reply" | sed -n 's/.*"job":{[^{]*"status":"\([a-z]*\)".*/\1/p')
echo "job $job ended: $status"

reply=$(call '{"id": 3, "op": "stats"}')
echo "completed jobs: $(printf '%s' "$reply" | sed -n 's/.*"stats":{[^{]*"completed":\([0-9]*\).*/\1/p')"

call '{"id": 4, "op": "stop"}' >/dev/null
wait "$supervisor" && supervisor=
[ "$status" = completed ]
