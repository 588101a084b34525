"""Wrong inputs to forward fail at the door with a ValueError naming the argument and the expected shape."""

import pytest
import torch
from transformers import DynamicCache

from yuan_hf.testing import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@torch.no_grad()
def test_wrong_shaped_attention_mask_and_positions_are_named(model):
    x = torch.randint(6, 500, (2, 5))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[2, past \+ 5\].*got \[1, 5\]"):
        model(x, attention_mask=torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[2, past \+ 5\].*got \[2, 3\]"):
        model(x, attention_mask=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"position_ids must have shape \[2 or 1, 5\].*got \[2, 4\]"):
        model(x, position_ids=torch.arange(4).expand(2, 4))
    with pytest.raises(ValueError, match=r"position_ids must have shape.*got \[5\]"):
        model(x, position_ids=torch.arange(5))
    # a mask that also covers cached tokens is right
    cache = DynamicCache(config=model.config)
    model(x, cache=cache, use_cache=True)
    model(x[:, :1], cache=cache, use_cache=True, attention_mask=torch.ones(2, 6, dtype=torch.long))


@torch.no_grad()
def test_empty_input_is_refused(model):
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))


def test_labels_of_another_shape_raise_on_both_loss_paths(model):
    x = torch.randint(6, 500, (2, 6))
    for chunk in (1024, 0):  # the chunked default and the standard full-logits loss agree: both refuse
        model.config.loss_chunk_size = chunk
        try:
            with pytest.raises(ValueError, match=r"labels must have the shape of input_ids \[2, 6\], got \[2, 5\]"):
                model(x, labels=x[:, :5])
            with pytest.raises(ValueError, match=r"labels must have the shape of input_ids \[2, 6\], got \[1, 6\]"):
                model(x, labels=x[:1])
        finally:
            model.config.loss_chunk_size = 1024
