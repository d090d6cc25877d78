"""Train the two bundled demo checkpoints (SR3+YODA and SRDiff+YODA) on CPU and export them.

    python benchmarks/train_demo_checkpoints.py --steps 3000 --work runs/demo

1. writes the training images that ship inside installed packages (scikit-image's data,
   matplotlib's sample data) to WORK/train as PNG, holding out HELD_OUT;
2. runs ``yoda-sparse train`` for each family (the exact commands are printed and written to
   benchmarks/DEMO_CHECKPOINTS.md with a summary of each log);
3. exports the EMA weights (what one samples with) to yoda_sparse/checkpoints/*.safetensors,
   at most 10 MB each;
4. evaluates both, and bicubic, on the held-out images (PSNR/SSIM, Y channel, border crop) and
   names the better checkpoint in yoda_sparse/checkpoints/demo-best.txt.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = ("coffee", "chelsea")
# Attention for YODA here: no DINO weights can be downloaded on the machines this runs on, so
# the demo checkpoints use the paper's edge-based segmentation baseline.
ATTENTION = "edge"
MODELS = {"sr3": "sr3_tiny", "srdiff": "srdiff_tiny"}


def write_training_images(folder: Path) -> list[str]:
    from yoda_sparse.imageio import bundled_images, save_image

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for name, load in sorted(bundled_images().items()):
        if name in HELD_OUT:
            continue
        save_image(load(), folder / f"{name}.png")
        names.append(name)
    return names


def write_held_out(folder: Path) -> None:
    from yoda_sparse.imageio import bundled_images, save_image

    folder.mkdir(parents=True, exist_ok=True)
    for name in HELD_OUT:
        save_image(bundled_images()[name](), folder / f"{name}.png")


def export(run_dir: Path, dst: Path) -> None:
    """Keep only the EMA weights, stored as the model's weights."""
    from yoda_sparse.models.checkpoint import load_checkpoint, save_checkpoint

    model, config, extra = load_checkpoint(run_dir / "checkpoint-latest.safetensors", use_ema=True)
    extra = dict(extra or {})
    extra["exported_from"] = "EMA weights of " + str(run_dir.name)
    save_checkpoint(dst, model, config, extra=extra)
    size = dst.stat().st_size
    if size > 10 * 2**20:
        raise SystemExit(f"{dst} is {size / 2**20:.1f} MB, over the 10 MB limit for bundled checkpoints")


def log_summary(run_dir: Path) -> str:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return "no log rows"
    k = max(1, len(rows) // 8)
    picked = rows[::k] + ([rows[-1]] if rows[-1] is not rows[::k][-1] else [])
    return "\n".join(f"| {r['step']} | {r['loss']:.4f} |" for r in picked)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--eval-steps", type=int, default=100, help="respaced sampling steps for the held-out evaluation")
    ap.add_argument("--work", default="runs/demo")
    ap.add_argument("--only", choices=sorted(MODELS), help="train one family only")
    args = ap.parse_args()

    work = (ROOT / args.work).resolve()
    names = write_training_images(work / "train")
    write_held_out(work / "held_out")
    print(f"training images ({len(names)}): {', '.join(names)}; held out: {', '.join(HELD_OUT)}")
    out_dir = ROOT / "yoda_sparse" / "checkpoints"
    out_dir.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "yoda_sparse.cli"]
    report = ["# Demo checkpoints", "", f"Trained on CPU by `benchmarks/train_demo_checkpoints.py --steps {args.steps}` "
              f"on {len(names)} images that ship inside scikit-image and matplotlib ({', '.join(names)}); "
              f"held out: {', '.join(HELD_OUT)}. YODA attention: `{ATTENTION}` (no DINO weights are reachable here).", ""]
    results = {}
    for family, model in MODELS.items():
        if args.only and family != args.only:
            continue
        run_dir = work / family
        cmd = cli + ["train", str(work / "train"), "--out", str(run_dir), "--model", model, "--steps", str(args.steps),
                     "--batch-size", str(args.batch_size), "--crop", str(args.crop), "--attention", ATTENTION,
                     "--lower-bound", "0.2", "--lr", str(args.lr), "--lr-warmup", "100", "--ema-decay", "0.995",
                     "--log-every", "50", "--checkpoint-every", "500", "--seed", "0", "--resume"]
        shown = " ".join(shlex.quote(c) for c in ["yoda-sparse"] + cmd[3:]).replace(str(ROOT) + "/", "")
        print("$", shown, flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True, cwd=ROOT)
        minutes = (time.time() - t0) / 60
        dst = out_dir / f"{family}_yoda_demo.safetensors"
        export(run_dir, dst)
        eval_dir = work / f"eval_{family}"
        subprocess.run(cli + ["eval", str(work / "held_out"), "--checkpoint", str(dst), "--out", str(eval_dir),
                              "--steps", str(args.eval_steps), "--dense", "--crop", "128", "--ratio-methods", ""],
                       check=True, cwd=ROOT)
        res = json.loads((eval_dir / "results.json").read_text())
        results[family] = res["summary"]
        report += [f"## {family}: `{model}` -> `yoda_sparse/checkpoints/{dst.name}` ({dst.stat().st_size / 2**20:.1f} MB)", "",
                   "```", shown, "```", "", f"Wall time: {minutes:.1f} min on this 2-core CPU.", "",
                   "| step | loss (eq. 10, 'all' normalisation) |", "|---|---|", log_summary(run_dir), "",
                   f"Held-out ({', '.join(HELD_OUT)}, centre 128x128 crops, x4, {args.eval_steps} respaced steps):", "",
                   "| | PSNR (Y) | SSIM (Y) | update ratio |", "|---|---|---|---|"]
        for run in ("bicubic", "dense", "yoda"):
            s = res["summary"][run]
            ratio = f"{100 * s['update_ratio']:.1f}%" if s.get("update_ratio") is not None else "-"
            report.append(f"| {run} | {s['psnr']:.2f} | {s['ssim']:.4f} | {ratio} |")
        report.append("")
    if results:
        best = max(results, key=lambda f: results[f]["yoda"]["psnr"])
        (out_dir / "demo-best.txt").write_text(f"{best}_yoda_demo.safetensors\n")
        report.append(f"Better on held-out PSNR (YODA sampling): **{best}**, used by `bash run.sh`.")
        (ROOT / "benchmarks" / "DEMO_CHECKPOINTS.md").write_text("\n".join(report) + "\n")
        print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
