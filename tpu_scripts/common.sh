# Shared helpers for the Cloud TPU VM scripts; sourced, never run.
#
# Every script parses --name/--zone/--project/--dry-run/--help through
# parse_common_option, prints each command before running it, and with
# --dry-run prints the commands (one per line, shell-quoted, on stdout) and
# runs nothing. Written for bash 3.2 and newer (macOS ships 3.2): no
# associative arrays, no ${var,,}, empty arrays expanded with ${a[@]+...}.

# On the workers: the run directory (configs/, logs/, the source of a local
# checkout) and the Python environment. Relative paths given to launch.sh
# (--config, --log-file) are relative to REMOTE_DIR. The ~ is literal here: it
# expands in the workers' shell. These are used by the scripts that source this.
# shellcheck disable=SC2034,SC2088
REMOTE_DIR='~/jaxalign'
REMOTE_VENV='~/jaxalign-venv'
DEFAULT_LOG_FILE='logs/jaxalign.log'

NAME=""
ZONE=""
PROJECT=""
DRY_RUN=0

die() {
  echo "error: $*" >&2
  exit 1
}

usage_error() {
  echo "error: $*" >&2
  echo "run 'bash $0 --help' for usage" >&2
  exit 2
}

# need_value FLAG "$@": fails unless FLAG is followed by a value.
need_value() {
  local flag="$1"
  shift
  if [ $# -lt 1 ] || [ -z "$1" ] || [ "${1#--}" != "$1" ]; then
    usage_error "$flag needs a value"
  fi
}

# require FLAG VALUE WHAT: fails with a message naming FLAG when VALUE is empty.
require() {
  if [ -z "$2" ]; then
    usage_error "$1 is required: $3"
  fi
}

# split_equals "$@": --flag=value becomes --flag value (up to a bare --); the
# result is in ARGS.
split_equals() {
  ARGS=()
  local arg rest=0
  for arg in "$@"; do
    if [ $rest -eq 0 ] && [ "$arg" = "--" ]; then
      rest=1
      ARGS+=("$arg")
    elif [ $rest -eq 0 ] && [[ "$arg" == --*=* ]]; then
      ARGS+=("${arg%%=*}" "${arg#*=}")
    else
      ARGS+=("$arg")
    fi
  done
}

# parse_common_option "$@": handles one of the options every script shares and
# sets SHIFT to the number of words it used; returns 1 for anything else.
# shellcheck disable=SC2034
parse_common_option() {
  SHIFT=0
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --name)
      need_value "$@"
      NAME="$2"
      SHIFT=2
      ;;
    --zone)
      need_value "$@"
      ZONE="$2"
      SHIFT=2
      ;;
    --project)
      need_value "$@"
      PROJECT="$2"
      SHIFT=2
      ;;
    --dry-run)
      DRY_RUN=1
      SHIFT=1
      ;;
    *) return 1 ;;
  esac
}

require_name_and_zone() {
  require --name "$NAME" "the TPU VM (node) name, e.g. --name jaxalign-v4"
  require --zone "$ZONE" "the zone of the TPU VM, e.g. --zone us-central2-b"
}

# shell_quote WORD: WORD as one shell word (bare when it is plain, else in single quotes).
shell_quote() {
  local s="$1"
  if [ -n "$s" ] && [[ "$s" =~ ^[A-Za-z0-9_./:=@,+%^-]+$ ]]; then
    printf '%s' "$s"
  else
    local q="'\\''"
    printf "'%s'" "${s//\'/$q}"
  fi
}

# quote_words WORD...: the words as one command line.
quote_words() {
  local out="" word
  for word in "$@"; do
    out="$out${out:+ }$(shell_quote "$word")"
  done
  printf '%s' "$out"
}

# run CMD ARGS...: prints the command; runs it unless --dry-run. With --dry-run
# the line goes to stdout (and nothing else does); otherwise "+ line" to stderr.
run() {
  if [ "$DRY_RUN" -eq 1 ]; then
    printf '%s\n' "$(quote_words "$@")"
    return 0
  fi
  printf '+ %s\n' "$(quote_words "$@")" >&2
  "$@"
}

# gcloud_run ARGS...: run for gcloud, adding --project when one was given.
gcloud_run() {
  if [ "$DRY_RUN" -eq 0 ] && ! command -v gcloud > /dev/null 2>&1; then
    die "gcloud not found on PATH; install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) or use --dry-run to see the commands"
  fi
  if [ -n "$PROJECT" ]; then
    run gcloud "$@" "--project=$PROJECT"
  else
    run gcloud "$@"
  fi
}

# remote_script STEP...: one line for the workers' shell that stops at the first
# failing step; a step ending in "&" runs in the background.
remote_script() {
  local out="set -eu" step
  for step in "$@"; do
    case "$out" in
      *"&") out="$out $step" ;;
      *) out="$out; $step" ;;
    esac
  done
  printf '%s' "$out"
}

# tpu_ssh WORKER REMOTE_SCRIPT: runs REMOTE_SCRIPT with bash on WORKER (a number or "all").
tpu_ssh() {
  gcloud_run compute tpus tpu-vm ssh "$NAME" "--zone=$ZONE" "--worker=$1" "--command=$2"
}

# tpu_scp SOURCE DEST_PATH: copies a local file to DEST_PATH (relative to the
# home directory) on every worker.
tpu_scp() {
  gcloud_run compute tpus tpu-vm scp "$1" "$NAME:$2" "--zone=$ZONE" "--worker=all"
}

# info MESSAGE: a note for the user on stderr, so that --dry-run's stdout holds only commands.
info() {
  echo "$*" >&2
}

# script_hint SCRIPT ARGS...: the command line of another of these scripts for the same
# VM (--name, --zone and, when given, --project), for "next:" notes.
script_hint() {
  local script="$1"
  shift
  local words=(bash "tpu_scripts/$script" --name "$NAME" --zone "$ZONE")
  if [ -n "$PROJECT" ]; then
    words+=(--project "$PROJECT")
  fi
  quote_words "${words[@]}" "$@"
}

# gcloud_hint ARGS...: a gcloud command line for the user to run, with --project when given.
gcloud_hint() {
  if [ -n "$PROJECT" ]; then
    quote_words gcloud "$@" "--project=$PROJECT"
  else
    quote_words gcloud "$@"
  fi
}
