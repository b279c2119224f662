"""`flowtrain check` must catch everything the configuration alone can show (issue 11, case 5): an unknown
`model.family` passed `check` and was only refused by `train`. The `model:` section is now validated against the
named family's options, so `check` refuses it, naming the families there are."""

from __future__ import annotations

from flowtrain.cli import main


def test_check_refuses_an_unknown_model_family(tmp_path, capsys, tiny_pipeline_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  family: nope\n  pretrained: {tiny_pipeline_dir}\n")
    assert main(["check", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "model.family" in err and "nope" in err and "flux2_klein" in err and "Traceback" not in err
