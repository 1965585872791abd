"""The prototype study behind fed_kin: which sharing could pay among sites alike? (docs/federation_scenarios.md)

    python -m bench.proto_study --sites gamma-1 gamma-2 low_contrast-1@3 --images 24 --rounds 4 \
        [--variant local|aff|caff] [--boost K] [--bn auto|image|site|mixed] [--bnw W] [--lr LR] \
        [--lookahead none|local|kin] [--early none|own|kin --early-layers K --early-w W]

Adapters in one process, no Flower, no privacy: `aff` averages the BN affine parameters over all
sites after every round, `caff` within each kind (the name before the dash; a `@R` site joins in
round R and starts from its kind's average), `--boost` scales the averaged change. `--lookahead`:
before a round's images are segmented, bn=auto's switch is decided from the round's exact stem
shifts and those of the site's earlier rounds (`local`, the control), or those of every active
site of its kind (`kin`).
`--early`: the first K BN layers mix in the running source-pass statistics of the site's own images
so far (`own`, the control) or its kind's (`kin`). The kin versions share exact values: an upper
bound on what a private release of the same thing could give. Prints the Dice per round and site
and the image-weighted mean.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from grata.adapters import build_adapter
from grata.config import DataConfig, open_domain
from grata.metrics import score
from grata.models import load_checkpoint
from grata.privacy import SourcePass, source_moments, to_relative


def affine_of(ad):
    return [(n.weight.detach().clone(), n.bias.detach().clone()) for n in ad.norms]


def set_affine(ad, layers):
    with torch.no_grad():
        for n, (w, b) in zip(ad.norms, layers):
            n.weight.copy_(w)
            n.bias.copy_(b)


def mean_layers(all_layers):
    return [tuple(torch.stack([l[i][j] for l in all_layers]).mean(0) for j in (0, 1)) for i in range(len(all_layers[0]))]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--sites", nargs="+", required=True)  # name[@join]
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--variant", default="local")
    p.add_argument("--boost", type=float, default=1.0)
    p.add_argument("--kind", default="synthetic")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--ckpt", default="checkpoints/source_synthetic_clean_resnet18_128.pt")
    p.add_argument("--out", default="")
    p.add_argument("--bn", default="auto")
    p.add_argument("--bnw", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=4, help="bn=auto's auto_warmup (images before it may switch)")
    p.add_argument("--lookahead", default="none", choices=["none", "local", "kin", "kin_dp"],
                   help="before a round's images: decide bn=auto's switch from the round's exact stem shifts, "
                        "the site's own (local) or its kind's active sites' (kin, exact: an upper bound)")
    p.add_argument("--dp-epsilon", type=float, default=8.0,
                   help="kin_dp: each site releases, every round, the noised share of its round's images whose "
                        "stem shift ratio exceeds the threshold (sensitivity 1), at this epsilon over the run")
    p.add_argument("--dp-releases", type=int, default=0,
                   help="kin_dp: release only in the first R rounds, the run's budget spread over them (0: every round)")
    p.add_argument("--early", default="none", choices=["none", "own", "kin"],
                   help="the first --early-layers BN layers mix in running source-pass statistics (share --early-w): "
                        "the site's own images so far, or its kind's (exact: an upper bound)")
    p.add_argument("--early-layers", type=int, default=1)
    p.add_argument("--early-w", type=float, default=0.5)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    model, meta = load_checkpoint(a.ckpt)
    opts = dict(lr=a.lr, aux="ent", pse="consis", bn=a.bn, bn_source_weight=a.bnw, dynamic_lr=True, entropy_form="reference",
                ensemble=True, fallback=False, guard=5.0,
                auto_warmup=a.warmup)
    data = DataConfig(kind=a.kind, size=a.size, synthetic_test=a.images, root="../shared/data/fundus", source="clean")
    sites = {}
    for spec in a.sites:
        name, _, join = spec.partition("@")
        group = name.rsplit("-", 1)[0]
        ds = open_domain(data, name, "test")
        sites[name] = dict(group=group, join=int(join or 1), ds=ds,
                           ad=build_adapter("grata", model, seed=0, shift_reference=meta.get("shift_reference"),
                                            quality=meta.get("quality"), **opts), dice={})
    spass = SourcePass(model)
    src = source_moments([m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    t0 = time.perf_counter()
    broadcast = {}
    if a.lookahead == "kin_dp":
        from grata.privacy import calibrate
        releases = a.dp_releases or a.rounds
        sigma = calibrate(a.dp_epsilon, 1e-5, releases)  # the run's budget spread evenly over the releases
        noise = torch.Generator().manual_seed(1)
    for rnd in range(1, a.rounds + 1):
        for name, s in sites.items():
            if rnd < s["join"]:
                continue
            span = a.rounds - s["join"] + 1
            n = len(s["ds"])
            lo, hi = (rnd - s["join"]) * n // span, (rnd - s["join"] + 1) * n // span
            if rnd == s["join"] and a.variant.startswith("caff") and s["group"] in broadcast:
                set_affine(s["ad"], broadcast[s["group"]])  # warm start
            s["span"] = (lo, hi)
        if a.lookahead != "none":  # phase 1: the round's exact stem shifts, before any image is segmented
            for name, s in sites.items():
                if rnd < s["join"]:
                    continue
                # every image of the site so far, this round's included (the same decision rule as bn=auto's)
                s.setdefault("ratios", []).extend(s["ad"].stem_ratio(*spass.moments(s["ds"][i].image[None], first=1)[0])
                                                  for i in range(*s["span"]))
                if a.lookahead == "kin_dp" and rnd <= releases:
                    n = s["span"][1] - s["span"][0]
                    share = sum(r > s["ad"].shift_threshold for r in s["ratios"][-n:]) / n
                    sd = sigma / n
                    s["release"] = (share + float(torch.randn((), generator=noise)) * sd, n, sd)
            for name, s in sites.items():
                if rnd < s["join"]:
                    continue
                if a.lookahead == "kin_dp":
                    # own exact evidence so far + every other active site's noised share of this round
                    ad = s["ad"]
                    rows = [o["release"] for o in sites.values() if o is not s and rnd >= o["join"]]
                    if rnd > releases or not rows:
                        continue  # the budget is spent: the site decides as bn=auto does
                    w = [1 / sd**2 for _, _, sd in rows]
                    pooled = sum(wi * m for wi, (m, _, _) in zip(w, rows)) / sum(w)
                    pooled_sd = sum(w) ** -0.5
                    own = s["ratios"]
                    if (sum(own) / len(own) > ad.shift_threshold and pooled - 2 * pooled_sd > 0.5
                            and len(own) + sum(n for _, n, _ in rows) >= ad.auto_warmup):
                        ad.adopt_image_statistics()
                    continue
                pool_ = s["ratios"] if a.lookahead == "local" else [
                    r for o in sites.values() if o["group"] == s["group"] and rnd >= o["join"] for r in o["ratios"]]
                ad = s["ad"]
                if len(pool_) >= ad.auto_warmup and sum(pool_) / len(pool_) > ad.shift_threshold:
                    ad.adopt_image_statistics()
        for name, s in sites.items():
            if rnd < s["join"]:
                continue
            lo, hi = s["span"]
            ds = []
            for i in range(lo, hi):
                smp = s["ds"][i]
                if a.early != "none":
                    k = a.early_layers
                    mine = spass.moments(smp.image[None], first=k)
                    s.setdefault("early", []).append([(m1[0], m2[0]) for m1, m2 in mine])
                    rows = s["early"] if a.early == "own" else [
                        e for o in sites.values() if o["group"] == s["group"] for e in o.get("early", [])]
                    pooled = [tuple(torch.stack([r[j][t] for r in rows]).mean(0) for t in (0, 1)) for j in range(k)]
                    ad = s["ad"]
                    full = pooled + [(n.running_mean.clone(), n.running_var.clone() + n.running_mean**2)
                                     for n in ad.norms[k:]]
                    ad.set_pooled(full, [a.early_w] * k + [0.0] * (len(ad.norms) - k))
                logits = s["ad"].adapt_and_predict(smp.image[None])
                ds.append(float(score(logits, smp.mask[None], with_asd=False)["dice_mean"][0]))
            s["dice"][rnd] = ds
        # aggregation
        if a.variant in ("caff", "aff"):
            groups = {}
            for name, s in sites.items():
                if rnd >= s["join"]:
                    groups.setdefault(s["group"] if a.variant == "caff" else "all", []).append(name)
            for g, names in groups.items():
                avg = mean_layers([affine_of(sites[n]["ad"]) for n in names])
                prev = broadcast.get(g)
                if prev is not None and a.boost != 1.0:
                    avg = [tuple(p_ + a.boost * (m - p_) for p_, m in zip(pl, ml)) for pl, ml in zip(prev, avg)]
                broadcast[g] = avg
                for n in names:
                    set_affine(sites[n]["ad"], avg)
                if a.variant == "aff":
                    for s in sites.values():
                        broadcast[s["group"]] = avg
        line = " ".join(f"{n}:{sum(s['dice'].get(rnd, [float('nan')]))/max(1,len(s['dice'].get(rnd, [1]))):.1f}" for n, s in sites.items())
        print(f"r{rnd} {time.perf_counter()-t0:.0f}s {line}", flush=True)
    per_site = {n: sum(sum(v) for v in s["dice"].values()) / sum(len(v) for v in s["dice"].values()) for n, s in sites.items()}
    allv = [d for s in sites.values() for v in s["dice"].values() for d in v]
    res = {"variant": a.variant, "boost": a.boost, "sites": per_site, "mean": sum(allv) / len(allv),
           "rounds": {n: {r: sum(v) / len(v) for r, v in s["dice"].items()} for n, s in sites.items()}}
    print(json.dumps({k: res[k] for k in ("variant", "boost", "mean")}), {k: round(v, 1) for k, v in per_site.items()})
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
