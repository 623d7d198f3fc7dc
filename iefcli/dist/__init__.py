"""Beyond one process: iEF / EF / SF exact over the GLOBAL batch on torchrun ranks and micro-batches.

- :mod:`iefcli.dist.comm`: the process group (gloo / NCCL, a timeout on collectives) and
  the two collectives (one all_gather of packed factors, one all_reduce);
- :mod:`iefcli.dist.rows`: :class:`ShardedRows`, the rows of the whole batch from this
  rank's micro-batches and everyone's gathered factors (the fast path's own block types);
- :mod:`iefcli.dist.grads`: :func:`global_batch_grads` (the global batch's BatchGrads) and
  :class:`DistModelFn` (what the optimisers use under torchrun / ``train.accumulate``);
- :mod:`iefcli.dist.train`, :mod:`iefcli.dist.launch`: `ief train` under torchrun and
  `ief train --nproc K` (one error line; the ranks' errors in per-rank logs);
  :mod:`iefcli.dist.bench`: calls and bytes per step, step time; ``--memory``
  (:mod:`iefcli.dist.memory`): peak memory vs the micro-batch size, under a memory cap.

See docs/distributed.md. The drop-in :class:`iefcli.Preconditioner` uses the same rows
(``pre.accumulate()``, and torch.distributed when it is initialised).
"""

__all__ = ["Comm", "ShardedRows", "global_batch_grads", "DistModelFn"]


def __getattr__(name):
    if name == "Comm":
        from iefcli.dist.comm import Comm

        return Comm
    if name == "ShardedRows":
        from iefcli.dist.rows import ShardedRows

        return ShardedRows
    if name in ("global_batch_grads", "DistModelFn"):
        from iefcli.dist import grads

        return getattr(grads, name)
    raise AttributeError(name)
