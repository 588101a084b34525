"""transformers' own common model tests for Yuan 2.0-M32, as an in-tree model's test file runs them.

The mixins come from the installed transformers' source distribution (`transformers_suite.py` fetches and caches
it). The tester follows `tests/models/qwen3_moe/test_modeling_qwen3_moe.py` / `lfm2` (CausalLMModelTester style),
with Yuan's constraints: hidden_size even (the LF gate halves it), rotary dims = head_dim x 0.5 even, special ids
inside the vocabulary, `layer_types` all "hybrid". GQA (2 key/value heads for 4 query heads) is on, unlike the
release, so `repeat_kv` is covered too.

Every skip below names its reason. Not skipped, but switched off by the model itself: the compile / fullgraph
tests, because `_can_compile_fullgraph = False` (the experts' group sizes cost a host sync per layer; another issue
makes decode compilable).
"""

import tempfile
import unittest
from unittest import mock

import pytest
import torch
from transformers import pipeline
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES
from transformers.testing_utils import torch_device

from transformers_suite import load, require
from yuan_hf import YuanM32Config, YuanM32ForCausalLM, YuanM32Model
from yuan_hf.testing import tiny_config

SUITE = load()


class YuanM32ModelTester:
    """Builds the tiny config and inputs the common tests use (the interface of transformers' CausalLMModelTester)."""

    def __init__(
        self,
        parent,
        batch_size=13,
        seq_length=7,
        is_training=True,
        use_input_mask=True,
        use_labels=True,
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,  # 2 x hidden / heads, as the release
        moe_intermediate_size=24,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        initializer_range=0.02,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        sep_token_id=3,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.use_labels = use_labels
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.moe_intermediate_size = moe_intermediate_size
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.sep_token_id = sep_token_id

    def get_config(self) -> YuanM32Config:
        return YuanM32Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            moe_intermediate_size=self.moe_intermediate_size,
            num_experts=self.num_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=self.initializer_range,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            sep_token_id=self.sep_token_id,
        )

    def prepare_config_and_inputs(self):
        input_ids = SUITE.ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = None
        if self.use_input_mask:
            input_mask = SUITE.random_attention_mask([self.batch_size, self.seq_length])
        token_labels = None
        if self.use_labels:
            token_labels = SUITE.ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        return self.get_config(), input_ids, input_mask, token_labels

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask, _ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}

    def create_and_check_model(self, config, input_ids, input_mask, token_labels):
        model = YuanM32Model(config).to(torch_device).eval()
        with torch.no_grad():
            result = model(input_ids, attention_mask=input_mask)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))

    def create_and_check_causal_lm(self, config, input_ids, input_mask, token_labels):
        model = YuanM32ForCausalLM(config).to(torch_device).eval()
        with torch.no_grad():
            result = model(input_ids, attention_mask=input_mask, labels=token_labels, logits_to_keep=self.seq_length)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.seq_length, self.vocab_size))
        self.parent.assertTrue(torch.isfinite(result.loss))


if SUITE is None:

    def test_transformers_common_tests_available():
        require(SUITE)

else:

    class YuanM32ModelTest(
        SUITE.ModelTesterMixin, SUITE.GenerationTesterMixin, SUITE.PipelineTesterMixin, unittest.TestCase
    ):
        all_model_classes = (YuanM32Model, YuanM32ForCausalLM)
        pipeline_model_mapping = {"feature-extraction": YuanM32Model, "text-generation": YuanM32ForCausalLM}
        # transformers dates a model by a "# Copyright YYYY" header (our files have none) and skips this check for
        # old ones; Yuan's `_init_weights` must cover every parameter, so run it
        test_can_init_all_missing_weights_before_2023 = True

        @classmethod
        def setUpClass(cls):
            # The mixins pick the base model (skipped by the training tests, used by the RoPE tests) and the heads
            # that get labels from transformers' static name tables, which list in-tree models only; an in-tree
            # Yuan would be there, so it is put there for the duration of this class.
            super().setUpClass()
            tables = ((MODEL_MAPPING_NAMES, "YuanM32Model"), (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "YuanM32ForCausalLM"))
            cls._in_tree_names = [mock.patch.dict(table, {"yuan_m32": name}) for table, name in tables]
            for patch in cls._in_tree_names:
                patch.start()

        @classmethod
        def tearDownClass(cls):
            for patch in cls._in_tree_names:
                patch.stop()
            super().tearDownClass()

        def setUp(self):
            self.model_tester = YuanM32ModelTester(self)

        def test_config(self):
            config = self.model_tester.get_config()
            restored = YuanM32Config.from_dict(config.to_dict())
            self.assertEqual(restored.to_dict(), config.to_dict())
            with tempfile.TemporaryDirectory() as folder:
                config.save_pretrained(folder)
                self.assertEqual(YuanM32Config.from_pretrained(folder).to_dict(), config.to_dict())

        def test_model(self):
            self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

        def test_causal_lm(self):
            self.model_tester.create_and_check_causal_lm(*self.model_tester.prepare_config_and_inputs())


# Our own text-generation pipeline run: transformers' PipelineTesterMixin only runs models listed in its
# tiny-model summary (tiny Hub checkpoints of in-tree models), so for Yuan it always skips.
@torch.no_grad()
def test_text_generation_pipeline(tmp_path):
    from yuan_hf.conversion.writers.tokenizer import build_demo_tokenizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_demo_tokenizer(tmp_path / "tokenizer"))
    config = tiny_config(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.sep_token_id,
    )  # fmt: skip
    model = YuanM32ForCausalLM(config).eval()
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = generator("Hello, world!", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("Hello, world!")
    tokenizer.padding_side = "left"
    batched = generator(["Hello", "The quick brown fox jumps"], max_new_tokens=4, do_sample=False, batch_size=2)
    alone = [generator(text, max_new_tokens=4, do_sample=False) for text in ("Hello", "The quick brown fox jumps")]
    assert [b[0]["generated_text"] for b in batched] == [a[0]["generated_text"] for a in alone]
    new_only = generator("Hello", max_new_tokens=3, do_sample=False, return_full_text=False)
    assert not new_only[0]["generated_text"].startswith("Hello")
