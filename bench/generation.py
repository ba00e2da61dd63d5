"""Story generation speed per precision and batch size; on a GPU, records the result for chapter 7.

Run: `python bench/generation.py` (prints) or `python bench/generation.py --record` on a GPU, which
writes generation_<device>.json (hw.result_filename) into hw.recorded_dir(), code/mixprec/data/gpu/
in a checkout. Tokens/s counts only the tokens each sequence really generated (up to and including EOS).
"""

import sys

import torch
from mixprec import cli, hw, story

PROMPT = "Once upon a time"


def main() -> None:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=sorted(story.SIZES))
    parser.add_argument("--precisions", nargs="+", type=cli.inference_precision, default=["fp32", "fp16", "bf16"])
    parser.add_argument("--batch-sizes", type=cli.at_least(1), nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--new-tokens", type=cli.at_least(1), default=128)
    parser.add_argument("--record", action="store_true", help="GPU only: write generation_<device>.json into hw.recorded_dir()")
    args = parser.parse_args()
    prompt_max = len(PROMPT.encode())  # byte-level BPE: at most one token per byte (the exact count needs the tokenizer)
    n_positions = story.SIZES[args.size].n_positions
    if args.new_tokens + prompt_max > n_positions:
        parser.error(f"--new-tokens must be at most {n_positions - prompt_max} for the {args.size} model (context {n_positions}, "
                     f"prompt {PROMPT!r} up to {prompt_max} tokens), got {args.new_tokens}")
    if args.record:
        try:
            hw.recording_device()  # fail before the run, not after it
        except RuntimeError as err:
            sys.exit(f"{parser.prog}: cannot record: {err}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, _, _ = story.storyteller(args.size, progress=False)
    model.to(device)
    rows = []
    for precision in args.precisions:
        for batch in args.batch_sizes:
            t = story.time_generation(model, tokenizer, PROMPT, precision, batch, args.new_tokens)
            rows.append({"precision": precision, "batch_size": batch, "seconds": t.seconds, "generated_tokens": t.generated_tokens,
                         "tokens_per_s": t.tokens_per_s, "latency_per_token_s": t.latency_per_token, "peak_memory_bytes": t.peak_memory,
                         "weight_bytes": t.weight_bytes})
            print(f"{precision:5s} batch {batch:4d}: {t.tokens_per_s:10.1f} tokens/s, {t.latency_per_token * 1e3:7.2f} ms/token")
    if args.record:
        try:
            print("recorded", hw.record_gpu_result("generation", {"size": args.size, "new_tokens": args.new_tokens, "rows": rows}))
        except (RuntimeError, OSError) as err:
            sys.exit(f"{parser.prog}: cannot record: {err}")


if __name__ == "__main__":
    main()
