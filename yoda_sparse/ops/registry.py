"""Backend registry: each public op has a reference implementation plus any number of
registered backends; a call goes to the best one that can serve its inputs.

Order of preference (by ``priority``, highest first): CUDA extension, Triton, C++ CPU,
reference.  ``YODA_SPARSE_BACKEND`` forces a backend, either for every op
(``YODA_SPARSE_BACKEND=cpp``) or per op (``YODA_SPARSE_BACKEND=yoda_step=triton,masked_l1_loss=reference``).
When no backend can serve the inputs, the error lists every backend's reason.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

ENV_VAR = "YODA_SPARSE_BACKEND"


@dataclass
class Backend:
    """One implementation of one op.

    ``fn`` takes the op's validated arguments; ``unsupported`` returns None when the
    backend can serve them, else a short human-readable reason.  ``available`` is a
    zero-argument check (import/compile) whose reason is cached.
    """

    op: str
    name: str
    fn: Callable
    priority: int
    unsupported: Callable[..., str | None] = lambda *a, **k: None
    available: Callable[[], str | None] = lambda: None
    # Inputs the backend serves only when forced (e.g. Triton's CPU interpreter, a testing
    # tool): a reason here keeps automatic dispatch away without forbidding a forced call.
    forced_only: Callable[..., str | None] = lambda *a, **k: None
    _availability: list = field(default_factory=list, repr=False)

    def availability(self) -> str | None:
        """None when usable at all (checked once and cached), else the reason."""
        if not self._availability:
            return _availability_of(self.op, self.name)
        return self._availability[0]

    def _check_availability(self) -> str | None:
        if not self._availability:
            try:
                self._availability.append(self.available())
            except Exception as exc:  # an unavailable backend must not break dispatch
                self._availability.append(f"unavailable: {type(exc).__name__}: {exc}")
        return self._availability[0]

    def why_not(self, *args, **kwargs) -> str | None:
        reason = self.availability()
        return reason if reason is not None else self.unsupported(*args, **kwargs)


@torch.compiler.assume_constant_result
def _availability_of(op: str, name: str) -> str | None:
    # The first check may load (or build) the extension behind a lock, which torch.compile
    # cannot trace: when the first call of an op is inside a compiled function, dynamo runs
    # this eagerly and bakes the (constant) answer into the graph.
    return _REGISTRY[op][name]._check_availability()


class NoBackendError(RuntimeError):
    pass


_REGISTRY: dict[str, dict[str, Backend]] = {}


def register_backend(op: str, name: str, fn: Callable, *, priority: int, unsupported=None, available=None,
                     forced_only=None) -> Backend:
    """Register (or replace) backend ``name`` of ``op``."""
    b = Backend(op, name, fn, priority)
    if unsupported is not None:
        b.unsupported = unsupported
    if available is not None:
        b.available = available
    if forced_only is not None:
        b.forced_only = forced_only
    _REGISTRY.setdefault(op, {})[name] = b
    return b


def backends(op: str) -> list[Backend]:
    """The backends of ``op``, best first."""
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; known: {sorted(_REGISTRY)}")
    return sorted(_REGISTRY[op].values(), key=lambda b: -b.priority)


def forced_backend(op: str) -> str | None:
    """The backend named for ``op`` by the environment variable, if any."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    if "=" not in value:
        return value
    for part in value.split(","):
        key, _, name = part.partition("=")
        if key.strip() == op:
            return name.strip()
    return None


def select(op: str, *args, backend: str | None = None, **kwargs) -> Backend:
    """The backend that will run ``op`` on these arguments (``backend`` or the env var forces one)."""
    forced = backend or forced_backend(op)
    candidates = backends(op)
    if forced is not None:
        by_name = {b.name: b for b in candidates}
        if forced not in by_name:
            raise NoBackendError(f"{op}: backend {forced!r} (from {'backend=' if backend else ENV_VAR}) is not one of {sorted(by_name)}")
        reason = by_name[forced].why_not(*args, **kwargs)
        if reason is not None:
            raise NoBackendError(f"{op}: forced backend {forced!r} cannot serve these inputs: {reason}")
        return by_name[forced]
    reasons = []
    for b in candidates:
        reason = b.why_not(*args, **kwargs) or b.forced_only(*args, **kwargs)
        if reason is None:
            return b
        reasons.append(f"  {b.name}: {reason}")
    raise NoBackendError(f"{op}: no backend can serve these inputs:\n" + "\n".join(reasons))


def dispatch(op: str, *args, backend: str | None = None, **kwargs):
    return select(op, *args, backend=backend, **kwargs).fn(*args, **kwargs)


def describe() -> dict[str, list[tuple[str, str]]]:
    """For each op, (backend, "available" or its reason) best first: for ``yoda-sparse info``."""
    out = {}
    for op in sorted(_REGISTRY):
        out[op] = [(b.name, b.availability() or "available") for b in backends(op)]
    return out
