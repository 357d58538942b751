#!/usr/bin/env bash
# Re-measure every BENCHMARKS.md result that depends on the shipped demo teacher, one command at a time
# (two PyTorch jobs on two cores distort each other's times), in the order of the sections:
#
#     bash demo_teacher/teacher_dependent.sh [FIRST]      # about 100 minutes on a 2-core CPU
#
# Run it after the teacher's weights in deltaconv_cli/assets/demo change. Each command's wall-clock time
# goes to runs/teacher-dependent.log; the JSON, PNG and docs/analysis-demo outputs are the ones the
# sections cite. FIRST (a step number from that log) restarts after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
log=runs/teacher-dependent.log
first=${1:-1}
step=0

measure() {
    step=$((step + 1))
    if ((step < first)); then return; fi
    local start
    start=$(date +%s)
    echo "[$step] $*" | tee -a "$log"
    "$@"
    echo "[$step] $(($(date +%s) - start)) s" | tee -a "$log"
}

# 1. The teacher: quality at three guidance values, guided from the first step, 30 steps, 400 captions,
# other schedulers; where facts are lost, and how many objects it draws.
measure python demo_teacher/evaluate_demo_teacher.py --guidance 2 3 1.5 --json demo_teacher/results/demo-teacher-quality.json \
    --grid demo_teacher/results/demo-samples.png
measure python demo_teacher/evaluate_demo_teacher.py --guidance-start 0 \
    --json demo_teacher/results/demo-teacher-quality-guided-every-step.json
measure python demo_teacher/evaluate_demo_teacher.py --steps 30 --json demo_teacher/results/demo-teacher-quality-steps30.json
measure python demo_teacher/evaluate_demo_teacher.py --count 400 --json demo_teacher/results/demo-teacher-quality-400-captions.json
measure python demo_teacher/adherence_from_noised_scenes.py --json demo_teacher/results/demo-teacher-from-noised-scenes.json
measure python demo_teacher/layout_at_t999.py --json demo_teacher/results/demo-teacher-layout-t999.json
for scheduler in unipc euler heun; do
    measure python demo_teacher/evaluate_demo_teacher.py --scheduler "$scheduler" \
        --json "demo_teacher/results/demo-teacher-quality-scheduler-$scheduler.json"
done
measure python demo_teacher/count_histogram.py --json demo_teacher/results/count-histogram.json

# This script's own distill folders from an earlier run: distill refuses a folder that holds a run, so the
# step about to run (the next one) starts from none.
fresh() {
    if ((step + 1 >= first)); then rm -rf "$@"; fi
}

# 2. Distillation: the starts, README's main command, LinFusion on the same budget (its recipe, then ours).
measure python benchmarks/init_fidelity.py --json docs/init-fidelity.json
fresh runs/demo
measure deltaconv distill demo --data demo --recipe demo --out runs/demo --json docs/distill-demo-300.json
fresh runs/demo-linfusion-300
measure deltaconv distill demo --data demo --recipe demo --mixer linfusion --out runs/demo-linfusion-300 \
    --json docs/distill-demo-linfusion-300.json
fresh runs/demo-linfusion-300-pure
measure deltaconv distill demo --data demo --recipe demo --mixer linfusion --set denoise_weight=0 \
    --set teacher_weight=1 --set feature_weight=0.5 --set learning_rate=3e-4 \
    --out runs/demo-linfusion-300-pure --json docs/distill-demo-linfusion-300-pure-distillation.json

# 3. Teacher vs students on 200 captions, then the time per image in turns (unfitted blocks of the same shapes).
measure deltaconv eval demo --adapter runs/demo/adapter --linfusion-adapter runs/demo-linfusion-300/adapter \
    --prompts demo:200 --out runs/eval-demo-300 --json docs/eval-demo-300.json
measure deltaconv eval demo --adapter runs/demo/adapter --linfusion-adapter runs/demo-linfusion-300-pure/adapter \
    --prompts demo:200 --out runs/eval-demo-300-pure --json docs/eval-demo-300-linfusion-pure-distillation.json
measure deltaconv convert demo -o runs/demo-converted
measure python -c "from deltaconv_cli import DeltaConvAdapter; from deltaconv_cli.loading import load_model, \
locate_model; DeltaConvAdapter.construct_for(load_model(locate_model('demo')), mixer='linfusion')\
.save_pretrained('runs/demo-linfusion-start')"
measure deltaconv eval demo --adapter runs/demo-converted/deltaconv --linfusion-adapter runs/demo-linfusion-start \
    --prompts demo:16 --trajectory-prompts 0 --timing-rounds 7 --out runs/eval-timing \
    --json docs/eval-demo-timing.json

# The report images and grids the sections cite, unless a restart from FIRST skipped the runs above.
if ((first <= step)); then
    cp runs/demo/report.png docs/distill-demo-report.png
    cp runs/demo/loss.png docs/distill-demo-300-loss.png
    cp runs/demo-linfusion-300-pure/report.png docs/distill-demo-linfusion-300-pure-distillation-report.png
    cp runs/eval-demo-300/grid.png docs/eval-demo-300-grid.png
    cp runs/eval-demo-300-pure/grid.png docs/eval-demo-300-linfusion-pure-distillation-grid.png
fi

# 5. Attention locality. 7. High resolution end to end (the architecture, not the weights, sets these times).
measure deltaconv analyze demo --prompts demo:8 --queries 1024 --out docs/analysis-demo
measure deltaconv profile demo --end-to-end --res 64 128 256 512 1024 --steps 2 --repeats 3 --time-budget 600 \
    --plot docs/end-to-end-demo.png --json docs/end-to-end-demo.json
