"""Peak tensor memory on any device, the CPU included: the CPU counterpart of `torch.cuda.max_memory_allocated`.

    with MemoryTracker(roots=model.parameters()) as mt:   # bytes of `roots` are the baseline
        train_steps()
    mt.peak                                               # bytes

A `TorchDispatchMode` sees every aten op, forward and backward; each new storage an op returns is counted
from then until it is freed (a weak reference to the storage fires on release). Storages resized in place
(FSDP2 frees and re-allocates unsharded parameters with `UntypedStorage.resize_`) are followed too. So the
number is the bytes of live tensors, like CUDA's "allocated" counter: allocator caching and fragmentation
are not in it, nor scratch buffers that a kernel allocates without making a tensor.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The real storages behind a tensor; a wrapper subclass (DTensor) is looked through to its inner tensors."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        out: list[torch.UntypedStorage] = []
        for name in names:
            inner = getattr(t, name, None)
            if isinstance(inner, torch.Tensor):
                out.extend(_storages(inner))
        return out
    try:
        return [t.untyped_storage()]
    except (RuntimeError, NotImplementedError):
        return []


class MemoryTracker(TorchDispatchMode):
    def __init__(self, roots: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live: dict[int, tuple[int, Any]] = {}  # storage data_ptr -> (bytes, its weak reference)
        self.current = 0
        self.peak = 0
        self._resize: Any = None
        for t in roots:
            for st in _storages(t):
                self._add_storage(st)
        self.baseline = self.current

    def _add_storage(self, st: torch.UntypedStorage) -> None:
        if st.device.type == "meta":
            return
        key, size = st.data_ptr(), st.nbytes()
        if size == 0 or key in self.live:
            return

        def gone(ref: Any, key: int = key) -> None:
            entry = self.live.get(key)
            if entry is not None and entry[1] is ref:  # not a newer storage that reused the address
                del self.live[key]
                self.current -= entry[0]

        self.live[key] = (size, weakref.ref(st, gone))
        self.current += size
        self.peak = max(self.peak, self.current)

    def _forget(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.current -= entry[0]

    def reset_peak(self) -> None:
        self.peak = self.current

    def __enter__(self) -> MemoryTracker:
        original = torch.UntypedStorage.resize_
        tracker = self

        def resize_(st: torch.UntypedStorage, size: int) -> Any:
            tracker._forget(st.data_ptr())
            out = original(st, size)
            tracker._add_storage(st)
            return out

        self._resize = original
        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign,assignment]
        super().__enter__()
        return self

    def __exit__(self, *args: Any) -> None:
        super().__exit__(*args)
        torch.UntypedStorage.resize_ = self._resize  # type: ignore[method-assign]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                for st in _storages(t):
                    self._add_storage(st)
        return out
