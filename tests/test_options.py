"""A training option is one declaration (config.option metadata on a TrainConfig field): the CLI flag, the Train
form, /start_training and the docs table all come from it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, raw_call, serving, stop_all_jobs

from carapp import cli, config
from carapp.config import _field
from carapp.ui import jobs, train_tab


@dataclass
class WithMixup(config.TrainConfig):
    mixup: float = _field(0.0, "mixup strength (a new option, declared once)", form="advanced", label="Mixup",
                          info="0: off")


@pytest.fixture
def mixup_option(monkeypatch):
    monkeypatch.setattr(config, "TrainConfig", WithMixup)


def test_a_new_option_is_in_train_help_and_the_config(mixup_option, demo_root, tmp_path):
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--mixup" in help_text and "mixup strength" in help_text and "(default 0)" in help_text
    args = cli.build_parser().parse_args(["train", "--data", str(demo_root), "--run-dir", "x", "--mixup", "0.3"])
    cfg = cli.config_from_args(args)
    assert cfg.mixup == 0.3 and cfg.to_dict()["mixup"] == 0.3  # what config.json is written from
    assert cli.config_from_args(cli.build_parser().parse_args(["train", "--preset", "demo"])).mixup == 0.0
    assert "`--mixup`" in config.options_table() and "advanced: Mixup" in config.options_table()


@pytest.mark.slow
def test_a_new_option_is_in_the_train_form_and_start_training(mixup_option, demo_root, tiny_run, tmp_path):
    assert "mixup" in [f.name for f in train_tab.form_rows()[1]]  # in the Advanced accordion, with its values
    with serving(demo_root, tiny_run, tmp_path) as url:
        import urllib.request
        with urllib.request.urlopen(f"{url}config", timeout=30) as r:
            labels = [c.get("props", {}).get("label") for c in json.loads(r.read())["components"]]
        assert "Mixup" in labels
        ok, message = raw_call(url, "/start_training", [str(demo_root), "demo", {"mixup": 0.4, "epochs": 1,
                                                                              "image_size": 32, "workers": 0}])
        assert ok and message[0].startswith("Started"), message
        run = next(p for p in tmp_path.iterdir() if p.name.startswith("demo-"))
        handed_over = json.loads((run / jobs.REQUESTED_CONFIG).read_text())  # the trainer gets every field
        assert handed_over["mixup"] == 0.4 and handed_over["epochs"] == 1
        ok, message = raw_call(url, "/start_training", [str(demo_root), "demo", {"mixup": 0.4, "no_such": 1}])
        assert not ok and "unknown training option" in message and "'no_such'" in message
        stop_all_jobs(tmp_path)


def test_the_docs_table_is_the_declaration():
    table = (ROOT / "docs" / "TRAINING_OPTIONS.md").read_text()
    assert config.options_table() in table, "regenerate: python -c 'from carapp.config import options_table; " \
        "print(options_table())' into docs/TRAINING_OPTIONS.md"
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert all(config.option_flag(f) in help_text for f in config.train_options())
    assert "label-smoothing" not in Path(cli.__file__).read_text()  # no option is written out by hand there
