"""Arturo in a Hugging Face ``Trainer``, offline: a tiny Llama built from a config, trained a
few steps with a linear warmup and gradient accumulation, checkpointed and resumed."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="the 'hf' extra is not installed")
pytest.importorskip("accelerate", reason="the 'hf' extra is not installed")

from arturo import Arturo  # noqa: E402
from arturo.integrations import stats_for_logging, unwrap_optimizer  # noqa: E402
from arturo.integrations.hf import (  # noqa: E402
    ArturoStatsCallback,
    add_stats_callback,
    trainer_optimizer_kwargs,
)
from arturo.optimizer import DEFAULT_UNITS  # noqa: E402

SEQ, VOCAB, SAMPLES = 8, 100, 24


class TokenData(torch.utils.data.Dataset):
    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=gen)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        max_position_embeddings=SEQ,
    )
    return transformers.LlamaForCausalLM(config)


def make_trainer(output_dir, max_steps: int = 6, **optimizer_kwargs) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        lr_scheduler_type="linear",
        warmup_steps=2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=3,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    model = tiny_llama()
    # Relative units: the Trainer's two groups, each with ε per coordinate.
    kwargs = optimizer_kwargs or {"lr": 1e-4, "units": "relative"}
    return transformers.Trainer(
        model=model,
        args=args,
        train_dataset=TokenData(),
        **trainer_optimizer_kwargs(model, **kwargs),
    )


def _assert_same_optimizer_state(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    for key, entry in a["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, b["state"][key][name]), (key, name)
    for ga, gb in zip(a["param_groups"], b["param_groups"], strict=True):
        assert ga.keys() == gb.keys()
        for name, value in ga.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, gb[name]), name
            else:
                assert value == gb[name], name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One 6-step run (checkpoint at step 3), shared by the tests that only read it."""
    trainer = make_trainer(tmp_path_factory.mktemp("hf_run"))
    add_stats_callback(trainer)
    trainer.train()
    return trainer


def test_trainer_uses_arturo_with_two_groups_and_warmup(uninterrupted):
    opt = unwrap_optimizer(uninterrupted)
    assert type(opt) is Arturo
    assert uninterrupted.optimizer is not opt  # Accelerate's wrapper, which has no stats()
    assert unwrap_optimizer(uninterrupted.optimizer) is opt
    # The Trainer's split: weights decayed with TrainingArguments.weight_decay, the rest not.
    assert len(opt.param_groups) == 2
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]
    assert uninterrupted.state.global_step == 6
    # Linear warmup then decay to 0: after the last scheduler step ε is 0 again.
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    # Relative units: at one ε the two groups' bounds add up to one group's over all
    # parameters, so the split does not enlarge the budget (read on a copy: the fixture is
    # shared).
    copy = Arturo(
        [{"params": g["params"], "units": "relative", "lr": 1e-4} for g in opt.param_groups]
    )
    d = sum(p.numel() for p in uninterrupted.model.parameters())
    assert sum(s["kl_bound"] for s in copy.stats()) == pytest.approx(1e-4 * d)


def test_callback_logs_stats_at_each_logging_step(uninterrupted):
    train_logs = [e for e in uninterrupted.state.log_history if "loss" in e]
    assert [e["step"] for e in train_logs] == [1, 2, 3, 4, 5, 6]
    for entry in train_logs:
        for group in (0, 1):
            for name in ("eta", "kl", "kl_bound", "skipped_steps"):
                assert f"arturo/group{group}/{name}" in entry, (entry, name)
    first = train_logs[0]
    # The warmup's first step has ε = 0: no move, no KL, nothing skipped.
    assert first["arturo/group0/kl"] == 0.0 and first["arturo/group0/skipped_steps"] == 0
    later = train_logs[2]
    assert 0.0 < later["arturo/group0/kl"] <= 1.0001 * train_logs[1]["arturo/group0/kl_bound"]
    assert all(e["arturo/group0/skipped_steps"] == 0 for e in train_logs)


def test_resume_from_checkpoint_matches_uninterrupted_run(uninterrupted, tmp_path):
    checkpoint = os.path.join(uninterrupted.args.output_dir, "checkpoint-3")
    assert os.path.isfile(os.path.join(checkpoint, "optimizer.pt"))
    resumed = make_trainer(tmp_path)
    resumed.add_callback(ArturoStatsCallback())
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.state.global_step == 6
    _assert_same_optimizer_state(
        unwrap_optimizer(uninterrupted).state_dict(), unwrap_optimizer(resumed).state_dict()
    )
    for (name, p), q in zip(
        uninterrupted.model.named_parameters(), resumed.model.parameters(), strict=True
    ):
        assert torch.equal(p, q), name
    # The callback added with add_callback (after the reporters) still fills log_history.
    assert "arturo/group0/kl" in [e for e in resumed.state.log_history if "loss" in e][-1]


def test_the_default_form_follows_the_units():
    """In absolute units each group would get the whole ε, so the default is one group; in
    relative units the Trainer's split keeps the total bound."""
    model = tiny_llama()
    absolute = trainer_optimizer_kwargs(model, lr=0.02, units="absolute")
    (opt, _) = absolute["optimizers"]
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["units"] == "absolute"
    relative = trainer_optimizer_kwargs(model, lr=1e-4, units="relative")
    assert relative == {"optimizer_cls_and_kwargs": (Arturo, {"lr": 1e-4, "units": "relative"})}
    # Without units, the form follows the optimizer's default units.
    default = trainer_optimizer_kwargs(model, lr=1e-4)
    assert ("optimizers" in default) == (DEFAULT_UNITS == "absolute")
    split = trainer_optimizer_kwargs(model, one_group=False, lr=0.02)
    assert "optimizer_cls_and_kwargs" in split


def test_one_group_form_builds_the_optimizer(tmp_path):
    model = tiny_llama()
    kwargs = trainer_optimizer_kwargs(model, one_group=True, lr=0.02, units="relative")
    opt, scheduler = kwargs["optimizers"]
    assert scheduler is None and len(opt.param_groups) == 1
    assert sum(p.numel() for p in opt.param_groups[0]["params"]) == sum(
        p.numel() for p in model.parameters()
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
        use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(), **kwargs)
    add_stats_callback(trainer)
    trainer.train()
    first, last = [e for e in trainer.state.log_history if "loss" in e]
    assert first["arturo/kl"] > 0.0  # no warmup here
    # After the first of two steps the linear schedule has moved ε from 0.02 to 0.01; the
    # bound is ε times the group's size in relative units. (The Trainer's own
    # "learning_rate" entry reads the schedule before or after that move, by version.)
    d = sum(p.numel() for p in model.parameters())
    assert first["arturo/kl_bound"] == pytest.approx(0.01 * d)
    # The linear schedule has decayed ε to 0 after the last step.
    assert last["arturo/kl_bound"] == stats_for_logging(trainer.optimizer)["arturo/kl_bound"] == 0
