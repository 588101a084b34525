"""Configuration of IEIT's Yuan 2.0-M32 (native transformers 5 port).

Self-contained: imports only transformers (this file ships to the Hub as remote code).
"""

from transformers import PretrainedConfig

ROUTER_TYPES = ("attention", "linear")


class YuanM32Config(PretrainedConfig):
    r"""Configuration for [`YuanM32ForCausalLM`]. Defaults are the released Yuan 2.0-M32 (39.9B parameters, 3.7B active).

    Args:
        vocab_size: Padded vocabulary (the tokenizer has 134958 entries).
        hidden_size: Model width H.
        num_hidden_layers: Decoder layers.
        num_attention_heads: Query heads.
        num_key_value_heads: Key/value heads (the release has no GQA: equal to `num_attention_heads`).
        head_dim: Per-head width; the released model uses 256 = 2H / heads (attention projection 4096 = 2H).
        moe_intermediate_size: Width F of each expert's SwiGLU.
        num_experts: Routed experts (no shared expert): one count for every layer, or a list with one count per
            layer (a layer-adaptively pruned model, `yuan-hf experts prune`).
        router_num_experts: Outputs of each layer's router when it differs from the layer's expert count: a pruned
            model keeps its router whole (None: the router has one output per expert).
        router_experts: With `router_num_experts`: per layer, the router output each remaining expert answers to
            (its id before pruning; e.g. `[[0, 2, 5], ...]`). Yuan's attention router mixes every expert's value
            in its E x E attention, so dropping router rows would re-route every token; keeping the router whole
            and reading the kept experts' logits leaves the routing among them exactly as before.
        num_experts_per_tok: Experts per token (top-k).
        norm_topk_prob: Renormalise the top-k routing weights to sum to 1 (IEIT: yes).
        router_type: `"attention"` (Yuan's attention router: E x E attention over the expert axis, fp32) or
            `"linear"` (the classic softmax gate, for ablations and other checkpoints).
        max_position_embeddings: Context the model was fine-tuned for (16384). Longer inputs still run.
        rope_parameters: transformers RoPE dict. Default `{"rope_type": "default", "rope_theta": 40890.0,
            "partial_rotary_factor": 0.5}`: 40890 is the base IEIT's 16K fine-tuning used (NTK rule from the
            pretraining base 10000 at 4096 tokens). Use 10000 for the pretrained base model, or to match
            IEIT's Hugging Face remote code, which hard-codes 10000.
        rope_in_bfloat16: Reproduce IEIT remote code's bf16 cos/sin tables bit for bit (parity checks only;
            positions above 256 are rounded there, so leave this off for real use).
        rms_norm_eps: Epsilon of every RMSNorm (computed in fp32).
        hidden_act: Expert activation (SwiGLU gate).
        tie_word_embeddings: Share input embeddings and LM head (the release is tied).
        sep_token_id: `<sep>`, separating prompt and answer in IEIT's instruct format.
        output_router_logits: Return router logits (and the aux loss) by default.
        router_aux_loss_coef: Weight of the load-balancing loss added to the LM loss (0: IEIT trained without).
        loss_chunk_size: With labels, compute the LM loss this many tokens at a time so the [tokens, vocab] fp32
            logits are never materialised (0: the standard full-logits loss, logits returned). 1024 keeps a
            chunk's logits and their gradient near 1 GB with the 135040 vocabulary at no measured speed cost.
        layer_types: Must be `["hybrid"] * num_hidden_layers`: each layer caches K/V plus the LF-gate conv state.
    """

    model_type = "yuan_m32"
    keys_to_ignore_at_inference = ["past_key_values"]

    # Multi-GPU plans for transformers' DistributedConfig (see distributed_yuan_m32.py). TP splits attention by whole
    # heads and each expert's SwiGLU; EP gives each rank whole experts. Everything unnamed is replicated: the LF gate
    # (its convolutions mix all channels), the norms and the fp32 attention router (E x E over the expert axis).
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.experts.*.gate_proj": "colwise",
        "layers.*.mlp.experts.*.up_proj": "colwise",
        "layers.*.mlp.experts.*.down_proj": "rowwise",
    }
    base_model_ep_plan = {
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    def __init__(
        self,
        vocab_size: int = 135040,
        hidden_size: int = 2048,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        num_key_value_heads: int | None = None,
        head_dim: int = 256,
        moe_intermediate_size: int = 8192,
        num_experts: int | list[int] = 32,
        num_experts_per_tok: int = 2,
        router_num_experts: int | None = None,
        router_experts: list[list[int]] | None = None,
        norm_topk_prob: bool = True,
        router_type: str = "attention",
        max_position_embeddings: int = 16384,
        rope_parameters: dict | None = None,
        rope_in_bfloat16: bool = False,
        rms_norm_eps: float = 1e-6,
        hidden_act: str = "silu",
        initializer_range: float = 0.02,
        attention_dropout: float = 0.0,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        bos_token_id: int | None = 77185,
        eos_token_id: int | list[int] | None = 77185,
        pad_token_id: int | None = 77185,
        sep_token_id: int | None = 77187,
        output_router_logits: bool = False,
        router_aux_loss_coef: float = 0.0,
        loss_chunk_size: int = 1024,
        layer_types: list[str] | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim
        self.moe_intermediate_size = moe_intermediate_size
        self.num_experts = list(num_experts) if isinstance(num_experts, (list, tuple)) else num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.router_num_experts = router_num_experts
        self.router_experts = None if router_experts is None else [list(ids) for ids in router_experts]
        self.norm_topk_prob = norm_topk_prob
        self.router_type = router_type
        self.max_position_embeddings = max_position_embeddings
        if rope_parameters is None and "rope_theta" not in kwargs and "rope_scaling" not in kwargs:
            rope_parameters = {"rope_type": "default", "rope_theta": 40890.0, "partial_rotary_factor": 0.5}
        self.rope_parameters = rope_parameters
        kwargs.setdefault("partial_rotary_factor", 0.5)
        self.rope_in_bfloat16 = rope_in_bfloat16
        self.rms_norm_eps = rms_norm_eps
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.attention_dropout = attention_dropout
        self.use_cache = use_cache
        self.sep_token_id = sep_token_id
        self.output_router_logits = output_router_logits
        self.router_aux_loss_coef = router_aux_loss_coef
        self.loss_chunk_size = loss_chunk_size
        self.layer_types = ["hybrid"] * num_hidden_layers if layer_types is None else list(layer_types)
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_yuan()

    def validate_yuan(self) -> None:
        """Check every field; errors name the field, the value found and what is allowed."""

        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"YuanM32Config.{name} must be a positive integer, got {value!r}")

        for name in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "moe_intermediate_size", "num_experts_per_tok", "max_position_embeddings",
        ):  # fmt: skip
            positive(name)
        # special-token ids outside the vocabulary are not an error here: the defaults are the release's ids, and a
        # config for a smaller vocabulary (a tiny test model, `AutoConfig.for_model("yuan_m32", vocab_size=...)`)
        # must be constructible; transformers' own config validation warns about them (5.17+), `generate` refuses
        # them (YuanM32ForCausalLM.generate), and forwards leave input ids to the embedding (no host sync).
        self._validate_num_experts()
        if self.hidden_size % 2:
            raise ValueError(f"YuanM32Config.hidden_size must be even (the LF gate halves it), got {self.hidden_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"YuanM32Config.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.router_type not in ROUTER_TYPES:
            raise ValueError(f"YuanM32Config.router_type must be one of {ROUTER_TYPES}, got {self.router_type!r}")
        if not isinstance(self.rms_norm_eps, (int, float)) or self.rms_norm_eps <= 0:
            raise ValueError(f"YuanM32Config.rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if not isinstance(self.router_aux_loss_coef, (int, float)) or self.router_aux_loss_coef < 0:
            raise ValueError(
                f"YuanM32Config.router_aux_loss_coef must be a number >= 0, got {self.router_aux_loss_coef!r}"
            )
        if not isinstance(self.loss_chunk_size, int) or isinstance(self.loss_chunk_size, bool) or self.loss_chunk_size < 0:
            raise ValueError(
                f"YuanM32Config.loss_chunk_size must be an integer >= 0 (0 disables chunking), got {self.loss_chunk_size!r}"
            )
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"YuanM32Config.attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
        if self.layer_types != ["hybrid"] * self.num_hidden_layers:
            raise ValueError(
                "YuanM32Config.layer_types must be ['hybrid'] * num_hidden_layers (every Yuan layer has attention "
                f"and the LF-gate convolution), got {self.layer_types!r}"
            )
        rope = self.rope_parameters or {}
        theta = rope.get("rope_theta")
        if not isinstance(theta, (int, float)) or theta <= 1:
            raise ValueError(f"YuanM32Config.rope_parameters['rope_theta'] must be a number > 1, got {theta!r}")
        factor = rope.get("partial_rotary_factor", 1.0)
        rotary_dim = self.head_dim * factor
        if not 0 < factor <= 1 or rotary_dim != int(rotary_dim) or int(rotary_dim) % 2:
            raise ValueError(
                "YuanM32Config.rope_parameters['partial_rotary_factor'] must be in (0, 1] and give an even "
                f"rotary dimension; got {factor} x head_dim {self.head_dim} = {rotary_dim}"
            )
        if self.rope_in_bfloat16 and rope.get("rope_type", "default") != "default":
            raise ValueError(
                "YuanM32Config.rope_in_bfloat16 reproduces IEIT's plain RoPE tables and only works with "
                f"rope_type 'default', got {rope.get('rope_type')!r}"
            )

    def special_tokens_outside_vocab(self, source=None) -> dict:
        """`{field: id}` of the bos/eos/pad/sep ids of `source` (default: this config; or a GenerationConfig)
        that are not in `range(vocab_size)`."""
        source = self if source is None else source
        outside = {}
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id"):
            ids = getattr(source, name, None)
            ids = ids.tolist() if hasattr(ids, "tolist") else ids  # GenerationConfig may hold tensors
            for token_id in ids if isinstance(ids, (list, tuple)) else [ids]:
                if token_id is not None and not (isinstance(token_id, int) and 0 <= token_id < self.vocab_size):
                    outside[name] = ids
        return outside

    def _validate_num_experts(self) -> None:
        """`num_experts`: a positive int, or one positive int per layer; every layer has at least top-k experts."""
        counts = self.num_experts
        if isinstance(counts, list):
            if len(counts) != self.num_hidden_layers:
                raise ValueError(
                    f"YuanM32Config.num_experts has {len(counts)} per-layer counts but num_hidden_layers is "
                    f"{self.num_hidden_layers}; give one count per layer, or a single int"
                )
        elif not isinstance(counts, int) or isinstance(counts, bool) or counts <= 0:
            raise ValueError(
                f"YuanM32Config.num_experts must be a positive integer or a list of one per layer, got {counts!r}"
            )
        for layer, count in enumerate(self.experts_per_layer):
            where = f"num_experts[{layer}] (layer {layer})" if isinstance(counts, list) else "num_experts"
            if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
                raise ValueError(f"YuanM32Config.{where} must be a positive integer, got {count!r}")
            if self.num_experts_per_tok > count:
                raise ValueError(
                    f"YuanM32Config.num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed {where} ({count})"
                )
        if (self.router_num_experts is None) != (self.router_experts is None):
            raise ValueError(
                "YuanM32Config.router_num_experts and router_experts go together (a pruned model's whole router and "
                f"the outputs its experts answer to), got {self.router_num_experts!r} and {self.router_experts!r}"
            )
        if self.router_experts is None:
            return
        width = self.router_num_experts
        if not isinstance(width, int) or isinstance(width, bool) or width <= 0:
            raise ValueError(f"YuanM32Config.router_num_experts must be a positive integer, got {width!r}")
        if len(self.router_experts) != self.num_hidden_layers:
            raise ValueError(
                f"YuanM32Config.router_experts has {len(self.router_experts)} layers but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        for layer, (ids, count) in enumerate(zip(self.router_experts, self.experts_per_layer)):
            valid = all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < width for i in ids)
            if len(ids) != count or not valid or len(set(ids)) != len(ids):
                raise ValueError(
                    f"YuanM32Config.router_experts[{layer}] (layer {layer}) must list {count} distinct router outputs "
                    f"in [0, router_num_experts={width}) (one per expert of the layer), got {ids!r}"
                )

    @property
    def experts_per_layer(self) -> list[int]:
        """The routed-expert count of each layer (`num_experts` repeated, or the per-layer list)."""
        if isinstance(self.num_experts, list):
            return list(self.num_experts)
        return [self.num_experts] * self.num_hidden_layers

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that RoPE rotates (the first ones; the rest pass through)."""
        return int(self.head_dim * self.rope_parameters.get("partial_rotary_factor", 1.0))


__all__ = ["YuanM32Config"]
