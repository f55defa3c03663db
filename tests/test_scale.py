"""Long data commands show progress (and --quiet silences it); benchmarks/scale.py's generators
write the real formats."""

from ban.cli import main


def test_synth_shows_progress_unless_quiet(tmp_path, capsys):
    argv = ["data", "synth", "--train-images", "3", "--val-images", "2", "--test-images", "1"]
    argv += ["--no-images", "--workers", "1", "--feature-dim", "8"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "scenes: 100%" in err and "6/6" in err
    assert main([*argv, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert "scenes" not in capsys.readouterr().err
