from fake_quant import selfcheck


def test_selfcheck_runs_and_shows_the_expected_orderings(capsys):
    rows = {r["setting"]: r for r in selfcheck.main(["--dim", "96", "--hidden", "160", "--tokens", "512"])}
    out = capsys.readouterr().out
    assert "| W4 GPTQ |" in out
    assert rows["W4 GPTQ"]["group0"] < rows["W4 RTN"]["group0"]
    one = rows["W4A8 GPTQ, static per-tensor, one scale"]
    per_group = rows["W4A8 GPTQ, static per-tensor, a scale per row group"]
    # a scale per row group rescues the narrow rows that one shared static scale crushes
    assert per_group["group1"] < one["group1"] / 3
