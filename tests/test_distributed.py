"""Data-parallel training (mixprec.distributed): two real gloo processes started with torchrun, checked against
one process and against the communication the model predicts."""

import subprocess
import sys
import textwrap

import pytest
import torch
from mixprec import distributed
from mixprec.distributed import FSDP2_PRECISION, Setting

STEPS, BATCH, BLOCK, STORIES = 3, 8, 32, 100
OPTIONS = {"steps": STEPS, "global_batch": BATCH, "block_size": BLOCK, "n_stories": STORIES}
SETTINGS = ([f"fsdp2,{p}" for p in FSDP2_PRECISION if p != "tf32"] + ["fsdp2,bf16-master,reduce=bf16"]
            + ["ddp,fp32", "ddp,fp32,hook=fp16", "ddp,fp32,hook=bf16", "ddp,bf16-master"])


@pytest.fixture(scope="module")
def two_ranks():
    result = distributed.launch(SETTINGS, nproc=2, timeout=240, **OPTIONS)
    return result, {run["setting"]: run for run in result["runs"]}


@pytest.fixture(scope="module")
def one_process():
    return distributed.train("single,fp32", **OPTIONS)


def test_result_has_its_provenance(two_ranks):
    result, runs = two_ranks
    assert result["world_size"] == 2 and result["backend"] == "gloo"
    assert result["torch_version"] == torch.__version__ and "torchrun --nproc-per-node 2" in result["command"]
    assert [Setting.parse(s).spec for s in SETTINGS] == list(runs)
    assert all(len(run["loss"]) == STEPS for run in runs.values())


def test_two_fsdp2_ranks_in_fp32_match_one_process_step_by_step(two_ranks, one_process):
    _, runs = two_ranks
    fsdp, single = runs["fsdp2,fp32"], one_process
    for a, b in zip(fsdp["loss"], single["loss"], strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    for a, b in zip(fsdp["grad_norm"], single["grad_norm"], strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    # the tolerance tells settings apart: BF16 compute moves the losses by far more than FP32 rounding
    assert max(abs(a - b) for a, b in zip(runs["fsdp2,bf16-master"]["loss"], single["loss"])) > 1e-5 * single["loss"][0]


def test_every_mapping_trains(two_ranks):
    _, runs = two_ranks
    for spec, run in runs.items():
        assert run["loss"][-1] < run["loss"][0] - 0.3, (spec, run["loss"])
        assert not any(run["skipped"]), spec


def test_ddp_says_which_bf16_hook_ran(two_ranks):
    _, runs = two_ranks
    note = " ".join(runs["ddp,fp32,hook=bf16"]["notes"])
    assert "bf16" in note and ("torch bf16_compress_hook" in note or "mixprec bf16_allreduce_hook" in note)
    assert "torch fp16_compress_hook" in " ".join(runs["ddp,fp32,hook=fp16"]["notes"])


def test_measured_communication_is_what_the_model_predicts(two_ranks):
    _, runs = two_ranks
    for spec, run in runs.items():
        for step in run["communicated"]:
            assert step == run["predicted_bytes"], spec
    n = runs["ddp,fp32"]["parameters"]
    assert runs["ddp,fp32"]["predicted_bytes"] == {"all_reduce": 4 * n}
    assert runs["ddp,fp32,hook=bf16"]["predicted_bytes"] == {"all_reduce": 2 * n}
    assert runs["ddp,bf16-master"]["predicted_bytes"] == {"all_reduce": 2 * n}  # the model's own BF16 gradients
    full, half = runs["fsdp2,fp32"]["predicted_bytes"], runs["fsdp2,bf16-master,reduce=bf16"]["predicted_bytes"]
    assert half == {k: v // 2 for k, v in full.items()}
    # FSDP2 holds half the parameters and optimizer state per rank (up to padding)
    assert runs["fsdp2,fp32"]["memory_per_rank"]["optimizer_state"] == pytest.approx(8 * n / 2, rel=1e-3)


def test_communication_model_counts_padding_and_the_root():
    model = torch.nn.Module()
    model.transformer = torch.nn.Module()
    model.transformer.h = torch.nn.ModuleList([torch.nn.Linear(3, 5)])  # 5 rows: padded to 6 on 2 ranks
    model.transformer.wte = torch.nn.Embedding(7, 2)  # the root: 7 rows padded to 8, gathered once
    got = distributed.communication_per_step(model, "fsdp2,fp32", 2)
    block, root = 6 * 3 + 6, 8 * 2
    assert got == {"all_gather": 4 * (2 * block // 2 + root // 2), "reduce_scatter": 4 * (block + root)}
    assert distributed.ring_wire_bytes({"all_reduce": 100}, 4) == 150


def test_ring_reduction_error_grows_with_the_number_of_ranks():
    bf16 = [distributed.reduction_error(n, torch.bfloat16, numel=1024)["ring"] for n in (2, 16, 128, 512)]
    fp32 = [distributed.reduction_error(n, torch.float32, numel=1024)["ring"] for n in (2, 16, 128, 512)]
    assert bf16 == sorted(bf16) and bf16[-1] > 5 * bf16[0]
    assert max(fp32) < 1e-5 < min(bf16)
    rounded = distributed.reduction_error(2, torch.bfloat16, numel=1024)["rounded"]
    assert bf16[0] >= rounded * 0.9  # no reduction beats rounding the exact mean once


def test_ring_order_is_a_sequential_sum_starting_after_the_chunks_rank():
    values = torch.tensor([[1.0, 1.0], [2.0**-8, 2.0**-8], [2.0**-8, 2.0**-8]])  # 3 ranks, 2 elements, equal columns
    got = distributed.ring_allreduce_sum(values, torch.bfloat16)
    # element 0 is in chunk 0, summed over ranks 1, 2, 0: 2^-8 + 2^-8 = 2^-7, + 1 = 1 + 2^-7 (exact in BF16)
    # element 1 is in chunk 1, summed over ranks 2, 0, 1: 2^-8 + 1 ties to 1 (BF16 spacing at 1 is 2^-7), + 2^-8 ties to 1
    assert got.tolist() == [1 + 2.0**-7, 1.0]
    assert distributed.ring_allreduce_sum(values, torch.float64).tolist() == values.double().sum(0).tolist()


def test_settings_are_checked_with_clear_errors():
    assert Setting.parse("ddp,fp32,hook=bf16") == Setting("ddp", "fp32", hook="bf16")
    with pytest.raises(ValueError, match="bf16-master"):
        Setting("fsdp2", "bf16-pure")
    with pytest.raises(ValueError, match="strategy must be one of"):
        Setting.parse("zero9,fp32")
    with pytest.raises(ValueError, match="hook is for ddp only"):
        Setting.parse("fsdp2,fp32,hook=bf16")
    with pytest.raises(ValueError, match="unknown precision"):
        Setting.parse("ddp,fp42")
    with pytest.raises(TypeError, match="uint8"):
        distributed.check_collective_dtype(torch.float8_e4m3fn, "gloo")
    with pytest.raises(RuntimeError, match="process group"):
        distributed.train("fsdp2,fp32", steps=1)
    assert Setting.parse("fsdp2,bf16-master").mixed_precision().param_dtype == torch.bfloat16


def test_a_failing_launch_reports_the_subprocess_error():
    with pytest.raises(RuntimeError, match="multiple of the world size"):
        distributed.launch("ddp,fp32", nproc=2, steps=1, global_batch=3, timeout=120)


def test_fp8_all_gather_sends_uint8_with_one_scale_for_the_whole_weight(tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(textwrap.dedent("""
        import torch, torch.distributed as dist
        from mixprec.distributed import fp8_all_gather
        from mixprec.fp8 import quantize_tensorwise
        dist.init_process_group("gloo")
        full = torch.randn(2, 64, generator=torch.Generator().manual_seed(0)) * 3
        got = fp8_all_gather(full[dist.get_rank():dist.get_rank() + 1])  # a dim-0 shard, as FSDP2 cuts
        want = quantize_tensorwise(full).dequantize()  # one scale for the whole weight, as torchao's FSDP2 float8 all-gather
        assert not torch.equal(want, torch.cat([quantize_tensorwise(row).dequantize() for row in full]))  # not per shard
        assert torch.equal(got, want), (got - want).abs().max()
        try:
            dist.all_gather([torch.empty(2, dtype=torch.float8_e4m3fn)] * 2, torch.zeros(2, dtype=torch.float8_e4m3fn))
        except RuntimeError as error:
            print("gloo fp8:", error)
        dist.destroy_process_group()
    """))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                           "--master-port", str(distributed.free_port()), str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gloo fp8:" in done.stdout and "Invalid scalar type" in done.stdout  # two ranks print at once: lines can interleave


def test_schematic_draws_what_the_library_says_each_rank_holds_and_sends():
    from mixprec import schematics

    settings = ("ddp,fp32", "ddp,fp32,hook=bf16", "fsdp2,bf16-master", "fsdp2,bf16-master,reduce=bf16")
    data = schematics.data_parallel(settings, world_size=4).schematic_data
    assert data["ddp,fp32"]["collectives"] == {"all_reduce": "FP32"}
    assert data["ddp,fp32,hook=bf16"]["collectives"] == {"all_reduce": "BF16"}
    assert data["fsdp2,bf16-master"]["collectives"] == {"all_gather": "BF16", "reduce_scatter": "FP32"}
    assert data["fsdp2,bf16-master,reduce=bf16"]["collectives"] == {"all_gather": "BF16", "reduce_scatter": "BF16"}
    assert ("Adam m, v", "FP32", "1/4") in data["fsdp2,bf16-master"]["state"]
    assert ("master", "FP32", "all") in distributed.per_rank_state("ddp,bf16-master", 4)


def test_bytes_checker():
    from mixprec.exercises import check_ddp_bytes

    assert check_ddp_bytes("ddp,fp32,hook=bf16", 1000, 4, payload=2000, wire=3000)
    assert not check_ddp_bytes("ddp,fp32,hook=bf16", 1000, 4, payload=4000, wire=6000)
    assert not check_ddp_bytes("ddp,fp32", 1000, 4, payload=4000, wire=4000)
    assert not check_ddp_bytes("fsdp2,fp32", 1000, 4, payload=4000, wire=6000)
    assert not check_ddp_bytes("ddp,fp32", -1, 4, payload=0, wire=0)


def test_zero_stages_shard_one_more_component_each():
    table = distributed.zero_bytes_per_parameter("bf16-master", 8)
    assert {k: sum(v.values()) for k, v in table.items()} == {0: 16, 1: 4 + 12 / 8, 2: 2 + 14 / 8, 3: 16 / 8}  # ZeRO's 2 + 2 + 12
    assert sum(distributed.zero_bytes_per_parameter("fp32", 1)[3].values()) == 16
    with pytest.raises(ValueError, match="inference policy"):
        distributed.zero_bytes_per_parameter("bf16", 2)


def test_command_line_and_launch_refuse_bad_arguments_before_any_work(capsys):
    with pytest.raises(SystemExit) as exit_:
        distributed.main(["train", "--setting", "fsdp2,bf16-pure"])
    assert exit_.value.code == 2 and "bf16-master" in capsys.readouterr().err
    with pytest.raises(ValueError, match="device must be"):
        distributed.launch("ddp,fp32", device="tpu")
    with pytest.raises(ValueError, match="nproc"):
        distributed.launch("ddp,fp32", nproc=0)
    with pytest.raises(ValueError, match="device must be"):
        distributed.train("single,fp32", device="gpu")
    with pytest.raises(ValueError, match="reduce is for fsdp2 only"):
        distributed.Setting.parse("single,fp32,reduce=bf16")
