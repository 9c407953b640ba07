"""`kvloom serve` with several models: flags parsed, impossible combinations refused before anything loads."""
from kvloom.cli import main


def test_several_models_with_instances_is_refused(capsys):
    assert main(["serve", "--model", "a=x", "--model", "b=y", "--instances", "2"]) == 2
    assert "--instances" in capsys.readouterr().err


def test_path_and_named_models_together_are_refused(capsys):
    assert main(["serve", "somepath", "--model", "a=x", "--model", "b=y"]) == 2
    assert "not both" in capsys.readouterr().err


def test_duplicate_names_and_bad_routes_are_refused(capsys):
    assert main(["serve", "--model", "a=x", "--model", "a=y"]) == 2
    assert "different" in capsys.readouterr().err
    assert main(["serve", "--model", "a=x", "--model", "b=y", "--route", "r=greedy"]) == 2
    assert "--route" in capsys.readouterr().err
