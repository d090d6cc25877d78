"""Backend registry: each public op has a reference implementation plus any number of
registered backends; a call goes to the best one that can serve its inputs.

Order of preference (by ``priority``, highest first): CUDA extension, Triton, C++ CPU,
reference.  ``YODA_SPARSE_BACKEND`` forces a backend, either for every op
(``YODA_SPARSE_BACKEND=cpp``) or per op (``YODA_SPARSE_BACKEND=yoda_step=triton,masked_l1_loss=reference``).
When no backend can serve the inputs, the error lists every backend's reason.

Selections are cached for ops with a registered *signature* (:func:`register_signature`: a
cheap function of the arguments, e.g. device, dtypes and options) when every backend consulted
is ``cacheable``, i.e. its checks depend only on that signature and on the environment
variables it names in ``env``.  The cache key holds the current values of those variables (and
of ``YODA_SPARSE_BACKEND``), so changing them takes effect at the next call, as without the
cache.  A hit costs about 1-2 us instead of 3-8 us for walking the backends' checks, which
matters for small tensors on the CPU.
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
    # True when ``unsupported``, ``forced_only`` and ``available`` depend only on the op's
    # signature and on the environment variables named in ``env``: selections may be cached.
    cacheable: bool = False
    env: tuple[str, ...] = ()
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
_SIGNATURES: dict[str, Callable] = {}
_CACHE: dict[tuple, Backend] = {}
_ENV_NAMES: dict[tuple, tuple[str, ...]] = {}  # (op, forced backend) -> variables in the cache key
_CACHE_LIMIT = 1024  # distinct (op, forced backend, environment, signature) keys before a reset


def register_backend(op: str, name: str, fn: Callable, *, priority: int, unsupported=None, available=None,
                     forced_only=None, cacheable: bool = False, env: tuple[str, ...] = ()) -> Backend:
    """Register (or replace) backend ``name`` of ``op``.

    ``cacheable``: the backend's checks depend only on the op's signature and on the
    environment variables named in ``env`` (see :func:`register_signature`).
    """
    b = Backend(op, name, fn, priority, cacheable=cacheable, env=tuple(env))
    if unsupported is not None:
        b.unsupported = unsupported
    if available is not None:
        b.available = available
    if forced_only is not None:
        b.forced_only = forced_only
    _REGISTRY.setdefault(op, {})[name] = b
    _CACHE.clear()
    _ENV_NAMES.clear()
    return b


def register_signature(op: str, fn: Callable) -> None:
    """``fn(*args, **kwargs)`` -> a hashable summary of the arguments of ``op`` that holds
    everything the checks of its cacheable backends look at, or None for "do not cache this
    call": enables the selection cache."""
    _SIGNATURES[op] = fn
    _CACHE.clear()


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
    signature = _SIGNATURES.get(op)
    summary = None if signature is None else signature(*args, **kwargs)
    if summary is None:
        return _select(op, args, kwargs, backend, forced)[0]
    names = _ENV_NAMES.get((op, forced))
    if names is None:
        # the environment variables that the consulted backends read: the forced one's, or all
        ops = _REGISTRY.get(op, {})
        consulted = [ops[forced]] if forced in ops else ops.values()
        names = _ENV_NAMES[(op, forced)] = tuple(name for b in consulted for name in b.env)
    key = (op, forced, summary, *map(os.environ.get, names))
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    chosen, cacheable = _select(op, args, kwargs, backend, forced)
    if cacheable:
        if len(_CACHE) >= _CACHE_LIMIT:
            _CACHE.clear()
        _CACHE[key] = chosen
    return chosen


def _select(op: str, args, kwargs, backend: str | None, forced: str | None) -> tuple[Backend, bool]:
    """(the backend, whether the decision may be cached: every backend consulted is cacheable)."""
    candidates = backends(op)
    if forced is not None:
        by_name = {b.name: b for b in candidates}
        if forced not in by_name:
            raise NoBackendError(f"{op}: backend {forced!r} (from {'backend=' if backend else ENV_VAR}) is not one of {sorted(by_name)}")
        reason = by_name[forced].why_not(*args, **kwargs)
        if reason is not None:
            raise NoBackendError(f"{op}: forced backend {forced!r} cannot serve these inputs: {reason}")
        return by_name[forced], by_name[forced].cacheable
    reasons = []
    cacheable = True
    for b in candidates:
        cacheable = cacheable and b.cacheable
        reason = b.why_not(*args, **kwargs) or b.forced_only(*args, **kwargs)
        if reason is None:
            return b, cacheable
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
