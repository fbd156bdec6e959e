#!/usr/bin/env bash
# Starts the same `jaxalign run` on every worker of a Cloud TPU VM, in the background.
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat << USAGE
Usage: launch.sh --name NAME --zone ZONE --config FILE [options] [-- key=value ...]

Runs, on every worker (--worker=all), in $REMOTE_DIR:
  nohup jaxalign run --config FILE key=value ... >> LOG_FILE 2>&1 &
appending to LOG_FILE (a resumed run's log follows the earlier one's, after a
line with the date). Every host of a multi-host slice must run
the same program: jaxalign starts
jax.distributed on the slice and each host feeds its own devices. The command
returns once all workers have started; follow worker 0 with logs.sh and stop
the run with stop.sh. A worker that still has a run going refuses to start a
second one.

Required:
  --name NAME          TPU VM name
  --zone ZONE          its zone
  --config FILE        config path on the workers, relative to $REMOTE_DIR
                       (copy one there with copy_config.sh), e.g. configs/spa_zephyr7b_ultrafeedback.yaml

Options:
  --log-file PATH      log on each worker, relative to $REMOTE_DIR
                       (default: $DEFAULT_LOG_FILE)
  --project PROJECT    Google Cloud project (default: gcloud's configured one)
  --dry-run            print the gcloud command without running it
  -h, --help           show this help
  -- key=value ...     config overrides passed to jaxalign run, e.g.
                       -- run.mesh.fsdp=-1 run.mesh.data=1 run.output_dir=gs://BUCKET/spa7b
                       (on a multi-host slice point run.output_dir at gs://: every host
                       writes its checkpoint shards there)
USAGE
}

CONFIG=""
LOG_FILE="$DEFAULT_LOG_FILE"
OVERRIDES=()
split_equals "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [ $# -gt 0 ]; do
  case "$1" in
    --config)
      need_value "$@"
      CONFIG="$2"
      shift 2
      ;;
    --log-file)
      need_value "$@"
      LOG_FILE="$2"
      shift 2
      ;;
    --)
      shift
      OVERRIDES=("$@")
      break
      ;;
    *)
      parse_common_option "$@" || usage_error "unknown option: $1 (config overrides go after --)"
      shift "$SHIFT"
      ;;
  esac
done

require_name_and_zone
require --config "$CONFIG" "the config path on the workers, e.g. --config configs/demo.yaml"
for override in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  case "$override" in
    [A-Za-z_]*=*) ;;
    *) usage_error "override '$override' is not key=value (e.g. run.mesh.fsdp=-1)" ;;
  esac
done

LOG="$(shell_quote "$LOG_FILE")"
PID="$(shell_quote "$LOG_FILE.pid")"
RUN="$REMOTE_VENV/bin/jaxalign $(quote_words run --config "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"})"
tpu_ssh all "$(remote_script \
  "cd $REMOTE_DIR" \
  "mkdir -p \"\$(dirname $LOG)\"" \
  "if [ -f $PID ] && kill -0 \"\$(cat $PID)\" 2> /dev/null; then echo \"\$(hostname): a run is still going (pid \$(cat $PID)); stop it with stop.sh first\" >&2; exit 1; fi" \
  "echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) \$(hostname): launch.sh starts jaxalign run\" >> $LOG" \
  "nohup $RUN >> $LOG 2>&1 < /dev/null &" \
  "echo \$! > $PID" \
  "echo \"\$(hostname): started pid \$(cat $PID), log $REMOTE_DIR/$LOG\"")"
info "follow worker 0: $(script_hint logs.sh)"
