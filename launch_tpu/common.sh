# Shared by the launch_tpu/ scripts (sourced, not run): flag parsing and dry-run execution.
#
# Every script takes --name (the TPU VM), --zone, optional --project, and --dry_run, which
# prints the exact commands, one per line, shell-quoted, instead of running them.

set -euo pipefail

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "${LAUNCH_DIR}/.." && pwd)"
SCRIPT="$(basename "$0")"
DRY_RUN=0

die() {
  echo "${SCRIPT}: error: $*" >&2
  exit 2
}

# parse_flags "allowed flag names..." -- "$@": sets FLAG_<name> for every --name=value given.
# Boolean flags are given as --name (sets FLAG_<name>=1). --dry_run is always allowed.
parse_flags() {
  local allowed=" $1 name zone project "
  shift
  for arg in "$@"; do
    case "${arg}" in
      --dry_run) DRY_RUN=1 ;;
      --help|-h) usage; exit 0 ;;
      --*=*)
        local key="${arg%%=*}"; key="${key#--}"
        [[ "${allowed}" == *" ${key} "* ]] || die "unknown flag --${key} (flags:${allowed}dry_run)"
        printf -v "FLAG_${key}" '%s' "${arg#*=}" ;;
      --*)
        local key="${arg#--}"
        [[ "${allowed}" == *" ${key} "* ]] || die "unknown flag --${key} (flags:${allowed}dry_run)"
        printf -v "FLAG_${key}" '%s' 1 ;;
      *) die "unexpected argument ${arg@Q}; flags are --name=value" ;;
    esac
  done
  require name zone
}

# require NAME...: every named flag must have been given.
require() {
  local name var
  for name in "$@"; do
    var="FLAG_${name}"
    [[ -n "${!var:-}" ]] || die "--${name} is required"
  done
}

# flag NAME DEFAULT: the flag's value, or DEFAULT.
flag() {
  local var="FLAG_$1"
  printf '%s' "${!var:-$2}"
}

# The --zone/--project arguments every gcloud command takes.
gcloud_location() {
  LOCATION=(--zone="${FLAG_zone}")
  if [[ -n "${FLAG_project:-}" ]]; then LOCATION+=(--project="${FLAG_project}"); fi
}

# run CMD...: print (--dry_run) or execute one command.
run() {
  if (( DRY_RUN )); then
    local arg line=""
    for arg in "$@"; do
      # Plain words as they are, anything else single-quoted: a line to paste into a shell.
      if [[ "${arg}" =~ ^[A-Za-z0-9_./:=,@%+-][A-Za-z0-9_./:=,@%+~-]*$ ]]; then
        line+=" ${arg}"
      else
        line+=" ${arg@Q}"
      fi
    done
    echo "${line# }"
  else
    echo "+ $*" >&2
    "$@"
  fi
}
