#!/usr/bin/env bash
# Issue 19's frontier benchmarks, in order, as one resumable job:
#
#   nohup bash bench/frontier_all.sh > logs/frontier_all.out 2>&1 &
#
# Every step continues where a cut-short run stopped, through the project's own resume: the teacher
# from its last epoch checkpoint, the store from its committed shards, each sweep member from its own
# records (finished members are not retrained). Rerun the same command after an interruption.
# Hours on a 2-core CPU machine: the ML-1M teacher ~85 min, its store ~10 min, each sweep member
# 40-60 min (two at a time); minutes on a GPU node.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# One store for every ML-1M member: top-128 labels (the student's own top items are covered) and one
# teacher-labelled augmented row per training sequence.
ML1M=(--config configs/ml1m.yaml precompute.k=128 precompute.augment.ratio=1)

$PY -m cluster.cli prepare "${ML1M[@]}"
$PY -m cluster.cli train-teacher "${ML1M[@]}"
$PY -m cluster.cli precompute "${ML1M[@]}"
# The ladder: 1/5 to 1/100 of the teacher, each distilled (with and without the augmented rows) and its twin.
$PY -m bench.frontier --name ml1m_ladder "${ML1M[@]}" 'sweep.fractions=[0.1,0.2,0.05,0.02,0.01]' sweep.with_augmented=true
# 1/10 with two seeds, and the levers as variants (decoupled KD, more weight on the teacher).
$PY -m bench.frontier --name ml1m_1in10 "${ML1M[@]}" 'sweep.fractions=[0.1]' 'sweep.seeds=[0,1]' \
    'sweep.variants={dkd: [distill.loss=dkd], a08: [distill.alpha=0.8]}'
# Amazon Beauty: its own teacher and store, three sizes.
BEAUTY=(--config configs/beauty.yaml precompute.augment.ratio=1)
$PY -m cluster.cli prepare "${BEAUTY[@]}"
$PY -m cluster.cli train-teacher "${BEAUTY[@]}"
$PY -m cluster.cli precompute "${BEAUTY[@]}"
$PY -m bench.frontier --name beauty "${BEAUTY[@]}" 'sweep.fractions=[0.2,0.1,0.05]' sweep.with_augmented=true
