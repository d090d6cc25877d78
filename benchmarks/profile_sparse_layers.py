"""Where a sparse sampling run's time goes, layer by layer, against the same layers run dense.

    python benchmarks/profile_sparse_layers.py [--source gaussian] [--size 256] [--steps 20]

Runs one YODA sampling run of the SR3 16->128 architecture (random weights) on the sparse engine
with its defaults, then the same run (same masks, seed) on the sparse engine with every level
forced dense (``cost_model=0.0``: the engine's own layer program over whole maps), and times
every layer call of both (``StepContext.conv``, attention without its q/k/v convolution).
For each step that ran sparse, a layer's ideal time is its level's work share
(``LevelPlan.work``: the active tiles' columns, probes included) times its dense time; the
report sums, per level and layer kind, the sparse time, that ideal and their difference, and
the time outside the layers (plans, statistics, copies: the step's time minus its layers').

Timings are within one process, one after the other: run nothing else meanwhile.
"""
from __future__ import annotations

import argparse
import collections
import time

import torch


def kind_of(name: str) -> str:
    """The layer's kind from its engine name (down0.1.res.conv1 -> conv1, mid0.attn -> attn)."""
    return name.split(".")[-1]


def main(argv=None) -> int:
    from yoda_sparse.allocator import keep_freed_memory
    from yoda_sparse.bench import BenchConfig, _build, mask_source
    from yoda_sparse.imageio import bicubic_downscale
    from yoda_sparse.sparse import layers as sparse_layers
    from yoda_sparse.sparse import SparseUNet

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sr3_16_128")
    ap.add_argument("--source", default="gaussian")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    cfg = BenchConfig(model=args.model, size=args.size, steps=args.steps)
    diff, _, label = _build(cfg)
    hr, attn = mask_source(args.source, args.size, 1, cfg.lower_bound, diff.scale)
    lr = bicubic_downscale(hr, diff.scale)

    Ctx = sparse_layers.StepContext
    orig_conv, orig_attn, orig_predict = Ctx.conv, Ctx.attention, SparseUNet.predict
    records: list = []  # per run: per step {"layers": {name: (level, seconds)}, "total": s, "plans": [...]}
    depth = [0]

    def timed(fn):
        def wrapper(self, name, *a, **k):
            level = a[2]  # conv(name, module, x, level, ...) and attention(name, module, x, level)
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return fn(self, name, *a, **k)
            finally:
                depth[0] -= 1
                dt = time.perf_counter() - t0
                step = records[-1][-1]
                step["layers"][name] = (level, dt)
                if depth[0] > 0:  # nested (attention's q/k/v convolution): not the caller's own time
                    step["nested"] += dt
        return wrapper

    def predict(self, z, mask, **kw):
        step = {"layers": {}, "nested": 0.0}
        records[-1].append(step)
        t0 = time.perf_counter()
        out = orig_predict(self, z, mask, **kw)
        step["total"] = time.perf_counter() - t0
        step["history"] = self.history[-1]
        step["plans_work"] = getattr(self, "_last_works", None)
        return out

    # the level plans' work shares, recorded as they are made
    orig_plans = SparseUNet._plans

    def plans(self, *a, **k):
        ps = orig_plans(self, *a, **k)
        self._last_works = [(p.dense, p.work) for p in ps]
        return ps

    Ctx.conv = timed(orig_conv)
    Ctx.attention = timed(orig_attn)
    SparseUNet.predict = SparseUNet.__call__ = predict
    SparseUNet._plans = plans
    try:
        # warm-up (extension, oneDNN primitives, cost model), then the two timed runs
        records.append([])
        diff.sample(lr, attn, steps=2, progress=False, engine="sparse")
        runs = {}
        for label_run, options in (("sparse", {}), ("dense", {"cost_model": 0.0})):
            records.append([])
            t0 = time.perf_counter()
            diff.sample(lr, attn, steps=args.steps, generator=torch.Generator().manual_seed(0), progress=False,
                        engine="sparse", engine_options=options)
            runs[label_run] = (time.perf_counter() - t0, records[-1])
    finally:
        Ctx.conv, Ctx.attention = orig_conv, orig_attn
        SparseUNet.predict = SparseUNet.__call__ = orig_predict
        SparseUNet._plans = orig_plans

    (ts, sparse), (td, dense) = runs["sparse"], runs["dense"]
    print(f"# {label}, {args.size}x{args.size}, {args.source}, {args.steps} steps, {args.threads} threads")
    print(f"\nrun: sparse {ts:.2f} s, all-dense engine {td:.2f} s, ratio {ts / td:.3f}\n")
    print("| step | work per level | sparse s | dense s | ratio | outside layers s (sparse / dense) |")
    print("|---|---|---|---|---|---|")
    excess = collections.defaultdict(lambda: [0.0, 0.0])  # (level, kind) -> [sparse s, ideal s]
    for i, (s, d) in enumerate(zip(sparse, dense)):
        works = s.get("plans_work")
        out_s = s["total"] - sum(v[1] for v in s["layers"].values()) + s["nested"]
        out_d = d["total"] - sum(v[1] for v in d["layers"].values()) + d["nested"]
        wtxt = "model" if works is None or s["history"]["model"] else \
            " ".join("D" if dn else f"{w:.2f}" for dn, w in works)
        print(f"| {i} | {wtxt} | {s['total']:.3f} | {d['total']:.3f} | {s['total'] / d['total']:.2f} | "
              f"{out_s:.3f} / {out_d:.3f} |")
        if works is None or s["history"]["model"]:
            continue
        for name, (level, sec) in s["layers"].items():
            if name not in d["layers"]:
                continue
            dn, w = works[level]
            if dn:
                continue
            dsec = d["layers"][name][1]
            key = (level, kind_of(name))
            excess[key][0] += sec
            excess[key][1] += w * dsec
    print("\n| level | layer kind | sparse s | work x dense s | excess s | sparse / ideal |")
    print("|---|---|---|---|---|---|")
    tot = [0.0, 0.0]
    for (level, kind), (sec, ideal) in sorted(excess.items()):
        tot[0] += sec
        tot[1] += ideal
        print(f"| {level} | {kind} | {sec:.3f} | {ideal:.3f} | {sec - ideal:+.3f} | {sec / max(ideal, 1e-9):.2f} |")
    print(f"| all | | {tot[0]:.3f} | {tot[1]:.3f} | {tot[0] - tot[1]:+.3f} | {tot[0] / max(tot[1], 1e-9):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
