"""Benchmark the storyteller and write a JSON result with its provenance.

    python -m mixprec.bench train --precision bf16-amp --size gpt2-124m --steps 50 --compile --record
    python -m mixprec.bench generate --precision bf16 --size tiny --out result.json

``train`` times training steps of a freshly initialised model (tokens/s, MFU on a GPU, peak memory).
``generate`` trains (or loads from the cache) the storyteller, then times story generation.
``train --record`` (GPU only) writes the result where chapter 3 reads it: ``hw.recorded_dir()`` /
``hw.result_filename("train", <device>, <precision>)``, e.g. ``train_nvidia_h100_80gb_hbm3_bf16-amp.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from . import hw
from .amp import POLICY_NAMES
from .story import SIZES, build_model, encode, for_inference, generate, grammar_score, load_stories, storyteller, train, train_tokenizer
from .story.generate import INFERENCE_PRECISIONS


def run_train(args) -> dict:
    stories = load_stories("offline", n=args.stories)
    tokenizer = train_tokenizer(stories.train)
    data = encode(stories, tokenizer)
    model = build_model(args.size, len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    history = train(model, data, precision=args.precision, steps=args.steps, batch_size=args.batch_size, block_size=args.block_size,
                    lr=SIZES[args.size].lr, weight_decay=SIZES[args.size].weight_decay, compile=args.compile, progress=not args.quiet)
    skip = min(args.warmup_steps, args.steps - 1)
    mfu = [m for m in history.mfu[skip:] if m is not None]
    return {
        "size": args.size, "precision": args.precision, "parameters": history.parameters, "steps": args.steps,
        "batch_size": args.batch_size, "block_size": args.block_size, "compile": args.compile,
        "tokens_per_s": history.median_tokens_per_s(skip), "mfu": statistics.median(mfu) if mfu else None,
        "peak_memory_bytes": max((m for m in history.peak_memory if m is not None), default=None),
        "final_loss": history.loss[-1], "final_val_loss": history.final_val_loss, "skipped_steps": sum(history.skipped),
        "notes": history.notes,
    }


def run_generate(args) -> dict:
    model, tokenizer, _, _ = storyteller(args.size, steps=args.train_steps, progress=not args.quiet)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prepared = for_inference(model.to(device), args.precision)
    runs = [generate(prepared, tokenizer, "Once upon a time", seed=seed, max_new_tokens=args.new_tokens) for seed in range(args.repeat + 1)][1:]
    return {
        "size": args.size, "precision": args.precision, "new_tokens_max": args.new_tokens, "repeat": args.repeat,
        "tokens_per_s": statistics.median(r.tokens_per_s for r in runs),
        "latency_s": statistics.median(r.seconds for r in runs),
        "generated_tokens": [len(r.token_ids) for r in runs],
        "grammar_score": statistics.mean(grammar_score(r.prompt + r.text).score for r in runs),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m mixprec.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "generate"):
        p = sub.add_parser(name)
        p.add_argument("--precision", default="fp32",
                       help=f"one of {', '.join(POLICY_NAMES if name == 'train' else INFERENCE_PRECISIONS)}")
        p.add_argument("--size", default="tiny", choices=sorted(SIZES))
        p.add_argument("--out", type=Path, help="write the JSON result here (default: print it only)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    t = sub.choices["train"]
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the medians (warm-up, compilation)")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--block-size", type=int, default=128)
    t.add_argument("--stories", type=int, default=20_000)
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--record", action="store_true",
                   help="GPU only: record the result for chapter 3 as <recorded dir>/train_<device>_<precision>.json (hw.result_filename)")
    g = sub.choices["generate"]
    g.add_argument("--new-tokens", type=int, default=100)
    g.add_argument("--repeat", type=int, default=5)
    g.add_argument("--train-steps", type=int, default=1000, help="training steps of the storyteller to generate with")
    args = parser.parse_args(argv)
    record = getattr(args, "record", False)
    if record:
        try:
            hw.recording_device()  # fail before a long run, not after it
        except RuntimeError as err:
            sys.exit(f"{parser.prog}: cannot record: {err}")

    command = ["-m", "mixprec.bench", *(sys.argv[1:] if argv is None else argv)]
    result = {**hw.provenance(argv=command), "benchmark": args.command}
    result.update(run_train(args) if args.command == "train" else run_generate(args))
    text = json.dumps(result, indent=1, ensure_ascii=False)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if record:
        payload = {k: v for k, v in result.items() if k not in (*hw.PROVENANCE_KEYS, "compute_capability")}
        try:
            print("recorded", hw.record_gpu_result("train", payload, args.precision, argv=command))
        except (RuntimeError, OSError) as err:
            sys.exit(f"{parser.prog}: cannot record: {err}")
    return result


if __name__ == "__main__":
    main()
