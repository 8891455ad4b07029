"""Two versions of the package, measured in one run on the same machine.

    python benchmarks/before_after.py --before /path/to/old/tree [--after .] [--rounds 2] [--out DIR]

Runs ``speed.py --items 1 2 4`` and ``certified.py --no-clarabel`` (our solves only: the reference
solver's time does not change with our code) for each tree, alternating the trees for ``--rounds``
rounds, and prints, per row, the best time of each tree, their ratio, and — for the certified solves —
the passes over S and the certified gap of each (equal passes and gaps mean the same iterates: a time
difference is then the machine's noise, not the code). An old tree is a checkout, e.g.
``git worktree add /tmp/before <commit>``. Writes ``before_after.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))


def run_round(tree, out):
    for script, extra in (("speed.py", ["--items", "1", "2", "4"]), ("certified.py", ["--no-clarabel"])):
        subprocess.run([sys.executable, os.path.join(HERE, script), *extra, "--tree", tree, "--out", out],
                       check=True, stdout=subprocess.DEVNULL)


def best(frames, key, col):
    return pd.concat([f.set_index(key(f))[col] for f in frames], axis=1).min(axis=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="source tree of the old version")
    parser.add_argument("--after", default=os.path.dirname(HERE), help="source tree of the new version (default: this one)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "paper_figures", "performance"))
    args = parser.parse_args(argv)
    runs = {"before": [], "after": []}
    for r in range(args.rounds):
        for name in ("before", "after"):
            out = os.path.join(args.out, "before_after_runs", f"{name}{r}")
            os.makedirs(out, exist_ok=True)
            print(f"round {r + 1}: {name} ({getattr(args, name)})", flush=True)
            run_round(os.path.abspath(getattr(args, name)), out)
            runs[name].append(out)
    speed = {n: [pd.read_csv(os.path.join(o, "speed_items.csv")) for o in runs[n]] for n in runs}
    cert = {n: [pd.read_csv(os.path.join(o, "certified.csv")) for o in runs[n]] for n in runs}
    skey = lambda df: df["case"] + " | " + df["what"]                # noqa: E731
    ckey = lambda df: df["problem"] + " | " + df["loss"]             # noqa: E731
    s = pd.DataFrame({"before_s": best(speed["before"], skey, "toolkit_s"),
                      "after_s": best(speed["after"], skey, "toolkit_s")}).dropna()
    s["after/before"] = s["after_s"] / s["before_s"]
    c = pd.DataFrame({"before_s": best(cert["before"], ckey, "seconds"), "after_s": best(cert["after"], ckey, "seconds"),
                      "passes before": best(cert["before"], ckey, "passes"),
                      "passes after": best(cert["after"], ckey, "passes"),
                      "gap before": best(cert["before"], ckey, "relative_gap"),
                      "gap after": best(cert["after"], ckey, "relative_gap")})
    c.insert(2, "after/before", c["after_s"] / c["before_s"])
    fmt = lambda v: f"{v:.4g}"                                        # noqa: E731
    text = (f"# Before / after, best of {args.rounds} alternating rounds\n\n"
            f"`python benchmarks/before_after.py --before {args.before}`\n\n"
            f"## speed.py items 1, 2, 4 (seconds)\n\n```\n{s.to_string(float_format=fmt)}\n```\n\n"
            f"## certified.py, ours only\n\n```\n{c.to_string(float_format=fmt)}\n```\n")
    with open(os.path.join(args.out, "before_after.md"), "w") as fh:
        fh.write(text)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_colwidth", 100)
    print(s.to_string(float_format=fmt))
    print(c.to_string(float_format=fmt))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
