"""Local training and evaluation functions (no Flower)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score
from torch import nn

from fedtune.data.encode import DenseFeatures
from fedtune.data.loaders import eval_loader, train_loader
from fedtune.models.mlp import MLP
from fedtune.train import TrainSettings, evaluate, macro_f1, train_local

CPU = torch.device("cpu")


def _separable(n=400, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    return DenseFeatures(x), y


def test_training_lowers_the_loss_and_counts_steps():
    encoded, y = _separable()
    torch.manual_seed(0)
    model = MLP(6, [16], 2)
    rows = np.arange(300)
    before = evaluate(model, eval_loader(encoded, y, rows, 64), CPU)
    result = train_local(model, train_loader(encoded, y, rows, 32, seed=0),
                         TrainSettings(optimizer="sgd", lr=0.5, local_epochs=3), CPU)
    after = evaluate(model, eval_loader(encoded, y, rows, 64), CPU)
    assert result.num_steps == 3 * 10 and result.num_examples == 900
    assert after.loss < before.loss * 0.5
    assert after.accuracy > 0.9


def test_an_empty_batch_steps_but_leaves_the_mean_loss_of_the_examples_seen():
    """DP-SGD's Poisson sampling can draw no example for a step (Opacus then steps on noise
    alone): the reported loss is the mean over the examples seen, not NaN."""
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 1, 0])
    empty = ({"features": x[:0]}, y[:0])
    torch.manual_seed(0)
    model = MLP(6, [5], 2)
    alone = train_local(model, [({"features": x}, y)], TrainSettings(optimizer="sgd", lr=0.0),
                        CPU)
    result = train_local(model, [empty, ({"features": x}, y), empty],
                         TrainSettings(optimizer="sgd", lr=0.0), CPU)
    assert result.num_steps == 3 and result.num_examples == 4
    assert result.loss == pytest.approx(alone.loss)


def test_local_steps_cycle_through_the_loader():
    encoded, y = _separable(50)
    result = train_local(MLP(6, [4], 2), train_loader(encoded, y, np.arange(50), 16, seed=0),
                         TrainSettings(local_steps=7), CPU)
    assert result.num_steps == 7


class FixedPredictor(nn.Module):
    """Predicts the label stored in feature 0."""

    def forward(self, features):
        return nn.functional.one_hot(features[:, 0].long(), 3).float() * 10


def test_evaluate_reports_accuracy_macro_f1_and_per_class_report():
    predicted = np.array([0, 0, 1, 1, 2, 2, 2, 0], dtype=np.float32)
    truth = np.array([0, 0, 1, 2, 2, 2, 2, 1])
    encoded = DenseFeatures(predicted.reshape(-1, 1))
    result = evaluate(FixedPredictor(), eval_loader(encoded, truth, np.arange(8), 3), CPU,
                      ("a", "b", "c"))
    assert result.accuracy == pytest.approx(6 / 8)
    # per class F1: a: p=2/3 r=1 -> .8 ; b: p=1/2 r=1/2 -> .5 ; c: p=1 r=3/4 -> 6/7
    assert result.macro_f1 == pytest.approx((0.8 + 0.5 + 6 / 7) / 3)
    assert result.report["c"]["recall"] == pytest.approx(0.75)
    assert result.num_examples == 8


def test_train_order_depends_only_on_seed():
    encoded, y = _separable(64)
    rows = np.arange(64)

    def first_batch(seed):
        inputs, _ = next(iter(train_loader(encoded, y, rows, 8, seed)))
        return inputs["features"]

    assert torch.equal(first_batch(5), first_batch(5))
    assert not torch.equal(first_batch(5), first_batch(6))


def test_bf16_autocast_trains_and_keeps_fp32_weights():
    encoded, y = _separable()
    rows = np.arange(300)
    torch.manual_seed(0)
    model = MLP(6, [16], 2)
    before = evaluate(model, eval_loader(encoded, y, rows, 64), CPU)
    dtypes = set()
    model.body[0].register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    train_local(model, train_loader(encoded, y, rows, 32, seed=0),
                TrainSettings(optimizer="sgd", lr=0.5, local_epochs=3, precision="bf16"), CPU)
    assert dtypes == {torch.bfloat16}  # the forward pass ran under autocast
    after = evaluate(model, eval_loader(encoded, y, rows, 64), CPU)
    assert after.loss < before.loss * 0.5 and after.accuracy > 0.9
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fp16_needs_cuda():
    from fedtune.config import ConfigError
    from fedtune.task import check_precision

    with pytest.raises(ConfigError, match="client.precision = 'fp16' is not allowed on cpu"):
        check_precision("fp16", CPU)
    check_precision("bf16", CPU)


def test_a_reset_optimizer_trains_exactly_as_a_fresh_one_and_adam_is_fused_on_cpu():
    """One optimizer serves client after client: zeroing its state gives the same steps, to the
    bit, as the fresh optimizer each client used to build."""
    from fedtune.train import make_optimizer, reset_optimizer

    torch.manual_seed(0)
    model = MLP(6, [5], 3)
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 1])
    settings = TrainSettings(optimizer="adamw", lr=0.05, local_steps=3)
    reused = make_optimizer(list(model.parameters()), settings)
    assert reused.defaults["fused"] is True
    start = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    for optimizer in (reused, None, reused):  # reused (fresh state), fresh, reused again
        model.load_state_dict(start)
        if optimizer is not None:
            reset_optimizer(optimizer)
        train_local(model, [({"features": x}, y)] * 3, settings, torch.device("cpu"),
                    optimizer=optimizer)
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(results[0][k], results[1][k]) for k in start)
    assert all(torch.equal(results[0][k], results[2][k]) for k in start)
    assert not torch.equal(results[0]["classifier.weight"], start["classifier.weight"])


@pytest.mark.parametrize("classes", [2, 5])
def test_macro_f1_equals_scikit_learns_bit_for_bit(classes: int) -> None:
    """The hand-written macro-F1 against ``f1_score(average="macro", zero_division=0)``:
    labels missing from the truth or the predictions, one example, one class everywhere."""
    rng = np.random.default_rng(classes)
    cases = [(np.array([1]), np.array([0])), (np.array([3, 3]), np.array([3, 3]))]
    for size in rng.integers(1, 60, size=200):
        truth = rng.integers(0, classes, size=size)
        predicted = rng.integers(0, classes, size=size)
        predicted[rng.random(size) < 0.5] = 0  # a skewed model: labels one side lacks
        cases.append((truth, predicted))
    for truth, predicted in cases:
        assert macro_f1(truth, predicted) == f1_score(truth, predicted, average="macro",
                                                      zero_division=0)
