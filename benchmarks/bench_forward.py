"""One model call, transformers' forward (``HFDecoderLM``) against the lean one (``LeanLlamaLM``), side by side in one
process: for each query width q, a call that appends q tokens after a cached prompt (the shape of a beam-search
step or a verification call). Calls of the two forwards alternate, so machine noise hits both alike; the median of
``--repeats`` is printed, with the largest logit difference between the two.

    python benchmarks/bench_forward.py --model-dir artifacts/target/<name>/model --widths 1,10,40,120
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from peft import PeftModel

from atspeed_exp.decoding.protocol import mask_value
from atspeed_exp.models.adapter import HFDecoderLM
from atspeed_exp.models.build import DTYPES, count_parameters, load_model, merge_lora
from atspeed_exp.models.lean import LeanLlamaLM


def sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels are asynchronous: time them to completion
        torch.cuda.synchronize(device)


def timed_calls(lm, prompt_cache, width: int, prompt_len: int, repeats: int, vocab: int) -> tuple[list[float], torch.Tensor]:
    gen = torch.Generator().manual_seed(width)
    device = lm.device
    ids = torch.randint(4, vocab, (1, width), generator=gen).to(device)
    positions = (prompt_len + torch.arange(width)[None]).to(device)
    mask = torch.zeros(1, 1, width, prompt_len + width, device=device)
    keep = torch.arange(prompt_len, device=device)[None]
    times, logits = [], None
    for _ in range(repeats):
        cache = lm.gather_cache(prompt_cache(), keep)  # a fresh copy of the prompt cache
        sync(device)
        start = time.perf_counter()
        hidden, _ = lm.hidden(ids, positions, mask, cache)
        logits = lm.project(hidden)
        sync(device)
        times.append(time.perf_counter() - start)
    return times, logits


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", action="append", required=True, help="saved model dir (repeat for several)")
    p.add_argument("--widths", default="1,10,40,120", help="query tokens per call, comma-separated")
    p.add_argument("--prompt-len", type=int, default=50, help="cached tokens before the call")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="model weights (bfloat16: for cuda)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for model_dir in args.model_dir:
        model = load_model(Path(model_dir))
        if isinstance(model, PeftModel):
            model = merge_lora(model)
        model = model.to(device=args.device, dtype=DTYPES[args.dtype]).eval()
        vocab = model.config.vocab_size
        config = model.config
        label = (f"{Path(model_dir).parent.name}: {config.num_hidden_layers}L/{config.hidden_size}, "
                 f"{count_parameters(model)['total'] / 1e6:.2f}M")
        caches = {}
        for name, lm in (("hf", HFDecoderLM(model)), ("lean", LeanLlamaLM(model))):
            allowed = torch.ones(args.prompt_len, args.prompt_len, dtype=torch.bool).tril()
            mask = torch.where(allowed, 0.0, mask_value(torch.float32))[None, None]
            ids = torch.randint(4, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
            _, cache = lm.hidden(ids.to(lm.device), torch.arange(args.prompt_len, device=lm.device)[None],
                                 mask.to(lm.device), None)
            caches[name] = (lm, cache)
        for width in map(int, args.widths.split(",")):
            times = {"hf": [], "lean": []}
            logits = {}
            for _ in range(args.repeats // 10):  # alternate in blocks of 10 calls
                for name, (lm, cache) in caches.items():
                    block, logits[name] = timed_calls(lm, lambda c=cache, lm=lm: _copy(lm, c), width,
                                                      args.prompt_len, 10, vocab)
                    times[name] += block
            hf_ms, lean_ms = (1000 * statistics.median(times[n]) for n in ("hf", "lean"))
            rows.append({"model": label, "q": width, "hf_ms": hf_ms, "lean_ms": lean_ms, "ratio": hf_ms / lean_ms,
                         "max_abs_diff": float((logits["hf"] - logits["lean"]).abs().max().cpu())})
    header = ["model", "q", "hf_ms", "lean_ms", "hf/lean", "max|logit diff|"]
    table = [header] + [[r["model"], str(r["q"]), f"{r['hf_ms']:.3f}", f"{r['lean_ms']:.3f}", f"{r['ratio']:.2f}",
                         f"{r['max_abs_diff']:.1e}"] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, threads {torch.get_num_threads()}"
    print(f"bench_forward: one call of q tokens after a {args.prompt_len}-token cached prompt, median of "
          f"{args.repeats}, {device}, {args.dtype}, torch {torch.__version__}")
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    return rows


def _copy(lm, cache):
    """A cache that the timed call may extend without touching ``cache`` (gather makes new tensors)."""
    if isinstance(lm, LeanLlamaLM):
        return type(cache)(list(cache.keys), list(cache.values))
    from transformers import DynamicCache

    copy = DynamicCache(config=lm.model.config)
    for index, layer in enumerate(cache.layers):
        copy.update(layer.keys, layer.values, index)
    return copy


if __name__ == "__main__":
    main()
