"""Privacy against utility: fed_stats Dice at several epsilons, with local_only and no noise as controls.

    python -m bench.privacy_curve [--epsilons 0.5 1 2 4 8] [--images 16] [--rounds 4]

Every point is one federation (in-process, `engine=inline`, sites in turn) of the four synthetic demo
hospitals on the demo's source model (ResUNet-18, 128 px, trained on `clean`; trained first if it is
missing), method fedgrata, the same seed and images for every point. `no noise` is epsilon 1e6, a
control and never a setting to use; `local_only` shares nothing. Reported per point: each site's
Dice (mean of disc and cup, x100, image-weighted over its stream), their mean, the epsilon each
site's ledger holds after the run (the noised BN statistics and the noised Dice proxy together), the
BN statistics' and the proxy's noise multipliers, and the share of the pooled signal the
coordinator kept (dp_signal_kept). Writes bench/results/privacy_curve.{json,png} and one MLflow run
(experiment bench-privacy) with the table, the curve as metrics over epsilon, and the PNG.
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from bench.common import publish, pyplot, save_figure, table

SITES = ("colour_cast", "gamma", "low_contrast", "uneven_light")
NO_NOISE = 1e6


def run_point(variant: str, epsilon: float, args: argparse.Namespace, work: Path) -> dict:
    from server.config import load_config
    from server.federation import federate
    from server.inline_grid import InlineGrid
    from client.client_app import app as client_app

    tag = f"{variant}_eps{epsilon:g}"
    cfg = load_config(["data=synthetic", f"federation={variant}", f"data.synthetic_test={args.images}", f"federation.rounds={args.rounds}",
                       f"privacy.epsilon={epsilon}", "engine=inline", "mlflow.overlays=0",
                       f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}", "mlflow.experiment=bench-privacy",
                       f"mlflow.run_name={tag}", f"out_dir={work / tag}", *args.overrides])
    grid = InlineGrid(client_app, [{"partition-id": i, "num-partitions": len(SITES)} for i in range(len(SITES))])
    t0 = time.perf_counter()
    result = federate(grid, cfg, Path.cwd())
    sites = result["sites"]
    row = {"variant": variant, "epsilon": None if variant == "local_only" else epsilon,
           "label": "local_only" if variant == "local_only" else ("no noise" if epsilon >= NO_NOISE else f"{epsilon:g}"),
           "seconds": time.perf_counter() - t0}
    for s in SITES:
        row[s] = sites[s].get("dice_mean")
    row["mean"] = sum(row[s] for s in SITES) / len(SITES)
    if variant == "fed_stats":
        from grata.privacy import calibrate

        sigma = calibrate(epsilon, cfg.privacy.delta, args.rounds, cfg.privacy.accountant)
        row["sigma_stats"] = sigma / math.sqrt(1 - cfg.privacy.metrics_share)
        row["sigma_proxy"] = sigma / math.sqrt(cfg.privacy.metrics_share)
        row["epsilon_spent"] = max(sites[s].get("dp_epsilon", 0.0) for s in SITES)
        kept = _signal_kept(result)
        row["signal_kept"] = kept[-1] if kept else None
    return row


def _signal_kept(result: dict) -> list[float]:
    """The coordinator's dp_signal_kept per round, from the run's MLflow parent run."""
    from mlflow.tracking import MlflowClient

    ml = result["mlflow"]
    if not ml.get("parent_run_id"):
        return []
    history = MlflowClient(ml["uri"]).get_metric_history(ml["parent_run_id"], "round/dp_signal_kept")  # the per-round series (tracking.py)
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()

    curve = [r for r in rows if r["variant"] == "fed_stats" and r["epsilon"] < NO_NOISE]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["epsilon"] for r in curve], [r["mean"] for r in curve], "o-", label="fed_stats (mean of 4 sites)")
    for r in rows:
        if r["label"] in ("local_only", "no noise"):
            ax.axhline(r["mean"], ls="--" if r["label"] == "local_only" else ":", color="grey" if r["label"] == "local_only" else "red",
                       label=f"{r['label']} ({r['mean']:.2f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("epsilon per site for the run (delta 1e-5)")
    ax.set_ylabel("Dice x100 (disc/cup mean)")
    ax.set_title("fed_stats: privacy against Dice (synthetic demo sites)")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def log_mlflow(rows: list[dict], text: str, png: Path, uri: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bench-privacy")
    exp_id = exp.experiment_id if exp else client.create_experiment("bench-privacy")
    run = client.create_run(exp_id, run_name="privacy_curve")
    rid = run.info.run_id
    for r in rows:
        if r["variant"] == "fed_stats" and r["epsilon"] < NO_NOISE:
            step = int(round(r["epsilon"] * 10))  # MLflow steps are integers: epsilon x 10
            client.log_metric(rid, "dice_mean", r["mean"], step=step)
            client.log_metric(rid, "epsilon_spent", r["epsilon_spent"], step=step)
        else:
            client.log_metric(rid, f"dice_mean_{r['label'].replace(' ', '_')}", r["mean"])
    client.log_text(rid, text, "privacy_curve.md")
    client.log_artifact(rid, str(png))
    client.set_terminated(rid)
    return rid


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[0.5, 1, 2, 4, 8])
    parser.add_argument("--images", type=int, default=16, help="test images per site")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--mlflow", default=f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--overrides", nargs="*", default=[], help="more Hydra overrides for every point")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedgrata-privacy-") as tmp:
        points = [("local_only", 8.0)] + [("fed_stats", e) for e in args.epsilons] + [("fed_stats", NO_NOISE)]
        for variant, eps in points:
            rows.append(run_point(variant, eps, args, Path(tmp)))
            r = rows[-1]
            print(f"{r['label']:>10}: Dice {r['mean']:.2f} ({r['seconds']:.0f} s)", flush=True)
    cols = [("label", "epsilon", ""), *[(s, s, ".2f") for s in SITES], ("mean", "mean", ".2f"),
            ("epsilon_spent", "ledger epsilon", ".3f"), ("sigma_stats", "sigma BN stats", ".2f"),
            ("sigma_proxy", "sigma proxy", ".2f"), ("signal_kept", "signal kept", ".3f")]
    text = table(rows, cols)
    png = args.out / "privacy_curve.png"
    plot(rows, png)
    run_id = log_mlflow(rows, text, png, args.mlflow)
    publish("privacy_curve", args, text, model="ResUNet-18, 128 px, synthetic demo sites, fedgrata",
            rows=rows, png=str(png), mlflow_run=run_id)
    return rows


if __name__ == "__main__":
    main()
