"""A MoCo-style queue of negative keys."""

from __future__ import annotations

import torch


class NegativeQueue(torch.nn.Module):
    """A first-in-first-out queue of ``size`` keys of dimension ``dim``, to use as the negatives of
    :func:`contrastbound.info_nce` (a shared bank).

    The queue is a buffer: ``module.to(device)`` moves it, ``state_dict`` saves it, and it never requires grad.

    Example::

        queue = NegativeQueue(65536, 128)
        for x, x_pos in loader:
            q = encoder(x)
            with torch.no_grad():
                k = momentum_encoder(x_pos)
            loss = info_nce(q, k, queue.negatives() if len(queue) else None)  # before enqueueing k
            loss.backward(); opt.step()
            queue.enqueue(k)

    Pitfalls: enqueue the keys of a batch *after* computing its loss; otherwise each anchor's own key (its
    positive) is also among its negatives. Keys must be detached (the queue detaches them anyway) and, as in MoCo,
    come from a slowly moving (momentum) encoder so that old keys stay comparable with new queries.

    The write position and fill level are kept as Python ints beside their buffers (which ``state_dict`` saves),
    so ``enqueue``, ``negatives`` and ``len`` never read a device tensor back: no synchronisation with a GPU.
    Under ``torch.compile`` ``enqueue``, ``negatives`` and ``len`` run eagerly (a graph break each) instead of
    being traced with those ints as constants, which would recompile the step at every new write position.
    """

    queue: torch.Tensor
    ptr: torch.Tensor
    filled: torch.Tensor

    def __init__(self, size: int, dim: int, *, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        self.size, self.dim = size, dim
        self.register_buffer("queue", torch.zeros(size, dim, dtype=dtype, device=device))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long, device=device))
        self._ptr = 0  # host copies of the two buffers
        self._filled = 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ptr, self._filled = int(self.ptr), int(self.filled)  # one read-back, at load time

    @torch.compiler.disable  # likewise (an int attribute of a module is a constant to torch.compile)
    def __len__(self) -> int:
        return self._filled

    @torch.compiler.disable  # host-int bookkeeping: traced, each new position would be a recompilation
    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Appends keys (n, dim), overwriting the oldest once full; keeps only the last ``size`` if n > size."""
        if not isinstance(keys, torch.Tensor) or keys.dim() != 2 or keys.shape[1] != self.dim:
            shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ValueError(f"keys must have shape (n, dim) with dim = {self.dim}, got {shape}")
        if not keys.is_floating_point():
            raise TypeError(f"keys must be a floating tensor, got dtype {keys.dtype}")
        keys = keys.detach().to(device=self.queue.device, dtype=self.queue.dtype)
        n = keys.shape[0]
        if n == 0:
            return
        if n >= self.size:
            keys, n = keys[-self.size :], self.size
        start = self._ptr
        first = min(n, self.size - start)
        self.queue[start : start + first] = keys[:first]
        if first < n:
            self.queue[: n - first] = keys[first:]
        self._ptr = (start + n) % self.size
        self._filled = min(self.size, self._filled + n)
        self.ptr.fill_(self._ptr)
        self.filled.fill_(self._filled)

    @torch.compiler.disable  # likewise (the fill level decides the view's length)
    def negatives(self) -> torch.Tensor:
        """The keys in the queue, (len(self), dim): a view, no copy. Order does not matter to InfoNCE."""
        return self.queue if self._filled == self.size else self.queue[: self._filled]

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, dtype={self.queue.dtype}, filled={self._filled}"
