"""The test suite that ships with ryzen-opt: fast checks of the optimizers on a real model, run by ``ryzen-opt run``'s
testing stage from any directory (``python -m pytest --pyargs ryzen_opt.selftest``).

It tests the model in ``$RYZEN_OPT_SELFTEST_MODEL`` (a ``save_pretrained`` directory with its tokenizer; the pipeline
saves the model it just validated to ``<output_dir>/model`` and sets the variable), with the optimizer configs saved
beside it (``ryzen_opt_system.json``, else ``SystemConfig()``'s defaults). Without the variable it tests the reference
model, SmolLM2-135M-Instruct, and skips with the reason if that is not installed.

What it checks holds for a correct implementation on any causal LM, trained well or not, and fails for a broken one:

- speculative decoding is lossless (its greedy output is the model's own ``generate``), with n-gram drafting and with
  a drafter that proposes the model's own continuation (all of which must then be accepted);
- the KernelOptimizer and the EmbeddingCompressor keep next-token top-1 within 1% (not shown to lose more, on a few
  held-out prose blocks) and agree with the model on most tokens;
- the KV cache stores less than HF's dynamic cache, and greedy decoding through it picks, at every step, a token the
  full-precision model scores within a small margin of its own best.

Budget: about a minute and a half on 2 cores for SmolLM2.
"""

MODEL_ENV = "RYZEN_OPT_SELFTEST_MODEL"
SYSTEM_CONFIG_FILE = "ryzen_opt_system.json"
