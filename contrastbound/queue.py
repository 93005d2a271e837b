"""A MoCo-style queue of negative keys."""

from __future__ import annotations

import torch

from .functional import _check_int

# the key dtypes the queue takes (and its constructor's dtype argument)
_KEY_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


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

    Pitfalls: enqueue the keys of a batch *after* its backward (as above); enqueued before its loss, each anchor's
    own key (its positive) is also among its negatives, and enqueued between loss and backward, the in-place write
    into the bank the loss saved makes backward raise. Keys must be detached (the queue detaches them anyway) and, as in MoCo,
    come from a slowly moving (momentum) encoder so that old keys stay comparable with new queries.

    The write position and fill level are kept as Python ints beside their buffers (which ``state_dict`` saves),
    so ``enqueue``, ``negatives`` and ``len`` do not read a device tensor back: no synchronisation with a GPU. The
    ints are re-read (once) when a write went through the buffers' version counters: ``load_state_dict``,
    ``module.to``, in-place ops such as ``q.ptr.fill_(n); q.filled.fill_(n)``, DDP's broadcast of rank 0's buffers
    when it wraps the model; a pair that enqueue cannot reach (until the queue is full the write position equals
    the fill level) raises ValueError, a state_dict with one is refused whole, and :meth:`clear` empties the queue. Writes that bypass them are not seen (a collective such as ``dist.broadcast`` or DDP's
    per-step ``broadcast_buffers``, ``.data``, a numpy view, in-place writes to buffers made under
    ``torch.inference_mode``; ``load_state_dict`` is seen there too): after
    such a write call :meth:`resync`, or keep every rank's queue identical (gather the keys of all ranks before
    enqueueing, as MoCo does), so that no write changes the ints.
    A float16 queue holds magnitudes up to 65504, a float32 or bfloat16 one up to ~3.4e38: keys of a dtype with a
    wider range (float16: any other; float32 / bfloat16: float64) are checked (one read-back per enqueue, a
    synchronisation on a GPU; keys in the queue's dtype, or float32 keys for a bfloat16 queue, whose ranges differ
    by 0.4 %, are stored as given) and a finite key that would become inf raises ValueError; so does a cast of the
    queue to a narrower dtype (``.half()``, ``.to(torch.float16)``) over keys it cannot hold, leaving the queue as is.
    With ``labels=True`` the queue keeps each key's integer label beside it (a buffer ``queue_labels``, int64):
    ``enqueue(keys, labels)`` takes them, :meth:`labels` serves them in the order of :meth:`negatives`, for
    :func:`contrastbound.supcon_loss`'s ``bank`` and ``bank_labels`` (SupCon over a memory bank)::

        queue = NegativeQueue(65536, 128, labels=True)
        loss = supcon_loss(z, y, bank=queue.negatives(), bank_labels=queue.labels())
        loss.backward(); opt.step()
        queue.enqueue(k, y)  # keys from the momentum encoder, and their labels

    Not thread-safe: ``enqueue`` updates the buffers and the ints in steps, so one thread at a time may use a
    queue (as one training loop does); the losses themselves may be called from several threads at once.

    Under ``torch.compile`` ``enqueue``, ``negatives``, ``labels`` and ``len`` run eagerly (a graph break each)
    instead of being traced with those ints as constants, which would recompile the step at every new write
    position.
    """

    queue: torch.Tensor
    ptr: torch.Tensor
    filled: torch.Tensor
    with_labels = False  # (a class default: a queue pickled before labels existed has none)

    def __init__(self, size: int, dim: int, *, dtype: torch.dtype = torch.float32, device=None,
                 labels: bool = False) -> None:
        super().__init__()
        # (no upper bound here: size x dim is checked against what one tensor can address below)
        size, dim = (_check_int(name, v, 1, "a positive int", below=None) for name, v in (("size", size), ("dim", dim)))
        if dtype not in _KEY_DTYPES:  # the dtypes info_nce takes
            raise TypeError(f"dtype must be torch.float32, float64, float16 or bfloat16, got {dtype!r}")
        if not isinstance(labels, bool):
            raise TypeError(f"labels must be a bool (whether the queue keeps a label per key), got {labels!r}")
        device = _usable_device(device)
        itemsize = torch.finfo(dtype).bits // 8
        if size * dim * itemsize >= 2**63:  # (torch.zeros: "Storage size calculation overflowed")
            raise ValueError(f"size x dim = {size} x {dim} keys of {dtype} take {size * dim * itemsize} bytes, past "
                             "what one tensor can address (2^63)")
        self.size, self.dim = size, dim
        self.with_labels = labels
        self.register_buffer("queue", torch.zeros(size, dim, dtype=dtype, device=device))
        if labels:
            self.register_buffer("queue_labels", torch.zeros(size, dtype=torch.int64, device=device))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long, device=device))
        self._ptr = 0  # host copies of the two buffers
        self._filled = 0
        self._seen = self._stamp()

    def _stamp(self) -> tuple[int, ...]:
        """Which tensors the buffers are and how often they were written in place (no device read). Inference
        tensors have no version counter: only their identity."""
        if self.ptr.is_inference() or self.filled.is_inference():
            return (self.ptr.data_ptr(), self.filled.data_ptr())
        return (self.ptr.data_ptr(), self.ptr._version, self.filled.data_ptr(), self.filled._version)

    @torch.compiler.disable
    def resync(self) -> None:
        """Re-reads the write position and fill level from the buffers (one read-back), after a write that
        bypassed their version counters (see the class docstring)."""
        self._seen = None
        self._host()

    def _host(self) -> tuple[int, int]:
        """The write position and fill level; read back from the buffers only if something else wrote them."""
        if self._stamp() != self._seen:
            ptr, filled = int(self.ptr), int(self.filled)
            problem = _bad_state(ptr, filled, self.size)
            if problem:
                raise ValueError(f"the queue's buffers hold ptr = {ptr}, filled = {filled}: {problem} (clear() "
                                 "empties the queue)")
            self._ptr, self._filled = ptr, filled
            self._seen = self._stamp()
        return self._ptr, self._filled

    @torch.compiler.disable
    def clear(self) -> None:
        """Empties the queue (write position and fill level 0; the stored keys stay but are no longer served)."""
        self.ptr.fill_(0)
        self.filled.fill_(0)
        self._ptr = self._filled = 0
        self._seen = self._stamp()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # All or nothing: torch copies the buffers that fit before it reports one that does not, which would leave
        # a queue whose fill level counts keys that were never loaded.
        names = ("queue", "ptr", "filled") + (("queue_labels",) if self.with_labels else ())
        keys = {name: state_dict.get(prefix + name) for name in names}
        problem = None
        missing = [name for name, v in keys.items() if v is None]
        if missing and len(missing) < len(keys):
            # Keys without their fill level (or a level without its keys, or keys without their labels) would
            # serve rows never loaded.
            problem = f"{', '.join(names)} are loaded together, but {', '.join(missing)} missing"
        elif not_tensor := [name for name, v in keys.items() if v is not None and not isinstance(v, torch.Tensor)]:
            # (torch's own copy raised AttributeError on .shape / .numel)
            problem = "; ".join(f"{name} must be a tensor, got {type(keys[name]).__name__}" for name in not_tensor)
        elif keys["queue"] is not None and keys["queue"].dtype not in _KEY_DTYPES:
            # (the copy into the real buffer dropped a complex tensor's imaginary part, with a warning only; an
            # integer one, assigned with load_state_dict(assign=True), made the next enqueue fail in torch.finfo:
            # a misuse audit)
            problem = (f"queue must be a tensor of keys in float32, float64, float16 or bfloat16, got "
                       f"{keys['queue'].dtype}")
        elif keys["queue"] is not None and tuple(keys["queue"].shape) != (self.size, self.dim):
            problem = f"queue has shape {tuple(keys['queue'].shape)}, this queue {(self.size, self.dim)}"
        elif keys.get("queue_labels") is not None and (tuple(keys["queue_labels"].shape) != (self.size,) or
                                                       keys["queue_labels"].is_floating_point() or
                                                       keys["queue_labels"].is_complex() or
                                                       keys["queue_labels"].dtype == torch.bool):
            problem = (f"queue_labels must be an integer tensor of shape ({self.size},), got "
                       f"{keys['queue_labels'].dtype} of shape {tuple(keys['queue_labels'].shape)}")
        elif keys["queue"] is not None and (over := self._beyond_range(keys["queue"], _served(keys["filled"]))):
            problem = over
        elif keys["ptr"] is not None and keys["filled"] is not None:
            faults = {_level_fault(keys["ptr"]), _level_fault(keys["filled"])} - {None}
            if "count" in faults:
                problem = (f"ptr and filled must hold one value each, of shape () or (1,), got shapes "
                           f"{tuple(keys['ptr'].shape)} and {tuple(keys['filled'].shape)}")
            elif "dtype" in faults:
                problem = f"ptr and filled must be integer tensors, got {keys['ptr'].dtype} and {keys['filled'].dtype}"
            elif "meta" in faults:
                problem = ("ptr and filled must hold values, got meta tensors: the queue reads its write position and "
                           "fill level")
            else:
                ptr, filled = int(keys["ptr"]), int(keys["filled"])
                bad = _bad_state(ptr, filled, self.size)
                problem = f"ptr = {ptr}, filled = {filled}: {bad}" if bad else None
        if problem:
            error_msgs.append(f"NegativeQueue ({prefix or 'top level'}): {problem}; nothing was loaded")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # Re-read the host copies at the next use: the load copies into the buffers in place, which inference
        # tensors (a queue made under torch.inference_mode) do not count, so the stamp missed it, and the next
        # enqueue overwrote the loaded keys from the old position (an audit).
        self._seen = None

    def _beyond_range(self, stored: torch.Tensor, served: int | None = None) -> str | None:
        """What is wrong with loading `stored` as the keys: finite values among the first `served` rows (those the
        state serves; None: all) that this queue's dtype would store as inf (a float64 state into a float32 queue,
        as enqueue refuses), else None. Any wider dtype is checked here, float32 into bfloat16 too (a load is rare;
        enqueue skips that pair, whose ranges differ by 0.4 %, to spare a read-back every step). Rows a clear()
        left behind are not served, so they may become inf: enqueue overwrites them before they are."""
        if not isinstance(stored, torch.Tensor) or not stored.is_floating_point() or stored.device.type == "meta":
            return None
        if torch.finfo(self.queue.dtype).max >= torch.finfo(stored.dtype).max:
            return None
        if served is not None:
            stored = stored[:served]
        cast = stored.detach().to(self.queue.dtype)
        over = torch.isinf(cast) & torch.isfinite(stored.detach())
        if not bool(over.any()):
            return None
        name = str(self.queue.dtype).replace("torch.", "")
        return f"queue holds finite values beyond {name}'s range, which this {name} queue would store as inf"

    def _apply(self, fn, recurse=True):
        # A cast to a narrower dtype (.half(), .to(torch.float16), .float() of a float64 queue) is checked as enqueue
        # and load_state_dict are: finite keys that torch's cast would store as inf raise ValueError, the buffers
        # left as they were (one read-back, only where the cast produced an inf). Only the served rows count: keys
        # that clear() left behind are overwritten before they are served.
        before = dict(self._buffers)
        out = super()._apply(fn, recurse)
        old, new = before["queue"], self.queue
        if new is not old and new.dtype != old.dtype and "meta" not in (old.device.type, new.device.type) and \
                torch.finfo(new.dtype).max < torch.finfo(old.dtype).max and bool(torch.isinf(new).any()):
            served = int(self.filled)
            if bool((torch.isinf(new.to(old.device)[:served]) & torch.isfinite(old[:served])).any()):
                self._buffers.update(before)
                name = str(new.dtype).replace("torch.", "")
                raise ValueError(f"the queue holds finite keys beyond {name}'s range, which a cast to {name} would "
                                 f"store as inf (the loss over them NaN); the queue was left in {old.dtype}")
        return out

    @torch.compiler.disable  # likewise (an int attribute of a module is a constant to torch.compile)
    def __len__(self) -> int:
        return self._host()[1]

    @torch.compiler.disable  # host-int bookkeeping: traced, each new position would be a recompilation
    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Appends keys (n, dim), overwriting the oldest once full; keeps only the last ``size`` if n > size.
        A queue built with ``labels=True`` takes the keys' integer labels (n,) too (and only such a queue)."""
        from .functional import _check_dense

        if isinstance(keys, torch.Tensor):
            _check_dense("keys", keys)  # first: a nested tensor has no shape to print
        if not isinstance(keys, torch.Tensor) or keys.dim() != 2 or keys.shape[1] != self.dim:
            shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ValueError(f"keys must have shape (n, dim) with dim = {self.dim}, got {shape}")
        if not keys.is_floating_point():
            raise TypeError(f"keys must be a floating tensor, got dtype {keys.dtype}")
        if keys.device.type == "meta" and self.queue.device.type != "meta":
            raise ValueError(f"keys are a meta tensor (no values) but the queue is on {self.queue.device}")
        labels = self._check_labels(labels, keys.shape[0])
        given = keys.detach()
        if given.shape[0] > self.size:
            given = given[-self.size :]
            labels = labels[-self.size :] if labels is not None else None
        keys = given.to(device=self.queue.device, dtype=self.queue.dtype)
        n = keys.shape[0]
        if n == 0:
            return
        top = torch.finfo(self.queue.dtype).max
        if 2 * top < torch.finfo(given.dtype).max:
            # A queue of a narrower range than the keys (float16 fed wider keys, float32 or bfloat16 fed float64
            # ones): a larger finite key would be stored as inf (torch's cast), and the loss over the queue would be
            # NaN steps later. One read-back (a synchronisation on a GPU); keys in the queue's dtype skip it. The
            # keys' own infinities are compared on their device, only where the cast has any.
            if bool(torch.isinf(keys).any()):
                over = torch.isinf(keys.to(given.device)) & torch.isfinite(given)
                if bool(over.any()):
                    name = str(self.queue.dtype).replace("torch.", "")
                    wider = "a float32 or bfloat16" if self.queue.dtype == torch.float16 else "a float64"
                    largest = given[torch.isfinite(given)].abs().amax().item()
                    raise ValueError(
                        f"keys hold finite values beyond {name}'s range (largest finite magnitude {largest:.4g} > "
                        f"{top:g}), which a {name} queue would store as inf: normalise the keys (as MoCo does), scale "
                        f"them, or use {wider} queue"
                    )
        if keys.untyped_storage().data_ptr() == self.queue.untyped_storage().data_ptr():
            keys = keys.clone()  # rows of the queue itself (e.g. negatives()): the writes below would overlap them
        if labels is not None:
            labels = labels.to(device=self.queue_labels.device, dtype=torch.int64)
            if labels.untyped_storage().data_ptr() == self.queue_labels.untyped_storage().data_ptr():
                labels = labels.clone()  # (likewise: labels())
        start, filled = self._host()
        first = min(n, self.size - start)
        self.queue[start : start + first] = keys[:first]
        if first < n:
            self.queue[: n - first] = keys[first:]
        if labels is not None:
            self.queue_labels[start : start + first] = labels[:first]
            if first < n:
                self.queue_labels[: n - first] = labels[first:]
        self._ptr = (start + n) % self.size
        self._filled = min(self.size, filled + n)
        self.ptr.fill_(self._ptr)
        self.filled.fill_(self._filled)
        self._seen = self._stamp()

    @torch.compiler.disable  # likewise (the fill level decides the view's length)
    def negatives(self) -> torch.Tensor:
        """The keys in the queue, (len(self), dim): a view, no copy. Order does not matter to InfoNCE."""
        filled = self._host()[1]
        return self.queue if filled == self.size else self.queue[:filled]

    @torch.compiler.disable  # likewise
    def labels(self) -> torch.Tensor:
        """The keys' labels (len(self),) int64, row k the label of row k of :meth:`negatives` (a view, no copy);
        only for a queue built with ``labels=True``."""
        if not self.with_labels:
            raise RuntimeError("this NegativeQueue keeps no labels: build it with NegativeQueue(size, dim, "
                               "labels=True) and enqueue(keys, labels)")
        filled = self._host()[1]
        return self.queue_labels if filled == self.size else self.queue_labels[:filled]

    def _check_labels(self, labels: object, n: int) -> torch.Tensor | None:
        """enqueue's labels, checked against the queue's kind and the n keys given (detached)."""
        from .functional import _check_dense

        if not self.with_labels:
            if labels is not None:
                raise ValueError("labels were given to a NegativeQueue built without labels=True (it keeps keys "
                                 "only): build it with NegativeQueue(size, dim, labels=True)")
            return None
        if labels is None:
            raise ValueError(f"this NegativeQueue keeps a label per key (labels=True): pass enqueue(keys, labels) "
                             f"with labels an integer tensor of shape (n,) = ({n},)")
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be an integer tensor of shape (n,) = ({n},), got {type(labels).__name__}")
        _check_dense("labels", labels)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor of shape (n,) = ({n},), got dtype {labels.dtype}")
        if tuple(labels.shape) != (n,):
            raise ValueError(f"labels must have shape (n,) = ({n},) (one per key), got {tuple(labels.shape)}")
        if labels.device.type == "meta" and self.queue_labels.device.type != "meta":
            raise ValueError(f"labels are a meta tensor (no values) but the queue is on {self.queue_labels.device}")
        return labels.detach()

    @torch.no_grad()
    @torch.compiler.disable
    def reset_parameters(self) -> None:
        """Zeroes the stored keys and empties the queue: what ``to_empty`` (a module built on the meta device) and
        FSDP's deferred initialisation call, the buffers then holding uninitialised memory."""
        self.queue.zero_()
        if self.with_labels:
            self.queue_labels.zero_()
        self.clear()

    def extra_repr(self) -> str:
        # Never raises (print(model) must not): buffers on the meta device, or holding a state that enqueue cannot
        # reach (uninitialised memory after to_empty), print their fill level as "?"
        if self.queue.device.type == "meta":
            filled = "?"
        else:
            try:
                filled = self._host()[1]
            except ValueError:
                filled = "? (the buffers hold no valid state: clear() empties the queue)"
        labels = ", labels=True" if self.with_labels else ""
        return f"size={self.size}, dim={self.dim}, dtype={self.queue.dtype}{labels}, filled={filled}"


def _level_fault(v: torch.Tensor) -> str | None:
    """Why a state's ptr or filled tensor cannot be read as a level: "count" (not one value of shape () or (1,),
    the shapes torch's load copies into the 0-d buffer: a (1, 1) one passed here, then failed torch's shape check
    after the other buffers were copied), "dtype" (not an integer type) or "meta" (no value), the first that
    applies; None where it can."""
    if v.numel() != 1 or v.dim() > 1:
        return "count"
    if v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
        return "dtype"
    return "meta" if v.device.type == "meta" else None


def _served(filled: object) -> int | None:
    """The rows a state's fill level serves, where it is a usable one-value integer tensor (else None: all rows;
    the state's own check reports a bad level)."""
    if not isinstance(filled, torch.Tensor) or _level_fault(filled) is not None:
        return None
    value = int(filled)
    return value if value >= 0 else None


def _bad_state(ptr: int, filled: int, size: int) -> str | None:
    """Why (ptr, filled) is not a state that enqueue can reach in a queue of `size` rows, or None."""
    if not (0 <= ptr < size and 0 <= filled <= size):
        return f"not a state of a queue of size {size}"
    if filled < size and ptr != filled:
        return "until the queue is full the write position equals the fill level (else stale rows would be served)"
    return None


def _usable_device(device: object) -> torch.device | None:
    """device as a torch.device (None: torch's default), checked usable by an empty allocation there: a device
    string torch does not parse, a type that is no device, or a backend this build or machine lacks ("cuda" on a
    CPU build: torch's AssertionError "Torch not compiled with CUDA enabled") raises one error naming the
    argument."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except TypeError:  # (torch's message lists its overloads)
        raise TypeError(f"device must be a torch.device, a device string such as 'cpu' or 'cuda:0', a device index "
                        f"or None, got {type(device).__name__} {device!r}") from None
    except RuntimeError as e:
        raise ValueError(f"device must be a torch.device, a device string such as 'cpu' or 'cuda:0', a device index "
                         f"or None, got {device!r} ({e})") from None
    try:
        torch.empty(0, device=parsed)
    except (AssertionError, RuntimeError) as e:
        raise ValueError(f"device {device!r} cannot hold the queue here: {e}") from None
    return parsed
