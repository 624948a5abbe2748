"""The loader's doc_ids do what the model needs: a token's logits ignore other documents in its row."""

import numpy as np
import torch

from flowtrain.data.loader import IGNORE_INDEX, BatchLoader
from flowtrain.model.config import ModelConfig
from flowtrain.model.gpt import GPT


def _model(vocab: int) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=48, vocab_size=vocab)).eval()


def test_packed_doc_mask_isolates_documents(byte_ds):
    loader = BatchLoader(byte_ds, "train", batch_size=8, block_size=48, mode="packed", seed=0, doc_mask=True)
    batch = loader.next()
    rows = [r for r in range(8) if batch.doc_ids[r].max() > batch.doc_ids[r].min()]
    assert rows, "expected a row holding two documents"
    r = rows[0]
    later = batch.doc_ids[r] == batch.doc_ids[r].max()
    model = _model(byte_ds.vocab_size)
    with torch.no_grad():
        before = model(batch.inputs[r : r + 1], doc_ids=batch.doc_ids[r : r + 1])
        changed = batch.inputs[r : r + 1].clone()
        changed[0, ~later] = torch.randint(0, 256, (int((~later).sum()),))
        after = model(changed, doc_ids=batch.doc_ids[r : r + 1])
        unmasked = model(changed)
    assert torch.allclose(before[0, later], after[0, later], atol=1e-6)
    assert not torch.allclose(before[0, later], unmasked[0, later], atol=1e-4)  # the mask is what isolates


def test_varlen_padding_does_not_touch_real_tokens(byte_ds):
    loader = BatchLoader(byte_ds, "train", batch_size=4, block_size=48, mode="varlen", seed=0)
    batch = loader.next()
    real = batch.targets != IGNORE_INDEX
    r = int(np.argmin(real.sum(1).numpy()))  # the shortest row has padding
    assert not real[r].all()
    model = _model(byte_ds.vocab_size)
    with torch.no_grad():
        before = model(batch.inputs[r : r + 1])
        changed = batch.inputs[r : r + 1].clone()
        changed[0, ~real[r]] = 7
        after = model(changed)
    assert torch.allclose(before[0, real[r]], after[0, real[r]], atol=1e-6)
