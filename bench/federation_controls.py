"""Each sharing idea against its local control: a table and a plot from bench.proto_study's JSON files.

    python -m bench.federation_controls --base local.json \\
        --pair "evidence before adapting" look_local.json look_kin.json \\
        --pair "lr 1e-2, affine averaged in the kind" lr_local.json lr_caff.json ... \\
        [--plot docs/img/federation_vendors_controls.png]

Every JSON is one `python -m bench.proto_study ... --out FILE` run on the same hospitals. A pair is
(the site alone with the idea, the kind sharing it); the column that matters is the federated
run's gain over its own control, not over `--base` (a gain a site gets alone is not federation's).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(path: str) -> dict:
    """A proto_study result: {"mean": image-weighted Dice, "sites": {site: stream Dice}, ...}."""
    result = json.loads(Path(path).read_text())
    if "mean" not in result or "sites" not in result:
        raise ValueError(f"{path}: not a bench.proto_study result (needs 'mean' and 'sites')")
    return result


def table(base: dict, pairs: list[tuple[str, dict, dict]]) -> str:
    lines = [f"base (local_only): {base['mean']:.2f}", "",
             "| idea | local control | federated | control - base | federated - control | worst site (fed - control) |",
             "|---|---|---|---|---|---|"]
    for name, local, fed in pairs:
        worst = min(fed["sites"][s] - local["sites"][s] for s in local["sites"])
        lines.append(f"| {name} | {local['mean']:.2f} | {fed['mean']:.2f} | {local['mean'] - base['mean']:+.2f} | "
                     f"{fed['mean'] - local['mean']:+.2f} | {worst:+.2f} |")
    return "\n".join(lines)


def plot(base: dict, pairs: list[tuple[str, dict, dict]], path: Path) -> None:
    from bench.common import pyplot, save_figure  # torch comes with bench.common: only when plotting

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 3.8))
    xs = range(len(pairs))
    ax.bar([x - 0.2 for x in xs], [p[1]["mean"] for p in pairs], 0.4, label="the site alone (control)")
    ax.bar([x + 0.2 for x in xs], [p[2]["mean"] for p in pairs], 0.4, label="its kind sharing (exact values)")
    ax.axhline(base["mean"], color="k", lw=1, ls="--", label=f"local_only {base['mean']:.2f}")
    ax.set_xticks(list(xs), [p[0] for p in pairs], fontsize=8)
    ax.set_ylabel("mean Dice x100")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="proto_study JSON of the plain local run")
    parser.add_argument("--pair", nargs=3, action="append", required=True, metavar=("NAME", "LOCAL", "FED"))
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    base = load(args.base)
    pairs = [(name, load(local), load(fed)) for name, local, fed in args.pair]
    print(table(base, pairs))
    if args.plot:
        plot(base, pairs, args.plot)


if __name__ == "__main__":
    main()
