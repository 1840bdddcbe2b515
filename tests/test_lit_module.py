import math

import torch
import torch.nn.functional as F

from lmlab.data import IGNORE_INDEX
from lmlab.lit_module import Perplexity


def test_perplexity_is_exp_of_mean_nll_over_real_targets_across_batches():
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 5, 7, generator=generator) for _ in range(3)]
    targets = [torch.randint(0, 7, (2, 5), generator=generator) for _ in range(3)]
    targets[2][1, 3:] = IGNORE_INDEX  # padding of the last block is not a token
    metric = Perplexity()
    for x, y in zip(logits, targets):
        metric.update(x, y)
    log_probs = torch.cat([F.log_softmax(x, -1).flatten(0, 1) for x in logits])
    flat = torch.cat([y.flatten() for y in targets])
    real = flat != IGNORE_INDEX
    nll = -log_probs[real].gather(1, flat[real, None]).mean().item()
    assert abs(metric.compute().item() / math.exp(nll) - 1) < 1e-6
    assert int(metric.count) == 28


def test_perplexity_of_a_perfect_model_is_one_and_uniform_is_vocab_size():
    targets = torch.tensor([[1, 2, 3]])
    confident = torch.full((1, 3, 5), -1e4).scatter(2, targets[..., None], 0.0)
    metric = Perplexity()
    metric.update(confident, targets)
    assert abs(metric.compute().item() - 1.0) < 1e-6
    metric.reset()
    metric.update(torch.zeros(1, 3, 5), targets)
    assert abs(metric.compute().item() - 5.0) < 1e-5
