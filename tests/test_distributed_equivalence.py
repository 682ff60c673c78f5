"""The whole MLIP model + composite loss on 2 gloo ranks (each with half the batch, features gathered with
gradients, rows/columns sharded) gives the loss and parameter gradients of one process on the full batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from launch_utils import free_port

from mlip_dist.config import IntegrityMode, LossConfig
from mlip_dist.data.batch import MLIPBatch
from mlip_dist.models.image_encoder import random_patch_mask
from mlip_dist.models.presets import tiny
from mlip_dist.training.module import MLIPTrainingModule

BATCH = 8


def make_inputs(model_config, integrity: IntegrityMode):
    generator = torch.Generator().manual_seed(1)
    size = model_config.image.image_size
    tokens = 24
    spans = torch.zeros(BATCH, model_config.max_sentences, 2, dtype=torch.long)
    sentence_mask = torch.zeros(BATCH, model_config.max_sentences, dtype=torch.bool)
    for b in range(BATCH):
        for s in range(1 + b % 4):  # different sentence counts: padding differs across ranks
            spans[b, s] = torch.tensor([1 + 5 * s, 5 + 5 * s])
            sentence_mask[b, s] = True
    batch = MLIPBatch(
        images=torch.randn(BATCH, 3, size, size, generator=generator),
        input_ids=torch.randint(1000, 5000, (BATCH, tokens), generator=generator),
        attention_mask=torch.ones(BATCH, tokens, dtype=torch.long),
        sentence_spans=spans, sentence_mask=sentence_mask,
    )
    num_patches = (size // model_config.image.patch_size) ** 2
    mask = random_patch_mask(BATCH, num_patches, model_config.image.mask_ratio, generator=generator)
    return batch, mask


def build(rank: int, world_size: int, integrity: IntegrityMode):
    torch.manual_seed(0)
    model_config = tiny()
    loss_config = LossConfig(integrity=integrity, ot_tol=0.0, ot_max_iter=40)
    return model_config, MLIPTrainingModule(model_config, loss_config, rank=rank, world_size=world_size)


def loss_and_grads(module, batch, mask, rows):
    from mlip_dist.models.image_encoder import PatchMask

    part = MLIPBatch(images=batch.images[rows], input_ids=batch.input_ids[rows],
                     attention_mask=batch.attention_mask[rows], sentence_spans=batch.sentence_spans[rows],
                     sentence_mask=batch.sentence_mask[rows])
    part_mask = PatchMask(mask.visible_patch_idx[rows], mask.masked_patch_idx[rows], mask.num_patches)
    output = module.model(part, compute_full_view=module.compute_full_view, mask=part_mask)
    terms = module.loss(output, rank=module.rank, world_size=module.world_size, group=None)
    terms.total.backward()
    return terms.total.detach(), {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def worker(rank: int, world_size: int, port: int, integrity: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    model_config, module = build(rank, world_size, IntegrityMode(integrity))
    batch, mask = make_inputs(model_config, IntegrityMode(integrity))
    per_rank = BATCH // world_size
    loss, grads = loss_and_grads(module, batch, mask, slice(rank * per_rank, (rank + 1) * per_rank))
    dist.all_reduce(loss)
    for grad in grads.values():  # what DeepSpeed does: average gradients over data-parallel ranks
        dist.all_reduce(grad)
        grad /= world_size
    if rank == 0:
        queue.put((float(loss / world_size), {k: v.numpy() for k, v in grads.items()}))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("integrity", ["relative", "learned"])
def test_two_ranks_match_one_process_on_the_concatenated_batch(integrity):
    model_config, module = build(0, 1, IntegrityMode(integrity))
    batch, mask = make_inputs(model_config, IntegrityMode(integrity))
    reference_loss, reference_grads = loss_and_grads(module, batch, mask, slice(0, BATCH))

    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=worker, args=(rank, 2, port, integrity, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    loss, grads = queue.get(timeout=300)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    assert loss == pytest.approx(float(reference_loss), rel=1e-5)
    assert grads.keys() == reference_grads.keys()
    for name, reference in reference_grads.items():
        difference = torch.from_numpy(grads[name]) - reference
        relative = float(difference.norm() / reference.norm().clamp_min(1e-12))
        # Parameters whose gradient is ~0 in exact arithmetic (the learned-integrity bias: a shift is
        # removed by the mean-1 normalisation) are compared absolutely.
        assert relative <= 1e-5 or float(difference.abs().max()) <= 1e-6, (name, relative)
    everything = torch.cat([torch.from_numpy(grads[n]).flatten() for n in reference_grads])
    reference_all = torch.cat([g.flatten() for g in reference_grads.values()])
    assert float((everything - reference_all).norm() / reference_all.norm()) <= 1e-5
