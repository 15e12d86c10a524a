#!/usr/bin/env bash
# The main job, end to end: prepare a corpus, train a small transformer with ARCH,
# translate the test set with fairseq-generate, print sacreBLEU.
#
#   bash scripts/demo.sh                        # synthetic toy corpus (no network, no data)
#   bash scripts/demo.sh --corpus DIR --src de --tgt en      # a local corpus
#   ARCH_CORPUS=../shared/data/multi30k/tok bash scripts/demo.sh --src de --tgt en
#
# Options: --workdir DIR (default runs/demo; a non-empty DIR that an earlier demo did not make is
# refused, since the demo empties it), --epochs N, --refresh-interval Tc,
# --spm-vocab N (default 0 for the toy corpus, 8000 for a local one),
# --max-train N, --smoke (400 training and 50 valid/test pairs, 3 epochs: what CI runs), -h/--help.
# Anything after `--` goes to fairseq-train as is (e.g. `-- --adv-method rdrop --adv-lambda 5`).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"

CORPUS="${ARCH_CORPUS:-}"; SRC=src; TGT=tgt; WORK=runs/demo; EPOCHS=12; TC=5
SPM=""; MAX_TRAIN=0; MAX_EVAL=0; SMOKE=0; TOY_TRAIN=6000; EXTRA=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --corpus) CORPUS="$2"; shift 2;;
        --src) SRC="$2"; shift 2;;
        --tgt) TGT="$2"; shift 2;;
        --workdir) WORK="$2"; shift 2;;
        --epochs) EPOCHS="$2"; shift 2;;
        --refresh-interval) TC="$2"; shift 2;;
        --spm-vocab) SPM="$2"; shift 2;;
        --max-train) MAX_TRAIN="$2"; shift 2;;
        --smoke) SMOKE=1; shift;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0;;
        --) shift; EXTRA=("$@"); break;;
        *) echo "demo.sh: unknown option $1" >&2; exit 2;;
    esac
done
if [[ -z "$SPM" ]]; then [[ -n "$CORPUS" ]] && SPM=8000 || SPM=0; fi
if [[ $SMOKE == 1 ]]; then
    EPOCHS=3; TC=2; TOY_TRAIN=400; MAX_EVAL=50; [[ -n "$CORPUS" ]] && { MAX_TRAIN=400; [[ $SPM -gt 0 ]] && SPM=500; }
fi
if [[ -n "$CORPUS" && ! -d "$CORPUS" ]]; then echo "demo.sh: corpus dir $CORPUS does not exist" >&2; exit 2; fi
# the demo empties its workdir: only one that it made itself (its marker file) or an empty one
MARKER=.fairseq-arch-demo
demo_made() {  # the marker, or (a demo from before the marker) nothing but what a demo writes
    [[ -f "$1/$MARKER" ]] || ! ls -A "$1" | grep -qvxE 'text|bin|checkpoints|(preprocess|train|generate)\.log|hyp\.test\..*'
}
if [[ -e "$WORK" ]] && { [[ ! -d "$WORK" ]] || ! demo_made "$WORK"; }; then
    echo "demo.sh: --workdir $WORK exists and was not made by the demo (no $MARKER in it); the demo" \
         "empties its workdir, so it refuses this one: give a new or empty directory" >&2
    exit 2
fi
# the method the run trains with: the criterion's default, or the last --adv-method after --
METHOD=arch
for ((i = 0; i < ${#EXTRA[@]}; i++)); do
    [[ "${EXTRA[$i]}" == --adv-method ]] && METHOD="${EXTRA[$((i + 1))]:-arch}"
    [[ "${EXTRA[$i]}" == --adv-method=* ]] && METHOD="${EXTRA[$i]#--adv-method=}"
done

source scripts/env.sh
arch_use_env
export PYTHONWARNINGS="ignore"

rm -rf "$WORK"; mkdir -p "$WORK"; touch "$WORK/$MARKER"
echo "== 1/4 prepare corpus"
python3 scripts/prepare_corpus.py "$WORK/text" --corpus "$CORPUS" --src "$SRC" --tgt "$TGT" \
    --spm-vocab "$SPM" --max-train "$MAX_TRAIN" --max-eval "$MAX_EVAL" --toy-train "$TOY_TRAIN"
[[ -z "$CORPUS" ]] && { SRC=src; TGT=tgt; }
fairseq-preprocess --source-lang "$SRC" --target-lang "$TGT" --trainpref "$WORK/text/train" \
    --validpref "$WORK/text/valid" --testpref "$WORK/text/test" --destdir "$WORK/bin" \
    --joined-dictionary --workers 2 > "$WORK/preprocess.log" 2>&1 || { tail "$WORK/preprocess.log"; exit 1; }

case "$METHOD" in
    arch|arch-rdrop) WHAT="$METHOD ($EPOCHS epochs, fresh perturbations every $TC epochs)";;
    *) WHAT="$METHOD ($EPOCHS epochs)";;
esac
echo "== 2/4 train with $WHAT -> $WORK/train.log"
# scripts/progress.py keeps fairseq's whole output in train.log and prints each epoch's line as it ends
# (kind: refresh/reuse, seconds, time left; on a terminal also a line for the running epoch). Its exit
# status is fairseq-train's; on failure it prints why and the log's last 30 lines.
python3 scripts/progress.py run --log "$WORK/train.log" --tail 30 -- fairseq-train "$WORK/bin" --user-dir "$REPO/fairseq_arch" \
    --task arch_translation --criterion adversarial_label_smoothed_cross_entropy --label-smoothing 0.1 \
    --arch transformer --share-all-embeddings --encoder-layers 3 --decoder-layers 3 \
    --encoder-embed-dim 128 --decoder-embed-dim 128 --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512 \
    --encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0.1 \
    --optimizer adam --adam-betas '(0.9, 0.98)' --lr 2e-3 --lr-scheduler inverse_sqrt --warmup-updates 300 \
    --max-tokens 4096 --max-epoch "$EPOCHS" --arch-refresh-interval "$TC" \
    --save-dir "$WORK/checkpoints" --no-epoch-checkpoints --seed 1 --cpu \
    --no-progress-bar --log-format simple --log-interval 5 "${EXTRA[@]}" || exit $?
for f in "$WORK/checkpoints/arch_cache"/gen-*/*.bin; do [[ -e "$f" ]] || continue; echo "  cache file ${f#$WORK/}: $(stat -c %s "$f") bytes"; done

echo "== 3/4 translate the test set (fairseq-generate, beam 5) -> $WORK/generate.log"
POST=(); [[ "$SPM" -gt 0 ]] && POST=(--post-process sentencepiece)
fairseq-generate "$WORK/bin" --user-dir "$REPO/fairseq_arch" --task arch_translation \
    --source-lang "$SRC" --target-lang "$TGT" --path "$WORK/checkpoints/checkpoint_best.pt" \
    --gen-subset test --beam 5 --batch-size 128 --required-batch-size-multiple 1 \
    --max-len-a 1.5 --max-len-b 10 --cpu "${POST[@]}" > "$WORK/generate.log" 2>&1 \
    || { tail -20 "$WORK/generate.log"; exit 1; }
grep "BLEU4" "$WORK/generate.log" | sed 's/^/  fairseq (tokenised): /'

echo "== 4/4 sacreBLEU"
python3 scripts/score.py "$WORK/generate.log" "$WORK/text/ref.test.$TGT" --hyp-out "$WORK/hyp.test.$TGT"
