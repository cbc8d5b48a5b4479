"""Plot `python -m deepcomm.bench --json` rows: µs per stage against SMs, kernels vs copy floor.

    python tools/plot_bench.py prefill_2ranks.json prefill_4ranks.json -o docs/img/intranode_prefill.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    series = [("dispatch", "bf16"), ("dispatch", "fp8"), ("combine", "bf16")]
    fig, axes = plt.subplots(1, len(args.json), figsize=(6 * len(args.json), 4.2), squeeze=False)
    for ax, path in zip(axes[0], args.json):
        rows = [r for r in json.load(open(path)) if r["path"] == "intranode" and r["sms"] is not None]
        first = rows[0]
        for (stage, dtype), color in zip(series, ("tab:blue", "tab:orange", "tab:green")):
            picked = sorted((r for r in rows if r["stage"] == stage and r["dtype"] == dtype), key=lambda r: r["sms"])
            if not picked:
                continue
            sms = [r["sms"] for r in picked]
            ax.plot(sms, [r["us"] for r in picked], "o-", color=color, label=f"{stage} {dtype}")
            ax.plot(sms, [r["floor_us"] for r in picked], "x--", color=color, alpha=0.6,
                    label=f"copy floor for {stage} {dtype}")
        ax.set_title(f"{first['ranks']} ranks on one {first['device']}\n"
                     f"{first['tokens']} tokens × {first['hidden']}, top-{first['topk']} of {first['experts']}")
        ax.set_xlabel("SMs per rank")
        ax.set_ylabel("µs (median, slowest rank)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)


if __name__ == "__main__":
    main()
