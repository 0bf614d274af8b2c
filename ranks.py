"""torch.distributed plumbing for train.py under torchrun: each rank trains on its share of every global batch,
and these keep the ranks' SAEs identical.

Glossary
  world, rank   number of processes, this one's index (torchrun's WORLD_SIZE, RANK); rank 0 writes the run
  weight        b_rank / batch: this rank's share of the global batch, so the averaged gradient is the batch's
  dead          an atom fired in a step if it fired on any rank (GlobalDeadTracker)
  broadcast     where a rank decides from its own batch (resampling, BatchTopK's threshold), rank 0's SAE and
                optimiser state overwrite the others'
"""

import torch
import torch.distributed as dist

import writesae


class GlobalDeadTracker(writesae.DeadTracker):
    def update(self, codes):  # an atom fired in this step if it fired on any rank
        fired = (codes > 0).any(1).int()                                                 # [h,n]
        dist.all_reduce(fired, op=dist.ReduceOp.MAX)
        self.steps = torch.where(fired.bool(), 0, self.steps + 1)


def average_grads(params, weight):
    """An optimiser pre-step hook: grad ← Σ_ranks (b_rank / batch) grad_rank, as one flat all-reduce."""
    def hook(opt, *_):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten() for g in grads]) * weight
        dist.all_reduce(flat)
        for p, g in zip(params, flat.split([q.numel() for q in params])):
            p.grad = g.view_as(p)
    return hook


def broadcast_state(sae, opt):
    tensors = [*sae.parameters(), *sae.buffers()]
    tensors += [v for p in sae.parameters() for v in opt.state.get(p, {}).values() if torch.is_tensor(v) and v.dim()]
    flat = torch.cat([t.detach().flatten() for t in tensors])
    dist.broadcast(flat, 0)
    with torch.no_grad():
        for t, x in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(x.view_as(t))


def reduce_sum(x, world):
    if world > 1:
        dist.all_reduce(x)
    return x
