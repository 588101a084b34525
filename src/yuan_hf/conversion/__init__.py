"""Converters from IEIT's checkpoint formats to the native ``yuan_m32`` layout.

The layout of this package is the data path (README "Architecture")::

    ieit_hf.py            IEIT-HF folder: read shards, translate config.json  ─┐
    megatron/                                                                  │ IEIT-HF-named tensors
      pickle_reader.py    safe zip/pickle reader, lazy tensors                 │
      checkpoint.py       tracker / iter_* / mp_rank_* layout                  │
      args.py             saved training args -> sizes, native config          │
      merge.py            TP/PP merge rules (one declarative table)  ──────────┤
      convert.py          the driver                                           │
    native/               the sink every converter ends in                    ◄┘
      builder.py          IEIT-HF names -> native tensors, shapes checked
      output.py           atomic destination, sharded safetensors writer
      folder.py           config, modeling code, tokenizer adoption, summary, --verify
    cache.py              on-the-fly conversion cache for from_pretrained(ieit_folder)
    tokenizer.py          SentencePiece tokenizer.model -> fast tokenizer folder
    writers/              the inverse direction (synthetic IEIT-HF / Megatron checkpoints for
                          tests, demo, benchmarks); readers never import it
    common.py             ConversionError, KeyTable, shared checks
"""
