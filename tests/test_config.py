"""Config composition, overrides and the error messages for unknown keys and wrong types."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from lightning_gen.config import ConfigError, compose


def test_default_composes_the_embedded_experiment():
    cfg = compose([])
    assert cfg.experiment == "ae_digits"
    assert cfg.method.name == "autoencoder" and cfg.data.name == "digits"
    assert (
        cfg.trainer.max_epochs == 15
    )  # set by conf/experiment/ae_digits.yaml over conf/trainer/default.yaml


def test_group_selection_and_dotted_overrides_compose_in_order():
    cfg = compose(["experiment=ae_digits", "data=cifar10", "method.lr=0.1", "trainer.max_epochs=5", "seed=3"])
    assert cfg.data.name == "cifar10"  # command-line group choice beats the experiment's
    assert cfg.data.batch_size == 256  # ...and its file was loaded
    assert cfg.method.lr == 0.1 and cfg.trainer.max_epochs == 5 and cfg.seed == 3
    assert isinstance(cfg.method.lr, float)


def test_method_option_file_and_types():
    cfg = compose(["method=denoising_autoencoder", "method.latent_dim=8", "trainer.devices=2"])
    assert cfg.method.noise_std == 0.3 and cfg.method.latent_dim == 8 and cfg.trainer.devices == 2
    assert OmegaConf.get_type(cfg.method).__name__ == "AutoencoderConfig"


def test_choosing_a_method_without_an_experiment_drops_the_default_experiment():
    # `lgen train` alone is the embedded default (ae_digits); `lgen train method=...` is that method
    # with its own defaults, not the autoencoder experiment's overrides applied to it.
    plain = compose(["method=denoising_autoencoder"])
    assert plain.experiment == "denoising_autoencoder_digits"
    assert "linear_probe" not in plain.callbacks  # ae_digits.yaml adds the evaluation callbacks
    assert "linear_probe" in compose([]).callbacks
    kept = compose(["experiment=ae_digits", "method=denoising_autoencoder"])
    assert kept.experiment == "ae_digits" and "linear_probe" in kept.callbacks


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "method.lrr=0.1",
            ["unknown config key method.lrr", "did you mean 'lr'", "Valid keys here:", "latent_dim"],
        ),
        ("trainer.precison=32-true", ["trainer.precison", "did you mean 'precision'"]),
        ("logger.wandb.projct=x", ["logger.wandb.projct", "did you mean 'project'"]),
        ("lr=0.1", ["unknown config key lr (at the top level)", "did you mean 'method.lr'"]),
        ("data.batchsize=4", ["data.batchsize", "did you mean 'batch_size'"]),
    ],
)
def test_unknown_key_names_full_path_valid_keys_and_suggestion(override, expected):
    with pytest.raises(ConfigError) as error:
        compose([override])
    for text in expected:
        assert text in str(error.value)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("method.lr=abc", "wrong type for method.lr: expected float, got 'abc' (str)"),
        ("trainer.max_epochs=1.5", "wrong type for trainer.max_epochs: expected int, got 1.5 (float)"),
        ("data.download=maybe", "wrong type for data.download: expected bool"),
    ],
)
def test_wrong_type_names_key_and_expected_type(override, expected):
    with pytest.raises(ConfigError) as error:
        compose([override])
    assert expected in str(error.value)


def test_enumerated_value_and_unknown_option_errors():
    with pytest.raises(
        ConfigError, match=r"invalid value 'adamm' for method.optimizer \(did you mean 'adam'\?\)"
    ):
        compose(["method.optimizer=adamm"])
    with pytest.raises(ConfigError, match=r"unknown data option 'cifar' \(did you mean 'cifar10'\?\)"):
        compose(["data=cifar"])
    with pytest.raises(ConfigError, match="unknown experiment option 'nope'"):
        compose(["experiment=nope"])
    with pytest.raises(ConfigError, match=r"unknown callback callbacks.imagez \(did you mean 'images'\?\)"):
        compose(["callbacks.imagez.enabled=true"])
    with pytest.raises(ConfigError, match="overrides look like group=option"):
        compose(["justaword"])


def test_print_config_and_list_from_the_cli(lgen):
    printed = lgen("train", "experiment=ae_digits", "method.latent_dim=7", "--print-config").stdout
    cfg = OmegaConf.create(printed)
    assert cfg.method.latent_dim == 7 and cfg.data.name == "digits"
    assert not (lgen.cwd / "runs").exists()  # printing trains nothing
    listing = lgen("list").stdout
    for line in ("autoencoder", "digits", "cifar10", "stl10", "svhn", "folder", "ae_digits"):
        assert line in listing
    bad = lgen("train", "method.lrr=1", check=False)
    assert bad.returncode == 2 and "did you mean 'lr'" in bad.stderr and "Traceback" not in bad.stderr


def test_list_descriptions_are_whole(capsys):
    from lightning_gen.cli import main

    described = []
    for what in ("methods", "data", "experiments", "callbacks"):
        assert main(["list", what]) == 0
        described += [
            line.split(None, 1) for line in capsys.readouterr().out.splitlines() if line.startswith("  ")
        ]
    assert len(described) > 60 and ["cpc_digits"] in [d[:1] for d in described]
    for name, text in described:
        # A description cut at the end of its first line stops mid-sentence ("of the", "wd 0.1,").
        assert text.endswith("."), f"{name}: {text!r} is cut"
