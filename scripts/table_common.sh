# Sourced by scripts/table_*.sh (from the repository root): the model families, the settings of the paper's
# tables as exam-script flags, the reference repo's sample counts, and one resumable run per (setting, benchmark).
# shellcheck shell=bash

# One line per family: registry name) set_family EXAM_SCRIPT DEFAULT_CHECKPOINT_FOLDER [FLAGS FOR EVERY QUANTIZED RUN]
family_row() {
  case "$1" in
    qwen2vl)   set_family exam/quant_qwen2vl.py  weights/Qwen2-VL-7B-Instruct ;;
    qwenvl)    set_family exam/quant_qwenvl.py   weights/Qwen-VL-Chat ;;
    internvl2) set_family exam/quant_internvl.py weights/InternVL2-8B ;;
    llava)     set_family exam/quant_llava.py    "" ;;
    minicpmv)  set_family exam/quant_minicpmv.py weights/MiniCPM-V-2_6 ;;
    glm4v)     set_family exam/quant_glm4v.py    weights/glm-4v-9b ;;
    *) return 1 ;;
  esac
}
FAMILIES="qwen2vl qwenvl internvl2 llava minicpmv glm4v"

set_family() { EXAM=$1; DEFAULT_CKPT=$2; shift 2; FAMILY_FLAGS="$*"; }

BENCHMARKS_ALL="OCRBench TextVQA_VAL DocVQA_VAL MME"
TINY_BENCHMARKS="MME"

# The reference repo's counts per benchmark (GPTQ rows, static-calibration rows). Every setting of a benchmark
# holds out the larger of the two, so that all of them score the same rows.
recipe() {
  case "$1" in
    OCRBench)              NSAMPLES=128 CALIB_NUM=128 ;;
    TextVQA_VAL|DocVQA_VAL) NSAMPLES=128 CALIB_NUM=256 ;;
    MME)                   NSAMPLES=256 CALIB_NUM=512 ;;
  esac
  HOLDOUT=$(( NSAMPLES > CALIB_NUM ? NSAMPLES : CALIB_NUM ))
}

# Settings: v8_* = vision W8A8 + LLM W4A8, v4_* = vision W4A8 + LLM W4A8 (the reference repo's two bit settings).
ROT="--rotate --rotate_visual_clip --rotate_visual_cross_attn --rotate_llm --online_llm_hadamard --online_visual_hadamard"
QUANT="--quant --quant_llm --quant_visual_clip --quant_cross_attention"
GPTQ="--visual_w_clip --llm_w_clip --act_order"
RTN="--visual_w_rtn --llm_w_rtn"
STATIC="--visual_static --llm_static"
setting_flags() {  # SETTING -> its flags (empty for FP); an unknown setting returns 1
  local b="--visual_w_bits ${1:1:1} --visual_a_bits 8 --llm_w_bits 4 --llm_a_bits 8"
  case "$1" in
    fp)                 echo "" ;;
    v[48]_rtn)          echo "$QUANT $b $RTN" ;;
    v[48]_gptq)         echo "$QUANT $b $GPTQ" ;;
    v[48]_dynamic)      echo "$ROT $QUANT $b $GPTQ" ;;
    v[48]_static)       echo "$ROT $QUANT $b $GPTQ $STATIC --no_msq" ;;
    v[48]_msq)          echo "$ROT $QUANT $b $GPTQ $STATIC" ;;
    v[48]_msq_aifs)     echo "$ROT $QUANT $b $GPTQ $STATIC --aifs" ;;
    v[48]_mquant)       echo "$ROT $QUANT $b $GPTQ $STATIC --aifs --visual_split" ;;
    v[48]_mquant_sink)  echo "$ROT $QUANT $b $GPTQ $STATIC --aifs --visual_split --sink_scale" ;;
    *) return 1 ;;
  esac
}

die() { echo "$(basename "$0"): $*" >&2; exit 2; }

table_usage() {
  cat <<EOF
usage: scripts/$TABLE_SCRIPT FAMILY [CHECKPOINT_FOLDER]

$TABLE_ABOUT

FAMILY: one of $FAMILIES. CHECKPOINT_FOLDER defaults to the family's folder under weights/ (the reference
repo's layout); MODEL=tiny (or CHECKPOINT_FOLDER tiny) uses the family's built-in tiny random model with tiny
sample counts instead (1 GPTQ and 3 static-calibration rows, 2 scored rows, 2 new tokens; benchmarks
$TINY_BENCHMARKS; settings $TINY_SETTINGS), a check that the table runs end to end in a minute.

Environment:
  DATA=DIR           the VLMEvalKit TSVs (default \$LMUData, else ~/LMUData); DATA=tests/fixtures for tiny runs
  OUT=DIR            where the runs go, one folder per run: OUT/FAMILY-CHECKPOINT/SETTING/BENCHMARK
                     (default outputs/tables; the tables share runs of the same setting)
  SETTINGS="..."     only these settings, or "all" (of: $ALL_SETTINGS)
  BENCHMARKS="..."   only these benchmarks, or "all" (of: $BENCHMARKS_ALL)
  CALIB_SOURCE_<BENCHMARK>=TSV  calibrate that benchmark on another TSV (a name in DATA or a path), e.g.
                     CALIB_SOURCE_TextVQA_VAL=TextVQA_TRAIN; then every row of the benchmark is scored
                     (default: rows held out of the benchmark itself, never scored)
  EVAL_NUM=N         score only the first N rows of each benchmark; MAX_NEW_TOKENS=N  decoding length
  EXTRA_FLAGS="..."  more exam-script flags for every run (e.g. --offload, --device cuda:1)
  PYTHON=...         the interpreter (default .venv/bin/python)
  DRY_RUN=1          print each run's state and command; run nothing

A run whose results.json exists with the same command is skipped; one that stopped during evaluation resumes
from its predictions file. The table is printed and written to OUT/FAMILY-CHECKPOINT/$TABLE_NAME.md (and .csv).
EOF
}

# Checks everything that can be checked before the first run; sets CKPT, TINY, RUN_ROOT, SETTINGS_RUN, BENCH_RUN.
table_preflight() {
  if [[ $# -lt 1 || $# -gt 2 || $1 == -h || $1 == --help ]]; then
    table_usage
    [[ $# -ge 1 && ( $1 == -h || $1 == --help ) ]] && exit 0
    exit 2
  fi
  FAMILY=$1
  family_row "$FAMILY" || die "unknown family '$FAMILY': give one of $FAMILIES (a new family is one line in scripts/table_common.sh)"
  [[ -f $EXAM ]] || die "the $FAMILY family's exam script $EXAM is not in this checkout yet: update the checkout to a version that has it, or pick another family ($FAMILIES)"
  PYTHON=${PYTHON:-.venv/bin/python}
  command -v "$PYTHON" >/dev/null || die "no Python at $PYTHON: run 'make test' once (it creates .venv), or set PYTHON=/path/to/python"

  local arg=${2:-} model=${MODEL:-}
  [[ -n $arg && -n $model && $arg != "$model" ]] && die "MODEL=$model and the checkpoint argument $arg disagree: give one of them"
  CKPT=${arg:-${model:-$DEFAULT_CKPT}}
  [[ -n $CKPT ]] || die "the $FAMILY family has no default checkpoint folder: pass CHECKPOINT_FOLDER (or MODEL=tiny)"
  TINY=0
  if [[ $CKPT == tiny* ]]; then
    TINY=1
    # a tiny model's matrices are too small to share among threads: one thread is several times faster
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  fi
  DATA=${DATA:-${LMUData:-$HOME/LMUData}}

  SETTINGS_RUN=$(pick "setting" "${SETTINGS:-}" "$ALL_SETTINGS" "$TINY_SETTINGS")
  BENCH_RUN=$(pick "benchmark" "${BENCHMARKS:-}" "$BENCHMARKS_ALL" "$TINY_BENCHMARKS")
  local b missing=()
  for b in $BENCH_RUN; do [[ -f $DATA/$b.tsv ]] || missing+=("$DATA/$b.tsv"); done
  [[ ${#missing[@]} -eq 0 ]] || die "benchmark file(s) not found: ${missing[*]}. Put VLMEvalKit's TSVs there (VLMEvalKit downloads them to \$LMUData, by default ~/LMUData), set DATA=FOLDER to the folder that holds them, or BENCHMARKS=\"...\" to run fewer"
  local src
  for b in $BENCH_RUN; do
    src=$(calib_source "$b")
    [[ -z $src || -f $src || -f $DATA/$src.tsv ]] || die "CALIB_SOURCE_$b=$src: neither $src nor $DATA/$src.tsv exists; give a TSV path or the name of a TSV in DATA"
  done

  if [[ $TINY == 0 ]]; then
    # the exam script would find a wrong checkpoint too, but only after the runs before it have spent hours
    "$PYTHON" - "$FAMILY" "$CKPT" "$(basename "$0")" <<'EOF' || exit 2
import os, sys
family, path, script = sys.argv[1:]
from model import registry
try:
    own = registry.get(family)
    if path not in own.builtin_models:
        if not os.path.isdir(path):
            sys.exit(f"{script}: checkpoint folder {path} does not exist: put the checkpoint there, pass its folder "
                     "as CHECKPOINT_FOLDER, or MODEL=tiny for the built-in tiny model")
        registry.for_checkpoint(path, family)
except (ValueError, FileNotFoundError) as e:
    sys.exit(f"{script}: {e}; pass a {family} checkpoint folder, or run the table for the family that serves it")
EOF
  fi
  OUT=${OUT:-outputs/tables}
  RUN_ROOT=$OUT/$FAMILY-$(basename "$CKPT")
  RUN_DIRS=()
}

pick() {  # KIND REQUESTED ALL TINY -> the list to run
  local kind=$1 want=${2//,/ } all=$3 tiny=$4 w
  [[ -z $want ]] && { [[ $TINY == 1 ]] && echo "$tiny" || echo "$all"; return; }
  [[ $want == all ]] && { echo "$all"; return; }
  for w in $want; do
    [[ " $all " == *" $w "* ]] || die "unknown $kind '$w' for this table: give some of: $all (or all)"
  done
  echo "$want"
}

# run_state RUN_DIR COMMAND -> done | other | partial N | new
run_state() {
  "$PYTHON" - "$1" "$2" <<'EOF'
import json, os, sys
run, cmd = sys.argv[1:]
res = os.path.join(run, "results.json")
if os.path.isfile(res):
    with open(res) as f:
        print("done" if json.load(f).get("command") == cmd else "other")
    sys.exit()
answered = 0
for name in sorted(os.listdir(run)) if os.path.isdir(run) else []:
    if name.endswith("_predictions.jsonl"):
        with open(os.path.join(run, name)) as f:
            answered += max(0, sum(1 for line in f if line.strip()) - 1)  # the first line is the run's identity
print(f"partial {answered}" if answered else "new")
EOF
}

calib_source() {  # BENCHMARK -> $CALIB_SOURCE_<BENCHMARK>, empty when unset
  local var=CALIB_SOURCE_$1
  echo "${!var:-}"
}

run_one() {  # SETTING BENCHMARK
  local setting=$1 bench=$2 flags dir cmd state
  flags=$(setting_flags "$setting")
  [[ -n $flags ]] && flags="$flags $FAMILY_FLAGS"
  recipe "$bench"
  # tiny: fewer GPTQ than static rows, as in most recipes, and more than one MME question pair apart, so that
  # only the shared hold-out makes the FP and the static runs score the same rows
  [[ $TINY == 1 ]] && { NSAMPLES=1 CALIB_NUM=3 HOLDOUT=3; }
  local eval_num=${EVAL_NUM:-} new_tokens=${MAX_NEW_TOKENS:-}
  [[ $TINY == 1 ]] && { eval_num=${eval_num:-2}; new_tokens=${new_tokens:-2}; }
  dir=$RUN_ROOT/$setting/$bench
  RUN_DIRS+=("$dir")
  # word splitting of the flag strings is intended: they hold only flags and numbers
  # shellcheck disable=SC2206
  local args=(--model_path "$CKPT" $flags --dataset_name "$bench" --data_root "$DATA" --nsamples "$NSAMPLES"
              --calib_num "$CALIB_NUM" --holdout_num "$HOLDOUT")
  local src
  src=$(calib_source "$bench")
  [[ -n $src ]] && args+=(--calib_source "$src")
  [[ -n $eval_num ]] && args+=(--eval_num "$eval_num")
  [[ -n $new_tokens ]] && args+=(--max_new_tokens "$new_tokens")
  # shellcheck disable=SC2206
  args+=(${EXTRA_FLAGS:-} --output_dir "$dir")
  cmd="$EXAM ${args[*]}"
  state=$(run_state "$dir" "$cmd")
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    echo "[$state] $cmd"
    return
  fi
  case "$state" in
    done)
      echo "skip    $setting/$bench: finished ($dir/results.json)"
      return ;;
    other)
      die "$dir/results.json was written by another command; delete that file to rerun it with the current flags (predictions made with the same model and flags are reused), or set OUT to another folder" ;;
    partial*)
      echo "resume  $setting/$bench: ${state#partial } predictions on disk ($dir)" ;;
    *)
      echo "run     $setting/$bench" ;;
  esac
  mkdir -p "$dir"
  echo "+ $PYTHON $cmd" | tee -a "$dir/log.txt"
  if ! "$PYTHON" "$EXAM" "${args[@]}" 2>&1 | tee -a "$dir/log.txt"; then
    die "run $setting/$bench failed (its log: $dir/log.txt); fix the cause and rerun this script: finished runs are skipped"
  fi
}

table_run() {  # the whole table: every chosen setting on every chosen benchmark, then the report
  table_preflight "$@"
  local s b
  for s in $SETTINGS_RUN; do
    for b in $BENCH_RUN; do run_one "$s" "$b"; done
  done
  [[ ${DRY_RUN:-0} == 1 ]] && return
  mkdir -p "$RUN_ROOT"
  "$PYTHON" -m evaluation.report --title "$TABLE_TITLE: $FAMILY ($CKPT)" --csv "$RUN_ROOT/$TABLE_NAME.csv" \
    "${RUN_DIRS[@]}" | tee "$RUN_ROOT/$TABLE_NAME.md"
}
