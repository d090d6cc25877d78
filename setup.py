"""Packaging: the `yoda_sparse` package plus the top-level `kernels/` folder installed as
`yoda_sparse.kernels` (Triton kernels), and the C++/CUDA extension built from `csrc/`."""
from setuptools import find_packages, setup

packages = find_packages(include=["yoda_sparse", "yoda_sparse.*"]) + ["yoda_sparse.kernels"]

setup(
    packages=packages,
    package_dir={"yoda_sparse.kernels": "kernels"},
    package_data={"yoda_sparse": ["data/*", "checkpoints/*"]},
    include_package_data=True,
)
