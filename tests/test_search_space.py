"""search's space: each spec a range or choices of a setting, a grid's points, and a bad spec refused in
one line before anything is written."""

import pytest

from companions.experiments import search_space


@pytest.mark.parametrize(
    "spec, dimension",
    [
        ("lr=log:1e-4..3e-2", search_space.Dimension("lr", 1e-4, 3e-2, log=True)),
        ("dropout=0..0.5", search_space.Dimension("dropout", 0.0, 0.5)),
        ("epochs=1..5", search_space.Dimension("epochs", 1, 5)),
        ("batch-size=32,64,128", search_space.Dimension("batch_size", choices=("32", "64", "128"))),
        ("adam_betas=0.9,0.999|0.7,0.9", search_space.Dimension("adam_betas", choices=("0.9,0.999", "0.7,0.9"))),
        ("widths=6,16,120,84", search_space.Dimension("widths", choices=("6,16,120,84",))),
        ("batch_norm=true,false", search_space.Dimension("batch_norm", choices=("true", "false"))),
        ("depth=0..2", search_space.Dimension("depth", 0, 2)),
    ],
)
def test_a_spec_is_a_range_or_choices_of_a_setting(spec, dimension):
    assert search_space.parse_dimension(spec) == dimension


def test_a_grid_takes_a_ranges_ends_and_middle():
    assert search_space.Dimension("lr", 1e-4, 1e-2, log=True).grid() == pytest.approx([1e-4, 1e-3, 1e-2])
    assert search_space.Dimension("dropout", 0.0, 0.5).grid() == pytest.approx([0.0, 0.25, 0.5])
    assert search_space.Dimension("epochs", 1, 2).grid() == [1, 2]
    assert search_space.Dimension("pool", choices=("avg", "max")).grid() == ["avg", "max"]


@pytest.mark.parametrize(
    "spec, says",
    [
        ("nosuch=1..2", "nosuch is not a setting search can vary"),
        ("seed=0..3", "seed is not a setting search can vary"),
        ("lr", "write a setting and its values"),
        ("lr=3e-2..1e-3", "a range goes from the lower value to the higher"),
        ("lr=log:0..1", "must be a positive number"),
        ("batch_size=0,64", "must be a positive integer"),
        ("pool=avg,min", "pool is one of avg, max, not min"),
        ("widths=1..3", "widths takes no range"),
        ("batch_norm=maybe", "batch_norm is on or off"),
        ("momentum=0..0.9", "--momentum is for --optimizer sgd or rmsprop"),
    ],
)
def test_a_bad_space_is_one_line_naming_it_before_anything_is_written(spec, says, tmp_path, cli):
    result = cli("search", "--space", spec, "--out-dir", tmp_path / "search")
    assert result.code == 2 and not (tmp_path / "search").exists()
    assert len(result.errors()) == 1 and f"--space {spec}" in result.errors()[0] and says in result.errors()[0]
