"""Dense vs sparse YODA sampling, side by side in one run (what ``yoda-sparse bench`` runs).

    python benchmarks/bench_sparse_sampling.py --model sr3_16_128 --size 256 --steps 20
    python benchmarks/bench_sparse_sampling.py --model srdiff_df2k_x4 --size 256 --sources gaussian disk:0.4

Writes bench.md, bench.json, time_ratio.png and step_time.png under --out; see
yoda_sparse/bench.py for what is measured.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yoda_sparse.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["bench"] + sys.argv[1:]))
