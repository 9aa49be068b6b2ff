#!/usr/bin/env bash
# The sweep that chooses the default sieve per mode (flowsieve.bench.choose), on one model.
#
#   bash benchmarks/choose_default.sh MODEL DB [SEED] [LIMIT] [HAYSTACK]
#
# Candidates: the flowsieve configurations below and kvpress's presses at the same keeps, on the
# needle tasks (context ~1024 tokens), QA (gold passage and other paragraphs, 768 tokens), multi-document QA and, without a
# question, bits per byte. HAYSTACK "wiki" runs the needle tasks alone, on the held-out Wikipedia
# haystack; NEEDLE_TASKS (default needle,multi_needle,needle_thread) narrows the needle tasks. SEED must be a headline seed (flowsieve.bench.config.HEADLINE_SEEDS) for
# numbers that are reported. Then: flowsieve bench choose --db DB
set -euo pipefail
model=${1:?model}; db=${2:?db}; seed=${3:-1000}; limit=${4:-8}; haystack=${5:-}
needles=${NEEDLE_TASKS:-needle,multi_needle,needle_thread}
chat=(); [[ $model == gemma3-270m ]] && chat=(--no-chat)
hay=(); [[ -n $haystack ]] && hay=(--param "haystack=\"$haystack\"")
aware="full,fusion@units=sentence,selfinfo@units=sentence,snapkv@units=sentence@refeed=true,flowcut@units=sentence@refeed=true,snapkv,flowcut"
agnostic="full,selfinfo@units=sentence,fusion@units=sentence,snapkv@units=sentence,snapkv,flowcut"
common=(--model "$model" "${chat[@]}" --keep 0.25,0.1 --seed "$seed" --limit "$limit" --db "$db"
        --share-prefill --threads 1 --max-new-tokens 16 -q)
fs=.venv/bin/flowsieve
$fs bench "${common[@]}" --modes query_aware --methods "$aware" --peers kvpress:snapkv+tova+keydiff \
    --tasks "$needles" --length 1024 "${hay[@]}"
$fs bench "${common[@]}" --modes query_agnostic --methods "$agnostic" --peers kvpress:snapkv+tova+keydiff \
    --tasks "$needles" --length 1024 "${hay[@]}"
if [[ -z $haystack ]]; then
    for mode in query_aware query_agnostic; do
        methods=$aware; [[ $mode == query_agnostic ]] && methods=$agnostic
        $fs bench "${common[@]}" --modes $mode --methods "$methods" --peers kvpress:snapkv+tova+keydiff \
            --tasks qa@length=768,multidoc_qa
    done
    $fs bench "${common[@]}" --modes query_agnostic --methods "$agnostic" --tasks lm --length 1024
fi
