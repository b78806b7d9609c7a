"""Every command speaks the same command-line dialect: usage `python -m MODULE`, every flag
with its help and default, Beam's pass-through options named in --help of the Beam
commands, and a misspelt flag answered with the flag that was meant."""

import argparse
import importlib

import pytest

BEAM_COMMANDS = [
    "pipelines.build_entity_index", "pipelines.select_candidates", "pipelines.decontaminate", "pipelines.refine",
    "pipelines.ground", "pipelines.build_codes", "pipelines.oven_to_shards", "pipelines.demo",
]
OTHER_COMMANDS = ["pipelines.plan", "pipelines.inspect", "pipelines.card", "trainer.train", "trainer.predict", "trainer.visual_matching",
                  "trainer.score", "trainer.contrastive", "trainer.contrastive_predict"]


@pytest.mark.parametrize("module", BEAM_COMMANDS + OTHER_COMMANDS)
def test_one_usage_style_and_every_flag_has_help(module):
    parser = importlib.import_module(module).build_parser()
    assert parser.prog == f"python -m {module}"
    assert isinstance(parser.formatter_class, type) and issubclass(
        parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter
    )
    missing = [a.option_strings for a in parser._actions if a.help in (None, "") and a.option_strings]
    assert not missing, f"{module}: flags without help: {missing}"
    text = parser.format_help()
    assert text.startswith(f"usage: python -m {module}")
    assert ("--runner" in text and "Beam pipeline options" in text) == (module in BEAM_COMMANDS)


def test_misspelt_flags_are_answered_with_the_flag_meant(capsys):
    from pipelines import build_entity_index, decontaminate, plan
    from trainer import score

    with pytest.raises(SystemExit) as e:
        decontaminate.run(["--input", "x", "--eval_images", "y", "--output", "o", "--treshold", "0.9"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--treshold (did you mean --threshold?) 0.9" in err and "usage: python -m pipelines.decontaminate" in err
    # A misspelt Beam option is matched against Beam's flags too.
    with pytest.raises(SystemExit):
        build_entity_index.run(["--entities", "x", "--output", "o", "--direct_num_worker", "2"])
    assert "--direct_num_worker (did you mean --direct_num_workers?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plan.run(["--entities", "10", "--captions", "10", "--workerz", "3"])
    assert "--workerz (did you mean --workers?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        score.main(["--reference", "r", "--predictions", "p", "--prediction_feild", "x"])
    assert "--prediction_feild (did you mean --prediction_field?)" in capsys.readouterr().err
    # Something that resembles no flag is still named, without a guess.
    with pytest.raises(SystemExit):
        decontaminate.run(["--input", "x", "--eval_images", "y", "--output", "o", "--zzz"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --zzz (neither" in err and "did you mean" not in err
