"""Every config composes, every node with a _target_ instantiates, bad values stop early."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lmlab.config import check_train_config, instantiate_each
from lmlab.errors import UserError
from lmlab.lit_module import LanguageModel
from lmlab.models import PRESETS, preset
from lmlab.precision import choose_precision

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_train(overrides: list[str], tmp_path: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        # outside @hydra.main there is no run folder: name one
        return compose("train", overrides=[*overrides, f"paths.output_dir={tmp_path}"])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment, tmp_path, corpus_dir):
    cfg = compose_train([f"experiment={experiment}", f"data.data_dir={corpus_dir}"], tmp_path)
    check_train_config(cfg)
    model_config = instantiate(cfg.model, vocab_size=100)
    module = LanguageModel(
        model_config, ["<eos>", "<unk>"], instantiate(cfg.optimizer), instantiate(cfg.scheduler)
    )
    assert module.model.config.block_size == cfg.data.seq_len
    datamodule = instantiate(cfg.data)
    assert datamodule.seq_len == cfg.data.seq_len
    precision = choose_precision(
        cfg.trainer.precision, cfg.trainer.accelerator, model_config.n_embd, tmp_path / "cache"
    )
    trainer = instantiate(
        cfg.trainer,
        precision=precision.precision,
        callbacks=instantiate_each(cfg, "callbacks"),
        logger=instantiate_each(cfg, "logger"),
    )
    assert trainer.max_epochs == cfg.trainer.max_epochs
    assert Path(trainer.checkpoint_callback.dirpath) == tmp_path / "checkpoints"


@pytest.mark.parametrize(
    "group, options",
    [
        ("model", sorted(PRESETS)),  # gpt, llama and lstm sizes: every conf/model file
        ("optimizer", ["adamw", "sgd", "adafactor"]),
        ("scheduler", ["cosine", "constant"]),
        ("trainer", ["default", "cpu", "gpu"]),
        ("logger", ["tensorboard", "csv", "none"]),
        ("averaging", ["ema", "swa"]),
    ],
)
def test_every_group_option_composes(group, options, tmp_path):
    for option in options:
        cfg = compose_train([f"{group}={option}"], tmp_path)
        check_train_config(cfg)
        if group == "model":  # and the network of each family builds from it
            words = ["<eos>", "<unk>", "a", "b"]
            LanguageModel(instantiate(cfg.model, vocab_size=4), words, instantiate(cfg.optimizer))


def test_the_adafactor_recipe_is_ptb_5min_with_adafactor_at_its_own_step_cap(tmp_path, corpus_dir):
    recipe, base = (
        compose_train([f"experiment={name}", f"data.data_dir={corpus_dir}"], tmp_path)
        for name in ("ptb_5min_adafactor", "ptb_5min")
    )
    assert recipe.optimizer._target_ == "torch.optim.Adafactor"
    assert (recipe.optimizer.lr, recipe.optimizer.weight_decay) == (0.1, 0.0)  # not AdamW's
    for group in ("model", "data", "scheduler", "trainer", "callbacks", "seed"):
        assert recipe[group] == base[group], group


def test_adafactors_pair_of_epsilons_is_accepted(tmp_path):
    cfg = compose_train(["optimizer=adafactor", "+optimizer.eps=[null,0.001]"], tmp_path)
    check_train_config(cfg)
    optimizer = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(2, 2))])
    assert optimizer.defaults["eps"] == [None, 0.001]


def test_logger_none_gives_no_logger(tmp_path):
    assert instantiate_each(compose_train(["logger=none"], tmp_path), "logger") == []


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=abc", "optimizer.lr must be a number, got 'abc'"),
        ("optimizer.lr=-1", "optimizer.lr must be > 0"),
        ("model.dropout=1.5", r"model.dropout must be in \[0, 1\), got 1.5"),
        ("model.attn_dropout=-0.1", r"model.attn_dropout must be in \[0, 1\) or null, got -0.1"),
        ("model.n_head=3", "must be divisible by model.n_head"),
        ("data.seq_len=0", "data.seq_len must be a positive integer, got 0"),
        ("data.batch_size=abc", "data.batch_size must be a positive integer, got 'abc'"),
        ("trainer.devices=0", "trainer.devices must be a positive integer"),
        ("trainer.max_epochs=0", "trainer.max_epochs must be a positive integer"),
        ("scheduler.warmup_steps=-5", "scheduler.warmup_steps must be a non-negative integer"),
        (
            "callbacks.budget.seconds=soon",
            "callbacks.budget.seconds must be a positive number of seconds or null, got 'soon'",
        ),
        ("trainer.precision=fast", "trainer.precision must be one of auto, 64-true"),
        ("compile=maybe", "compile must be true, false or auto, got 'maybe'"),
    ],
)
def test_out_of_range_values_are_refused_with_one_line(override, message, tmp_path):
    cfg = compose_train([override], tmp_path)
    with pytest.raises(UserError, match=message) as error:
        check_train_config(cfg)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_config_files_equal_the_presets_the_benchmarks_use(name, tmp_path):
    cfg = compose_train([f"model={name}"], tmp_path)
    from_file = instantiate(cfg.model, vocab_size=100, block_size=64)
    assert from_file == preset(name, vocab_size=100, block_size=64)


def test_every_model_file_is_a_preset():
    names = {p.stem for p in (CONF / "model").glob("*.yaml")}
    assert names == set(PRESETS)


def test_data_text_without_its_three_files_is_refused_with_the_keys_to_give(tmp_path):
    cfg = compose_train(["data=text", "data.files.train=a.txt", "data.files.test=c.txt"], tmp_path)
    with pytest.raises(UserError, match=r"^data.files.valid is not set: data=text reads three"):
        check_train_config(cfg)
