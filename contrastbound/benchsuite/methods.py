"""The methods the scaling benchmark runs, each in the settings (modes) that match its API.

A :class:`Method` says in which modes it runs, what it computes there (the ``setting`` shown in the table), how to
build one training step from the inputs, and how much extra memory it needs (a prior used before anything was
measured; the sweep then extrapolates from measurements). Modes and their inputs (see ``harness.make_inputs``):

* ``shared``:     anchors (B, d), positives (B, d), bank (K, d), detached unless ``--bank-grad`` (a MoCo queue).
* ``per-anchor``: anchors, positives, negatives (B, K, d).
* ``indexed``:    anchors, positives, bank (K, d), negative_indices (B, K) int64 (uniform with replacement).
* ``in-batch``:   anchors (N, d) and positives (N, d) with N = K: each anchor's negatives are the other positives.
* ``bank-ce``:    anchors (B, d), class weights (K, d) that need grad, targets (B,): softmax cross-entropy over K
                  classes without a positive of its own (the setting of Cut Cross-Entropy and Liger's fused
                  linear cross entropy); no normalisation, temperature 1.

Peers are imported only inside their builders, so none of them is needed to install or test contrastbound.
Some packages import torchvision or triton from their ``__init__``; their loss modules are plain PyTorch, so they
are loaded file by file (:func:`load_module_bypassing_init`) and the table says so.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

MODES = ("shared", "per-anchor", "indexed", "in-batch", "bank-ce")

# What every mode computes, in words (the ``setting`` of the naive, compiled and chunked rows too).
MODE_SETTINGS = {
    "shared": "InfoNCE, shared bank (K,d)",
    "per-anchor": "InfoNCE, per-anchor negatives (B,K,d)",
    "indexed": "InfoNCE, bank rows by index (B,K)",
    "in-batch": "InfoNCE in-batch, N=K pairs",
    "bank-ce": "cross-entropy over K classes (d-dim weights)",
}
NTXENT_SETTING = "NT-Xent (SimCLR), 2N views, N=K"
CLIP_SETTING = "CLIP symmetric, N=K pairs"
PML_MEMORY_SETTING = "NT-Xent, 2B queries vs K-row memory (incl. batch)"

Step = Callable[[], torch.Tensor]


@dataclass
class Method:
    """One way to compute the loss.

    ``build(cfg, inputs) -> step``: ``step()`` runs the forward pass and returns a scalar loss whose
    ``backward()`` is the backward pass. ``settings[mode]`` says what it computes in that mode (modes absent from
    it are not run). ``logits_factor`` is the prior for extra memory in units of one float32 (rows, K) logits
    tensor, ``bank_copies`` in units of the bank (K, d) in the input dtype. ``requires``: module names it
    imports (absent: "not installed"). ``gpu_only``: the method runs only on CUDA devices.
    """

    name: str
    build: Callable[[object, dict], Step]
    settings: dict[str, str]
    kind: str = "baseline"  # "fused", "baseline", "peer", "gemm" or "test"
    requires: tuple[str, ...] = ()
    gpu_only: bool = False
    compiled: bool = False
    logits_factor: float = 0.0
    bank_copies: float = 0.0
    note: str = ""
    extra_bytes: Callable[[object], float] | None = None  # overrides the logits/bank prior when given
    growth: dict[str, float] = field(default_factory=dict)  # mode -> power of K in extra memory (default 1, 2 in-batch)
    ref: str = field(default="", repr=False)  # "module:attr" the worker imports to find this method

    def setting(self, mode: str) -> str | None:
        return self.settings.get(mode)

    def unavailable(self, device: str) -> str | None:
        """Why the method cannot run at all on ``device`` (cheap checks only), or None."""
        if self.gpu_only and not device.startswith("cuda"):
            return "GPU only (Triton/CUDA kernels)"
        for module in self.requires:
            if module not in sys.modules and importlib.util.find_spec(module) is None:
                return f"not installed ({module})"
        return None


# ----------------------------------------------------------------------------------------------------------
# Loading peer loss modules without their package __init__ (which may import torchvision or triton).
# ----------------------------------------------------------------------------------------------------------


def load_module_bypassing_init(dotted: str, stubs: dict[str, dict] | None = None) -> types.ModuleType:
    """Imports ``dotted`` (e.g. "lightly.loss.ntx_ent_loss") without running the ``__init__`` of its packages.

    The parent packages are registered as empty namespace modules whose ``__path__`` is the installed folder, so
    only the module files on the import chain run. ``stubs`` maps module names to attribute dicts for modules on
    that chain that would import something unavailable. Meant for the benchmark worker process (it changes
    ``sys.modules`` for that package).
    """
    parts = dotted.split(".")
    spec = importlib.util.find_spec(parts[0])
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{parts[0]} is not installed")
    for name, attrs in (stubs or {}).items():
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__dict__.update(attrs)
            sys.modules[name] = stub
    path = list(spec.submodule_search_locations)
    for i in range(1, len(parts)):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = path  # type: ignore[attr-defined]
            pkg.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            pkg.__spec__.submodule_search_locations = path
            sys.modules[name] = pkg
        path = [p + "/" + parts[i] for p in sys.modules[name].__path__]  # type: ignore[attr-defined]
    return importlib.import_module(dotted)


def _import_or_bypass(dotted: str, stubs: dict[str, dict] | None = None) -> tuple[types.ModuleType, str]:
    """The module, and a note when it had to be loaded without its package __init__."""
    try:
        return importlib.import_module(dotted), ""
    except ModuleNotFoundError as err:
        missing = err.name or "?"
        if missing.split(".")[0] == dotted.split(".")[0]:
            raise
        for name in [n for n in sys.modules if n == dotted.split(".")[0] or n.startswith(dotted.split(".")[0] + ".")]:
            del sys.modules[name]
        return load_module_bypassing_init(dotted, stubs), f"loaded without package __init__ (needs {missing})"


# ----------------------------------------------------------------------------------------------------------
# Fused (contrastbound) in every setting.
# ----------------------------------------------------------------------------------------------------------


def _fused(cfg, x: dict) -> Step:
    import contrastbound as cb

    t = cfg.temperature
    if cfg.mode == "shared" or cfg.mode == "per-anchor":
        return lambda: cb.info_nce(x["anchors"], x["positives"], x["negatives"], temperature=t)
    if cfg.mode == "indexed":
        return lambda: cb.info_nce(
            x["anchors"], x["positives"], x["negatives"], negative_indices=x["negative_indices"], temperature=t
        )
    if cfg.mode == "in-batch":
        return lambda: cb.info_nce(x["anchors"], x["positives"], temperature=t)
    if cfg.mode == "bank-ce":
        return lambda: cb.bank_cross_entropy(x["anchors"], x["negatives"], x["targets"])
    raise ValueError(cfg.mode)


def _fused_ntxent(cfg, x: dict) -> Step:
    import contrastbound as cb

    return lambda: cb.nt_xent(x["anchors"], x["positives"], temperature=cfg.temperature)


def _fused_clip(cfg, x: dict) -> Step:
    import contrastbound as cb

    return lambda: cb.clip_loss(x["anchors"], x["positives"], 1.0 / cfg.temperature)


# ----------------------------------------------------------------------------------------------------------
# Naive PyTorch: materialised logits + F.cross_entropy (what a user writes first).
# ----------------------------------------------------------------------------------------------------------


def naive_loss(mode: str, temperature: float, anchors, positives, negatives=None, negative_indices=None, targets=None):
    """The loss of ``mode`` with the full logits materialised (also what torch.compile compiles)."""
    if mode == "bank-ce":
        return F.cross_entropy((anchors @ negatives.t()).float(), targets)
    a = F.normalize(anchors, dim=-1)
    p = F.normalize(positives, dim=-1)
    if mode == "in-batch":
        logits = a @ p.t()
        target = torch.arange(a.shape[0], device=a.device)
    else:
        if mode == "shared":
            neg = a @ F.normalize(negatives, dim=-1).t()
        else:
            n = negatives[negative_indices] if mode == "indexed" else negatives
            neg = torch.bmm(F.normalize(n, dim=-1), a.unsqueeze(2)).squeeze(2)
        logits = torch.cat([(a * p).sum(-1, keepdim=True), neg], 1)
        target = torch.zeros(a.shape[0], dtype=torch.long, device=a.device)
    return F.cross_entropy(logits.float() / temperature, target)


def _naive_args(x: dict) -> dict:
    keys = ("anchors", "positives", "negatives", "negative_indices", "targets")
    return {k: x.get(k) for k in keys}


def _naive(cfg, x: dict) -> Step:
    args = _naive_args(x)
    return lambda: naive_loss(cfg.mode, cfg.temperature, **args)


def _compiled_naive(cfg, x: dict) -> Step:
    fn = torch.compile(naive_loss)
    args = _naive_args(x)
    return lambda: fn(cfg.mode, cfg.temperature, **args)


# ----------------------------------------------------------------------------------------------------------
# Hand-written chunked online log-sum-exp with activation checkpointing (what a careful user writes next).
# ----------------------------------------------------------------------------------------------------------


def _chunk_lse_shared(a, chunk, scale):  # a (B, d) normalised, chunk (c, d) raw rows -> (B,)
    return torch.logsumexp((a @ F.normalize(chunk, dim=-1).t()).float() * scale, dim=1)


def _chunk_lse_per_anchor(a, chunk, scale):  # a (B, d), chunk (B, c, d) -> (B,)
    logits = torch.bmm(F.normalize(chunk, dim=-1), a.unsqueeze(2)).squeeze(2)
    return torch.logsumexp(logits.float() * scale, dim=1)


def _chunk_lse_indexed(a, bank, idx, scale):  # bank (M, d), idx (B, c) -> (B,)
    return _chunk_lse_per_anchor(a, bank[idx], scale)


def _chunk_lse_raw(a, chunk, scale):  # bank-ce: no normalisation
    return torch.logsumexp((a @ chunk.t()).float() * scale, dim=1)


def chunked_loss(mode: str, temperature: float, chunk: int, anchors, positives, negatives=None,
                 negative_indices=None, targets=None):
    """The loss of ``mode`` over chunks of ``chunk`` negatives: an online log-sum-exp (running ``logaddexp``),
    each chunk's logits under ``torch.utils.checkpoint`` so they are recomputed in backward, never stored."""
    scale = 1.0 / temperature
    if mode == "bank-ce":
        a, K = anchors, negatives.shape[0]
        target_logit = (a * negatives[targets]).sum(-1).float()
        lse = None
        for s in range(0, K, chunk):
            part = checkpoint(_chunk_lse_raw, a, negatives[s:s + chunk], 1.0, use_reentrant=False)
            lse = part if lse is None else torch.logaddexp(lse, part)
        return (lse - target_logit).mean()
    a = F.normalize(anchors, dim=-1)
    p = F.normalize(positives, dim=-1)
    if mode == "in-batch":
        pos = (a * p).sum(-1).float() * scale
        lse, K = None, p.shape[0]
        for s in range(0, K, chunk):
            part = checkpoint(_chunk_lse_shared, a, positives[s:s + chunk], scale, use_reentrant=False)
            lse = part if lse is None else torch.logaddexp(lse, part)
        return (lse - pos).mean()
    pos = (a * p).sum(-1).float() * scale
    lse = pos
    K = negative_indices.shape[1] if mode == "indexed" else negatives.shape[-2]
    for s in range(0, K, chunk):
        if mode == "shared":
            part = checkpoint(_chunk_lse_shared, a, negatives[s:s + chunk], scale, use_reentrant=False)
        elif mode == "per-anchor":
            part = checkpoint(_chunk_lse_per_anchor, a, negatives[:, s:s + chunk], scale, use_reentrant=False)
        else:
            part = checkpoint(_chunk_lse_indexed, a, negatives, negative_indices[:, s:s + chunk], scale,
                              use_reentrant=False)
        lse = torch.logaddexp(lse, part)
    return (lse - pos).mean()


def _chunked(cfg, x: dict) -> Step:
    args = _naive_args(x)
    return lambda: chunked_loss(cfg.mode, cfg.temperature, cfg.chunk, **args)


# ----------------------------------------------------------------------------------------------------------
# Peers.
# ----------------------------------------------------------------------------------------------------------


def _info_nce_pytorch(cfg, x: dict) -> Step:
    from info_nce import info_nce

    a, p, t = x["anchors"], x["positives"], cfg.temperature
    if cfg.mode == "shared":
        return lambda: info_nce(a, p, x["negatives"], temperature=t, negative_mode="unpaired")
    if cfg.mode == "per-anchor":
        return lambda: info_nce(a, p, x["negatives"], temperature=t, negative_mode="paired")
    return lambda: info_nce(a, p, temperature=t)  # in-batch


def _lightly_ntxent_class():
    def _no_gather(*args, **kwargs):
        raise RuntimeError("distributed gather is not available in this benchmark")

    stubs = {"lightly.models.utils": {"concat_all_gather": _no_gather}}
    module, note = _import_or_bypass("lightly.loss.ntx_ent_loss", stubs)
    return module.NTXentLoss, note


def _lightly(cfg, x: dict) -> Step:
    NTXentLoss, _ = _lightly_ntxent_class()
    a, p = x["anchors"], x["positives"]
    if cfg.mode == "shared":
        bank = x["negatives"]
        loss_fn = NTXentLoss(temperature=cfg.temperature, memory_bank_size=(bank.shape[0], bank.shape[1]))
        loss_fn.to(bank.dtype)
        with torch.no_grad():
            loss_fn.memory_bank.bank.copy_(F.normalize(bank.detach().float(), dim=-1))
        return lambda: loss_fn(a, p)
    loss_fn = NTXentLoss(temperature=cfg.temperature, memory_bank_size=0)  # in-batch: SimCLR over 2N views
    return lambda: loss_fn(a, p)


def _pml(cfg, x: dict) -> Step:
    from pytorch_metric_learning.losses import CrossBatchMemory, NTXentLoss

    a, p = x["anchors"], x["positives"]
    n = a.shape[0]
    labels = torch.cat([torch.arange(n), torch.arange(n)]).to(a.device)
    if cfg.mode == "in-batch":
        loss_fn = NTXentLoss(temperature=cfg.temperature)
        return lambda: loss_fn(torch.cat([a, p]), labels)
    bank = x["negatives"]
    K = bank.shape[0]
    loss_fn = CrossBatchMemory(NTXentLoss(temperature=cfg.temperature), bank.shape[1], memory_size=K)
    with torch.no_grad():
        loss_fn.embedding_memory = bank.detach().clone()
        loss_fn.label_memory = torch.arange(n, n + K, device=a.device)  # distinct: every memory row a negative
    loss_fn.has_been_filled = True

    def step():
        loss_fn.queue_idx = 0  # the batch always overwrites the same 2B rows: K - 2B bank rows stay negatives
        return loss_fn(torch.cat([a, p]), labels)

    return step


def _open_clip(cfg, x: dict) -> Step:
    module, _ = _import_or_bypass("open_clip.loss")
    loss_fn = module.ClipLoss()
    a, p = x["anchors"], x["positives"]
    scale = torch.tensor(1.0 / cfg.temperature, device=a.device)
    # open_clip's model normalises the features before the loss; the fused clip_loss does it inside.
    return lambda: loss_fn(F.normalize(a, dim=-1), F.normalize(p, dim=-1), scale)


def _cce(cfg, x: dict) -> Step:
    a, w, targets = x["anchors"], x["negatives"], x["targets"]
    if cfg.device.startswith("cuda"):
        from cut_cross_entropy import linear_cross_entropy

        return lambda: linear_cross_entropy(a, w, targets, impl="cce")
    module, _ = _import_or_bypass("cut_cross_entropy.torch_compile")
    return lambda: module.torch_compile_linear_cross_entropy(a, w, targets)


def _liger(cfg, x: dict) -> Step:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss()
    return lambda: loss_fn(x["negatives"], x["anchors"], x["targets"])


def _inf_cl(cfg, x: dict) -> Step:
    from inf_cl import cal_inf_loss

    a, p = x["anchors"], x["positives"]
    # As benchmarks/bench_gpu.py calls it on the H200: the scale as a device tensor, and head_dim = d (Inf-CL's
    # default, 256, reshapes q to (B, -1, 256) and fails for any other width).
    scale = torch.tensor(1.0 / cfg.temperature, device=a.device)
    d = a.shape[-1]
    return lambda: cal_inf_loss(F.normalize(a, dim=-1), F.normalize(p, dim=-1), scale=scale, head_dim=d).mean()


def _pml_extra_bytes(cfg) -> float:
    # pml pairs every positive pair with every negative pair of its anchor: O(Q^2 K) for Q queries.
    q = 2 * cfg.rows
    k = 2 * cfg.K if cfg.mode == "in-batch" else cfg.K
    return 16.0 * q * q * k


def _gemm(cfg, x: dict) -> Step:  # never called: the harness times torch.mm itself
    raise NotImplementedError


_ALL = dict(MODE_SETTINGS)
_NO_BANK_CE = {m: s for m, s in MODE_SETTINGS.items() if m != "bank-ce"}

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("gemm", _gemm, {k: "torch.mm of the logits shape" for k in MODES}, kind="gemm"),
        Method("fused", _fused, _ALL, kind="fused", note="contrastbound.info_nce / bank_cross_entropy"),
        Method("fused-ntxent", _fused_ntxent, {"in-batch": NTXENT_SETTING}, kind="fused",
               note="contrastbound.nt_xent"),
        Method("fused-clip", _fused_clip, {"in-batch": CLIP_SETTING}, kind="fused", note="contrastbound.clip_loss"),
        Method("naive", _naive, _ALL, logits_factor=5.0, bank_copies=1.0,
               note="materialised logits + F.cross_entropy"),
        Method("compiled-naive", _compiled_naive, _ALL, compiled=True, logits_factor=3.0, bank_copies=1.0,
               note="torch.compile(naive); compile time apart"),
        Method("chunked-ckpt", _chunked, _ALL, logits_factor=0.0, bank_copies=0.1,
               note="chunked online logsumexp + torch.utils.checkpoint"),
        Method("info-nce-pytorch", _info_nce_pytorch,
               {"shared": "InfoNCE, shared bank (K,d) [unpaired]",
                "per-anchor": "InfoNCE, per-anchor negatives (B,K,d) [paired]",
                "in-batch": MODE_SETTINGS["in-batch"]},
               kind="peer", requires=("info_nce",), logits_factor=5.0, bank_copies=1.0, note="info_nce.info_nce"),
        Method("lightly", _lightly,
               {"shared": "InfoNCE, shared bank (K,d) [NTXentLoss memory bank]", "in-batch": NTXENT_SETTING},
               kind="peer", requires=("lightly",), logits_factor=5.0, bank_copies=2.0,
               note="lightly.loss.NTXentLoss"),
        Method("pml", _pml, {"shared": PML_MEMORY_SETTING, "in-batch": NTXENT_SETTING}, kind="peer",
               requires=("pytorch_metric_learning",), logits_factor=24.0, bank_copies=2.0, growth={"in-batch": 3.0},
               extra_bytes=_pml_extra_bytes,
               note="pytorch_metric_learning NTXentLoss (+ CrossBatchMemory for a bank)"),
        Method("open_clip", _open_clip, {"in-batch": CLIP_SETTING}, kind="peer", requires=("open_clip",),
               logits_factor=8.0, note="open_clip.loss.ClipLoss"),
        Method("cce", _cce, {"bank-ce": MODE_SETTINGS["bank-ce"]}, kind="peer", requires=("cut_cross_entropy",),
               compiled=True, logits_factor=3.0,
               note="cut_cross_entropy linear_cross_entropy (impl torch_compile on CPU, cce on GPU)"),
        Method("liger", _liger, {"bank-ce": MODE_SETTINGS["bank-ce"]}, kind="peer", requires=("liger_kernel",),
               gpu_only=True, logits_factor=0.5, note="liger_kernel LigerFusedLinearCrossEntropyLoss"),
        Method("inf-cl", _inf_cl, {"in-batch": MODE_SETTINGS["in-batch"]}, kind="peer", requires=("inf_cl",),
               gpu_only=True, logits_factor=0.1, note="inf_cl.cal_inf_loss"),
    ]
}
for _m in METHODS.values():
    _m.ref = f"{__name__}:METHODS"
