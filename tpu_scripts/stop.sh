#!/usr/bin/env bash
# Stops the run started by launch.sh on every worker, and with --vm the TPU VM too.
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat << USAGE
Usage: stop.sh --name NAME --zone ZONE [--log-file PATH] [--timeout SECONDS] [--vm] [options]

Sends SIGTERM to the run launch.sh started on every worker (--worker=all),
found through the pid file next to its log, and waits until the process has
exited (at most --timeout seconds, then SIGKILL) before removing the pid file,
so that launch.sh can start the next run at once. A worker whose process
outlives SIGKILL keeps its pid file and makes stop.sh fail. A rerun of the same
launch.sh command resumes from the last finished stage.

The TPU VM itself keeps running (and billing) unless --vm is given.

Required:
  --name NAME          TPU VM name
  --zone ZONE          its zone

Options:
  --log-file PATH      log path relative to $REMOTE_DIR, as given to launch.sh
                       (default: $DEFAULT_LOG_FILE)
  --timeout SECONDS    how long to wait after SIGTERM before SIGKILL (default: 60)
  --vm                 then stop the TPU VM too (gcloud compute tpus tpu-vm stop): the
                       TPU charges stop, the boot disk and ~/jaxalign stay; start it
                       again with gcloud compute tpus tpu-vm start. Google documents
                       stop/start for single TPU VMs; a Spot TPU VM cannot be
                       restarted, and gcloud refuses VMs it cannot stop (e.g. of a
                       queued resource or a multi-host slice): for those, teardown.sh
  --project PROJECT    Google Cloud project (default: gcloud's configured one)
  --dry-run            print the gcloud commands without running them
  -h, --help           show this help
USAGE
}

LOG_FILE="$DEFAULT_LOG_FILE"
TIMEOUT=60
STOP_VM=0
split_equals "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [ $# -gt 0 ]; do
  case "$1" in
    --log-file)
      need_value "$@"
      LOG_FILE="$2"
      shift 2
      ;;
    --timeout)
      need_value "$@"
      TIMEOUT="$2"
      shift 2
      ;;
    --vm)
      STOP_VM=1
      shift
      ;;
    *)
      parse_common_option "$@" || usage_error "unknown option: $1"
      shift "$SHIFT"
      ;;
  esac
done

require_name_and_zone
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || usage_error "--timeout must be a number of seconds, got '$TIMEOUT'"

PID="$(shell_quote "$LOG_FILE.pid")"
# alive P: P is running (a zombie that nobody has reaped yet counts as exited).
tpu_ssh all "$(remote_script \
  "cd $REMOTE_DIR" \
  "alive() { kill -0 \"\$1\" 2> /dev/null && [ \"\$(ps -o stat= -p \"\$1\" 2> /dev/null | cut -c1)\" != Z ]; }" \
  "pid=\"\$(cat $PID 2> /dev/null || true)\"" \
  "if [ -z \"\$pid\" ] || ! alive \"\$pid\"; then rm -f $PID; echo \"\$(hostname): no run going\"; exit 0; fi" \
  "kill \"\$pid\" 2> /dev/null || true" \
  "waited=0" \
  "while alive \"\$pid\" && [ \$waited -lt $TIMEOUT ]; do sleep 1; waited=\$((waited + 1)); done" \
  "if alive \"\$pid\"; then echo \"\$(hostname): pid \$pid still running $TIMEOUT s after SIGTERM; sending SIGKILL\" >&2; kill -9 \"\$pid\" 2> /dev/null || true; n=0; while alive \"\$pid\" && [ \$n -lt 10 ]; do sleep 1; n=\$((n + 1)); done; fi" \
  "if alive \"\$pid\"; then echo \"\$(hostname): pid \$pid survived SIGKILL; $PID kept; look at it with ps -p \$pid\" >&2; exit 1; fi" \
  "rm -f $PID" \
  "echo \"\$(hostname): stopped pid \$pid (exited after \$waited s)\"")"
if [ "$STOP_VM" -eq 1 ]; then
  gcloud_run compute tpus tpu-vm stop "$NAME" "--zone=$ZONE"
  info "to start it again: $(gcloud_hint compute tpus tpu-vm start "$NAME" "--zone=$ZONE")"
else
  info "the TPU VM $NAME is still running (and billed): stop.sh --vm stops it, teardown.sh deletes it"
fi
