"""The fast path: Gram matrices J J^T and combinations J^T x without per-sample gradients.

Package layout (four layers, each usable on its own):
``rules``    which modules have a rule, and the CAPTURE layer (:class:`Layer`: a forward hook
             keeping X and Z, optionally a tensor hook keeping dL/dZ from an ordinary backward;
             :class:`Call` for the per-module replay), parameter-use counting on the graph;
``blocks``   per-layer block maths from X and E (gram / combine_into / dot, and ``matrix()``,
             the dense twin), and the per-module replay block;
``rows``     :class:`FastRows`, the sum of the blocks (plus the whole-model vmap fallback);
``jacobian`` :class:`FastJacobian`, the OutputJacobian over a functional forward.
The same capture and blocks serve :class:`iefcli.precond.Preconditioner` (hooks on the
user's own modules during their own forward/backward).

:class:`FastJacobian` is an :class:`iefcli.core.jacobian.OutputJacobian`
registered as ``"fast"`` (``make_jacobian(jacobian="auto")`` picks it). It runs
ONE batched forward with the trainable parameters substituted
(``forward(model, params, inputs)``, e.g. ``functional_call``), with forward
hooks on the supported layers that record each layer's input X and keep its
output Z. ``rows(U)`` runs one backward pass per cotangent set U_k (K, N, ...)
from the logits to every hooked output (retaining the graph), which gives the
output gradients E = dL_k/dZ with the batch structure intact. For a layer
whose output is Z_n = X_n W^T (+ b), the per-sample gradient of row
m = (k, n) is E_m^T X_n, so the layer's block of the Gram matrix and of
R^T x need only X and E:

==================  =========================================================
layer               per-sample gradient of row m (T = positions per sample)
==================  =========================================================
Linear (N, d_in)    W: E_m^T X_n  ->  Gram block (X X^T) * (E E^T)  (Hadamard)
Linear (N, T, d)    W: sum_t E_mt^T X_nt -> per layer the cheaper of
                    "ghost" sum_{t,t'} (X_i X_j^T)_{tt'} (E_i E_j^T)_{tt'},
                    O(M^2 T^2 (d_in + d_out)), and "materialise"
                    (the M x d_out x d_in per-sample blocks of THIS layer),
                    O(M T d_in d_out + M^2 d_in d_out)
bias (any)          sum_t E_mt  ->  Gram block (sum_t E)(sum_t E)^T
Conv2d (groups=1)   a sequence Linear on unfolded patches (T = H_out W_out)
LayerNorm           w: sum_t E_mt * xhat_nt, b: sum_t E_mt (M x D, materialised)
Embedding           W: scatter of E_mt into rows ids_nt; Gram over shared
                    tokens only (pairs of occurrences of the same id)
==================  =========================================================

``combine(x)`` = sum_m x_m row_m is E^T diag(x) X per layer (one matmul, no
per-sample gradients); ``dot(v)`` = R v is <E_m, X_n V^T> per layer.

Requirement (as for any per-sample gradient): samples are independent and
batch-first inside the model, i.e. dim 0 of every hooked layer's input and
output indexes the N samples and z_n depends on slice n only. A layer whose
input's leading dim is not N (peft's shared prompt embedding, seq-first
layers such as ``nn.TransformerEncoderLayer(batch_first=False)``) falls back
automatically; batch norm in train mode is refused. A seq-first layer whose
sequence length happens to EQUAL N cannot be told apart from shapes: use
``jacobian="vmap"`` for models that run layers seq-first.

Fallback: every trainable parameter without such a rule takes the plain
chunked vmap path (:class:`iefcli.core.jacobian.VmapJacobian` restricted to
those parameters, the others held fixed), so every model works and the same
rows come out. A layer falls back when its type has no rule, its forward is
not the stock one (a subclass overriding ``forward``), it is called more or
fewer than once, its input is modified in place after the call, a parameter
is shared (tied) or used by any other operation in the graph (counted on the
autograd graph: each of the layer's parameters must have exactly one consumer),
or the rule does not support its options (e.g. Embedding ``max_norm``,
grouped or non-zero-padded convolutions). ``FastJacobian.param_paths`` tells
which path each parameter took; ``fallback_reasons`` says why.

Precision (documented choice): everything that reaches the solves or the
direction is accumulated in float64 from the captured X and E (kept in
float32, or float64 for float64 parameters; bf16/fp16 upcast): each Gram
block and their sum, ``dot`` (returned in float64) and ``combine`` (formed in
float64 over blocks of output units, each rounded once into the parameters'
dtype, so the float64 temporaries stay small). This is the plain path's
precision (float32 rows, float64 Gram and R^T x); float32 accumulation was
measurably worse for SF at tiny damping, whose Woodbury form
(g - Jhat^T x) / lam cancels. On the benchmark MLP the float64 combine costs
a few per cent of the step. Inputs a layer sees before an autocast cast
(float32 X, bf16 E) are used as seen.

Randomness: the batched forward is an ordinary forward. With
``randomness="error"`` (the default, as for vmap) a model in train mode with
active dropout modules is refused (put it in eval mode); with "different"
the batched forward's dropout masks are per sample by construction. Batch
norm in train mode is always refused: batch statistics couple the samples.

Memory: X and E per hooked layer (the size of the activations), the N x N
Gram, and per-sample blocks only for the layers where the materialise
strategy is cheaper AND below ``MATERIALISE_MAX_ELEMENTS``; never N x P.
"""

from __future__ import annotations

from iefcli.core.fast.blocks import (
    ACC,
    COMBINE_CHUNK_ELEMENTS,
    COMBINE_CHUNK_ELEMENTS_ACCEL,
    GHOST_CHUNK_ELEMENTS,
    MATERIALISE_MAX_ELEMENTS,
    Block,
    compute_dtype,
    make_block,
)
from iefcli.core.fast.jacobian import FastJacobian
from iefcli.core.fast.rows import FastRows
from iefcli.core.fast.rules import Layer, leaf_uses, rule_for
from iefcli.core.jacobian import register_jacobian

__all__ = ["FastJacobian", "FastRows", "MATERIALISE_MAX_ELEMENTS", "GHOST_CHUNK_ELEMENTS", "COMBINE_CHUNK_ELEMENTS",
           "COMBINE_CHUNK_ELEMENTS_ACCEL", "ACC", "Block", "Layer", "compute_dtype", "make_block", "leaf_uses",
           "rule_for"]

register_jacobian("fast", FastJacobian)
