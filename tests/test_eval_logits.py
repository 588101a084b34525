"""Evaluation with metrics gets logits by default; training keeps the memory-lean chunked loss (issue 13.3)."""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from yuan_hf.testing import tiny_model


def test_no_grad_forward_with_labels_returns_logits_and_the_same_loss():
    model = tiny_model()
    ids = torch.randint(6, 500, (2, 20))
    labels = ids.clone()
    labels[0, :5] = -100
    model.config.loss_chunk_size = 7  # the 40 tokens span several loss chunks
    with torch.no_grad():
        evaluated = model(ids, labels=labels)
        model.config.loss_chunk_size = 0
        standard = model(ids, labels=labels)
        model.config.loss_chunk_size = 7
    assert evaluated.logits is not None and evaluated.logits.shape == (2, 20, model.config.vocab_size)
    torch.testing.assert_close(evaluated.logits, standard.logits)
    # the chunked loss sums per chunk in another order than one cross-entropy over all tokens (fp32 rounding)
    torch.testing.assert_close(evaluated.loss, standard.loss, atol=1e-5, rtol=0)
    assert model(ids, labels=labels).logits is None  # with gradients (training): never built
    with torch.no_grad():
        assert model(ids, labels=labels, logits_to_keep=1).logits.shape == (2, 1, model.config.vocab_size)


def test_trainer_evaluate_with_compute_metrics_receives_logits(tmp_path):
    model = tiny_model()
    ids = torch.randint(6, 500, (6, 16))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    seen = {}

    def compute_metrics(prediction):
        logits, labels = prediction.predictions, prediction.label_ids
        seen["shape"] = None if logits is None else np.shape(logits)
        accuracy = (np.argmax(logits[:, :-1], -1) == labels[:, 1:]).mean()
        return {"next_token_accuracy": float(accuracy)}

    args = TrainingArguments(tmp_path, per_device_eval_batch_size=3, report_to=[], use_cpu=True)
    metrics = Trainer(model=model, args=args, eval_dataset=data, compute_metrics=compute_metrics).evaluate()
    assert seen["shape"] == (6, 16, model.config.vocab_size)
    assert 0.0 <= metrics["eval_next_token_accuracy"] <= 1.0
    with torch.no_grad():
        model.config.loss_chunk_size = 0
        expected = model(ids, labels=ids).loss
    assert abs(metrics["eval_loss"] - expected.item()) < 1e-4
