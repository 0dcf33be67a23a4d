"""Decoding speed: t5x_lite's jit-compiled greedy and beam-4 search against Hugging Face ``generate``.

    python experiments/benchmarks/decode_bench.py [--model t5_small --batch 32 --new_tokens 64 --repeats 3]
    python experiments/benchmarks/decode_bench.py --quick   # a 2-layer toy model: checks the script in seconds

What it measures. One random T5 (``--model``, T5 v1.0 shapes for ``t5_small``: 6+6 layers, d_model 512, vocab
32128, float32) is built in transformers (``torch.manual_seed``) and converted with
``t5x_lite.convert.params_from_hf``, so both sides decode the SAME weights in the same process. For each method,
``--batch`` encoder inputs of ``--input_length`` random tokens (no padding) are decoded for exactly
``--new_tokens`` new tokens, encoder included, end to end:

* t5x_lite: ``decoding.greedy_decode`` and ``decoding.beam_search(beam_size=4)`` (jit-compiled while loops);
* Hugging Face: ``T5ForConditionalGeneration.generate`` under ``torch.inference_mode()``, greedy
  (``do_sample=False, num_beams=1``) and beam (``num_beams=4``).

tokens/s is new output tokens per second, ``batch * new_tokens / seconds``; for beam search that counts the
``batch * new_tokens`` tokens of the returned sequences, not ``beams x`` that. Timings are the median of
``--repeats`` runs after a warm-up run of each, t5x_lite and Hugging Face alternating; t5x_lite's compilation
(trace + lower + XLA compile, done ahead of time with ``.lower(...).compile()``) is excluded and printed apart.
torch gets as many intra-op threads as XLA's CPU thread pool has (all cores this process may run on).

Same amount of work on both sides. Both must generate exactly ``new_tokens`` tokens per row, so EOS (id 1) is
made impossible in the weights: its row of the tied embedding / output projection is zeroed, giving it a logit
of exactly 0, about the median of the random logits and so never among the few best (token 1 never appears in
the inputs, so the input side is unaffected). No logits processor is added on either side. The script counts
the generated tokens of every returned row on both sides and fails if any side stopped early.

Beam semantics differ between the two libraries, not the work done. Ours scores a finished hypothesis as
log-probability / ((5 + len) / 6) ** alpha (GNMT, alpha 0.6, as T5X), lets an EOS continuation finish only
if it ranks among the k best (fairseq), and stops once no live beam can beat the k finished ones even at the
maximum length. Hugging Face divides by len ** length_penalty and, with ``early_stopping="never"``, applies the
same "cannot be beaten at max length" stop. With EOS impossible, nothing finishes early on either side: both
run ``new_tokens`` steps with 4 live beams per row and rank the 4 survivors of the same length, so the top beam
should agree too (printed as a sanity line, like the fraction of identical greedy rows; float32 differences
between XLA and PyTorch can split near-ties, so a few rows may differ).

Hardware and time. The 2-core development machine (an AMD EPYC host, KVM, 24 GiB), idle: jax 0.10.2 (XLA CPU,
2 threads), torch 2.13 CPU (2 intra-op threads), transformers 5.24 (T5 attention "sdpa"). One full run takes
about 85 s; ``--quick`` about 20 s.

Measured QUIET on 2026-12-02 at code 2fc4957, ``../shared/tools/quiet-run -- python
experiments/benchmarks/decode_bench.py`` (defaults), three runs (every figure and the history of changes in
experiments/benchmarks/NOTES.md, "decode_bench: t5x_lite vs Hugging Face generate"):

    greedy  t5x_lite 1,267 / 1,544 / 1,391 tokens/s   hf 550 / 685 / 662 tokens/s   ratio 2.30x / 2.26x / 2.10x
    beam4   t5x_lite   519 /   573 /   514 tokens/s   hf 215 / 224 / 232 tokens/s   ratio 2.41x / 2.56x / 2.22x

All 32 greedy rows and all 32 top beams were identical on both sides, with 64 tokens per row. Quote only
figures from ``../shared/tools/quiet-run`` runs that end QUIET. Ratios taken while other jobs share the cores
flatter t5x_lite, because the load slows PyTorch more than XLA.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from t5x_lite import convert, decoding, host_memory
from t5x_lite.presets import get_model_config

EOS_ID = 1
BEAMS = 4
ALPHA = 0.6  # GNMT length-penalty exponent for ours; passed to HF as length_penalty (its semantics differ)

# --quick: a toy T5 v1.0 (2+2 layers, d_model 64, vocab 512) and a small problem, to check the script runs.
QUICK_MODEL = dict(
    d_model=64, num_heads=4, d_kv=16, d_ff=128, num_encoder_layers=2, num_decoder_layers=2, vocab_size=512
)


def cpu_cores() -> int:
    """Cores this process may run on: the size of XLA's CPU intra-op thread pool."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def build_models(args):
    """A random HF T5 (``torch.manual_seed``) and the same weights as t5x_lite (cfg, params)."""
    overrides = QUICK_MODEL if args.quick else {}
    target = get_model_config(args.model, dropout_rate=0.0, **overrides)
    hf_config = convert.hf_config_from(target)
    torch.manual_seed(args.seed)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_config)).eval()
    with torch.no_grad():
        model.shared.weight[EOS_ID] = 0.0  # tied: EOS's output logit is exactly 0, far below the best token
    cfg, params = convert.params_from_hf(model.state_dict(), hf_config)
    # init_through_scan says how fresh parameters are drawn; converted weights are not drawn
    cfg = cfg.replace(init_through_scan=target.init_through_scan)
    if cfg != target:
        raise SystemExit(f"converted config differs from the {args.model} preset:\n{cfg}\n{target}")
    params = jax.device_put(jax.tree.map(jnp.asarray, params))
    return model, cfg, params


def hf_generate(model, inputs: torch.Tensor, mask: torch.Tensor, new_tokens: int, beams: int) -> np.ndarray:
    """[batch, new_tokens] tokens (start token dropped) from ``generate``; the best beam when ``beams > 1``."""
    kwargs = dict(do_sample=False, num_beams=1)
    if beams > 1:
        kwargs = dict(
            do_sample=False, num_beams=beams, num_return_sequences=1, length_penalty=ALPHA, early_stopping="never"
        )
    with torch.inference_mode():
        out = model.generate(
            input_ids=inputs,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            decoder_start_token_id=0,  # T5's start token is the padding id
            eos_token_id=EOS_ID,
            pad_token_id=0,
            **kwargs,
        )
    return out[:, 1:].numpy()


def ours_compile_seconds(cfg, params, inputs: jax.Array, new_tokens: int, beams: int) -> float:
    """Trace + lower + XLA-compile time (ahead of time; the jit cache then holds the executable)."""
    start = time.perf_counter()
    if beams == 1:
        decoding.greedy_decode.lower(cfg, params, inputs, max_decode_length=new_tokens, eos_id=EOS_ID).compile()
    else:
        decoding.beam_search.lower(
            cfg, params, inputs, beam_size=beams, max_decode_length=new_tokens, alpha=ALPHA, eos_id=EOS_ID
        ).compile()
    return time.perf_counter() - start


def ours_generate(cfg, params, inputs: jax.Array, new_tokens: int, beams: int) -> np.ndarray:
    """[batch, new_tokens] tokens; the best beam when ``beams > 1``."""
    if beams == 1:
        tokens, _ = decoding.greedy_decode(cfg, params, inputs, max_decode_length=new_tokens, eos_id=EOS_ID)
    else:
        tokens, _ = decoding.beam_search(
            cfg, params, inputs, beam_size=beams, max_decode_length=new_tokens, alpha=ALPHA, eos_id=EOS_ID
        )
        tokens = tokens[:, 0]
    return np.asarray(jax.block_until_ready(tokens))


def generated_lengths(tokens: np.ndarray) -> np.ndarray:
    """Tokens generated per row: up to and including the first EOS, else every column (both sides pad with 0
    after EOS; id 0 itself is an ordinary output of a random model, so zeros alone say nothing)."""
    is_eos = tokens == EOS_ID
    return np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, tokens.shape[1])


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench_method(name, beams, args, model, cfg, params):
    """Warm-up, then ``repeats`` alternating timed runs; prints and returns (ours tok/s, hf tok/s)."""
    rng = np.random.default_rng(args.seed)
    inputs_np = rng.integers(2, cfg.vocab_size, (args.batch, args.input_length)).astype(np.int32)
    inputs_jax = jnp.asarray(inputs_np)
    inputs_pt = torch.tensor(inputs_np, dtype=torch.long)
    mask_pt = torch.ones_like(inputs_pt)
    n = args.new_tokens
    ours = lambda: ours_generate(cfg, params, inputs_jax, n, beams)
    hf = lambda: hf_generate(model, inputs_pt, mask_pt, n, beams)

    compile_s = ours_compile_seconds(cfg, params, inputs_jax, n, beams)
    _, ours_tokens = timed(ours)  # warm-up
    _, hf_tokens = timed(hf)
    ours_times, hf_times = [], []
    for _ in range(args.repeats):
        ours_times.append(timed(ours)[0])
        hf_times.append(timed(hf)[0])
    ours_s, hf_s = statistics.median(ours_times), statistics.median(hf_times)

    for side, tokens in (("t5x_lite", ours_tokens), ("hf", hf_tokens)):
        lengths = generated_lengths(tokens)
        print(f"{name}: {side} generated tokens per row: min {lengths.min()} max {lengths.max()} total {lengths.sum()}")
        if tokens.shape != (args.batch, n) or (lengths != n).any():
            raise SystemExit(f"{name}: {side} did not generate exactly {n} tokens in every row: unfair comparison")
    same = float(np.mean((ours_tokens == hf_tokens).all(axis=1)))
    what = "greedy rows" if beams == 1 else "top-beam rows"
    print(f"{name}: identical {what} t5x_lite vs hf: {same:.3f}")

    tokens_out = args.batch * n
    ours_rate, hf_rate = tokens_out / ours_s, tokens_out / hf_s
    print(f"{name}: t5x_lite compile (trace+lower+XLA, excluded) {compile_s:.2f} s")
    print(f"{name}: t5x_lite runs {', '.join(f'{t:.2f}' for t in ours_times)} s")
    print(f"{name}: hf runs {', '.join(f'{t:.2f}' for t in hf_times)} s")
    print(f"{name}: t5x_lite {ours_s:.3f} s = {ours_rate:,.1f} tokens/s; hf {hf_s:.3f} s = {hf_rate:,.1f} tokens/s")
    return ours_rate, hf_rate


def main(argv=None) -> None:
    host_memory.keep_freed_memory(True)  # as the evaluate and infer commands do (t5x_lite/host_memory.py)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="t5_small", help="a t5x_lite.presets preset with a HF T5 counterpart")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--input_length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="toy model, batch 4, 8 tokens: runs in seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.new_tokens, args.input_length = 4, 8, 8
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    transformers.logging.set_verbosity_error()
    cores = cpu_cores()
    torch.set_num_threads(cores)
    print(f"date {datetime.date.today()}  machine {cpu_name()}, {cores} cores")
    print(
        f"jax {jax.__version__} devices {jax.devices()} (XLA CPU thread pool: {cores} threads); "
        f"torch {torch.__version__} intra-op threads {torch.get_num_threads()}, "
        f"inter-op {torch.get_num_interop_threads()}; transformers {transformers.__version__}"
    )
    model, cfg, params = build_models(args)
    print(
        f"model {args.model}{' (quick toy)' if args.quick else ''}: {cfg.num_encoder_layers}+{cfg.num_decoder_layers} "
        f"layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}, {cfg.dtype}; hf attention "
        f"{model.config._attn_implementation}; batch {args.batch}, input {args.input_length}, "
        f"new tokens {args.new_tokens}, repeats {args.repeats}"
    )
    ratios = {}
    for name, beams in (("greedy", 1), (f"beam{BEAMS}", BEAMS)):
        ours_rate, hf_rate = bench_method(name, beams, args, model, cfg, params)
        ratios[name] = ours_rate / hf_rate
    print(f"greedy ratio t5x_lite/hf: {ratios['greedy']:.2f}x")
    print(f"beam{BEAMS} ratio t5x_lite/hf: {ratios[f'beam{BEAMS}']:.2f}x")


if __name__ == "__main__":
    main()
