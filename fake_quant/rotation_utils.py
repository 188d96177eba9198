"""Computational-invariance transforms (QuaRot-style), driven by :mod:`fake_quant.spec`.

Order for one stack (vision encoder or LLM):

1. ``untie``: give a tied head its own weight.
2. ``fold_layer_scales``: multiply LayerScale vectors into the layers that produce them.
2b. ``split_norm_writers``: a norm that starts the stream becomes a weightless norm + a linear writer.
3. ``bake_mean_out`` (LayerNorm stacks only): make every writer produce zero-mean vectors, so the
   residual stream has zero mean and LayerNorm equals RMSNorm.
4. ``fuse_norms``: move each norm's scale (and LayerNorm's bias) into the linear layers reading it,
   and replace the norm by a weightless RMSNorm with the same eps.
5. ``rotate_stack``: residual rotation Q: writers' outputs by Q^T, readers' inputs by Q.
6. ``rotate_ov``: a Hadamard per head between V and O.
7. ``add_online_hadamard``: fold H into the MLP output layer and apply H to its input at run time;
   ``add_online_input_hadamards`` does the same for the layers reading the stream (opt-in).

Every weight is transformed in float64 and written back in its own dtype. Steps 1-4 leave the
model's function unchanged on their own; 5-7 need 1-4 first (a rotation only commutes with a
weightless RMSNorm).

A stack whose norms sit on the branch outputs (``StackSpec.branch_output_norms``) has no linear after a
norm: steps 2-5 do not apply to it (its norms stay as they are) and asking for them is an error; 6 and 7
are exact on any stack, so they are what rotating such a stack means.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from . import hadamard_utils as hu
from .quant_utils import QuantLinear
from .rms import SplitQuantLinear, split_report
from .spec import AttentionSpec, Reader, StackSpec, Writer, get, join, scale_param, set_module

log = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    """Weightless RMSNorm (what a fused LayerNorm / RMSNorm becomes), computed in float32.

    With ``center`` (a unit vector u) it first removes the input's component along u: a fused
    LayerNorm on a stream whose mean was kept (u = 1/sqrt(d), rotated along with the stream)."""

    def __init__(self, hidden_size: int, eps: float, center: torch.Tensor | None = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.register_buffer("center", None if center is None else center.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.center is not None:
            u = self.center.to(device=xf.device, dtype=xf.dtype)  # the stats run in float32 whatever the model dtype
            xf = xf - (xf @ u)[..., None] * u
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}" + (", centering" if self.center is not None else "")


# ---------------------------------------------------------------------------------------------
# small helpers on weights
# ---------------------------------------------------------------------------------------------
def _linear(root: nn.Module, path: str) -> nn.Linear:
    m = get(root, path)
    if isinstance(m, QuantLinear):
        return m  # shares weight / bias attributes with nn.Linear
    if not isinstance(m, nn.Linear):
        raise TypeError(f"{path}: expected nn.Linear, found {type(m).__name__}")
    return m


def _write(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data = value.to(dtype=param.dtype, device=param.device).contiguous()


ROW_CHUNK = 8192  # rows transformed at a time: float64 copies of a 150k-row embedding would cost GBs


def _rowwise_(t: torch.Tensor, fn) -> None:
    """``t[rows] = fn(t[rows] in float64, rows)`` in place, a chunk of rows at a time (``t`` may be a
    transposed view, to work on columns)."""
    data = t.data if isinstance(t, nn.Parameter) else t
    for i in range(0, data.shape[0], ROW_CHUNK):
        sl = slice(i, min(i + ROW_CHUNK, data.shape[0]))
        data[sl] = fn(data[sl].double(), sl).to(data.dtype)


def _ensure_bias(linear: nn.Linear) -> torch.Tensor:
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                               device=linear.weight.device))
    return linear.bias


def _eps(norm: nn.Module) -> float:
    for name in ("eps", "variance_epsilon", "epsilon"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    raise ValueError(f"cannot find the epsilon of {type(norm).__name__}")


def _norm_params(norm: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    w = getattr(norm, "weight", None)
    b = getattr(norm, "bias", None)
    return (w if isinstance(w, torch.Tensor) else None, b if isinstance(b, torch.Tensor) else None)


# ---------------------------------------------------------------------------------------------
# 1-4: function-preserving rewrites
# ---------------------------------------------------------------------------------------------
def untie(model: nn.Module, stack: StackSpec) -> None:
    if stack.tied is None:
        return
    emb, head = get(model, stack.tied[0]), _linear(model, stack.tied[1])
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone())
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
        log.info("%s: untied %s from %s", stack.name, stack.tied[1], stack.tied[0])


def fold_layer_scales(model: nn.Module, stack: StackSpec) -> None:
    b = stack.block
    for bp in stack.block_paths(model):
        for scale_path, writer in ((b.attn_scale, b.attn.o), (b.mlp_scale, b.mlp_out)):
            if scale_path is None:
                continue
            lam = scale_param(model, join(bp, scale_path))
            lin = _linear(model, join(bp, writer))
            s = lam.detach().double()
            _rowwise_(lin.weight, lambda x, sl: x * s[sl, None].to(x.device))
            if lin.bias is not None:
                _write(lin.bias, lin.bias.double() * s)
            lam.data.fill_(1.0)


def split_norm_writers(model: nn.Module, stack: StackSpec) -> None:
    """Each ``norm`` writer (a norm whose output starts the stream) becomes a weightless copy of itself
    followed by a linear ``x * gamma + beta`` at ``<path>.1``, which then writes the stream like any linear."""
    for w in stack.writers:
        if w.kind != "norm" or isinstance(get(model, w.path), nn.Sequential):
            continue
        norm = get(model, w.path)
        weight, bias = _norm_params(norm)
        if weight is None:
            raise ValueError(f"{w.path}: a norm writer needs an affine weight")
        d = weight.numel()
        if isinstance(norm, nn.LayerNorm):
            plain = nn.LayerNorm(d, eps=norm.eps, elementwise_affine=False)
        else:
            plain = RMSNorm(d, _eps(norm))
        lin = nn.Linear(d, d, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        lin.weight.data = torch.diag(weight.detach().clone())
        if bias is not None:
            lin.bias.data = bias.detach().clone()
        set_module(model, w.path, nn.Sequential(plain, lin))


def _writers(model: nn.Module, stack: StackSpec) -> list[Writer]:
    out = [Writer(join(w.path, "1")) if w.kind == "norm" else w for w in stack.writers]
    for bp in stack.block_paths(model):
        out += [Writer(join(bp, stack.block.attn.o)), Writer(join(bp, stack.block.mlp_out))]
    return out


def bake_mean_out(model: nn.Module, stack: StackSpec) -> None:
    """Subtract, from every writer, the mean over the stream dimension of what it writes."""
    _refuse_residual(stack, "bake the mean out of its residual stream")
    for w in _writers(model, stack):
        if w.kind == "linear":
            lin = _linear(model, w.path)
            _rowwise_(lin.weight.data.t(), lambda x, sl: x - x.mean(dim=-1, keepdim=True))
            if lin.bias is not None:
                _write(lin.bias, lin.bias.double() - lin.bias.double().mean())
        elif w.kind == "conv":
            conv = get(model, w.path)
            W = conv.weight.double()
            _write(conv.weight, W - W.mean(dim=0, keepdim=True))
            if conv.bias is not None:
                _write(conv.bias, conv.bias.double() - conv.bias.double().mean())
        elif w.kind in ("embedding", "param"):
            p = get(model, w.path)
            p = p.weight if w.kind == "embedding" else p
            _rowwise_(p.data.view(-1, p.shape[-1]), lambda x, sl: x - x.mean(dim=-1, keepdim=True))
        else:
            raise ValueError(f"unknown writer kind {w.kind!r} at {w.path}")


def fuse_norm_into(model: nn.Module, norm_path: str, readers: list[Reader], center: bool = False) -> None:
    """Fold ``norm``'s scale and bias into its readers, then replace it by a weightless RMSNorm
    (which removes the mean itself when ``center``: a LayerNorm on a stream that keeps its mean)."""
    norm = get(model, norm_path)
    weight, bias = _norm_params(norm)
    for r in readers:
        lin = _linear(model, r.path)
        # a norm over one stream vector read by a reader of ``chunks`` concatenated ones repeats its
        # scale per chunk; a norm over the whole concatenation (InternVL's mlp1.0) does not
        param = weight if weight is not None else bias
        reps = lin.in_features // param.numel() if param is not None else 1
        if bias is not None and bool(torch.any(bias != 0)):
            beta = bias.detach().double().repeat(reps).to(lin.weight.device)
            shift = torch.cat([lin.weight.data[i:i + ROW_CHUNK].double() @ beta
                               for i in range(0, lin.out_features, ROW_CHUNK)])
            b = _ensure_bias(lin)
            _write(b, b.double() + shift)
        if weight is not None:
            gamma = weight.detach().double().repeat(reps).to(lin.weight.device)
            _rowwise_(lin.weight, lambda x, sl: x * gamma[None, :])
    hidden = int((weight.numel() if weight is not None else None) or getattr(norm, "normalized_shape", [None])[0])
    u = torch.full((hidden,), 1.0 / math.sqrt(hidden), dtype=torch.float64) if center else None
    set_module(model, norm_path, RMSNorm(hidden, _eps(norm), center=u))


def _norm_paths(model: nn.Module, stack: StackSpec) -> list[str]:
    b = stack.block
    paths = [join(bp, n) for bp in stack.block_paths(model) for n in (b.attn_norm, b.mlp_norm)]
    return paths + ([stack.final_norm] if stack.final_norm is not None else [])


def fuse_norms(model: nn.Module, stack: StackSpec) -> None:
    _refuse_residual(stack, "fuse its norms into their readers")
    b = stack.block
    # a LayerNorm on a stream whose mean was not baked out (keep_mean, or an RMSNorm stack whose final
    # norm is a LayerNorm, like InternViT-6B's read by InternVL's mlp1) removes the mean itself
    baked = stack.norm_kind == "layernorm" and not stack.keep_mean

    def fuse(path: str, readers: list[Reader]) -> None:
        fuse_norm_into(model, path, readers, center=not baked and isinstance(get(model, path), nn.LayerNorm))

    for bp in stack.block_paths(model):
        fuse(join(bp, b.attn_norm), [Reader(join(bp, p)) for p in b.attn.inputs])
        fuse(join(bp, b.mlp_norm), [Reader(join(bp, p)) for p in b.mlp_in])
    if stack.final_norm is not None:
        fuse(stack.final_norm, list(stack.readers))


def _refuse_residual(stack: StackSpec, what: str) -> None:
    if not stack.residual_rotation:
        raise ValueError(
            f"{stack.name}: cannot {what}: the norms of this stack sit on the branch outputs "
            "(h = x + norm(f(x))), so no linear reads a norm's output to absorb it offline; such a stack "
            "takes only the per-head V/O Hadamard and online Hadamards on linear inputs (what rotate() "
            "applies to it)")


def make_rotation_ready(model: nn.Module, stack: StackSpec) -> None:
    """Steps 1-4: after this the stack's norms are weightless RMSNorms and it computes the same function.
    A stack with norms on its branch outputs only gets its head untied: its norms cannot be fused."""
    untie(model, stack)
    if not stack.residual_rotation:
        return
    split_norm_writers(model, stack)
    fold_layer_scales(model, stack)
    if stack.norm_kind == "layernorm" and not stack.keep_mean:
        bake_mean_out(model, stack)
    fuse_norms(model, stack)


# ---------------------------------------------------------------------------------------------
# 5-7: rotations
# ---------------------------------------------------------------------------------------------
def rotation_matrix(n: int, mode: str = "hadamard", seed: int = 0, fallback: str = "error") -> torch.Tensor:
    """Orthogonal float64 ``n x n``: a random-sign Hadamard (``"hadamard"``) or Haar-random (``"random"``)."""
    if mode == "hadamard":
        if hu.is_constructible(n):
            return hu.random_hadamard_matrix(n, seed)
        if fallback != "orthogonal":
            raise ValueError(
                f"no exact Hadamard matrix of order {n} for the residual rotation; use "
                "--rotate_mode random or the 'orthogonal' Hadamard fallback (padding cannot change "
                "the width of a residual stream)"
            )
        plan = hu.get_plan(n, "orthogonal", seed)
        g = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
        return signs[:, None] * plan.matrix() / math.sqrt(n)
    if mode == "random":
        g = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))
    raise ValueError(f"unknown rotation mode {mode!r}: use 'hadamard' or 'random'")


def rotate_reader(lin: nn.Linear, Q: torch.Tensor, chunks: int = 1) -> None:
    Qd = Q.to(lin.weight.device)
    _rowwise_(lin.weight, lambda x, sl: (x.reshape(x.shape[0], chunks, -1) @ Qd).reshape(x.shape))


def rotate_writer(model: nn.Module, w: Writer, Q: torch.Tensor) -> None:
    if w.kind == "linear":
        lin = _linear(model, w.path)
        Qd = Q.to(lin.weight.device)
        _rowwise_(lin.weight.data.t(), lambda x, sl: x @ Qd)  # (Q^T W)^T = W^T Q
        if lin.bias is not None:
            _write(lin.bias, lin.bias.double() @ Qd)
    elif w.kind == "conv":
        conv = get(model, w.path)
        Qd = Q.to(conv.weight.device)
        W = conv.weight.double()
        _write(conv.weight, (Qd.t() @ W.reshape(W.shape[0], -1)).reshape(W.shape))
        if conv.bias is not None:
            _write(conv.bias, conv.bias.double() @ Qd)
    elif w.kind in ("embedding", "param"):
        p = get(model, w.path)
        p = p.weight if w.kind == "embedding" else p
        Qd = Q.to(p.device)
        _rowwise_(p.data.view(-1, p.shape[-1]), lambda x, sl: x @ Qd)
    else:
        raise ValueError(f"unknown writer kind {w.kind!r} at {w.path}")


def rotate_stack(model: nn.Module, stack: StackSpec, Q: torch.Tensor) -> None:
    """Residual rotation by Q (stack must be rotation-ready)."""
    _refuse_residual(stack, "take a residual rotation")
    for w in _writers(model, stack):
        rotate_writer(model, w, Q)
    b = stack.block
    for bp in stack.block_paths(model):
        for p in (*b.attn.inputs, *b.mlp_in):
            rotate_reader(_linear(model, join(bp, p)), Q)
    for r in stack.readers:
        rotate_reader(_linear(model, r.path), Q, r.chunks)
    for path in _norm_paths(model, stack):  # a centering direction turns with the stream
        norm = get(model, path)
        if isinstance(norm, RMSNorm) and norm.center is not None:
            # a norm over several concatenated stream vectors (a final norm read by a chunked reader)
            # turns chunk by chunk
            c = norm.center.double().reshape(-1, Q.shape[0])
            norm.center = (c @ Q.to(c.device)).reshape(-1).float()


def rotate_ov(model: nn.Module, stack: StackSpec) -> None:
    """Hadamard per head between V and O in every block of the stack."""
    for bp in stack.block_paths(model):
        rotate_ov_at(model, bp, stack.block.attn)


def rotate_ov_at(model: nn.Module, path: str, a: AttentionSpec) -> None:
    """Hadamard per head between V and O of the attention described by ``a`` under ``path`` (GQA-aware:
    each KV head's V is rotated once, and every query head's slice of O undoes it). Exact whatever the
    attention's inputs are, so it also applies to a connector's cross-attention."""
    hd = a.head_dim
    v_path, rows = a.v_rows()
    v = _linear(model, join(path, v_path))
    rows = rows.to(v.weight.device)
    Wv = v.weight.double()[rows]                                     # [kv heads, head_dim, in]
    Wv = hu.hadamard_transform(Wv.transpose(1, 2)).transpose(1, 2)   # H~ W_vh per head
    W = v.weight.double().clone()
    W[rows.reshape(-1)] = Wv.reshape(-1, W.shape[1])
    _write(v.weight, W)
    if v.bias is not None:
        bvec = v.bias.double().clone()
        bvec[rows.reshape(-1)] = hu.hadamard_transform(bvec[rows]).reshape(-1)
        _write(v.bias, bvec)
    o = _linear(model, join(path, a.o))
    Wo = o.weight.double().reshape(o.weight.shape[0], a.num_heads, hd)
    _write(o.weight, hu.hadamard_transform(Wo).reshape(o.weight.shape))  # W_oh H~^T per head


def online_hadamard_at(model: nn.Module, path: str, fp32: bool = False, fallback: str = "error") -> QuantLinear:
    """Fold H~^T into the linear at ``path`` and wrap it so H~ is applied to its input at run time (exact
    whatever the layer's input is). With the ``"pad"`` fallback the input is zero-padded to the next
    constructible width inside the online transform, and the weight gets matching zero columns (no bias
    is added)."""
    lin = _linear(model, path)
    plan = hu.get_plan(lin.in_features, fallback)
    W = lin.weight.double()
    if plan.out_dim != lin.in_features:
        W = nn.functional.pad(W, (0, plan.out_dim - lin.in_features))
    Wr = hu.hadamard_transform(W, plan=hu.get_plan(plan.out_dim) if plan.kind == "pad" else plan)
    online = hu.OnlineHadamard(lin.in_features, fp32=fp32, fallback=fallback)
    if isinstance(lin, QuantLinear):
        if lin.online_rotation is not None and lin.use_online_rotation:
            raise ValueError(f"{path} already has an online Hadamard transform")
        lin.online_rotation, lin.use_online_rotation = online, True
        ql = lin
    else:
        ql = QuantLinear(lin, online_rotation=online)
    ql.weight = nn.Parameter(Wr.to(lin.weight.dtype), requires_grad=lin.weight.requires_grad)
    ql.in_features = plan.out_dim
    set_module(model, path, ql)
    return ql


def add_online_hadamard(model: nn.Module, stack: StackSpec, fp32: bool = False, fallback: str = "error",
                        split: bool = False, split_threshold: float = 0.0, keep_fp: bool = False,
                        split_reports: dict | None = None) -> list[str]:
    """The online Hadamard (:func:`online_hadamard_at`) on each MLP output layer of the stack.

    With ``split`` (RMS) a layer whose rows meet the RMS condition in more than ``split_threshold``
    of its rows gets its mean channel split off (:mod:`fake_quant.rms`); ``split_reports`` collects
    what happened per layer."""
    wrapped = []
    for bp in stack.block_paths(model):
        path = join(bp, stack.block.mlp_out)
        lin = _linear(model, path)
        plan = hu.get_plan(lin.in_features, fallback)
        if split and plan.kind == "orthogonal":
            raise ValueError(f"{path}: RMS needs a Hadamard matrix; the 'orthogonal' fallback spreads the row mean")
        W = nn.functional.pad(lin.weight.double(), (0, plan.out_dim - lin.in_features))
        ql = online_hadamard_at(model, path, fp32, fallback)
        if split:
            rep = split_report(W, ql.weight.double(), split_threshold)
            if split_reports is not None:
                split_reports[path] = rep.__dict__
            if rep.split:
                set_module(model, path, SplitQuantLinear(ql, keep_fp=keep_fp))
                log.info("RMS: split %s (%.1f%% of rows meet the condition; weight scale / %.2f)",
                         path, 100 * rep.rows_meeting_condition, rep.scale_reduction)
        wrapped.append(path)
    return wrapped


def add_online_input_hadamards(model: nn.Module, stack: StackSpec, fp32: bool = False,
                               fallback: str = "error") -> list[str]:
    """The online Hadamard on every layer of each block that reads the stream: the attention's inputs
    (q/k/v or the packed qkv) and the MLP's (fc1, gate/up). Exact on any stack; the way to rotate what
    those layers quantize when the stream itself cannot be rotated offline. Each layer transforms its
    own input: separate q, k and v pay for it three times."""
    b = stack.block
    wrapped = []
    for bp in stack.block_paths(model):
        for p in (*b.attn.inputs, *b.mlp_in):
            online_hadamard_at(model, join(bp, p), fp32, fallback)
            wrapped.append(join(bp, p))
    return wrapped


@dataclass
class RotationOptions:
    mode: str = "hadamard"         # residual rotation: "hadamard" or "random"
    seed: int = 0
    online_hadamard: bool = False  # on the MLP output layers
    online_inputs: bool = False    # on the layers reading the stream (attention and MLP inputs)
    rotate_ov: bool = True
    fp32_had: bool = False
    fallback: str = "error"        # for widths without a Hadamard construction
    split: bool = False            # RMS on the online-Hadamard layers
    split_threshold: float = 0.0   # split when more than this fraction of rows meets the condition
    keep_fp: bool = False          # keep the split branch in floating point


def rotate(model: nn.Module, stacks: list[StackSpec], options: dict[str, RotationOptions]) -> dict:
    """Make every stack rotation-ready, then rotate those named in ``options``.

    ``stacks`` must list every stack whose writers or readers touch a rotated stream (e.g. both the
    vision encoder and the LLM, since the connector writes into the LLM stream)."""
    report: dict = {}
    for s in stacks:
        make_rotation_ready(model, s)
    for s in stacks:
        opt = options.get(s.name)
        if opt is None:
            continue
        if s.residual_rotation:
            Q = rotation_matrix(s.hidden_size, opt.mode, opt.seed, opt.fallback)
            rotate_stack(model, s, Q)
        else:
            log.info("%s: norms on the branch outputs, no residual rotation (per-head V/O and online Hadamards "
                     "only)", s.name)
        if opt.rotate_ov:
            rotate_ov(model, s)
        splits: dict = {}
        online = (add_online_hadamard(model, s, opt.fp32_had, opt.fallback, opt.split, opt.split_threshold,
                                      opt.keep_fp, splits) if opt.online_hadamard else [])
        inputs = add_online_input_hadamards(model, s, opt.fp32_had, opt.fallback) if opt.online_inputs else []
        report[s.name] = {"mode": opt.mode, "seed": opt.seed, "residual": s.residual_rotation,
                          "online_hadamard": online, "online_input_hadamard": inputs, "rms": splits}
        log.info("rotated %s (%s, seed %d); online Hadamard on %d output and %d input layers", s.name, opt.mode,
                 opt.seed, len(online), len(inputs))
    return report
