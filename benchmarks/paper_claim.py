"""The paper's central claim at small scale: the same small SR3 trained with and without YODA
(batch size 4, same steps, same data, same seed), evaluated on held-out images.

    python benchmarks/paper_claim.py --steps 2000 --work runs/claim

Records PSNR, SSIM and colour shift (mean absolute per-channel mean error: the paper reports
that YODA mitigates SR3's colour shift at small batch sizes) in benchmarks/RESULTS.md,
whatever the outcome.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_ops import cpu_model  # noqa: E402
from train_demo_checkpoints import ATTENTION, HELD_OUT, ROOT, write_held_out, write_training_images  # noqa: E402

MODEL = "sr3_tiny"
BEGIN, END = "<!-- paper-claim:begin -->", "<!-- paper-claim:end -->"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--eval-steps", type=int, default=100)
    ap.add_argument("--work", default="runs/claim")
    args = ap.parse_args()

    work = (ROOT / args.work).resolve()
    names = write_training_images(work / "train")
    write_held_out(work / "held_out")
    cli = [sys.executable, "-m", "yoda_sparse.cli"]
    summary = {}
    for label, attention in (("dense", "none"), ("yoda", ATTENTION)):
        run_dir = work / label
        t0 = time.time()
        subprocess.run(cli + ["train", str(work / "train"), "--out", str(run_dir), "--model", MODEL, "--steps", str(args.steps),
                              "--batch-size", "4", "--crop", str(args.crop), "--attention", attention, "--lower-bound", "0.2",
                              "--lr", str(args.lr), "--lr-warmup", "100", "--ema-decay", "0.995", "--log-every", "100",
                              "--checkpoint-every", "500", "--seed", "0", "--resume"], check=True, cwd=ROOT)
        minutes = (time.time() - t0) / 60
        eval_dir = work / f"eval_{label}"
        # Each model is sampled the way it was trained: dense for dense, YODA for YODA.
        extra = ["--dense"] if label == "dense" else []
        subprocess.run(cli + ["eval", str(work / "held_out"), "--checkpoint", str(run_dir / "checkpoint-latest.safetensors"),
                              "--out", str(eval_dir), "--steps", str(args.eval_steps), "--crop", "128", "--ratio-methods", ""] + extra,
                       check=True, cwd=ROOT)
        res = json.loads((eval_dir / "results.json").read_text())
        run = "dense" if label == "dense" else "yoda"
        summary[label] = dict(res["summary"][run], minutes=minutes)
        summary["bicubic"] = res["summary"]["bicubic"]

    lines = [BEGIN, "## The paper's claim at small scale: SR3 with and without YODA", "",
             f"`python benchmarks/paper_claim.py --steps {args.steps}`: `{MODEL}` trained twice on the same "
             f"{len(names)} bundled images (batch 4, {args.steps} steps, crop {args.crop}, lr {args.lr}, seed 0), once dense "
             f"(eq. 8) and once with YODA (eq. 10, `{ATTENTION}` attention, l = 0.2); evaluated on held-out "
             f"{', '.join(HELD_OUT)} (centre 128x128, x4, {args.eval_steps} respaced steps; PSNR/SSIM on Y with a 4-pixel border crop; "
             "colour shift = mean over images of the mean |per-channel mean error| in [0,1] units). CPU: " + cpu_model() + ".", "",
             "| model | PSNR | SSIM | colour shift | update ratio | training time |", "|---|---|---|---|---|---|"]
    for label in ("bicubic", "dense", "yoda"):
        s = summary[label]
        ratio = f"{100 * s['update_ratio']:.1f}%" if s.get("update_ratio") is not None else "-"
        minutes = f"{s['minutes']:.1f} min" if "minutes" in s else "-"
        lines.append(f"| {label} | {s['psnr']:.2f} | {s['ssim']:.4f} | {s['colour_shift']:.4f} | {ratio} | {minutes} |")
    d, y = summary["dense"], summary["yoda"]
    lines += ["", f"Outcome: YODA {'>' if y['psnr'] > d['psnr'] else '<='} dense in PSNR ({y['psnr'] - d['psnr']:+.2f} dB), "
              f"SSIM {y['ssim'] - d['ssim']:+.4f}, colour shift {y['colour_shift'] - d['colour_shift']:+.4f}. "
              "Two tiny models, two held-out images and one seed: a small-scale check, not a replication.", END]
    results = ROOT / "benchmarks" / "RESULTS.md"
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + "\n".join(lines) + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(lines) + "\n"
    results.write_text(text)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
