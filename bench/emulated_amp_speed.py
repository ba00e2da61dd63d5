"""Step time of emulated AMP and FP8 against FP32 on this machine: the tiny storyteller, interleaved rounds, medians.

    python bench/emulated_amp_speed.py [--steps 20] [--rounds 5]

Prints the median time per training step for each policy and its ratio to FP32. ``fp16-amp`` and
``bf16-amp`` on a CPU run ``mixprec.emulate.EmulatedAutocast`` (CUDA's op lists); ``:native`` is
the CPU's own autocast (real FP16/BF16 kernels); ``round-all:fp16`` is whole-network rounding;
``fp8:<recipe>`` the emulated FP8 linears of each recipe (``mixprec.fp8.Float8Linear``) under the
emulated BF16 autocast, as on every device.
"""

from __future__ import annotations

import statistics
import time

import torch
from mixprec import cli, story
from mixprec.amp import FP8_POLICIES, get_policy
from mixprec.step import train_step
from mixprec.story.train import lm_loss

POLICIES = ("fp32", "fp16-amp", "bf16-amp", "fp16-amp:cpu-lists", "round-all:fp16", "fp16-amp:native", "bf16-amp:native", *FP8_POLICIES)


def main(argv=None) -> None:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=cli.at_least(1), default=10, help="training steps per policy and round")
    parser.add_argument("--rounds", type=cli.at_least(1), default=3, help="interleaved rounds (the median is reported)")
    parser.add_argument("--policies", nargs="+", type=cli.training_precision, default=list(POLICIES))
    args = parser.parse_args(argv)
    stories = story.load_stories("offline", n=2000)
    tokenizer = story.train_tokenizer(stories.train)
    data = story.encode(stories, tokenizer)
    generator = torch.Generator().manual_seed(0)
    batches = [data.batch(16, 128, generator) for _ in range(args.steps)]
    times: dict[str, list[float]] = {p: [] for p in args.policies}
    for _ in range(args.rounds):
        for name in args.policies:
            model = story.build_model("tiny", len(tokenizer), seed=0, eos_token_id=tokenizer.eos_token_id)
            setup = get_policy(name).setup(model, lr=1e-3, loss_fn=lm_loss, device="cpu")
            train_step(setup, *batches[0])  # warm-up
            start = time.perf_counter()
            for x, y in batches:
                train_step(setup, x, y)
            times[name].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["fp32"]) if "fp32" in times else None
    print(f"tiny storyteller, batch 16 x 128, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, ts in times.items():
        median = statistics.median(ts)
        ratio = f"{median / base:5.2f}x fp32" if base else ""
        print(f"{name:>20}: {median * 1e3:8.1f} ms/step  {ratio}")


if __name__ == "__main__":
    main()
