"""The GPU benchmark's parts, run on CPU here: `python -m bench.loop --device cuda` is prepared for a GPU host this
machine is not, so what can be checked without one is checked here (its loops run, its FLOP count is right)."""

import pytest

from bench.loop import CNN, MLP, flops_per_sample, hand_epochs, kiln_epochs, synthetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_model_flops_per_sample_are_counted_as_by_hand():
    # MLP 784-256-256-10: forward 2 FLOPs per weight; backward the same for the weights' gradients, and again for
    # the inputs' gradients of every layer but the first (the data needs none).
    mlp = synthetic("mlp", MLP, (784,), 64, 256)
    macs = 784 * 256 + 256 * 256 + 256 * 10
    assert flops_per_sample(mlp, "cpu") == 2 * macs + 2 * macs + 2 * (256 * 256 + 256 * 10)
    assert flops_per_sample(synthetic("cnn", CNN, (3, 32, 32), 64, 256), "cpu") > 30e6


@pytest.mark.parametrize("model, shape", [(MLP, (784,)), (CNN, (3, 32, 32))], ids=["mlp", "cnn"])
def test_gpu_benchmark_loops_run(model, shape):
    problem = synthetic("tiny", model, shape, 64, 512)
    assert problem.x.device.type == "cpu"
    hand = hand_epochs(problem, 2)
    kiln = kiln_epochs(problem, 2, bf16=True)
    assert len(hand) == len(kiln) == 2 and all(s > 0 for s in hand + kiln)
