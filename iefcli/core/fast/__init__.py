"""The fast path: Gram matrices J J^T and combinations J^T x without per-sample gradients.

Package layout (four layers, each usable on its own):
``rules``    which modules have a rule, and the CAPTURE layer (:class:`Layer`: a forward hook
             keeping X and Z, optionally a tensor hook keeping dL/dZ from an ordinary backward;
             :class:`Call` for the per-module replay), parameter-use counting on the graph;
``attention`` nn.MultiheadAttention's rule (:class:`Attn`: the module's forward replaced, during the
             batched forward only, by the same computation with the projections as graph tensors);
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
Conv1d/2d (groups 1) per-sample W: one grouped weight-gradient convolution
                    (groups = M), or, on the CPU for few input channels (C_in k
                    <= 32 in 2-d, <= 256 in 1-d), strided-view patches + one bmm; J^T x
                    one weight-gradient convolution; too big to materialise:
                    a sequence Linear on unfolded patches (T = H_out W_out)
LayerNorm           w: sum_t E_mt * xhat_nt, b: sum_t E_mt (M x D, materialised)
Embedding           W: scatter of E_mt into rows ids_nt; Gram per id over the
                    rows holding it (one batched matmul per group-size class),
                    or densely on the touched rows when there are few ids
MultiheadAttention  in_proj (packed: one Linear on the sequence when query is
                    key is value, else three row slices, materialised; or
                    q/k/v_proj_weight: three Linears) and out_proj (a Linear
                    on the attention output): sequence Linear blocks
tied weight         sum of the holders' blocks: their Grams + cross terms
                    (Embedding x Linear on the touched rows only)
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

A materialised sequence Linear (and a Conv) keeps the per-sample gradients its Gram formed
(up to ``KEEP_PER_SAMPLE_ELEMENTS``) so that J^T x in the compute dtype is one (M) x (M, P_layer)
product instead of a weight-gradient matmul.

nn.MultiheadAttention (and so TransformerEncoderLayer / DecoderLayer): the module's forward is
replaced during the batched forward by :func:`iefcli.core.fast.attention.attention_forward` (the
same maths, batch-first inside, masks, need_weights, batch_first both ways, kdim/vdim), which
exposes the in-projection outputs and out_proj's input/output; E is the total derivative there, so
attention weights used downstream are exact too. add_bias_kv, add_zero_attn, active attention
dropout, unbatched inputs or a subclass overriding forward keep the per-module replay below; a
module called twice or a parameter used outside it as well (``param_paths`` "attention").

Fallback, per module: a module owning trainable parameters without a rule
(a custom layer, an nn.MultiheadAttention the attention rule does not cover, ...) is replayed per sample ON ITS OWN under vmap, its parameters the
only variables, from its captured arguments and output gradients
(:func:`iefcli.core.fast.blocks.replay_block`, the same implementation the
Preconditioner uses); rule layers below it (MHA's out_proj, whose weight MHA
reads without calling it) are replayed with it. A module returning a tuple is
replayed on its first output when the others do not reach the logits (MHA's
attention weights). Only what the per-module replay cannot take goes through
the whole model per sample (:class:`iefcli.core.jacobian.VmapJacobian`
restricted to those parameters, the others held fixed): tied weights whose
holders do not all have rules, a root module's own parameters, recurrent modules (nn.RNNBase), a module called more
or fewer than once, a parameter used outside its module, or a module whose
input or output does not have the batch as its leading dim. A rule layer falls
back when its forward is not the stock one (a subclass overriding ``forward``),
it is called more or fewer than once, its input is modified in place after the
call, a parameter is shared (tied) or used by any other operation in the graph
(counted on the autograd graph: each of the layer's parameters must have
exactly one consumer), or the rule does not support its options (e.g.
Embedding ``max_norm``, grouped or non-zero-padded convolutions).
``FastJacobian.param_paths`` tells which path each parameter took ("replay":
the per-module fallback, "vmap": the whole model); ``fallback_reasons`` says
why.

When the parameters certain to take the whole-model path (a recurrent module, a root module's own
parameters, tied weights without rules) hold at least half of the trainable numbers, everything
is handed to the plain path (:class:`iefcli.core.jacobian.VmapJacobian`, ``param_paths`` all
"vmap", the reason in ``fallback_reasons``): the hooked forward and the layer blocks would only add
to a per-sample pass that costs most of the time anyway.

Tied weights (one Parameter held by several modules with rules, e.g. an
Embedding and the Linear head): the parameter's block (``param_paths`` "tied") sums the holders'
blocks: Gram = the holders' own Grams + cross terms, Embedding x Linear cross terms formed on the
weight rows the ids touch ((M, |U|, d) per side), other pairs by dense columns; J^T x and J v are
the sums of the holders'. Nothing M x numel is formed, except for iefcli.dist (the dense form it
gathers). Above ``MATERIALISE_MAX_ELEMENTS`` for N x numel the parameter still takes the
whole-model path. Broadcast position embeddings (an Embedding on
ids of leading dim 1 while the batch is N) have their output expanded to the
batch inside the capture so each sample gets its own output gradient; a model
whose code rejects the expanded shape is run as written (whole-model path).

Precision (documented choice): each Gram block and each layer's J^T x are
formed in the compute dtype (float32 for float32/bf16/fp16 parameters, float64
for float64 ones) from the captured X and E; the Gram blocks are summed in
float64 and the N x N solve is float64. On the bench MLP this changes the iEF
direction by ~3e-7 relative against a float64 reference (``ief bench`` checks
it on all N rows). ``dot`` is float64, and ``combine(x, dtype=float64)`` (SF's
Woodbury subtraction g - Jhat^T x / lam, ngd's residual) is accumulated in
float64 over blocks of output units, each rounded once, so the float64
temporaries stay small; SF's iterative refinement
(``directions.sf(refine=...)``) absorbs the float32 rounding of the Gram.
Inputs a layer sees before an autocast cast (float32 X, bf16 E) are used as
seen.

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
