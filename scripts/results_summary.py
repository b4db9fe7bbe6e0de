"""Print the README's results summary from results/*/table.json (the figures are never typed by hand).

Usage: python scripts/results_summary.py
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "results"
METHODS = ("teacher-anderson", "hyperdeq", "direct", "cdeq-plain", "cdeq")


def main() -> None:
    for path in sorted(ROOT.glob("*/table.json")):
        t = json.loads(path.read_text())
        acc = t["metric"] == "accuracy"
        fmt = (lambda v: f"{v * 100:.1f}") if acc else (lambda v: f"{v:.1f}")
        nfes = sorted({r["nfe"] for r in t["rows"] if r["method"] == "cdeq"})
        value = {(r["method"], r["nfe"]): r["value"] for r in t["rows"]}
        explicit = next(r["value"] for r in t["rows"] if r["method"] == "explicit")
        tc = t["teacher_converged"]
        print(f"**{t['task']}**, preset {t.get('preset', '?')} ({'accuracy %' if acc else 'perplexity'}; converged teacher {fmt(tc['value'])} "
              f"at {tc['nfe']:.1f} NFE, explicit {fmt(explicit)}; {t['device']}, seed {t['seed']}, "
              f"commit {t['commit'][:10]}; [table](results/{path.parent.name}/table.md))\n")
        print("| method | " + " | ".join(f"NFE {k}" for k in nfes) + " |")
        print("|---|" + "---:|" * len(nfes))
        for m in METHODS:
            print(f"| {m} | " + " | ".join(fmt(value[(m, k)]) if (m, k) in value else "–" for k in nfes) + " |")
        ratios = {k: value[("cdeq", k)] / tc["value"] for k in nfes}
        what = "of the converged teacher's accuracy" if acc else "x the converged teacher's perplexity"
        print("\nC-DEQ: " + ", ".join(f"NFE {k}: {r * 100:.1f}%" if acc else f"NFE {k}: {r:.3f}"
                                     for k, r in ratios.items()) + f" {what}.")
        if t.get("latency"):
            print("C-DEQ time / (injection + k bare layer calls + readout), timed alternately: "
                  + ", ".join(f"NFE {k}: {v['ratio']:.2f}x" for k, v in t["latency"].items()) + ".")
        elif t.get("bare_layer_time_ms"):
            bare = t["bare_layer_time_ms"]
            times = {r["nfe"]: r["time_ms"] for r in t["rows"] if r["method"] == "cdeq"}
            print("C-DEQ time / (injection + k bare layer calls + readout): "
                  + ", ".join(f"NFE {k}: {times[k] / bare[str(k)]:.2f}x" for k in nfes if str(k) in bare) + ".")
        print()


if __name__ == "__main__":
    main()
