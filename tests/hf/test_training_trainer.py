"""transformers.Trainer with every pefops method (#16): the base stays frozen, the optimizer holds only the
method's parameters (+ head), checkpoints hold only those (and each method's own format), and
resume_from_checkpoint continues with the losses of an uninterrupted run."""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import pefops.hf as hf  # noqa: E402
from pefops.hf.checkpoint_io import read_safetensors  # noqa: E402
from pefops.hf.mask_tuning import masked_modules  # noqa: E402
from tests.hf.training_models import METHODS, build, dataset, trainable  # noqa: E402

pytestmark = pytest.mark.hf
STEPS = 4


def arguments(output_dir, **changes):
    options = dict(output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
                   save_strategy="steps", save_steps=STEPS // 2, logging_steps=1, report_to="none", use_cpu=True,
                   seed=0, disable_tqdm=True, dataloader_num_workers=0)
    options.update(changes)
    return transformers.TrainingArguments(**options)


def losses(trainer):
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def run(method, output_dir, resume=None):
    model = build(method)
    trainer = hf.PefopsTrainer(model=model, args=arguments(output_dir), train_dataset=dataset(16))
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def frozen(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("method", METHODS)
def test_trainer_trains_saves_and_resumes(method, tmp_path):
    before = build(method)
    model, trainer = run(method, tmp_path / "straight")

    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    for name, value in frozen(before).items():
        assert torch.equal(value, dict(model.named_parameters())[name]), f"frozen {name} changed"
    changed = [n for n, v in trainable(model).items() if not torch.equal(v, dict(before.named_parameters())[n])]
    assert changed, "no trainable parameter moved"

    checkpoint = tmp_path / "straight" / f"checkpoint-{STEPS}"
    weights = read_safetensors(checkpoint / "trainable.safetensors")
    assert set(weights) == set(trainable(model))
    files = {os.path.relpath(os.path.join(root, f), checkpoint) for root, _, names in os.walk(checkpoint)
             for f in names}
    assert not any(name.startswith("model.") for name in files), files  # no copy of the base
    check_export(method, model, checkpoint)

    straight = losses(trainer)
    assert sorted(straight) == list(range(1, STEPS + 1))
    resumed_model, resumed = run(method, tmp_path / "resumed", resume=str(tmp_path / "straight" / "checkpoint-2"))
    for step in range(STEPS // 2 + 1, STEPS + 1):
        assert losses(resumed)[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6), (step, method)
    for name, value in trainable(model).items():
        torch.testing.assert_close(dict(resumed_model.named_parameters())[name].detach(), value, rtol=1e-5, atol=1e-6)


def check_export(method, trained, checkpoint):
    """The checkpoint's copy in the method's own format loads with the method's loader into a fresh model
    and holds the trained values."""
    fresh = build(method)
    parameters = dict(trained.named_parameters())
    if method in ("adapter", "lsh", "mixed"):
        names = ("task",) if method != "mixed" else ("a", "b")
        for name in names:
            hf.remove_adapter(fresh, name)
            hf.load_adapter(fresh, checkpoint / "adapters" / name)
            for key, value in hf.adapter_parameters(fresh, name).items():
                assert torch.equal(value, parameters[key]), key
    elif method == "fusion":
        hf.remove_adapter_fusion(fresh, hf.Fuse("a", "b"))
        hf.load_adapter_fusion(fresh, checkpoint / "fusions" / "a,b")
        for key, value in hf.fusion_parameters(fresh, hf.Fuse("a", "b")).items():
            assert torch.equal(value, parameters[key]), key
    elif method == "masks":
        plain = transformers.BertForSequenceClassification(fresh.config)
        hf.load_masks(plain, str(checkpoint / "masks.safetensors"))
        trained_masks = masked_modules(trained)
        for name, module in masked_modules(plain).items():
            assert torch.equal(module.packed_mask(), trained_masks[name].packed_mask()), name
        assert torch.equal(plain.classifier.weight, trained.classifier.weight)
    elif method in ("side", "ladder"):
        hf.load_side(fresh.tuned, str(checkpoint / "side.safetensors"))
        for key, value in fresh.tuned.side_parameters().items():
            assert torch.equal(value, parameters["tuned." + key]), key
    else:  # prefix, prompt: save_prefix keeps the head too
        hf.load_prefix(fresh, checkpoint / "prefix")
        for key, value in fresh.named_parameters():
            assert torch.equal(value, parameters[key]), key


def test_resume_rejects_a_model_prepared_differently(tmp_path):
    run("adapter", tmp_path / "run")
    other = build("fusion")
    before = {name: p.detach().clone() for name, p in other.named_parameters()}
    with pytest.raises(ValueError, match="trainable.safetensors: unexpected tensor"):
        hf.load_training_checkpoint(other, tmp_path / "run" / "checkpoint-2")
    for name, p in other.named_parameters():
        assert torch.equal(p, before[name]), name


def test_save_refuses_a_model_that_trains_nothing(tmp_path):
    model = build("adapter")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        hf.save_training_checkpoint(model, tmp_path / "empty")
