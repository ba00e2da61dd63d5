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

from . import cli, hw
from .amp import INFERENCE_POLICIES, POLICY_NAMES, get_policy
from .fp8 import fp8_engine
from .story import SIZES, build_model, encode, for_inference, generate, grammar_score, load_stories, storyteller, train, train_tokenizer

PROMPT = "Once upon a time"
MIN_STORIES = 20  # fewer leave no validation split worth the name


UsageError = cli.UsageError  # a bad command-line argument: reported in one line, before any work
_writable_target = cli.check_out_file


def validate(args) -> None:
    """Every argument, checked before any work (a long run must not fail at its end on a typo)."""
    if args.out is not None:
        _writable_target(args.out)
    n_positions = SIZES[args.size].n_positions
    if args.command == "train":
        try:
            get_policy(args.precision).check_trainable()
        except ValueError as error:
            raise UsageError(f"--precision: {error}") from None
        checks = [(args.steps >= 1, f"--steps must be >= 1, got {args.steps}"),
                  (args.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {args.warmup_steps}"),
                  (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
                  (2 <= args.block_size <= n_positions, f"--block-size must be in 2..{n_positions} (the {args.size} model's context), got {args.block_size}"),
                  (args.stories >= MIN_STORIES, f"--stories must be >= {MIN_STORIES}, got {args.stories}")]
    else:
        try:
            get_policy(args.precision)  # every policy runs a trained model (for_inference)
        except (ValueError, TypeError) as error:
            raise UsageError(f"--precision: {error}") from None
        checks = [(args.repeat >= 1, f"--repeat must be >= 1, got {args.repeat}"),
                  (args.train_steps >= 1, f"--train-steps must be >= 1, got {args.train_steps}"),
                  (args.new_tokens >= 1, f"--new-tokens must be >= 1, got {args.new_tokens}")]
        prompt_max = len(PROMPT.encode())  # byte-level BPE: at most one token per byte (the exact count needs the tokenizer)
        checks.append((args.new_tokens + prompt_max <= n_positions,
                       f"--new-tokens must be at most {n_positions - prompt_max} for the {args.size} model: its context is "
                       f"{n_positions} positions and the prompt {PROMPT!r} takes up to {prompt_max}; got {args.new_tokens}"))
    for ok, message in checks:
        if not ok:
            raise UsageError(message)

def run_train(args) -> dict:
    stories = load_stories("offline", n=args.stories)
    tokenizer = train_tokenizer(stories.train)
    data = encode(stories, tokenizer)
    for split in ("train", "valid"):  # known only now, but before any training
        tokens = getattr(data, split).numel()
        if tokens <= args.block_size:
            raise UsageError(f"--block-size {args.block_size} is too long for --stories {args.stories}: the {split} split has "
                             f"{tokens} tokens; use more stories or a block size below {tokens}")
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
    runs = [generate(prepared, tokenizer, PROMPT, seed=seed, max_new_tokens=args.new_tokens) for seed in range(args.repeat + 1)][1:]
    return {
        "size": args.size, "precision": args.precision, "new_tokens_max": args.new_tokens, "repeat": args.repeat,
        "tokens_per_s": statistics.median(r.tokens_per_s for r in runs),
        "latency_s": statistics.median(r.seconds for r in runs),
        "generated_tokens": [len(r.token_ids) for r in runs],
        "grammar_score": statistics.mean(grammar_score(r.prompt + r.text).score for r in runs),
    }


def _check_engine_to_record(precision: str) -> None:
    """A recorded result carries only the label its run earned: an FP8 policy that would run on the
    emulated Float8Linear (FP32 matmuls) here is not recorded as FP8."""
    recipe = get_policy(precision).fp8
    if recipe:
        native, why = fp8_engine(recipe)
        if not native:
            raise RuntimeError(f"{precision} would run emulated here ({why}): only native FP8 runs are recorded; "
                               "run without --record to print the emulation's figures")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m mixprec.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "generate"):
        p = sub.add_parser(name)
        p.add_argument("--precision", default="fp32",
                       help=f"a precision policy, one of {', '.join(n for n in POLICY_NAMES if name == 'generate' or n not in INFERENCE_POLICIES)}")
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
    try:
        validate(args)
    except UsageError as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        sys.exit(2)
    record = getattr(args, "record", False)
    if record:
        try:
            hw.recording_device()  # fail before a long run, not after it
            _check_engine_to_record(args.precision)
        except RuntimeError as err:
            sys.exit(f"{parser.prog}: cannot record: {err}")

    command = ["-m", "mixprec.bench", *(sys.argv[1:] if argv is None else argv)]
    result = {**hw.provenance(argv=command), "benchmark": args.command}
    try:
        result.update(run_train(args) if args.command == "train" else run_generate(args))
    except UsageError as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        sys.exit(2)
    text = json.dumps(result, indent=1, ensure_ascii=False)
    print(text)
    if args.out:
        try:  # a temporary file renamed into place (never a half-written result), through a symlink, never over a FIFO or device
            cli.write_out_file(args.out, text + "\n")
        except OSError as error:
            sys.exit(f"{parser.prog} {args.command}: error: cannot write --out {str(args.out)!r}: {error}")
    if record:
        payload = {k: v for k, v in result.items() if k not in (*hw.PROVENANCE_KEYS, "compute_capability")}
        try:
            print("recorded", hw.record_gpu_result("train", payload, args.precision, argv=command))
        except (RuntimeError, OSError) as err:
            sys.exit(f"{parser.prog}: cannot record: {err}")
    return result


if __name__ == "__main__":
    main()
