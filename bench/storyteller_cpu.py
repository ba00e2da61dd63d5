"""Train the `tiny` storyteller for a fixed wall-clock budget and report what it learned.

Run: `python bench/storyteller_cpu.py [--seconds 60] [--precision fp32]`

Goal (2-core CPU, 60 s): validation loss clearly below the corpus's unigram entropy (a model that
ignores context), and sampled stories with a mean grammar score of at least 0.8.
"""

import statistics
import time

import torch
from mixprec import cli, hw
from mixprec.story import SIZES, build_model, encode, generate, grammar_score, load_stories, train, train_tokenizer, unigram_entropy


def main() -> None:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=cli.positive_float, default=60.0, help="training budget (the step count is calibrated to it)")
    parser.add_argument("--precision", type=cli.training_precision, default="fp32")
    parser.add_argument("--samples", type=cli.at_least(1), default=20, help="stories sampled and scored after training")
    args = parser.parse_args()

    stories = load_stories("offline")
    tokenizer = train_tokenizer(stories.train)
    data = encode(stories, tokenizer)
    baseline = unigram_entropy(data.train)

    # calibrate: time a few steps, then choose the step count that fits the budget
    probe = train(build_model("tiny", len(tokenizer)), data, precision=args.precision, steps=10, progress=False)
    seconds_per_step = statistics.median(probe.step_time[2:])
    steps = max(10, int(args.seconds / seconds_per_step * 0.9))  # leave room for the evaluations

    model = build_model("tiny", len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    start = time.perf_counter()
    settings = SIZES["tiny"]
    history = train(model, data, precision=args.precision, steps=steps, lr=settings.lr, weight_decay=settings.weight_decay,
                    eval_every=max(1, steps // 5), progress=False)
    elapsed = time.perf_counter() - start

    samples = [generate(model, tokenizer, "Once upon a time", seed=s, max_new_tokens=150) for s in range(args.samples)]
    scores = [grammar_score(g.prompt + g.text).score for g in samples]
    print(f"device: {hw.device_info().name}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"tiny ({history.parameters:,} parameters), {args.precision}: {steps} steps in {elapsed:.1f} s, "
          f"{history.median_tokens_per_s():,.0f} tokens/s")
    print(f"validation loss {history.final_val_loss:.3f} nats/token (unigram entropy of the corpus: {baseline:.3f})")
    print(f"grammar score of {len(samples)} sampled stories: mean {statistics.mean(scores):.3f}, min {min(scores):.3f}")
    print("sample:", samples[0].prompt + samples[0].text)


if __name__ == "__main__":
    main()
