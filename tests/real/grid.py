"""The 64-token grid (docs/caching.md, Exactness rules 1-4) on the llama.cpp backend."""

#: ``ModelConfig.options`` that keep the grid: no padded chunks (the default on the CPU with
#: flash attention pads them). The grid is what the backend does with GPU layers or flash
#: attention off; the tests that count whole grid cells, or that mirror the engine's chunks in
#: a plain loop of their own, run it. Padded feeding has its own tests against a plain padded
#: loop (test_padded_prefill_real.py).
GRID_FEEDING = {"pad_prefill": False}
